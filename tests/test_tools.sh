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
#   pg-stop, redis-stop given a relative directory stop the server there
#             (#19: pg-stop did nothing and exited 0).
#   make run  from a clone in a directory the postgres user cannot traverse
#             (a mktemp -d, mode 0700): starts, keeps the servers' data and
#             sockets outside the clone, serves /health and /metrics, prints
#             no shell error, and `kill -INT` of make's pid stops the broker
#             and both servers; a server that fails to start gives one line,
#             no shell error.
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
t "shows a transaction-mode pool's line" 0 \
    "cache transaction mode: 1 handle in use, 2 backends \\(1 bound, 1 idle\\), 2 statements queued" -s /pbx-one
t "shows its backends" 0 "^cache +0 bound +4 +\\? +77 .* 417  127\\.0\\.0\\.1:6379" -s /pbx-one
t "--json has them" 0 '"backends": \[\{"pool": "cache", "number": 0, "state": "bound", "handle": 4, "worker_pid": null, "backend_pid": 77,' -s /pbx-one --json
t "--prometheus has them" 0 '^poolbroker_pool_backends\{pool="cache",state="idle"\} 1$' -s /pbx-one --prometheus
for seed in 1 2 3 4 5 6 7 8; do
    "$fixture" /pbx-one garbage $seed || echo "not ok - fixture"
    for f in "" --json --prometheus; do t "garbage backend rows (seed $seed${f:+, $f})" 0 "" -s /pbx-one $f; done
done
INNER
    cat "$tmp/shm.out"
    failed=$(( failed + $(grep -c '^not ok' "$tmp/shm.out") ))
fi

# ------------------------------------------------------- pg-stop, redis-stop
srv=$tmp/srv
chmod 755 "$tmp"                    # pg-start as root: `postgres` must reach it
if pgout=$(bash "$src/tools/pg-start" "$srv" 2>"$tmp/pg-start.err") &&
   rdout=$(bash "$src/tools/redis-start" "$srv" 2>"$tmp/redis-start.err"); then
    pgport=$(sed -n 's/^PGPORT=//p' <<<"$pgout")
    rport=$(sed -n 's/^REDIS_PORT=//p' <<<"$rdout")
    up() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    check "pg-start and redis-start listen" up "$pgport"
    (cd "$tmp" && bash "$src/tools/pg-stop" srv)
    check "pg-stop with a relative directory exits 0" test $? = 0
    check "pg-stop with a relative directory stops the server" bash -c "! (: </dev/tcp/127.0.0.1/$pgport) 2>/dev/null"
    (cd "$tmp" && bash "$src/tools/redis-stop" srv)
    check "redis-stop with a relative directory exits 0" test $? = 0
    sleep 0.2
    check "redis-stop with a relative directory stops the server" bash -c "! (: </dev/tcp/127.0.0.1/$rport) 2>/dev/null"
    (cd "$tmp" && bash "$src/tools/pg-stop" srv && bash "$src/tools/redis-stop" srv)
    check "stopping again is harmless" test $? = 0
    check "pg-stop of a directory that does not exist exits 0" bash "$src/tools/pg-stop" "$tmp/nothing-here"
