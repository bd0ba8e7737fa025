/*
 * test_death.c — worker death, misuse and fairness, end to end on a real
 * PostgreSQL (docs/architecture.md: the lease path and the trust model).
 *
 * The group starts its own PostgreSQL and broker in a temp dir.  Workers are
 * forked processes, each with its own pb_client, exactly as a prefork server
 * would have them; they are SIGKILLed, SIGSTOPped and orphaned by a SIGKILLed
 * broker, and the parent checks what the next holder of the connection sees.
 *
 * Children never call cmocka: they report through exit codes and a shared
 * anonymous mapping.  Every child is tracked and killed by the per-test
 * teardown, so a failed assertion leaves nothing behind.  Wall-clock figures
 * are printed; the only time assertions are loose bounds ("within 5 s").
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

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

/* ================================================================ 1. reclaim */

struct reclaim_arg {
    int wfd;
    int rep;
    int sleep_query;            /* block in SELECT pg_sleep(2) after signalling */
};

static int reclaim_child(void *p)
{
    struct reclaim_arg *a = p;
    pb_client *c;
    pb_lease *l;
    char sql[160];
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    if (pb_acquire(c, "one", 10000, &l) != PB_OK)
        return 11;
    if (c_exec(l, "BEGIN", NULL, 0))
        return 12;
    if (c_exec(l, "UPDATE accounts SET n = n + 1000 WHERE id = 1", NULL, 0))
        return 13;
    snprintf(sql, sizeof sql, "INSERT INTO dlog (worker, acct, note) VALUES (%d, 1, '%s')", a->rep,
             a->sleep_query ? "sleeper" : "uncommitted");
    if (c_exec(l, sql, NULL, 0))
        return 14;
    if (write(a->wfd, "r", 1) != 1)
        return 15;
    if (a->sleep_query) {
        c_exec(l, "SELECT pg_sleep(2)", NULL, 0);
        if (write(a->wfd, "d", 1) != 1)     /* not killed in time: the parent fails */
            return 16;
    }
    for (;;)
        pause();
}

#define RECLAIM_REPS 20

static void test_reclaim_on_death(void **state)
{
    (void)state;
    connect_parent();
    pb_lease *l;
    assert_int_equal(pb_acquire(pc, "one", 10000, &l), PB_OK);
    int bpid = pb_lease_backend_pid(l);
    assert_int_equal(exec_ll(l, "SELECT n FROM accounts WHERE id = 1"), 0);
    assert_int_equal(pb_release(l), PB_OK);

    double lat[RECLAIM_REPS];
    int same_backend = 0;
    for (int rep = 0; rep < RECLAIM_REPS; rep++) {
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        struct reclaim_arg a = { fds[1], rep, 0 };
        pid_t pid = spawn(reclaim_child, &a);
        close(fds[1]);
        int b = read_byte(fds[0], 10000);
        close(fds[0]);
        if (b != 'r') {
            int st = 0;
            wait_kid(pid, &st, 1000);
            fail_msg("rep %d: worker did not open its transaction (exit status %d)", rep,
                     WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        }
        double t0 = now_ms();
        kill(pid, SIGKILL);
        int rc = pb_acquire(pc, "one", 10000, &l);
        double t1 = now_ms();
        if (rc != PB_OK)
            fail_msg("rep %d: acquire after the holder was killed: %s after %.0f ms", rep, pb_strerror(rc), t1 - t0);
        lat[rep] = t1 - t0;
        int st;
        assert_int_equal(wait_kid(pid, &st, 5000), 1);
        assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);

        /* What the dead worker left is gone: rolled back, not committed. */
        assert_int_equal(exec_ll(l, "SELECT count(*) FROM dlog WHERE note = 'uncommitted'"), 0);
        assert_int_equal(exec_ll(l, "SELECT n FROM accounts WHERE id = 1"), 0);
        assert_not_in_txn(l);
        if (pb_lease_backend_pid(l) == bpid)
            same_backend++;
        if (rep % 5 == 4)       /* nobody holds a transaction id any more */
            assert_int_equal(psql_ll(LOCKS_SQL), 0);
        assert_int_equal(pb_release(l), PB_OK);
    }
    assert_int_equal(psql_ll(LOCKS_SQL), 0);

    qsort(lat, RECLAIM_REPS, sizeof lat[0], cmp_double);
    double med = pct(lat, RECLAIM_REPS, 50), max = lat[RECLAIM_REPS - 1];
    print_message("reclaim latency (kill -> next pb_acquire OK), %d reps: min %.2f ms, median %.2f ms, "
                  "p90 %.2f ms, max %.2f ms; same backend reused %d/%d; issue target median < 100 ms: %s\n",
                  RECLAIM_REPS, lat[0], med, pct(lat, RECLAIM_REPS, 90), max, same_backend, RECLAIM_REPS,
                  med < 100 ? "met" : "MISSED");
    assert_true(max < 5000);
}

