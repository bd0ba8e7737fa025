/*
 * harness.h - helpers for poolbroker integration tests on real servers.
 *
 * Each test group gets its own temp dir (/tmp/pbtest.XXXXXX), its own
 * throwaway PostgreSQL and/or Redis on free ports (tools/pg-start,
 * tools/redis-start), its own broker config, control socket and shared
 * memory name, and at teardown fails if the broker log holds a sanitizer
 * report. Nothing is shared between tests and no server is mocked.
 *
 * Environment:
 *   PB_SRCDIR    repo root holding tools/ (default: the current directory;
 *                `make test` runs tests from the repo root)
 *   PB_BROKER    broker binary (default: <srcdir>/build/poolbroker)
 *   PB_KEEP_TMP  if set, th_teardown keeps the temp dir and prints its path
 *   PB_IO_BACKEND  if set (io_uring | epoll), th_broker_start puts
 *                `io_backend = <it>` in the [broker] section
 *
 * Every wait is bounded; every child is reaped; SIGPIPE is ignored in the
 * test process (children get the default back). If the test process gets
 * SIGINT, SIGTERM or SIGHUP, the servers and brokers of live environments
 * are stopped before it dies, so an interrupted run leaks no servers.
 *
 * Functions returning int return 0 (or a documented value) on success and
 * -1 on failure, after printing what failed to stderr (this is test code:
 * the diagnostics are the point).
 */
#ifndef PB_TEST_HARNESS_H
#define PB_TEST_HARNESS_H

#include <stddef.h>
#include <sys/types.h>

#define TH_SENTINELS 3       /* sentinels th_sentinels_start can run */

typedef struct th_env {
    char dir[256];           /* temp dir, /tmp/pbtest.XXXXXX (mode 0755) */
    int pg_port;             /* PostgreSQL TCP port on 127.0.0.1; 0: none */
    char pg_host[256];       /* PostgreSQL Unix socket dir (<dir>/pgsock) */
    int redis_port;          /* Redis TCP port on 127.0.0.1; 0: none */
    char redis_socket[256];  /* Redis Unix socket (<dir>/redis.sock) */
    char conf_path[300];     /* <dir>/poolbroker.conf */
    char sock_path[300];     /* broker control socket, <dir>/pb.sock */
    char shm_name[64];       /* broker segment, /pbtest-<pid>-<counter> */
    pid_t broker_pid;        /* running broker; 0: none */
    char broker_log[300];    /* <dir>/broker.log: broker stdout+stderr, appended */
    int broker_status;       /* waitpid status of the last broker that exited; -1: none */
    char pg_bindir[256];     /* PostgreSQL server bin dir (from pg-start), "" if none */
    char srcdir[256];        /* repo root: PB_SRCDIR or the cwd at th_setup */
    /* replicas (th_pg_standby_start, th_redis_replica_start, th_sentinels_start);
     * each lives in a directory of its own under dir, stopped by th_teardown */
    int standby_port;        /* PostgreSQL standby (<dir>/standby); 0: none */
    int replica_port;        /* Redis replica of redis_port (<dir>/replica); 0: none */
    int sentinel_ports[TH_SENTINELS]; /* Redis sentinels (<dir>/sentinelN); 0: none */
    char sentinel_password[64]; /* their requirepass; "" none */
} th_env;

/*
 * Make the temp dir and start the requested servers. Fills every path field
 * of *e. On failure everything started so far is stopped and removed and -1
 * is returned. Pair each successful call with th_teardown(). *e must stay
 * at the same address until then (static, or heap via cmocka's *state):
 * the signal-time cleanup keeps a pointer to it.
 */
int th_setup(th_env *e, int want_pg, int want_redis);

