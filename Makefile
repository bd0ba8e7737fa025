# poolbroker — build, test, install, run, bench.  See README.md.
PREFIX  ?= /usr/local
DESTDIR ?=
comma   := ,
SANITIZE ?=
# Sanitized builds get their own directory so objects never mix.
BUILD   ?= build$(if $(SANITIZE),-$(subst $(comma),-,$(SANITIZE)))
CC      ?= cc

SOVERSION := 0
VERSION   := 0.1.0

WARN    := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Werror
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE= -pthread $(WARN) -Iinclude -I$(shell pg_config --includedir 2>/dev/null || echo /usr/include/postgresql)
LDFLAGS ?=
ifneq ($(SANITIZE),)
CFLAGS  += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
LDFLAGS += -fsanitize=$(SANITIZE)
endif
# Debug and sanitizer builds abort on a broken broker invariant
# (broker/invariant.h: ALWAYS/NEVER); release builds log it and go on.
DEBUG ?=
ifneq ($(SANITIZE)$(DEBUG),)
CFLAGS  += -DPB_DEBUG
endif

# The segment reader and its renderings: linked into the broker (/metrics,
# /health) and into shmstat.
SHMVIEW_SRC := common/shmview_load.c common/shmview_text.c common/shmview_json.c common/shmview_prom.c
BROKER_SRC := broker/main.c broker/log.c broker/conf.c broker/loop.c broker/loop_uring.c \
              broker/loop_epoll.c broker/shm.c broker/lifeline.c broker/attach.c broker/control.c broker/pool.c broker/slot.c broker/conn.c broker/connio.c broker/release.c broker/txn.c broker/pg.c broker/pgstmt.c broker/pgshare.c \
              broker/redis.c broker/janitor.c broker/failover.c broker/sentinel.c broker/cancel.c broker/reload.c broker/tls.c broker/metrics.c \
              $(SHMVIEW_SRC)
CLIENT_SRC := client/client.c client/wait.c client/attachcheck.c client/pg.c client/pgproto.c client/redis.c client/async.c client/compat.c

BROKER_OBJ := $(BROKER_SRC:%.c=$(BUILD)/%.o)
CLIENT_OBJ := $(CLIENT_SRC:%.c=$(BUILD)/pic/%.o)
BROKER_LIBS := -lpq -luring -lhiredis -lssl -lcrypto -lmicrohttpd
CLIENT_LIBS := -lhiredis

UNIT_TESTS := test_conf test_pgproto test_slots test_conn test_log test_drv_ready
INTEG_TESTS := test_harness_selftest test_pg test_redis test_pgext test_ops \
               test_idle_kill test_command_timeout test_pool_size test_recycle test_validate test_multi_host test_outage \
               test_metrics \
               test_reclaim test_misuse test_max_lease test_fairness test_kill_storm test_broker_death \
               test_tls \
               test_access test_secrets test_rogue \
               test_async test_republish test_limits test_shrink test_not_ready test_redis_session \
               test_session_state test_txn \
               test_failover test_wait_many test_idle_scan test_reload test_pubsub test_bigreq
# Script-level tests of the tools (tests/*.sh), run once (not per io backend).
SCRIPT_TESTS := test_tools
# Integration files run once more with every pool in transaction mode
# (PB_POOL_MODE=transaction; the cases whose semantics differ skip there).
TXN_TESTS := test_pg test_redis test_reclaim test_bigreq
TEST_BINS := $(UNIT_TESTS:%=$(BUILD)/tests/%) $(INTEG_TESTS:%=$(BUILD)/tests/%) $(BUILD)/tests/noring \
             $(SCRIPT_TESTS:%=$(BUILD)/tests/%) $(BUILD)/tests/shmstat_fixture

.PHONY: all test unit integ run install bench clean deps examples check-docs python python-test
.PHONY: bench-deps bench-python
all: $(BUILD)/poolbroker $(BUILD)/libpoolbroker.so $(BUILD)/libpoolbroker.a $(BUILD)/shmstat \
     $(BUILD)/poolbroker.pc examples

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ibroker -MMD -MP -c $< -o $@

$(BUILD)/pic/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Iclient -fPIC -fvisibility=hidden -DPB_BUILDING_LIBRARY -MMD -MP -c $< -o $@

# The metrics endpoint renders with shmstat's code (common/shmview*.c).
$(BUILD)/broker/metrics.o: CFLAGS += -Icommon
$(BUILD)/common/%.o: CFLAGS += -Icommon

$(BUILD)/poolbroker: $(BROKER_OBJ)
	$(CC) $(CFLAGS) $^ -o $@ $(LDFLAGS) $(BROKER_LIBS)