static void test_reclaim_during_query(void **state)
{
    (void)state;
    connect_parent();
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    struct reclaim_arg a = { fds[1], 99, 1 };
    pid_t pid = spawn(reclaim_child, &a);
    close(fds[1]);
    assert_int_equal(read_byte(fds[0], 10000), 'r');
    /* Kill it once the server is really running the sleep. */
    double until = now_ms() + 5000;
    while (psql_ll("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbdeath' "
                   "AND state = 'active' AND query LIKE 'SELECT pg_sleep(2)%'") != 1) {
        if (now_ms() > until)
            fail_msg("the worker's SELECT pg_sleep(2) never showed up in pg_stat_activity");
        sleep_ms(20);
    }
    double t0 = now_ms();
    kill(pid, SIGKILL);
    pb_lease *l;
    int rc = pb_acquire(pc, "one", 10000, &l);
    double t1 = now_ms();
    int st;
    assert_int_equal(wait_kid(pid, &st, 5000), 1);
    assert_true(WIFSIGNALED(st));
    close(fds[0]);
    if (rc != PB_OK)
        fail_msg("acquire after killing a worker blocked in pg_sleep(2): %s after %.0f ms", pb_strerror(rc),
                 t1 - t0);
    print_message("killed inside SELECT pg_sleep(2): slot back after %.0f ms\n", t1 - t0);
    assert_true(t1 - t0 < 5000);

    /* A clean connection: no leftover reply, no transaction, nothing kept. */
    pb_result *r = exec_ok(l, "SELECT 'clean' AS c");
    assert_int_equal(pb_nfields(r), 1);
    assert_int_equal(pb_ntuples(r), 1);
    assert_string_equal(pb_fname(r, 0), "c");
    assert_string_equal(pb_getvalue(r, 0, 0), "clean");
    pb_result_free(r);
    assert_not_in_txn(l);
    assert_int_equal(exec_ll(l, "SELECT count(*) FROM dlog WHERE note = 'sleeper'"), 0);
    assert_int_equal(exec_ll(l, "SELECT n FROM accounts WHERE id = 1"), 0);
    r = exec_ok(l, "SELECT 2 + 2");
    assert_string_equal(pb_getvalue(r, 0, 0), "4");
    pb_result_free(r);
    assert_int_equal(psql_ll(LOCKS_SQL), 0);
    assert_int_equal(pb_release(l), PB_OK);
}

/* The same on a connection that never needed a reset before: the first and
 * only command of its first lease is in flight when the holder dies. */
static int fresh_child(void *p)
{
    int wfd = (int)(intptr_t)p;
    pb_client *c;
    pb_lease *l;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    if (pb_acquire(c, "fresh", 10000, &l) != PB_OK)
        return 11;
    if (write(wfd, "r", 1) != 1)
        return 15;
    c_exec(l, "SELECT pg_sleep(1)", NULL, 0);
    for (;;)
        pause();
}

static void test_reclaim_mid_query_fresh_connection(void **state)
{
    (void)state;
    connect_parent();
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = spawn(fresh_child, (void *)(intptr_t)fds[1]);
    close(fds[1]);
    assert_int_equal(read_byte(fds[0], 10000), 'r');
    close(fds[0]);
    double until = now_ms() + 5000;
    while (psql_ll("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbdeath' "
                   "AND state = 'active' AND query LIKE 'SELECT pg_sleep(1)%'") != 1) {
        if (now_ms() > until)
            fail_msg("the worker's SELECT pg_sleep(1) never showed up in pg_stat_activity");
        sleep_ms(10);
    }
    double t0 = now_ms();
    kill(pid, SIGKILL);
    /* Poll with timeout 0 rather than wait in pb_acquire: if the broker dies
     * here, a waiting pb_acquire would be a second victim (see
     * test_broker_death), and this test is about the broker. */
    pb_lease *l = NULL;
    int rc, died = 0;
    do {
        rc = pb_acquire(pc, "fresh", 0, &l);
        if (rc == PB_OK || (died = broker_died()))
            break;
        sleep_ms(2);
    } while (now_ms() - t0 < 10000);
    double t1 = now_ms();
    int st;
    assert_int_equal(wait_kid(pid, &st, 5000), 1);
    print_message("fresh connection, holder killed inside its first command: acquire %s after %.0f ms; "
                  "broker %s\n",
                  pb_strerror(rc), t1 - t0, died ? "DIED" : "alive");
    if (died)
        fail_msg("the broker died reclaiming a lease whose first command was in flight");
    assert_int_equal(rc, PB_OK);
    pb_result *r = exec_ok(l, "SELECT 'clean'");
    assert_string_equal(pb_getvalue(r, 0, 0), "clean");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
}

/* ================================================================= 3. misuse */

struct misuse_shared {
    int rc_exec, rc_release, rc_exec2, rc_pid, rc_acq, rc_own;
    int done;
};

static pb_lease *inherited;
static struct misuse_shared *ms;

static int misuse_child_kill(void *p)
{
    (void)p;
    pb_result *r = NULL;
    ms->rc_exec = pb_pg_exec(inherited, "SELECT 1", &r);
    ms->rc_pid = pb_lease_backend_pid(inherited);
    ms->rc_release = pb_release(inherited);
    ms->rc_exec2 = pb_pg_exec(inherited, "SELECT 1", &r);
    /* The inherited client re-attaches as this process and leases the other
     * slot; then this process dies holding it. */
    pb_lease *mine;
    ms->rc_acq = pb_acquire(pc, "misuse", 5000, &mine);
    if (ms->rc_acq == PB_OK)
        ms->rc_own = c_exec(mine, "BEGIN; INSERT INTO dlog (worker, acct, note) VALUES (-7, 0, 'child')", NULL, 0);
    ms->done = 1;
    raise(SIGKILL);
    return 99;
}

