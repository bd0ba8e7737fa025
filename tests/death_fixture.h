/*
 * death_fixture.h — the fixture shared by the worker-death test files
 * (test_reclaim.c, test_misuse.c, test_max_lease.c, test_fairness.c,
 * test_kill_storm.c, test_broker_death.c), included
 * by each of them once: worker death, misuse and fairness (docs/architecture.md:
 * the lease path and the trust model), end to end on a real
 * PostgreSQL.
 *
 * Each file's group starts its own PostgreSQL (tables accounts and dlog) and
 * broker (every pool below) in a temp dir.  Workers are forked processes,
 * each with its own pb_client, exactly as a prefork server would have them;
 * they are SIGKILLed, SIGSTOPped and orphaned by a SIGKILLed broker, and the
 * parent checks what the next holder of the connection sees.
 *
 * Children never call cmocka: they report through exit codes and a shared
 * anonymous mapping.  Every child is tracked and killed by the per-test
 * teardown (test_teardown), so a failed assertion leaves nothing behind.
 * Wall-clock figures are printed; the only time assertions are loose bounds
 * ("within 5 s").
 *
 * Environment (besides the harness's):
 *   PB_TEST_FILTER   run only the tests matching this cmocka filter
 */
#ifndef PB_TEST_DEATH_FIXTURE_H
#define PB_TEST_DEATH_FIXTURE_H

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

/* Not every file uses every helper. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

static th_env env;

#define CONNINFO "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable " \
                 "application_name=pbdeath\n"

/* The whole file (th_broker_start_raw) so that [broker] can carry a short
 * shutdown_timeout_ms: a lease left out at the end then costs 5 s, not 30,
 * and the group teardown reports it. */
#define CONF \
    "[broker]\n" \
    "socket = @SOCK@\n" \
    "shm_name = @SHM@\n" \
    "log_level = debug\n" \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool one]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 10000\n" \
    "\n" \
    "[pool fresh]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "\n" \
    "[pool misuse]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 1\n" \
    "max_size = 2\n" \
    "\n" \
    "[pool leasy]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "max_lease_ms = 1000\n" \
    "leak_threshold_ms = 500\n" \
    "\n" \
    "[pool fair]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 2\n" \
    "max_size = 2\n" \
    "\n" \
    "[pool storm]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 4\n" \
    "max_size = 4\n" \
    "\n" \
    "[pool bd]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "\n" \
    "[pool bdsleep]\n" \
    "type = postgres\n" CONNINFO \
    "min_size = 1\n" \
    "max_size = 1\n"

#define LOCKS_SQL \
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) " \
    "WHERE a.application_name = 'pbdeath' AND l.locktype = 'transactionid'"

/* ------------------------------------------------------------------ helpers */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sleep_ms(double ms)
{
    long long ns = (long long)(ms * 1e6);
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000), .tv_nsec = (long)(ns % 1000000000) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* p-th percentile (0..100) of a sorted array. */
static double pct(const double *v, size_t n, double p)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static void *shared_alloc(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    memset(p, 0, n);
    return p;
}

/* Children of the current test: SIGKILLed and reaped by the teardown. */
#define MAX_KIDS 256
static pid_t kids[MAX_KIDS];
static pb_client *pc;           /* the parent's client in the current test */

static void kid_track(pid_t pid)
{
    for (int i = 0; i < MAX_KIDS; i++)
        if (kids[i] == 0) {
            kids[i] = pid;
            return;
        }
    fail_msg("too many children");
}

static void kid_untrack(pid_t pid)
{
    for (int i = 0; i < MAX_KIDS; i++)
        if (kids[i] == pid)
            kids[i] = 0;
}

/* Fork a child running fn(arg); it never returns into cmocka. */
static pid_t spawn(int (*fn)(void *), void *arg)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        fail_msg("fork: %s", strerror(errno));
    if (pid == 0) {
        /* Not the harness's emergency cleanup, and not cmocka's handlers
         * for fatal signals: a crash in a child must be a crash (seen by the
         * parent as a signal status), never a longjmp into the runner. */
        static const int sigs[] = { SIGINT, SIGTERM, SIGHUP, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };
        for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
            signal(sigs[i], SIG_DFL);
        memset(kids, 0, sizeof kids);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        _exit(fn(arg));
    }
    kid_track(pid);
    return pid;
}