$(BUILD)/libpoolbroker.so: $(CLIENT_OBJ) client/libpoolbroker.map
	$(CC) $(CFLAGS) -shared -Wl,-soname,libpoolbroker.so.$(SOVERSION) \
	    -Wl,--version-script=client/libpoolbroker.map $(CLIENT_OBJ) -o $@.$(VERSION) $(LDFLAGS) $(CLIENT_LIBS)
	ln -sf libpoolbroker.so.$(VERSION) $(BUILD)/libpoolbroker.so.$(SOVERSION)
	ln -sf libpoolbroker.so.$(VERSION) $@

$(BUILD)/libpoolbroker.a: $(CLIENT_OBJ)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/shmstat: tools/shmstat.c $(SHMVIEW_SRC) common/shmview.h common/shmview_int.h include/pb_shm.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Icommon $(filter %.c,$^) -o $@ $(LDFLAGS)

# Outside /usr, the .pc also gives the linker an rpath, so that a program
# built with `pkg-config --libs poolbroker` finds libpoolbroker.so.0 at run
# time without ldconfig or LD_LIBRARY_PATH.
PC_RPATH := $(if $(filter /usr /usr/,$(PREFIX)),,-Wl$(comma)-rpath$(comma)$${libdir} )
PC_SED    = sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' -e 's|@RPATH@|$(PC_RPATH)|'

$(BUILD)/poolbroker.pc: poolbroker.pc.in
	$(PC_SED) $< > $@

# A worker linked statically against the library (see README.md).
examples: $(BUILD)/examples/hello

$(BUILD)/examples/hello: examples/hello.c include/poolbroker.h $(BUILD)/libpoolbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(BUILD)/libpoolbroker.a -o $@ $(LDFLAGS) -lhiredis

# A prefork HTTP server leasing from pools "main" and "cache" (or, with
# --direct, connecting per request); used by `make bench`.
examples: $(BUILD)/examples/prefork_http

$(BUILD)/examples/prefork_http: examples/prefork_http.c include/poolbroker.h $(BUILD)/libpoolbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(BUILD)/libpoolbroker.a -o $@ $(LDFLAGS) -lpq -lhiredis

# ---------------------------------------------------------------- python
# The `poolbroker` Python package (python/, docs/python.md), built in place
# so that `PYTHONPATH=python /usr/bin/python3 -c 'import poolbroker'` works
# from here.  The extension links the static library (-fPIC objects) and
# shmstat's reader (common/shmview*.c), so it needs no libpoolbroker.so at run
# time.  /usr/bin/python3: Debian's, which has the python3-* packages.
PYTHON ?= /usr/bin/python3

ifneq ($(SANITIZE),)
python:
	@echo "make python: not in a SANITIZE build: an instrumented libpoolbroker.a cannot load" \
	    "into an uninstrumented python3 (see docs/python.md)" >&2; exit 1
else
# The segment reader (common/shmview*.c), position-independent, for the
# extension's poolbroker.stats().
$(BUILD)/pic/common/%.o: CFLAGS += -Icommon
$(BUILD)/libshmview_pic.a: $(SHMVIEW_SRC:%.c=$(BUILD)/pic/%.o)
	rm -f $@
	ar rcs $@ $^

python: $(BUILD)/libpoolbroker.a $(BUILD)/libshmview_pic.a
	cd python && POOLBROKER_BUILD=$(abspath $(BUILD)) $(PYTHON) setup.py -q build_ext --inplace --force
endif

# The pytest suite (python/tests) on real servers and a real broker of this
# build.  Sanitizer builds skip it: see python-test in docs/python.md.
python-test: all $(if $(SANITIZE),,python)
	@bash python/tests/run-pytest $(BUILD) "$(SANITIZE)"

# ---------------------------------------------------------------- tests
$(BUILD)/tests/test_conf: tests/test_conf.c broker/conf.c broker/log.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ibroker $^ -o $@ $(LDFLAGS) -lcmocka -lpq

$(BUILD)/tests/test_log: tests/test_log.c broker/log.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ibroker $^ -o $@ $(LDFLAGS) -lcmocka

$(BUILD)/tests/test_pgproto: tests/test_pgproto.c client/pgproto.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Iclient $^ -o $@ $(LDFLAGS) -lcmocka -lhiredis

# Runs a program with io_uring_setup denied (seccomp): the epoll fallback test.
$(BUILD)/tests/noring: tests/noring.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< -o $@ $(LDFLAGS)

# A fake segment for shmstat's tests (tests/test_tools.sh).
$(BUILD)/tests/shmstat_fixture: tests/shmstat_fixture.c include/pb_shm.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< -o $@ $(LDFLAGS)

$(BUILD)/tests/test_tools: tests/test_tools.sh
	@mkdir -p $(dir $@)
	install -m 755 $< $@