static int misuse_child_disconnect(void *p)
{
    (void)p;
    pb_disconnect(pc);          /* the inherited client and its lease: ours to drop, not the parent's */
    return 0;
}

static int misuse_child_exit(void *p)
{
    (void)p;
    return 0;                   /* just go */
}

static void test_misuse(void **state)
{
    (void)state;
    connect_parent();
    pb_lease *a, *b;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &a), PB_OK);
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &b), PB_OK);
    int apid = pb_lease_backend_pid(a);

    /* Double release, use after release. */
    assert_int_equal(pb_release(b), PB_OK);
    assert_int_equal(pb_release(b), PB_ESTALE);
    assert_int_equal(pb_pg_exec(b, "SELECT 1", &r), PB_ESTALE);
    assert_null(r);
    const char *v[1] = { "1" };
    assert_int_equal(pb_pg_exec_params(b, "SELECT $1::int", 1, NULL, v, NULL, NULL, 0, &r), PB_ESTALE);
    assert_int_equal(pb_lease_backend_pid(b), -1);
    assert_int_equal(pb_release(b), PB_ESTALE);
    /* The other lease is untouched. */
    assert_int_equal(pb_lease_backend_pid(a), apid);
    assert_int_equal(exec_ll(a, "SELECT pg_backend_pid()"), apid);

    /* In a forked child the parent's lease is stale for every call, and the
     * child's own death (holding a lease of its own) does not touch it. */
    pb_result_free(exec_ok(a, "BEGIN"));
    pb_result_free(exec_ok(a, "INSERT INTO dlog (worker, acct, note) VALUES (-7, 0, 'parent')"));
    ms = shared_alloc(sizeof *ms);
    inherited = a;
    pid_t pid = spawn(misuse_child_kill, NULL);
    int st;
    assert_int_equal(wait_kid(pid, &st, 10000), 1);
    assert_true(ms->done);
    print_message("forked child on the parent's lease: exec %s, backend_pid %d, release %s, exec after %s; "
                  "own acquire %s\n",
                  pb_strerror(ms->rc_exec), ms->rc_pid, pb_strerror(ms->rc_release), pb_strerror(ms->rc_exec2),
                  pb_strerror(ms->rc_acq));
    assert_int_equal(ms->rc_exec, PB_ESTALE);
    assert_int_equal(ms->rc_pid, -1);
    assert_int_equal(ms->rc_release, PB_ESTALE);
    assert_int_equal(ms->rc_exec2, PB_ESTALE);
    assert_int_equal(ms->rc_acq, PB_OK);
    assert_int_equal(ms->rc_own, 0);

    pid = spawn(misuse_child_disconnect, NULL);
    assert_int_equal(wait_kid(pid, &st, 10000), 1);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    pid = spawn(misuse_child_exit, NULL);
    assert_int_equal(wait_kid(pid, &st, 10000), 1);

    /* Still ours, same connection, transaction still open. */
    assert_int_equal(pb_lease_backend_pid(a), apid);
    assert_int_equal(exec_ll(a, "SELECT count(*) FROM dlog WHERE note = 'parent'"), 1);
    pb_result_free(exec_ok(a, "COMMIT"));
    assert_int_equal(exec_ll(a, "SELECT count(*) FROM dlog WHERE note = 'child'"), 0);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(a), PB_ESTALE);

    /* The child's slot was taken back: both slots can be had again. */
    double t0 = now_ms();
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &a), PB_OK);
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &b), PB_OK);
    print_message("both misuse slots leased again after %.1f ms\n", now_ms() - t0);
    assert_not_in_txn(a);
    assert_not_in_txn(b);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(b), PB_OK);
    assert_int_equal(psql_ll("DELETE FROM dlog WHERE worker = -7"), 0);
    munmap(ms, sizeof *ms);
    ms = NULL;
}

/* max_lease_ms: a stopped worker's lease is taken back; when it resumes,
 * its next call says PB_ESTALE. */
struct overstay_shared {
    int rc_exec, rc_release;
    int done;
};

static int overstay_child(void *p)
{
    struct overstay_shared *sh = p;
    pb_client *c;
    pb_lease *l;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    if (pb_acquire(c, "leasy", 10000, &l) != PB_OK)
        return 11;
    if (c_exec(l, "BEGIN", NULL, 0) ||
        c_exec(l, "INSERT INTO dlog (worker, acct, note) VALUES (-8, 0, 'overstay')", NULL, 0))
        return 12;
    raise(SIGSTOP);
    pb_result *r = NULL;
    sh->rc_exec = pb_pg_exec(l, "SELECT 1", &r);
    pb_result_free(r);
    sh->rc_release = pb_release(l);
    sh->done = 1;
    pb_disconnect(c);
    return 0;
}