else
    bad "pg-start/redis-start for the stop tests:"; cat "$tmp"/*-start.err
fi
bash "$src/tools/pg-stop" "$srv" >/dev/null 2>&1
bash "$src/tools/redis-stop" "$srv" >/dev/null 2>&1

# ------------------------------------------------------------------ make run
# A clone (sources with their times, so the build under test stays up to
# date) in a directory only we may enter.
unset MAKEFLAGS MFLAGS MAKELEVEL
cparent=$(mktemp -d /tmp/pbclone.XXXXXX)
chmod 700 "$cparent"
clone=$cparent/poolbroker
mkdir "$clone"
tar -C "$src" --exclude='./build*' --exclude=./.git --exclude=./.run -cf - . | tar -C "$clone" -xpf -
shell_errors() {    # a bash error message in the file?
    grep -E 'unbound variable|line [0-9]+: |command not found|syntax error|No such file or directory$' "$1"
}

# A server that cannot start: one line of ours, no shell error.
(cd "$clone" && PG_BINDIR=/nonexistent POOLBROKER_RUN_DIR=$tmp/failrun bash tools/run-local "$build") \
    > "$tmp/fail.out" 2>&1
st=$?
check "make run with a failing PostgreSQL exits 1" test $st = 1
check "... and says so in one line" grep -q "^make run: PostgreSQL did not start" "$tmp/fail.out"
if shell_errors "$tmp/fail.out" >/dev/null; then bad "... without a shell error:"; sed 's/^/#   /' "$tmp/fail.out"
else ok "... without a shell error"; fi

# The real thing, as a user starts it; job control so that make handles
# SIGINT as it does in a terminal.
set -m
make -s -C "$clone" run BUILD="$build" > "$tmp/run.out" 2>&1 &
mpid=$!
set +m
ready=0
for (( i = 0; i < 1200; i++ )); do
    grep -q "poolbroker ready" "$tmp/run.out" && { ready=1; break; }
    kill -0 "$mpid" 2>/dev/null || break
    sleep 0.1
done
check "make run from a clone postgres cannot traverse gets ready" test $ready = 1
rundir=$(sed -n 's/.*servers. data and sockets: \([^)]*\)).*/\1/p' "$tmp/run.out" | head -n 1)
mport=$(sed -n 's|.*curl http://127.0.0.1:\([0-9]*\)/health.*|\1|p' "$tmp/run.out" | head -n 1)
pgport=$(sed -n 's/.*PostgreSQL on .* (port \([0-9]*\)).*/\1/p' "$tmp/run.out" | head -n 1)
rport=$(sed -n 's/.*Redis on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/run.out" | head -n 1)
case "$rundir" in
    /tmp/* | "${XDG_RUNTIME_DIR:-/nonexistent}"/*) ok "servers' data and sockets in $rundir" ;;
    *) bad "servers' data and sockets in '$rundir' (not under /tmp or XDG_RUNTIME_DIR)" ;;
esac
[[ -n "$rundir" && "$rundir" != "$clone"* ]] && ok "... not in the clone" || bad "... not in the clone"
if (( ready )); then
    check "/health answers 200" curl -sf -o /dev/null "http://127.0.0.1:$mport/health"
    check "/metrics answers" bash -c "curl -sf http://127.0.0.1:$mport/metrics | grep -q '^poolbroker_'"
fi
kill -INT "$mpid" 2>/dev/null
stopped=0
for (( i = 0; i < 400; i++ )); do
    kill -0 "$mpid" 2>/dev/null || { stopped=1; break; }
    sleep 0.1
done
check "kill -INT of make run's pid ends it" test $stopped = 1
wait "$mpid" 2>/dev/null
gone() { ! (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
check "... the broker is stopped (metrics port closed)" gone "${mport:-1}"
check "... PostgreSQL is stopped" gone "${pgport:-1}"
check "... Redis is stopped" gone "${rport:-1}"
if shell_errors "$tmp/run.out" >/dev/null; then bad "make run printed a shell error:"; sed 's/^/#   /' "$tmp/run.out"
else ok "make run printed no shell error"; fi
if (( failed )); then sed 's/^/# run: /' "$tmp/run.out"; fi
# Belt and braces: nothing of this run may outlive the test.
if [[ -n "$rundir" && -d "$rundir" ]]; then
    bash "$src/tools/redis-stop" "$rundir" >/dev/null 2>&1
    bash "$src/tools/pg-stop" "$rundir" >/dev/null 2>&1
    rm -rf -- "$rundir"
fi
kill -KILL -- -"$mpid" 2>/dev/null
rm -rf -- "$cparent"

echo
if (( failed )); then echo "test_tools: $failed failed"; exit 1; fi
echo "test_tools: all passed"