$(BUILD)/tests/test_slots: tests/test_slots.c include/pb_shm.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< -o $@ $(LDFLAGS) -lcmocka

# The connection state machine with a fake driver and a fake loop.  Built
# without PB_DEBUG: it checks that impossible phase changes are refused.
CONN_SRC := broker/pool.c broker/slot.c broker/conn.c broker/connio.c broker/release.c broker/txn.c broker/failover.c broker/loop.c broker/log.c
$(BUILD)/tests/test_conn: tests/test_conn.c $(CONN_SRC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -UPB_DEBUG -Ibroker $^ -o $@ $(LDFLAGS) -lcmocka

# The drivers' "server not ready yet" classification (pg.c, redis.c).
$(BUILD)/tests/test_drv_ready: tests/test_drv_ready.c broker/pg.c broker/pgstmt.c broker/pgshare.c broker/redis.c broker/cancel.c broker/log.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ibroker $^ -o $@ $(LDFLAGS) -lcmocka -lpq -lhiredis

$(BUILD)/tests/test_%: tests/test_%.c tests/harness.c tests/harness.h tests/pbtest.c tests/pbtest.h $(wildcard tests/*_fixture.h) $(BUILD)/libpoolbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests $< tests/harness.c tests/pbtest.c $(BUILD)/libpoolbroker.a -o $@ $(LDFLAGS) -lcmocka -lhiredis -lpq

# ---------------------------------------------------------------- fuzzing
# libFuzzer targets (tests/fuzz/*.c), built with clang into build/fuzz/
# whatever BUILD is.  `make fuzz` runs each for FUZZ_SECONDS on a scratch copy
# of its seed corpus; `make fuzz-smoke` runs each for 3 s (for `make test`);
# `make fuzz-regress` replays tests/fuzz/regress/<target>/* once each.
# Needs clang (tools/install-deps --fuzz).
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_JOBS    ?= 1
FUZZ_BUILD   := build/fuzz
FUZZ_CFLAGS  := -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -g -O1 -std=c11 \
                -D_GNU_SOURCE= -Wall -Wextra -Iinclude -Ibroker -Iclient \
                -I$(shell pg_config --includedir 2>/dev/null || echo /usr/include/postgresql)
FUZZ_TARGETS := fuzz_pg_request fuzz_resp fuzz_pg_reply fuzz_conf fuzz_shm fuzz_attach
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%)

$(FUZZ_BUILD)/fuzz_pg_request: tests/fuzz/fuzz_pg_request.c broker/pg.c broker/pgstmt.c broker/pgshare.c broker/cancel.c broker/log.c
$(FUZZ_BUILD)/fuzz_pg_request: FUZZ_LIBS := -lpq
$(FUZZ_BUILD)/fuzz_resp: tests/fuzz/fuzz_resp.c broker/redis.c broker/log.c
$(FUZZ_BUILD)/fuzz_resp: FUZZ_LIBS := -lhiredis
$(FUZZ_BUILD)/fuzz_pg_reply: tests/fuzz/fuzz_pg_reply.c client/pgproto.c
$(FUZZ_BUILD)/fuzz_conf: tests/fuzz/fuzz_conf.c broker/conf.c broker/log.c
$(FUZZ_BUILD)/fuzz_conf: FUZZ_LIBS := -lpq
$(FUZZ_BUILD)/fuzz_shm: tests/fuzz/fuzz_shm.c include/pb_shm.h
$(FUZZ_BUILD)/fuzz_attach: tests/fuzz/fuzz_attach.c broker/attach.c client/attachcheck.c
$(FUZZ_BINS): $(wildcard include/*.h broker/*.h client/*.h tests/fuzz/*.h)
	@command -v $(FUZZ_CC) >/dev/null || { echo "fuzz: $(FUZZ_CC) not found; run tools/install-deps --fuzz" >&2; exit 1; }
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(filter %.c,$^) -o $@ $(FUZZ_LIBS)

.PHONY: fuzz fuzz-build fuzz-smoke fuzz-regress
fuzz-build: $(FUZZ_BINS)

fuzz: fuzz-build
	@FUZZ_JOBS=$(FUZZ_JOBS) bash tests/fuzz/run-fuzz $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-smoke: fuzz-build
	@FUZZ_JOBS=$(FUZZ_JOBS) bash tests/fuzz/run-fuzz $(FUZZ_BUILD) 3 $(FUZZ_TARGETS)

fuzz-regress: fuzz-build
	@bash tests/fuzz/run-fuzz --regress $(FUZZ_BUILD) $(FUZZ_TARGETS)

# test_rogue over ROGUE_SEEDS seeds (default 50) on both io backends, outside
# `make test` (root only; about 15 s a run; docs/testing.md).
ROGUE_SEEDS ?= 50
.PHONY: rogue-seeds
rogue-seeds: all $(BUILD)/tests/test_rogue
	@bash tools/rogue-seeds $(BUILD) $(ROGUE_SEEDS)

deps:
	@bash tools/install-deps

# The documentation check and the fuzz targets (briefly, and their
# regression inputs) run first, so that the test runner's summary is the
# last line.  The Python suite runs last inside run-tests (PB_PYTEST); sanitizer builds
# skip it and do not build the extension.
test: deps all $(TEST_BINS) $(if $(SANITIZE),,python)
	@/usr/bin/python3 tools/check-docs $(BUILD)
	@$(MAKE) --no-print-directory fuzz-regress fuzz-smoke
	@PB_PYTEST=1 PB_SANITIZE=$(SANITIZE) bash tests/run-tests $(BUILD) $(UNIT_TESTS) -- $(INTEG_TESTS) -- $(SCRIPT_TESTS) -- $(TXN_TESTS)

# Config keys, exported symbols and error codes are documented; no document
# links a missing file (tools/check-docs says what it checks).
check-docs: all
	@/usr/bin/python3 tools/check-docs $(BUILD)

unit: all $(UNIT_TESTS:%=$(BUILD)/tests/%)
	@bash tests/run-tests $(BUILD) $(UNIT_TESTS) --

run: deps all
	@bash tools/run-local $(BUILD) $(CONFIG)

# `make bench` (bench/run): installs the bench packages too (pgbouncer,
# nutcracker, wrk, gnuplot-nox), then builds, then runs; the sub-make makes
# "install before compile" hold under -j as well.
BENCH_BINS := $(BUILD)/bench/bench $(BUILD)/examples/prefork_http

bench-deps:
	@bash tools/install-deps --bench

bench: bench-deps
	@$(MAKE) --no-print-directory all $(BENCH_BINS) python
	@bash bench/run $(BUILD)
	@$(PYTHON) python/bench/run $(BUILD)

# The Python rows alone (python/bench/run: per-query cost, FastAPI under
# gunicorn vs asyncpg); writes python/bench/results-python.md.
bench-python: bench-deps
	@$(MAKE) --no-print-directory all python
	@$(PYTHON) python/bench/run $(BUILD)

$(BUILD)/bench/bench: bench/bench.c include/poolbroker.h $(BUILD)/libpoolbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(BUILD)/libpoolbroker.a -o $@ $(LDFLAGS) -lpq -lhiredis

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/lib \
	    $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 755 $(BUILD)/poolbroker $(DESTDIR)$(PREFIX)/sbin/poolbroker
	install -m 755 $(BUILD)/shmstat $(DESTDIR)$(PREFIX)/bin/shmstat
	install -m 644 $(BUILD)/libpoolbroker.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/
	ln -sf libpoolbroker.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/libpoolbroker.so.$(SOVERSION)
	ln -sf libpoolbroker.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/libpoolbroker.so
	install -m 644 $(BUILD)/libpoolbroker.a $(DESTDIR)$(PREFIX)/lib/
	install -m 644 include/poolbroker.h $(DESTDIR)$(PREFIX)/include/
	$(PC_SED) poolbroker.pc.in > $(BUILD)/poolbroker.pc
	install -m 644 $(BUILD)/poolbroker.pc $(DESTDIR)$(PREFIX)/lib/pkgconfig/
	install -d $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man3 \
	    $(DESTDIR)$(PREFIX)/share/man/man5 $(DESTDIR)$(PREFIX)/share/man/man8
	install -m 644 man/shmstat.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 644 man/libpoolbroker.3 $(DESTDIR)$(PREFIX)/share/man/man3/
	install -m 644 man/poolbroker.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/
	install -m 644 man/poolbroker.8 $(DESTDIR)$(PREFIX)/share/man/man8/

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

# ---------------------------------------------------------------- soak
# `make soak` (soak/run, docs/soak.md): real PostgreSQL, Redis and broker, 12
# workers under injected faults for SOAK_SECONDS (default 300), invariant
# checks, then the scale step.  Not part of `make test`.
SOAK_SRC := soak/soak.c soak/worker.c soak/sampler.c soak/check.c soak/scale.c
.PHONY: soak
$(BUILD)/soak/soak: $(SOAK_SRC) soak/soak.h include/poolbroker.h $(BUILD)/libpoolbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Isoak $(SOAK_SRC) $(BUILD)/libpoolbroker.a -o $@ $(LDFLAGS) -lpq -lhiredis

soak: all $(BUILD)/soak/soak
	@bash soak/run $(BUILD)