/* Wait for pid up to timeout_ms: 1 (status in *st), 0 if still running. */
static int wait_kid(pid_t pid, int *st, int timeout_ms)
{
    double deadline = now_ms() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(pid, st, WNOHANG);
        if (r == pid) {
            kid_untrack(pid);
            return 1;
        }
        if (r < 0 && errno != EINTR) {
            kid_untrack(pid);
            return -1;
        }
        if (now_ms() >= deadline)
            return 0;
        sleep_ms(2);
    }
}

static void kill_and_reap(pid_t pid)
{
    int st;
    kill(pid, SIGKILL);
    kill(pid, SIGCONT);
    if (wait_kid(pid, &st, 5000) != 1)
        fprintf(stderr, "child %d did not die on SIGKILL\n", (int)pid);
}

/* If an earlier test killed the broker by accident (a crash), say so and
 * start it again, so that one bug fails one test rather than all later ones. */
static int broker_died(void)
{
    int st;
    if (env.broker_pid <= 0 || waitpid(env.broker_pid, &st, WNOHANG) != env.broker_pid)
        return 0;
    env.broker_pid = 0;
    env.broker_status = st;
    fprintf(stderr, "broker DIED (%s %d); restarting it for the next tests\n",
            WIFSIGNALED(st) ? "signal" : "exit status", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    return 1;
}

static int test_setup(void **state)
{
    (void)state;
    memset(kids, 0, sizeof kids);
    pc = NULL;
    /* broker_pid 0: a test found it dead (or killed it) and did not restart it. */
    if ((broker_died() || env.broker_pid <= 0) && th_broker_restart(&env) != 0)
        return -1;
    return 0;
}

static int test_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < MAX_KIDS; i++)
        if (kids[i] > 0)
            kill_and_reap(kids[i]);
    if (pc)
        pb_disconnect(pc);      /* releases whatever a failed test still held */
    pc = NULL;
    return 0;
}

/* Wait up to timeout_ms for one byte on fd; the byte, or -1. */
static int read_byte(int fd, int timeout_ms)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    if (poll(&p, 1, timeout_ms) != 1)
        return -1;
    unsigned char b;
    return read(fd, &b, 1) == 1 ? b : -1;
}

static void connect_parent(void)
{
    int rc = pb_connect(env.sock_path, &pc);
    if (rc != PB_OK)
        fail_msg("pb_connect: %s", pb_strerror(rc));
}

static pb_result *exec_ok(pb_lease *l, const char *sql)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    if (rc != PB_OK)
        fail_msg("%s: %s", sql, pb_strerror(rc));
    if (pb_result_status(r) == PB_RES_ERROR)
        fail_msg("%s: %s", sql, pb_error_message(r));
    return r;
}

/* The one value of a one-row query, through the lease. */
static long long exec_ll(pb_lease *l, const char *sql)
{
    pb_result *r = exec_ok(l, sql);
    assert_int_equal(pb_ntuples(r), 1);
    long long v = atoll(pb_getvalue(r, 0, 0));
    pb_result_free(r);
    return v;
}

/* The same through psql, from outside the broker. */
static long long psql_ll(const char *sql)
{
    char out[256];
    if (th_psql(&env, sql, out, sizeof out) != 0)
        fail_msg("psql: %s", sql);
    return atoll(out);
}

/* The lease is idle, not inside a transaction block. */
static void assert_not_in_txn(pb_lease *l)
{
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SAVEPOINT probe", &r), PB_OK);
    const char *code = pb_error_field(r, 'C');
    if (!code || strcmp(code, "25P01") != 0)
        fail_msg("connection handed over inside a transaction block (SAVEPOINT gave %s)",
                 code ? code : pb_cmd_status(r));
    pb_result_free(r);
}

/* ----- child side: small helpers returning 0 or a nonzero code ----- */

/* 0 if sql ran without an SQL error; else a PB_E* code (negative) or 1. */
static int c_exec(pb_lease *l, const char *sql, char *err, size_t errlen)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    if (rc != PB_OK) {
        if (err)
            snprintf(err, errlen, "%s: %s", sql, pb_strerror(rc));
        return rc;
    }
    int bad = pb_result_status(r) == PB_RES_ERROR;
    if (bad && err)
        snprintf(err, errlen, "%s: %s %s", sql, pb_error_field(r, 'C') ? pb_error_field(r, 'C') : "",
                 pb_error_message(r));
    pb_result_free(r);
    return bad;
}