/*
 * Write <dir>/poolbroker.conf (mode 0600): a [broker] section with
 * socket = sock_path, shm_name = shm_name, log_level = debug, followed by
 * pools_ini (pool sections; may be NULL or ""). Placeholders substituted in
 * pools_ini: @PGPORT@ @PGHOST@ @REDISPORT@ @REDISSOCK@ @DIR@ @SOCK@ @SHM@.
 * Then start the broker with `-c <conf>` in its own process group, stdin
 * from /dev/null, stdout+stderr appended to broker_log (after a
 * "==== harness: starting" marker line), and wait up to 30 s for a "poolbroker ready" line written by
 * this run. Returns 0 when ready. Returns -1 (log tail on stderr) if a broker
 * is already running, the binary is missing, it exits first (broker_status
 * then holds its waitpid status and broker_pid is 0), or it times out (it is
 * then killed).
 */
int th_broker_start(th_env *e, const char *pools_ini);

/*
 * Like th_broker_start, but conf_text is the whole config file (no [broker]
 * section is added; placeholders are still substituted). For config-error
 * tests: expect -1 and inspect broker_status and broker_log.
 */
int th_broker_start_raw(th_env *e, const char *conf_text);

/*
 * Start the broker again with the config file last written. If one is
 * running it is first stopped with SIGTERM. Same return as th_broker_start.
 */
int th_broker_restart(th_env *e);

/*
 * Send sig to the broker and wait up to 30 s for it to exit; after that,
 * SIGKILL it. Returns its waitpid status (also stored in broker_status;
 * test it with WIFEXITED/WEXITSTATUS), or -1 if no broker was running or it
 * had to be killed after the timeout.
 */
int th_broker_stop(th_env *e, int sig);

/*
 * Stop the broker if running (SIGTERM; a broker that does not then exit 0
 * counts as a failure), stop PostgreSQL and Redis, shm_unlink(shm_name),
 * then scan broker_log for sanitizer reports ("ERROR: AddressSanitizer",
 * "runtime error:", "ERROR: LeakSanitizer", "WARNING: ThreadSanitizer") and
 * print the matching lines. Removes the dir unless PB_KEEP_TMP is set.
 * Returns 0 if clean, -1 otherwise. Safe on a zeroed or torn-down env.
 */
int th_teardown(th_env *e);

/*
 * Run `psql -X -A -t -q -v ON_ERROR_STOP=1 -h pg_host -p pg_port -U postgres
 * -d postgres -c sql` (60 s limit). The output, trailing whitespace trimmed,
 * goes to out (always NUL-terminated; may be NULL if outlen is 0); psql's
 * stderr goes to ours. Returns psql's exit status, or -1 if it could not be
 * run, was killed or timed out.
 */
int th_psql(th_env *e, const char *sql, char *out, size_t outlen);

/*
 * Run `redis-cli -h 127.0.0.1 -p redis_port ARGS...` (60 s limit); args is
 * split on blanks, with "double quotes" grouping words. Output as th_psql.
 * Note redis-cli exits 0 on error replies: check the text ("ERR ...").
 */
int th_redis_cli(th_env *e, const char *args, char *out, size_t outlen);

/*
 * Number of lines of the file at path containing needle; -1 if it cannot
 * be read.
 */
long th_count_lines(const char *path, const char *needle);

/*
 * Wait up to timeout_ms until broker_log has at least min_count lines
 * containing needle. Returns 0, or -1 on timeout (no polling of wall-clock
 * durations is asserted: the timeout is only a bound).
 */
int th_wait_log(th_env *e, const char *needle, long min_count, int timeout_ms);

/*
 * Run argv (argv[0] looked up on PATH), stdin from /dev/null, stderr to
 * ours, stdout captured into out (trailing whitespace trimmed) until it
 * exits; killed (with its process group) after timeout_ms. Returns its exit
 * status, or -1 if it could not be run, died of a signal or timed out.
 */
int th_run(char *const argv[], char *out, size_t outlen, int timeout_ms);

/*
 * A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice
 * for bind to port 0), e.g. for metrics_listen. Returns -1 on failure.
 */