static void test_max_lease_taken_back(void **state)
{
    (void)state;
    connect_parent();
    struct overstay_shared *sh = shared_alloc(sizeof *sh);
    pid_t pid = spawn(overstay_child, sh);
    int st;
    assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
    if (!WIFSTOPPED(st)) {
        kid_untrack(pid);
        fail_msg("worker did not reach SIGSTOP (status %d)", st);
    }
    double t0 = now_ms();
    pb_lease *l = NULL;
    int rc = pb_acquire(pc, "leasy", 5000, &l);
    double t1 = now_ms();
    long leak_warnings = th_count_lines(env.broker_log, "lease held for");
    int rolled_back = -1;
    if (rc == PB_OK) {
        rolled_back = exec_ll(l, "SELECT count(*) FROM dlog WHERE note = 'overstay'") == 0;
        assert_not_in_txn(l);
        assert_int_equal(pb_release(l), PB_OK);
    }
    kill(pid, SIGCONT);
    assert_int_equal(wait_kid(pid, &st, 10000), 1);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    print_message("max_lease_ms = 1000, worker SIGSTOPped holding a lease: parent acquire %s after %.0f ms; "
                  "resumed worker: exec %s, release %s; leak warnings in the log: %ld\n",
                  pb_strerror(rc), t1 - t0, pb_strerror(sh->rc_exec), pb_strerror(sh->rc_release), leak_warnings);
    if (rc != PB_OK)
        fail_msg("max_lease_ms is not enforced: the overstaying lease was not taken back within 5 s "
                 "(the resumed worker could still use it: exec %s)",
                 pb_strerror(sh->rc_exec));
    assert_int_equal(rolled_back, 1);
    assert_int_equal(sh->rc_exec, PB_ESTALE);
    assert_int_equal(sh->rc_release, PB_ESTALE);
    assert_true(t1 - t0 < 5000);
    munmap(sh, sizeof *sh);
}

/* ============================================================== 4. fairness */

#define FAIR_WORKERS 24
#define FAIR_MS      3000
#define FAIR_MAXW    8192

struct fair_shared {
    _Atomic int ready;
    _Atomic int go;
    double start, end;
    int count[FAIR_WORKERS];
    int errors[FAIR_WORKERS];
    int first_err[FAIR_WORKERS];
    float wait[FAIR_WORKERS][FAIR_MAXW];
};

static struct fair_shared *fs;

static int fair_worker(void *p)
{
    int w = (int)(intptr_t)p;
    pb_client *c;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    atomic_fetch_add(&fs->ready, 1);
    while (!atomic_load(&fs->go))
        sleep_ms(1);
    while (now_ms() < fs->start)
        sleep_ms(0.2);
    while (now_ms() < fs->end) {
        pb_lease *l;
        double t = now_ms();
        int rc = pb_acquire(c, "fair", 10000, &l);
        double wt = now_ms() - t;
        if (rc != PB_OK) {
            if (!fs->errors[w]++)
                fs->first_err[w] = rc;
            continue;
        }
        if (c_exec(l, "SELECT pg_sleep(0.001)", NULL, 0) && !fs->errors[w]++)
            fs->first_err[w] = 1;
        if (pb_release(l) != PB_OK && !fs->errors[w]++)
            fs->first_err[w] = 2;
        if (fs->count[w] < FAIR_MAXW)
            fs->wait[w][fs->count[w]] = (float)wt;
        fs->count[w]++;
    }
    pb_disconnect(c);
    return 0;
}

static void test_fairness(void **state)
{
    (void)state;
    fs = shared_alloc(sizeof *fs);
    long long h0 = pool_stat("fair", "handoffs"), w0 = pool_stat("fair", "wakeups");
    long long a0 = pool_stat("fair", "acquires"), q0 = pool_stat("fair", "waits");
    pid_t pids[FAIR_WORKERS];
    for (int w = 0; w < FAIR_WORKERS; w++)
        pids[w] = spawn(fair_worker, (void *)(intptr_t)w);
    double until = now_ms() + 15000;
    while (atomic_load(&fs->ready) < FAIR_WORKERS) {
        if (now_ms() > until)
            fail_msg("only %d of %d workers attached", atomic_load(&fs->ready), FAIR_WORKERS);
        sleep_ms(5);
    }
    fs->start = now_ms() + 50;
    fs->end = fs->start + FAIR_MS;
    atomic_store(&fs->go, 1);
    int bad = 0;
    for (int w = 0; w < FAIR_WORKERS; w++) {
        int st;
        if (wait_kid(pids[w], &st, 30000) != 1) {
            fprintf(stderr, "fair worker %d still running 30 s later\n", w);
            bad++;
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "fair worker %d: status %d\n", w, st);
            bad++;
        }
    }
    long long h1 = pool_stat("fair", "handoffs"), w1 = pool_stat("fair", "wakeups");
    long long a1 = pool_stat("fair", "acquires"), q1 = pool_stat("fair", "waits");
    assert_int_equal(bad, 0);

    double counts[FAIR_WORKERS], sum = 0;
    size_t nw = 0;
    int errors = 0, first_err = 0;
    for (int w = 0; w < FAIR_WORKERS; w++) {
        counts[w] = fs->count[w];
        sum += counts[w];
        nw += (size_t)(fs->count[w] < FAIR_MAXW ? fs->count[w] : FAIR_MAXW);
        errors += fs->errors[w];
        if (fs->errors[w] && !first_err)
            first_err = fs->first_err[w];
    }
    double *waits = malloc((nw ? nw : 1) * sizeof *waits);
    assert_non_null(waits);
    size_t k = 0;
    for (int w = 0; w < FAIR_WORKERS; w++)
        for (int i = 0; i < fs->count[w] && i < FAIR_MAXW; i++)
            waits[k++] = fs->wait[w][i];
    qsort(counts, FAIR_WORKERS, sizeof counts[0], cmp_double);
    qsort(waits, nw, sizeof waits[0], cmp_double);
    double mean = sum / FAIR_WORKERS;
    double wmed = pct(waits, nw, 50), wp99 = pct(waits, nw, 99), wmax = nw ? waits[nw - 1] : 0;
    print_message("fairness, %d workers on 2 slots for %d ms: %.0f acquires (%.0f/s); per worker min %.0f, "
                  "median %.0f, max %.0f (mean %.1f); wait median %.2f ms, p99 %.2f ms, max %.2f ms; errors %d\n",
                  FAIR_WORKERS, FAIR_MS, sum, sum * 1000.0 / FAIR_MS, counts[0], pct(counts, FAIR_WORKERS, 50),
                  counts[FAIR_WORKERS - 1], mean, wmed, wp99, wmax, errors);
    if (h0 >= 0 && h1 >= 0)
        print_message("pool fair counters over the run: acquires +%lld, waits +%lld, handoffs +%lld, wakeups +%lld\n",
                      a1 - a0, q1 - q0, h1 - h0, w1 - w0);
    else
        print_message("pool fair: handoffs/wakeups not in shmstat --json output\n");
    free(waits);
    if (errors)
        fail_msg("%d failed acquires/execs/releases (first: %s)", errors,
                 first_err < 0 ? pb_strerror(first_err) : first_err == 1 ? "SQL error" : "release");
    assert_true(sum > 0);
    if (counts[0] < 0.25 * mean)
        fail_msg("a worker starved: %.0f acquires, mean %.1f", counts[0], mean);
    if (!(wmax < 20 * wmed + 100))
        fail_msg("max wait %.1f ms >= 20 x median (%.2f ms) + 100 ms", wmax, wmed);
    munmap(fs, sizeof *fs);
    fs = NULL;
}

