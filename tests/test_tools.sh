#!/usr/bin/env bash
# test_tools.sh — script-level tests of the command-line tools, run once by
# `make test` (tests/run-tests, under a time limit).  Each check prints
# "ok - what" or "not ok - what" and the script exits 1 if any failed.
#
#   shmstat   -c CONFIG takes shm_name from the broker's config; with neither
#             -s nor -c it uses the only poolbroker segment in /dev/shm and
#             lists them when there are several (in a private mount namespace
#             with its own /dev/shm, so other tests' segments do not count;
#             skipped when not root or without unshare).
#
# Environment: PB_SRCDIR (repo root; default: cwd), PB_BUILD (the build
# directory under test; default: build), PB_KEEP_TMP (keep the temp dir).
set -uo pipefail
src=${PB_SRCDIR:-$PWD}
build=${PB_BUILD:-$src/build}
[[ "$build" = /* ]] || build=$src/$build
tmp=$(mktemp -d /tmp/pbtools.XXXXXX) || { echo "not ok - mktemp"; exit 1; }
failed=0
ok() { echo "ok - $*"; }
bad() { echo "not ok - $*"; failed=$((failed + 1)); }
check() {   # check DESCRIPTION COMMAND...: ok when COMMAND succeeds
    local what=$1; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}
cleanup() {
    if [[ -n "${PB_KEEP_TMP:-}" ]]; then echo "# kept $tmp"; else rm -rf -- "$tmp"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ shmstat
shmstat=$build/shmstat
fixture=$build/tests/shmstat_fixture
if (( EUID != 0 )) || ! unshare -m true 2>/dev/null; then
    echo "# skipped shmstat discovery: needs root and unshare -m"
else
    cat > "$tmp/two.conf" <<'CONF'
[broker]
socket = /tmp/x.sock   ; a comment
shm_name = /pbx-two ; the one to show
[pool main]
type = postgres
conninfo = dbname=x
CONF
    printf '[broker]\nshm_name = "/pbx-one"\n[pool a]\ntype = redis\n' > "$tmp/quoted.conf"
    printf '[pool a]\ntype = redis\n' > "$tmp/default.conf"
    printf '[broker]\nsocket = /tmp/y\nshm_name = pbx-two\n' > "$tmp/bad.conf"
    # Everything below runs with a /dev/shm of its own.
    unshare -m --propagation private bash -s -- "$shmstat" "$fixture" "$tmp" > "$tmp/shm.out" 2>&1 <<'INNER'
shmstat=$1 fixture=$2 tmp=$3
mount -t tmpfs pbtools /dev/shm || { echo "not ok - mount a private /dev/shm"; exit 0; }
t() {   # t DESCRIPTION EXPECTED_STATUS GREP_PATTERN ARGS...
    local what=$1 want=$2 pat=$3; shift 3
    "$shmstat" "$@" > "$tmp/o" 2>&1
    local st=$?
    if [[ $st == "$want" ]] && grep -qE -- "$pat" "$tmp/o"; then echo "ok - shmstat $what"
    else echo "not ok - shmstat $what (exit $st, want $want, /$pat/):"; sed 's/^/#   /' "$tmp/o"; fi
}
t "with no segment names the default" 2 "/poolbroker"
t "-l with no segment" 0 "no poolbroker segment" -l
"$fixture" /pbx-one good || echo "not ok - fixture"
head -c 8192 /dev/urandom > /dev/shm/not-ours
t "uses the only poolbroker segment" 0 "^segment /pbx-one: broker pid"
"$fixture" /pbx-two good || echo "not ok - fixture"
t "with two segments lists them and exits 1" 1 "2 poolbroker segments"
grep -q "/pbx-one" "$tmp/o" && grep -q "/pbx-two" "$tmp/o" && ! grep -q "not-ours" "$tmp/o" &&
    echo "ok - shmstat lists both, not the other file" || echo "not ok - shmstat list content"
t "-l lists both" 0 "/pbx-two +broker pid" -l
t "-c reads shm_name (comments)" 0 "^segment /pbx-two:" -c "$tmp/two.conf"
t "-c reads a quoted shm_name" 0 "^segment /pbx-one:" -c "$tmp/quoted.conf"
t "-c without shm_name is the broker's default" 2 "/poolbroker" -c "$tmp/default.conf"
t "-c with a bad shm_name names file, line, key" 1 "bad.conf:3: key 'shm_name'" -c "$tmp/bad.conf"
t "-c with a missing file" 1 "nope.conf: cannot open" -c "$tmp/nope.conf"
t "-s and -c together" 1 "exclude each other" -s /pbx-one -c "$tmp/two.conf"
t "-s still wins" 0 "^segment /pbx-one:" -s /pbx-one
POOLBROKER_SHM=/pbx-two t "\$POOLBROKER_SHM before discovery" 0 "^segment /pbx-two:"
INNER
    cat "$tmp/shm.out"
    failed=$(( failed + $(grep -c '^not ok' "$tmp/shm.out") ))
fi

echo
if (( failed )); then echo "test_tools: $failed failed"; exit 1; fi
echo "test_tools: all passed"