int th_free_port(void);

/*
 * Stop this env's PostgreSQL (tools/pg-stop: an immediate shutdown) but
 * keep its data dir, socket dir and pg_port, so th_pg_start_again can bring
 * it back where its clients (the broker) expect it. Returns 0 or -1.
 */
int th_pg_stop(th_env *e);

/*
 * Start this env's PostgreSQL again after th_pg_stop: same data dir, same
 * socket dir, same TCP port (tools/pg-start with PB_PG_PORT=pg_port).
 * Returns 0 once it accepts connections; -1 if it failed or came up on
 * another port.
 */
int th_pg_start_again(th_env *e);

/* The same for Redis: tools/redis-stop, then tools/redis-start with
 * PB_REDIS_PORT=redis_port (same port, same Unix socket). 0 or -1. */
int th_redis_stop(th_env *e);
int th_redis_start_again(th_env *e);

/* ---- replicas: a PostgreSQL standby, a Redis replica, Redis Sentinel */

/*
 * Run a PostgreSQL server program of pg_bindir (pg_ctl, pg_basebackup, ...)
 * as the server's OS user (postgres when we are root, as tools/pg-start
 * does) with the NULL-terminated args; 60 s limit.  Its exit status (its
 * output on stderr when not 0), or -1.
 */
int th_pg_program(th_env *e, const char *prog, const char *const args[]);

/*
 * A streaming standby of this env's PostgreSQL: pg_basebackup -R -X stream
 * into <dir>/standby/pgdata, then tools/pg-start <dir>/standby on port
 * (0: a free one) with the NULL-terminated extra postgres options (e.g.
 * "-c", "hot_standby=off"; may be NULL).  Sets standby_port.  Returns 0 once
 * pg_ctl says it runs (a standby with hot_standby off still refuses
 * connections then).
 */
int th_pg_standby_start(th_env *e, int port, const char *const opts[]);

/* pg_ctl promote of the standby, tried again for up to timeout_ms while it
 * is still in its startup ("server is not in standby mode").  0 or -1. */
int th_pg_promote(th_env *e, int timeout_ms);

/*
 * A Redis replica of this env's Redis (tools/redis-start <dir>/replica
 * --replicaof 127.0.0.1 redis_port), waited for until its link to the
 * master is up (INFO replication: master_link_status:up).  Sets
 * replica_port.  0 or -1.
 */
int th_redis_replica_start(th_env *e);

/* SIGKILL the Redis of <dir>/sub (sub "" is this env's own), as a crash:
 * its pidfile names it.  0 or -1. */
int th_redis_kill(th_env *e, const char *sub);

/*
 * n (1..TH_SENTINELS) Redis sentinels (redis-server CONF --sentinel, each in
 * <dir>/sentinelN with its own config file, which it rewrites) monitoring
 * this env's Redis as master `name` with the given quorum and
 * down-after-milliseconds (failover-timeout 10 s); with a password (or
 * NULL), each requires it (requirepass, and sentinel-pass between them).
 * Sets sentinel_ports and sentinel_password.  Returns 0 once each answers
 * and knows the master's replica and the other sentinels (so a failover
 * has somewhere to go and a quorum).
 */
int th_sentinels_start(th_env *e, int n, const char *name, int quorum, int down_after_ms, const char *password);

/* redis-cli -p port ARGS (split as th_redis_cli) against any local port:
 * a replica or a sentinel; _auth with -a password (NULL: none).  Output as
 * th_psql. */
int th_redis_cli_port(int port, const char *args, char *out, size_t outlen);
int th_redis_cli_auth(int port, const char *password, const char *args, char *out, size_t outlen);
/* The same against sentinel i (0-based) of this env, with its password. */
int th_sentinel_cli(th_env *e, int i, const char *args, char *out, size_t outlen);

#endif /* PB_TEST_HARNESS_H */