/* ============================================================ 2. kill storm */

#define STORM_TXN    12
#define STORM_FAST   2
#define STORM_N      (STORM_TXN + STORM_FAST)
#define STORM_MS     5000
#define STORM_SLOTS  4

enum { PH_IDLE, PH_CONNECT, PH_ACQUIRE, PH_BEGIN, PH_UPDATE, PH_INSERT, PH_COMMIT, PH_RELEASE, PH_DONE };
static const char *const ph_name[] = { "idle", "connect", "acquire", "begin", "update", "insert", "commit",
                                       "release", "done" };

struct storm_worker {
    _Atomic int phase;
    double phase_ms;
    pid_t pid;
};

struct storm_shared {
    _Atomic int stop;
    _Atomic long commits, rollbacks, fast_cycles, errors;
    struct storm_worker w[STORM_N];
    char first_error[256];
    _Atomic int have_error;
};

static struct storm_shared *ss;

static void storm_phase(int w, int ph)
{
    ss->w[w].phase_ms = now_ms();
    atomic_store(&ss->w[w].phase, ph);
}

static int storm_error(int w, const char *what, int rc)
{
    atomic_fetch_add(&ss->errors, 1);
    int zero = 0;
    if (atomic_compare_exchange_strong(&ss->have_error, &zero, 1))
        snprintf(ss->first_error, sizeof ss->first_error, "worker %d (pid %d) in %s: %s", w, (int)getpid(), what,
                 rc < 0 ? pb_strerror(rc) : "SQL error");
    return 20;
}

static int storm_worker_main(void *p)
{
    int w = (int)(intptr_t)p;
    int fast = w >= STORM_TXN;
    char err[200];
    srandom((unsigned)getpid() ^ (unsigned)now_ms());
    storm_phase(w, PH_CONNECT);
    pb_client *c;
    int rc = pb_connect(env.sock_path, &c);
    if (rc != PB_OK)
        return storm_error(w, "pb_connect", rc);
    char wbuf[16], idbuf[16];
    snprintf(wbuf, sizeof wbuf, "%d", w);
    while (!atomic_load(&ss->stop)) {
        pb_lease *l;
        storm_phase(w, PH_ACQUIRE);
        rc = pb_acquire(c, "storm", 10000, &l);
        if (rc != PB_OK)
            return storm_error(w, "pb_acquire", rc);
        if (!fast) {
            snprintf(idbuf, sizeof idbuf, "%ld", 1 + random() % 4);
            const char *vals[2] = { wbuf, idbuf };
            storm_phase(w, PH_BEGIN);
            if ((rc = c_exec(l, "BEGIN", err, sizeof err)) != 0)
                return storm_error(w, err, rc);
            storm_phase(w, PH_UPDATE);
            if ((rc = c_exec_p(l, "UPDATE accounts SET n = n + 1 WHERE id = $1", 1, vals + 1, 1, err,
                               sizeof err)) != 0)
                return storm_error(w, err, rc);
            storm_phase(w, PH_INSERT);
            if ((rc = c_exec_p(l, "INSERT INTO dlog (worker, acct, note) VALUES ($1, $2, 'storm')", 2, vals, 1,
                               err, sizeof err)) != 0)
                return storm_error(w, err, rc);
            if (random() % 3) {
                storm_phase(w, PH_COMMIT);
                if ((rc = c_exec(l, "COMMIT", err, sizeof err)) != 0)
                    return storm_error(w, err, rc);
                atomic_fetch_add(&ss->commits, 1);
            } else {
                atomic_fetch_add(&ss->rollbacks, 1);    /* release mid-transaction: must roll back */
            }
        }
        storm_phase(w, PH_RELEASE);
        if ((rc = pb_release(l)) != PB_OK)
            return storm_error(w, "pb_release", rc);
        if (fast)
            atomic_fetch_add(&ss->fast_cycles, 1);
    }
    storm_phase(w, PH_DONE);
    pb_disconnect(c);
    return 0;
}