static int c_exec_p(pb_lease *l, const char *sql, int n, const char *const *vals, long long want_tuples, char *err,
                    size_t errlen)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec_params(l, sql, n, NULL, vals, NULL, NULL, 0, &r);
    if (rc != PB_OK) {
        if (err)
            snprintf(err, errlen, "%s: %s", sql, pb_strerror(rc));
        return rc;
    }
    int bad = pb_result_status(r) == PB_RES_ERROR || (want_tuples >= 0 && pb_cmd_tuples(r) != want_tuples);
    if (bad && err)
        snprintf(err, errlen, "%s: %s %s (%s)", sql, pb_error_field(r, 'C') ? pb_error_field(r, 'C') : "",
                 pb_error_message(r), pb_cmd_status(r));
    pb_result_free(r);
    return bad;
}

/* ----- shmstat ----- */

static int shmstat_json(char *out, size_t n)
{
    char bin[512];
    snprintf(bin, sizeof bin, "%s/shmstat", getenv("PB_BUILD") ? getenv("PB_BUILD") : "build");
    char *argv[] = { bin, "-s", env.shm_name, "--json", NULL };
    return th_run(argv, out, n, 10000);
}

/* A numeric field of pool <pool> in shmstat's JSON; -1 if absent. */
static long long json_pool_field(const char *json, const char *pool, const char *key)
{
    char pat[96];
    snprintf(pat, sizeof pat, "{\"name\": \"%s\"", pool);
    const char *p = strstr(json, pat);
    if (!p)
        return -1;
    const char *end = strchr(p, '}');
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *k = strstr(p, pat);
    if (!k || (end && k > end))
        return -1;
    return atoll(k + strlen(pat));
}

static long long pool_stat(const char *pool, const char *key)
{
    static char json[1 << 17];
    if (shmstat_json(json, sizeof json) != 0)
        return -1;
    return json_pool_field(json, pool, key);
}

/* Print the slot table of a pool (shmstat --json), for diagnosis. */
static void dump_slots(const char *pool)
{
    static char json[1 << 17];
    if (shmstat_json(json, sizeof json) != 0)
        return;
    char pat[64];
    snprintf(pat, sizeof pat, "{\"pool\": \"%s\"", pool);
    for (const char *p = strstr(json, pat); p; p = strstr(p + 1, pat)) {
        const char *e = strchr(p, '}');
        print_message("  slot %.*s\n", e ? (int)(e - p + 1) : 80, p);
    }
    char out[4096];
    if (th_psql(&env, "SELECT pid, state, left(query, 60), xact_start IS NOT NULL FROM pg_stat_activity "
                      "WHERE application_name = 'pbdeath' ORDER BY pid", out, sizeof out) == 0)
        print_message("  pg_stat_activity (pbdeath):\n%s\n", out);
}

/* ================================================================== group */

static int group_setup(void **state)
{
    (void)state;
    if (th_setup(&env, 1, 0) < 0)
        return -1;
    if (th_psql(&env,
                "CREATE TABLE accounts (id int PRIMARY KEY, n int NOT NULL);"
                "INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 4) g;"
                "CREATE TABLE dlog (seq serial PRIMARY KEY, worker int, acct int, note text)",
                NULL, 0) != 0)
        return -1;
    /* As th_broker_start: PB_IO_BACKEND picks the broker's event loop
     * (tests/run-tests runs the suite once with each). */
    const char *io = getenv("PB_IO_BACKEND");
    static char conf[8192];
    snprintf(conf, sizeof conf, "[broker]\n%s%s%s%s", io && *io ? "io_backend = " : "", io && *io ? io : "",
             io && *io ? "\n" : "", CONF + strlen("[broker]\n"));
    if (th_broker_start_raw(&env, conf) < 0)
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    int rc = 0;
    if (env.broker_pid > 0) {
        long before = th_count_lines(env.broker_log, "leases still out");
        int st = th_broker_stop(&env, SIGTERM);
        if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "broker did not exit 0 on SIGTERM (status %d)\n", st);
            rc = -1;
        }
        if (th_count_lines(env.broker_log, "leases still out") > before) {
            fprintf(stderr, "broker shut down with leases still out\n");
            rc = -1;
        }
    }
    if (th_teardown(&env) != 0)
        rc = -1;
    return rc;
}

#pragma GCC diagnostic pop

#endif /* PB_TEST_DEATH_FIXTURE_H */