static void storm_spawn(int w)
{
    atomic_store(&ss->w[w].phase, PH_IDLE);
    ss->w[w].pid = spawn(storm_worker_main, (void *)(intptr_t)w);
}

static void test_kill_storm(void **state)
{
    (void)state;
    assert_int_equal(th_psql(&env, "UPDATE accounts SET n = 0; DELETE FROM dlog", NULL, 0), 0);
    ss = shared_alloc(sizeof *ss);
    long long reclaims0 = pool_stat("storm", "reclaims");
    for (int w = 0; w < STORM_N; w++)
        storm_spawn(w);
    sleep_ms(300);

    srandom((unsigned)getpid());
    int kills = 0, kills_fast = 0, early_exits = 0;
    double t_end = now_ms() + STORM_MS;
    while (now_ms() < t_end) {
        sleep_ms(5 + random() % 20);
        int w = (int)(random() % STORM_N);
        pid_t pid = ss->w[w].pid;
        kill(pid, SIGKILL);
        int st;
        if (wait_kid(pid, &st, 5000) != 1)
            fail_msg("worker %d did not die", w);
        if (WIFSIGNALED(st)) {
            kills++;
            kills_fast += w >= STORM_TXN;
        } else {
            early_exits++;      /* it exited by itself: an error it reported */
        }
        storm_spawn(w);
        /* Any other worker that exited by itself reported an error. */
        for (int o = 0; o < STORM_N; o++) {
            if (o == w)
                continue;
            pid_t r = waitpid(ss->w[o].pid, &st, WNOHANG);
            if (r == ss->w[o].pid) {
                kid_untrack(r);
                early_exits++;
                storm_spawn(o);
            }
        }
    }
    atomic_store(&ss->stop, 1);
    int stuck = 0;
    char stuck_msg[1024] = "";
    double t_stop = now_ms();
    for (int w = 0; w < STORM_N; w++) {
        int st;
        int left = 20000 - (int)(now_ms() - t_stop);
        if (wait_kid(ss->w[w].pid, &st, left > 0 ? left : 0) != 1) {
            stuck++;
            int ph = atomic_load(&ss->w[w].phase);
            size_t n = strlen(stuck_msg);
            snprintf(stuck_msg + n, sizeof stuck_msg - n, " [worker %d pid %d: in %s for %.0f ms]", w,
                     (int)ss->w[w].pid, ph_name[ph], now_ms() - ss->w[w].phase_ms);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            early_exits++;
        }
    }
    double t_drained = now_ms();

    /* Every slot free again: all of them at once. */
    pb_lease *ls[STORM_SLOTS] = { 0 };
    int got = 0;
    if (!stuck) {
        connect_parent();
        for (int i = 0; i < STORM_SLOTS; i++) {
            int rc = pb_acquire(pc, "storm", 5000, &ls[i]);
            if (rc != PB_OK) {
                fprintf(stderr, "storm: acquire %d of %d: %s\n", i + 1, STORM_SLOTS, pb_strerror(rc));
                break;
            }
            got++;
        }
    }
    double t_all = now_ms();
    char out[64];
    long long locks = psql_ll(LOCKS_SQL);
    /* Idle connections hold no lock of any kind. */
    long long any_locks = psql_ll("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                                  "WHERE a.application_name = 'pbdeath'");
    long long idle_in_txn = psql_ll("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbdeath' "
                                    "AND state LIKE 'idle in transaction%'");
    assert_int_equal(th_psql(&env, "SELECT coalesce(sum(n), 0) FROM accounts", out, sizeof out), 0);
    long long sum = atoll(out);
    long long rows = psql_ll("SELECT count(*) FROM dlog WHERE note = 'storm'");
    for (int i = 0; i < got; i++) {
        assert_not_in_txn(ls[i]);
        assert_int_equal(pb_release(ls[i]), PB_OK);
    }
    long long reclaims1 = pool_stat("storm", "reclaims");
    long long leased = pool_stat("storm", "leased");
    if (got < STORM_SLOTS || idle_in_txn)
        dump_slots("storm");

    print_message("kill storm, %d ms: %d SIGKILLs (%d of acquire/release-only workers), %ld commits and %ld "
                  "releases mid-transaction seen by workers, %ld fast cycles; broker reclaims +%lld; "
                  "workers stopped %.0f ms after the stop flag, all %d slots leased %.0f ms after that (%d got)\n",
                  STORM_MS, kills, kills_fast, atomic_load(&ss->commits), atomic_load(&ss->rollbacks),
                  atomic_load(&ss->fast_cycles), reclaims1 - reclaims0, t_drained - t_stop, STORM_SLOTS,
                  t_all - t_drained, got);
    print_message("after the storm: sum(n) = %lld, committed rows = %lld, transactionid locks = %lld "
                  "(locks of any kind %lld), idle-in-transaction backends = %lld, slots leased now = %lld\n",
                  sum, rows, locks, any_locks, idle_in_txn, leased);
    if (atomic_load(&ss->have_error))
        print_message("first worker error: %s\n", ss->first_error);
    if (stuck)
        fail_msg("%d worker(s) never finished after the stop flag:%s", stuck, stuck_msg);
    if (early_exits || atomic_load(&ss->errors))
        fail_msg("%d worker(s) failed on their own (%ld errors); first: %s", early_exits,
                 atomic_load(&ss->errors), ss->first_error);
    assert_int_equal(got, STORM_SLOTS);
    assert_int_equal(locks, 0);
    assert_int_equal(any_locks, 0);
    assert_int_equal(idle_in_txn, 0);
    assert_int_equal(sum, rows);
    assert_true(rows >= atomic_load(&ss->commits));
    assert_true(kills >= 100);
    munmap(ss, sizeof *ss);
    ss = NULL;
}

/* ========================================================= 5. broker death */

enum { BD_HOLDER = 0, BD_WAITER1, BD_WAITER2, BD_WAITER3, BD_SLEEPER, BD_N };

struct bd_worker {
    int rc1;                    /* what the broker's death returned */
    double t1;                  /* when (CLOCK_MONOTONIC ms) */
    _Atomic int have1;
    int rc_rel;                 /* releasing the orphaned lease */
    double rel_ms;
    _Atomic int have_rel;
    int rc2;                    /* after the restart: PB_OK hoped for */
    int attempts;
    double t2;
    _Atomic int have2;
};

struct bd_shared {
    _Atomic int ready;
    _Atomic int go_wait;        /* holder has the slot: waiters may queue */
    _Atomic int go_release;     /* holder: release the orphaned lease */
    _Atomic int go_again;       /* broker restarted */
    struct bd_worker w[BD_N];
};

static struct bd_shared *bs;

static int bd_worker_main(void *p)
{
    int w = (int)(intptr_t)p;
    struct bd_worker *me = &bs->w[w];
    const char *pool = w == BD_SLEEPER ? "bdsleep" : "bd";
    pb_client *c;
    pb_lease *l = NULL;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    if (w == BD_HOLDER || w == BD_SLEEPER) {
        if (pb_acquire(c, pool, 10000, &l) != PB_OK)
            return 11;
    }
    atomic_fetch_add(&bs->ready, 1);
    if (w == BD_HOLDER) {
        while (!atomic_load(&bs->go_release))
            sleep_ms(1);
        double t = now_ms();
        me->rc_rel = pb_release(l);
        me->rel_ms = now_ms() - t;
        atomic_store(&me->have_rel, 1);
    } else if (w == BD_SLEEPER) {
        pb_result *r = NULL;
        me->rc1 = pb_pg_exec(l, "SELECT pg_sleep(5)", &r);
        me->t1 = now_ms();
        pb_result_free(r);
        atomic_store(&me->have1, 1);
        double t = now_ms();
        me->rc_rel = pb_release(l);
        me->rel_ms = now_ms() - t;
        atomic_store(&me->have_rel, 1);
    } else {
        while (!atomic_load(&bs->go_wait))
            sleep_ms(1);
        me->rc1 = pb_acquire(c, pool, 10000, &l);
        me->t1 = now_ms();
        atomic_store(&me->have1, 1);
        if (me->rc1 == PB_OK)
            pb_release(l);
    }
    while (!atomic_load(&bs->go_again))
        sleep_ms(1);
    /* Same process, same pb_client: retry until the new broker serves us. */
    double t0 = now_ms();
    for (;;) {
        me->attempts++;
        me->rc2 = pb_acquire(c, pool, 2000, &l);
        if (me->rc2 == PB_OK) {
            if (c_exec(l, "SELECT 1", NULL, 0))
                me->rc2 = 1;
            pb_release(l);
            break;
        }
        if (now_ms() - t0 > 10000)
            break;
        sleep_ms(50);
    }
    me->t2 = now_ms();
    atomic_store(&me->have2, 1);
    pb_disconnect(c);
    return 0;
}

static const char *const bd_name[BD_N] = { "holder", "waiter 1", "waiter 2", "waiter 3", "sleeper" };

static void test_broker_death(void **state)
{
    (void)state;
    bs = shared_alloc(sizeof *bs);
    pid_t pids[BD_N];
    pids[BD_HOLDER] = spawn(bd_worker_main, (void *)(intptr_t)BD_HOLDER);
    double until = now_ms() + 10000;
    while (atomic_load(&bs->ready) < 1) {
        if (now_ms() > until)
            fail_msg("holder did not get the bd slot");
        sleep_ms(5);
    }
    for (int w = BD_WAITER1; w < BD_N; w++)
        pids[w] = spawn(bd_worker_main, (void *)(intptr_t)w);
    while (atomic_load(&bs->ready) < BD_N) {
        if (now_ms() > until)
            fail_msg("only %d of %d broker-death workers ready", atomic_load(&bs->ready), BD_N);
        sleep_ms(5);
    }
    atomic_store(&bs->go_wait, 1);
    /* Three queued on bd, one inside pg_sleep(5). */
    long long waiting = -1, sleeping = -1;
    until = now_ms() + 5000;
    while (now_ms() < until) {
        waiting = pool_stat("bd", "waiting");
        sleeping = psql_ll("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbdeath' "
                           "AND state = 'active' AND query LIKE 'SELECT pg_sleep(5)%'");
        if (waiting >= 3 && sleeping == 1)
            break;
        sleep_ms(20);
    }
    if (waiting < 3 || sleeping != 1)
        fail_msg("setup: %lld waiters queued on bd, %lld backends in pg_sleep(5)", waiting, sleeping);

    double t_kill = now_ms();
    int st = th_broker_stop(&env, SIGKILL);
    assert_true(st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);

    /* A worker may also die (crash) instead of answering: watch for both. */
    int exited[BD_N], wst[BD_N];
    for (int w = 0; w < BD_N; w++)
        exited[w] = 0;
#define BD_REAP(w) (exited[w] || (exited[w] = wait_kid(pids[w], &wst[w], 0) == 1))
    until = now_ms() + 8000;
    for (int w = BD_WAITER1; w < BD_N; w++)
        while (!atomic_load(&bs->w[w].have1) && !BD_REAP(w) && now_ms() < until)
            sleep_ms(2);
    atomic_store(&bs->go_release, 1);
    for (int w = 0; w < BD_N; w++)
        if (w == BD_HOLDER || w == BD_SLEEPER)
            while (!atomic_load(&bs->w[w].have_rel) && !BD_REAP(w) && now_ms() < until + 5000)
                sleep_ms(2);
    double worst = 0;
    int crashed = 0;
    for (int w = 0; w < BD_N; w++) {
        if (BD_REAP(w) && !(WIFEXITED(wst[w]) && WEXITSTATUS(wst[w]) == 0)) {
            crashed++;
            print_message("%s: DIED after the broker was killed (%s %d)\n", bd_name[w],
                          WIFSIGNALED(wst[w]) ? "signal" : "exit status",
                          WIFSIGNALED(wst[w]) ? WTERMSIG(wst[w]) : WEXITSTATUS(wst[w]));
        }
    }
    for (int w = BD_WAITER1; w < BD_N; w++) {
        struct bd_worker *x = &bs->w[w];
        if (!atomic_load(&x->have1)) {
            if (!exited[w])
                print_message("%s: still blocked %.0f ms after the broker was killed\n", bd_name[w],
                              now_ms() - t_kill);
            worst = 1e9;
            continue;
        }
        double dt = x->t1 - t_kill;
        if (dt > worst)
            worst = dt;
        print_message("%s (%s): %s %.0f ms after the broker was SIGKILLed\n", bd_name[w],
                      w == BD_SLEEPER ? "in pb_pg_exec(SELECT pg_sleep(5))" : "in pb_acquire, 10 s timeout",
                      pb_strerror(x->rc1), dt);
    }
    for (int w = 0; w < BD_N; w++)
        if ((w == BD_HOLDER || w == BD_SLEEPER) && !exited[w])
            print_message("%s: pb_release of the orphaned lease: %s in %.1f ms%s\n", bd_name[w],
                          atomic_load(&bs->w[w].have_rel) ? pb_strerror(bs->w[w].rc_rel) : "(no answer)",
                          bs->w[w].rel_ms, atomic_load(&bs->w[w].have_rel) ? "" : " - STILL BLOCKED");

    /* The supervisor restarts it; the same processes carry on. */
    double t_restart = now_ms();
    assert_int_equal(th_broker_restart(&env), 0);
    double t_ready = now_ms();
    atomic_store(&bs->go_again, 1);
    int bad = 0;
    for (int w = 0; w < BD_N; w++) {
        if (exited[w] && !(WIFEXITED(wst[w]) && WEXITSTATUS(wst[w]) == 0)) {
            bad++;
            continue;
        }
        if (!exited[w] && wait_kid(pids[w], &wst[w], 30000) != 1) {
            print_message("%s: still running 30 s after the restart\n", bd_name[w]);
            bad++;
            continue;
        }
        exited[w] = 1;
        if (!WIFEXITED(wst[w]) || WEXITSTATUS(wst[w]) != 0) {
            print_message("%s: did not finish cleanly (status %d)\n", bd_name[w], wst[w]);
            bad++;
            continue;
        }
        struct bd_worker *x = &bs->w[w];
        print_message("%s after the restart: %s after %d attempt(s), %.0f ms after the new broker was ready\n",
                      bd_name[w], x->rc2 == PB_OK ? "served" : x->rc2 > 0 ? "SQL error" : pb_strerror(x->rc2),
                      x->attempts, x->t2 - t_ready);
        if (x->rc2 != PB_OK)
            bad++;
    }
#undef BD_REAP
    print_message("broker restart took %.0f ms\n", t_ready - t_restart);

    for (int w = BD_WAITER1; w < BD_N; w++)
        assert_int_equal(bs->w[w].rc1, PB_EBROKER);
    assert_int_equal(crashed, 0);
    assert_true(worst < 3000);
    assert_true(atomic_load(&bs->w[BD_HOLDER].have_rel));
    assert_true(atomic_load(&bs->w[BD_SLEEPER].have_rel));
    assert_int_equal(bad, 0);
    munmap(bs, sizeof *bs);
    bs = NULL;
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_misuse, test_setup, test_teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_on_death, test_setup, test_teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_during_query, test_setup, test_teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_mid_query_fresh_connection, test_setup, test_teardown),
        cmocka_unit_test_setup_teardown(test_max_lease_taken_back, test_setup, test_teardown),
        cmocka_unit_test_setup_teardown(test_fairness, test_setup, test_teardown),
        cmocka_unit_test_setup_teardown(test_kill_storm, test_setup, test_teardown),
        cmocka_unit_test_setup_teardown(test_broker_death, test_setup, test_teardown),
    };
    const char *filter = getenv("PB_TEST_FILTER");      /* e.g. "test_kill_storm" */
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests_name("death", tests, group_setup, group_teardown);
}
