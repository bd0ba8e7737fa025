/*
 * test_lifecycle.c — the life of pooled connections, on real servers.
 *
 * What happens to the connections behind a pool when the backend kills them
 * while idle, when a command runs past command_timeout_ms, when the pool
 * grows and shrinks, when max_uses / max_lifetime_s / validate_after_idle_ms
 * recycle them, when the backend goes away under load and comes back on the
 * same port, and what shmstat says meanwhile.
 *
 * Two groups, each with its own temp dir, servers and broker:
 *   lifecycle_pg     PostgreSQL pools (the outage tests come last: they stop
 *                    and restart the server)
 *   lifecycle_redis  Redis pools
 *
 * Timings are printed (print_message) and asserted only as far as needed to
 * prove the behaviour: "within a few seconds", "no hang", "before the
 * 5 s pg_sleep would have ended".
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"

static th_env env_pg;
static th_env env_redis;

/* ------------------------------------------------------------- utilities */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Clients and children of the running test: cleaned up by test_cleanup even
 * when an assertion jumps out, so no lease is left held at teardown (the
 * broker drains leases on SIGTERM) and no worker outlives its test. */
#define MAX_TRACKED 32
static pb_client *tracked_clients[MAX_TRACKED];
static pid_t tracked_children[MAX_TRACKED];

static pb_client *cli(th_env *e)
{
    pb_client *c = NULL;
    int rc = pb_connect(e->sock_path, &c);
    if (rc != PB_OK)
        fail_msg("pb_connect: %s", pb_strerror(rc));
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_clients[i] == NULL) {
            tracked_clients[i] = c;
            break;
        }
    return c;
}

static void cli_done(pb_client *c)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_clients[i] == c)
            tracked_clients[i] = NULL;
    pb_disconnect(c);   /* releases any lease still held */
}

static void track_child(pid_t p)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_children[i] == 0) {
            tracked_children[i] = p;
            return;
        }
}

static void untrack_child(pid_t p)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_children[i] == p)
            tracked_children[i] = 0;
}

static int test_cleanup(void **state)
{
    (void)state;
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked_children[i] > 0) {
            kill(tracked_children[i], SIGKILL);
            waitpid(tracked_children[i], NULL, 0);
            tracked_children[i] = 0;
        }
    }
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked_clients[i] != NULL) {
            pb_disconnect(tracked_clients[i]);
            tracked_clients[i] = NULL;
        }
    }
    return 0;
}

static pb_lease *lease(pb_client *c, const char *pool, int timeout_ms)
{
    pb_lease *l = NULL;
    int rc = pb_acquire(c, pool, timeout_ms, &l);
    if (rc != PB_OK)
        fail_msg("pb_acquire %s: %s", pool, pb_strerror(rc));
    return l;
}

/* Run sql expecting rows; the first value as an integer. */
static long long pg_int(pb_lease *l, const char *sql)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    if (rc != PB_OK)
        fail_msg("%s: %s", sql, pb_strerror(rc));
    if (pb_result_status(r) != PB_RES_TUPLES_OK || pb_ntuples(r) < 1) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", pb_error_message(r));
        pb_result_free(r);
        fail_msg("%s: not a row (%s)", sql, msg);
    }
    long long v = atoll(pb_getvalue(r, 0, 0));
    pb_result_free(r);
    return v;
}

/* psql a query whose answer is one integer; -1 on failure. */
static long psql_int(th_env *e, const char *sql)
{
    char out[256];
    if (th_psql(e, sql, out, sizeof out) != 0)
        return -1;
    return atol(out);
}

static long pg_count(th_env *e, const char *app)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE application_name = '%s'", app);
    return psql_int(e, sql);
}

/* Wait until the backend has `want` connections of app; ms waited or -1. */
static double wait_pg_count(th_env *e, const char *app, long want, int timeout_ms)
{
    double t0 = now_ms();
    for (;;) {
        if (pg_count(e, app) == want)
            return now_ms() - t0;
        if (now_ms() - t0 > timeout_ms)
            return -1;
        sleep_ms(50);
    }
}

/* Backend pids of app, comma separated, in out. */
static void pg_pids(th_env *e, const char *app, char *out, size_t n)
{
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM pg_stat_activity "
             "WHERE application_name = '%s'", app);
    if (th_psql(e, sql, out, n) != 0)
        fail_msg("psql: %s", sql);
}

static int in_list(const char *list, int pid)
{
    char buf[512];
    snprintf(buf, sizeof buf, ",%s,", list);
    char needle[32];
    snprintf(needle, sizeof needle, ",%d,", pid);
    return strstr(buf, needle) != NULL;
}

/* Kills that must land right before a lease go through a lease of the
 * "admin" pool: a shared-memory round trip, no process spawn.  Returns how
 * many backends of app were signalled, -1 on failure. */
static int pg_lease_terminate(pb_lease *admin, const char *app)
{
    const char *vals[1] = { app };
    pb_result *r = NULL;
    int rc = pb_pg_exec_params(admin,
                               "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = $1) s",
                               1, NULL, vals, NULL, NULL, 0, &r);
    int n = rc == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK ? atoi(pb_getvalue(r, 0, 0)) : -1;
    pb_result_free(r);
    return n;
}

static void shmstat_path(th_env *e, char *buf, size_t n)
{
    const char *b = getenv("PB_BUILD");
    if (b != NULL && b[0] != '\0')
        snprintf(buf, n, "%s/shmstat", b);
    else
        snprintf(buf, n, "%s/build/shmstat", e->srcdir);
}

/* shmstat --json into out; 0 or -1. */
static int shmstat_json(th_env *e, char *out, size_t n)
{
    char bin[512];
    shmstat_path(e, bin, sizeof bin);
    char *argv[] = { bin, (char *)"-s", e->shm_name, (char *)"--json", NULL };
    return th_run(argv, out, n, 10000) == 0 ? 0 : -1;
}

/* The pool object of `pool` in shmstat's JSON, or NULL. */
static const char *json_pool(const char *json, const char *pool)
{
    char key[96];
    snprintf(key, sizeof key, "{\"name\": \"%s\"", pool);
    return strstr(json, key);
}

/* A string field of the pool's object; 0 or -1. */
static int json_pool_str(const char *json, const char *pool, const char *field, char *val, size_t n)
{
    const char *p = json_pool(json, pool);
    val[0] = '\0';
    if (p == NULL)
        return -1;
    char key[64];
    snprintf(key, sizeof key, "\"%s\": \"", field);
    const char *end = strchr(p + 1, '{');   /* the next object: not ours */
    const char *f = strstr(p, key);
    if (f == NULL || (end != NULL && f > end))
        return -1;
    f += strlen(key);
    size_t k = 0;
    while (*f != '\0' && *f != '"') {
        if (*f == '\\' && f[1] != '\0')
            f++;
        if (k + 1 < n)
            val[k++] = *f;
        f++;
    }
    val[k] = '\0';
    return 0;
}

static long long json_pool_num(const char *json, const char *pool, const char *field)
{
    const char *p = json_pool(json, pool);
    if (p == NULL)
        return -1;
    char key[64];
    snprintf(key, sizeof key, "\"%s\": ", field);
    const char *end = strchr(p + 1, '{');
    const char *f = strstr(p, key);
    if (f == NULL || (end != NULL && f > end))
        return -1;
    return atoll(f + strlen(key));
}

static long long pool_counter(th_env *e, const char *pool, const char *field)
{
    static char json[262144];
    if (shmstat_json(e, json, sizeof json) != 0)
        return -1;
    return json_pool_num(json, pool, field);
}

/* ------------------------------------------------------------ PostgreSQL */

#define PG_POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool admin]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbadmin\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool kill]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife\n" \
    "min_size = 2\n" \
    "max_size = 2\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 5000\n" \
    "\n" \
    "[pool slow]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_to\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "command_timeout_ms = 500\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool grow]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_grow\n" \
    "min_size = 1\n" \
    "max_size = 6\n" \
    "idle_timeout_s = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 10000\n" \
    "\n" \
    "[pool uses]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_uses\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "max_uses = 3\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool life]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_life\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "max_lifetime_s = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool val]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_val\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 300\n" \
    "\n" \
    "[pool multi]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1,127.0.0.1 port=1,@PGPORT@ user=postgres dbname=postgres sslmode=disable " \
    "application_name=pblife_multi connect_timeout=5\n" \
    "min_size = 0\n" \
    "max_size = 1\n" \
    "\n" \
    "[pool multirw]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1,127.0.0.1 port=1,@PGPORT@ user=postgres dbname=postgres sslmode=disable " \
    "application_name=pblife_multirw connect_timeout=5 target_session_attrs=read-write\n" \
    "min_size = 0\n" \
    "max_size = 1\n" \
    "\n" \
    "[pool load]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_load\n" \
    "min_size = 2\n" \
    "max_size = 3\n" \
    "acquire_timeout_ms = 5000\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool lazy]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_lazy\n" \
    "min_size = 0\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 5000\n" \
    "validate_after_idle_ms = 0\n"

static int pg_group_setup(void **state)
{
    (void)state;
    if (th_setup(&env_pg, 1, 0) < 0)
        return -1;
    if (th_broker_start(&env_pg, PG_POOLS) < 0)
        return -1;
    return 0;
}

static int pg_group_teardown(void **state)
{
    (void)state;
    test_cleanup(NULL);
    return th_teardown(&env_pg);
}

/* The first command of a lease: SELECT pg_backend_pid().  Returns the pid,
 * or 0 if it failed, with what happened in how. */
static int pg_first_command(pb_lease *l, char *how, size_t n)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, "SELECT pg_backend_pid()", &r);
    if (rc != PB_OK) {
        snprintf(how, n, "pb_pg_exec -> %s", pb_strerror(rc));
        return 0;
    }
    if (pb_result_status(r) != PB_RES_TUPLES_OK) {
        const char *st = pb_error_field(r, 'C');
        snprintf(how, n, "error result SQLSTATE %s: %s", st ? st : "?", pb_error_message(r));
        pb_result_free(r);
        return 0;
    }
    int pid = atoi(pb_getvalue(r, 0, 0));
    pb_result_free(r);
    snprintf(how, n, "ok (pid %d)", pid);
    return pid;
}

/* 1. Idle connections killed by the server are replaced before anyone leases
 * them: 200 ms after pg_terminate_backend, each lease's FIRST command works. */
static void test_pg_idle_kill_then_lease_200ms(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    assert_true(wait_pg_count(e, "pblife", 2, 10000) >= 0);
    sleep_ms(300);          /* let the idle watch be armed on both */
    long long connects0 = pool_counter(e, "kill", "connects");
    for (int round = 0; round < 2; round++) {
        char old[256];
        pg_pids(e, "pblife", old, sizeof old);
        long killed = psql_int(e, "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = 'pblife') s");
        double t_kill = now_ms();
        assert_int_equal(killed, 2);
        sleep_ms(200);
        pb_client *c = cli(e);
        pb_lease *l[2];
        int pids[2], failed = 0;
        double t_acq = now_ms();
        for (int i = 0; i < 2; i++) {
            l[i] = lease(c, "kill", 5000);
            char how[256];
            pids[i] = pg_first_command(l[i], how, sizeof how);
            if (pids[i] == 0 || in_list(old, pids[i])) {
                failed++;
                print_message("round %d lease %d: first command: %s (killed pids %s)\n", round, i, how, old);
            }
        }
        double acq_ms = now_ms() - t_acq;
        for (int i = 0; i < 2; i++)
            assert_int_equal(pb_release(l[i]), PB_OK);
        cli_done(c);
        double refill = wait_pg_count(e, "pblife", 2, 10000);
        print_message("pg idle kill round %d: killed %s; 200 ms later 2 leases + first commands took %.1f ms, "
                      "new pids %d,%d, %d failed; pool back to 2 connections %.0f ms after the kill\n",
                      round, old, acq_ms, pids[0], pids[1], failed, refill < 0 ? -1.0 : now_ms() - t_kill);
        assert_int_equal(failed, 0);
        assert_true(refill >= 0);
        sleep_ms(300);
    }
    long long connects1 = pool_counter(e, "kill", "connects");
    print_message("pg idle kill: pool 'kill' made %lld new connections for 4 killed\n", connects1 - connects0);
}

/* 1b. The same with no delay at all: kill through a lease of the admin
 * pool, lease at once.  Reported; the assertion is only that a
 * failure is a clean error and costs one lease per killed connection at
 * most. */
static void test_pg_idle_kill_then_lease_0ms(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = cli(e);
    pb_lease *admin = lease(c, "admin", 10000);
    int rounds = 5, first_failed = 0;
    for (int round = 0; round < rounds; round++) {
        if (wait_pg_count(e, "pblife", 2, 10000) < 0)
            fail_msg("pool 'kill' did not get back to 2 connections");
        sleep_ms(300);
        int killed = pg_lease_terminate(admin, "pblife");
        double t0 = now_ms();
        pb_lease *l = NULL;
        int rc = pb_acquire(c, "kill", 5000, &l);
        char how[256];
        int pid = 0;
        if (rc == PB_OK)
            pid = pg_first_command(l, how, sizeof how);
        else
            snprintf(how, sizeof how, "pb_acquire -> %s", pb_strerror(rc));
        double dt = now_ms() - t0;
        if (pid == 0)
            first_failed++;
        print_message("pg idle kill, lease at once (round %d, %d killed): first command %s after %.2f ms\n", round,
                      killed, how, dt);
        if (l != NULL)
            pb_release(l);
        /* Whatever went wrong, each killed connection costs at most one
         * failed first command: the next leases (one per other killed
         * connection, which the broker may not have seen close yet, plus one)
         * reach a working connection. */
        for (int retry = 1; pid == 0; retry++) {
            l = lease(c, "kill", 5000);
            pid = pg_first_command(l, how, sizeof how);
            pb_release(l);
            if (pid == 0 && retry >= killed)
                fail_msg("%d leases after a failed first command failed too: %s", retry, how);
        }
    }
    assert_int_equal(pb_release(admin), PB_OK);
    cli_done(c);
    print_message("pg idle kill, lease at once: first command failed in %d of %d rounds\n", first_failed, rounds);
}

/* 2. pg_sleep past command_timeout_ms: cancelled (57014) well before the
 * sleep would end, and the lease stays usable on the same connection. */
static void test_pg_command_timeout_cancels(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = cli(e);
    pb_lease *l = lease(c, "slow", 10000);
    int pid0 = pb_lease_backend_pid(l);
    pb_result *r = NULL;
    double t0 = now_ms();
    int rc = pb_pg_exec(l, "SELECT pg_sleep(5)", &r);
    double dt = now_ms() - t0;
    const char *st = r ? pb_error_field(r, 'C') : NULL;
    print_message("pg_sleep(5) with command_timeout_ms=500: %s, status %d, SQLSTATE %s after %.0f ms\n",
                  pb_strerror(rc), r ? pb_result_status(r) : -1, st ? st : "-", dt);
    assert_int_equal(rc, PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_non_null(st);
    assert_string_equal(st, "57014");
    assert_true(dt < 2500);
    pb_result_free(r);
    assert_int_equal(pg_int(l, "SELECT 1"), 1);
    assert_int_equal(pg_int(l, "SELECT pg_backend_pid()"), pid0);
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "slow", 10000);
    assert_int_equal(pg_int(l, "SELECT 2"), 2);
    print_message("after the cancel: same lease and the next one work (pid %d then %d)\n", pid0,
                  pb_lease_backend_pid(l));
    assert_int_equal(pb_release(l), PB_OK);
    cli_done(c);
}

/* 3. Growth to max_size under concurrent demand, and the shrink back to
 * min_size after idle_timeout_s. */
#define GROW_N 6
static struct {
    int ran;
    char pids[256];          /* the 6 backends */
    long long connects_before, connects_after;
    long min_seen;           /* fewest connections seen while shrinking */
    int survivor;
} grow_res;

static void grow_child(th_env *e, int i, int res_fd, int go_fd)
{
    pb_client *c = NULL;
    int out[3] = { i, -100, 0 };
    double t0 = now_ms();
    if (pb_connect(e->sock_path, &c) == PB_OK) {
        pb_lease *l = NULL;
        out[1] = pb_acquire(c, "grow", 10000, &l);
        if (out[1] == PB_OK) {
            pb_result *r = NULL;
            if (pb_pg_exec(l, "SELECT pg_backend_pid()", &r) == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK)
                out[2] = atoi(pb_getvalue(r, 0, 0));
            pb_result_free(r);
        }
        int ms = (int)(now_ms() - t0);
        int msg[4] = { out[0], out[1], out[2], ms };
        if (write(res_fd, msg, sizeof msg) != sizeof msg)
            _exit(3);
        char b;
        while (read(go_fd, &b, 1) < 0 && errno == EINTR)
            ;
        if (l)
            pb_release(l);
        pb_disconnect(c);
        _exit(0);
    }
    int msg[4] = { i, PB_EBROKER, 0, 0 };
    if (write(res_fd, msg, sizeof msg) < 0)
        _exit(2);
    _exit(1);
}

static void test_pg_grow_to_max_and_shrink(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    memset(&grow_res, 0, sizeof grow_res);
    assert_true(wait_pg_count(e, "pblife_grow", 1, 10000) >= 0);

    int resp[2], gop[2];
    assert_int_equal(pipe(resp), 0);
    assert_int_equal(pipe(gop), 0);
    pid_t kids[GROW_N];
    fflush(NULL);
    for (int i = 0; i < GROW_N; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            close(resp[0]);
            close(gop[1]);
            grow_child(e, i, resp[1], gop[0]);
        }
        track_child(kids[i]);
    }
    close(resp[1]);
    close(gop[0]);
    int got = 0, bad = 0, maxwait = 0;
    char pids[256] = "";
    while (got < GROW_N) {
        struct pollfd p = { .fd = resp[0], .events = POLLIN };
        if (poll(&p, 1, 15000) <= 0)
            break;
        int msg[4];
        if (read(resp[0], msg, sizeof msg) != sizeof msg)
            break;
        got++;
        if (msg[1] != PB_OK || msg[2] <= 0) {
            bad++;
            print_message("grow child %d: acquire %s, pid %d\n", msg[0], pb_strerror(msg[1]), msg[2]);
        } else {
            size_t len = strlen(pids);
            snprintf(pids + len, sizeof pids - len, "%s%d", len ? "," : "", msg[2]);
        }
        if (msg[3] > maxwait)
            maxwait = msg[3];
    }
    long held_count = pg_count(e, "pblife_grow");
    /* A 7th lease must not grow the pool past max_size. */
    pb_client *c = cli(e);
    pb_lease *l7 = NULL;
    int rc7 = pb_acquire(c, "grow", 300, &l7);
    if (l7)
        pb_release(l7);
    long after7 = pg_count(e, "pblife_grow");
    long long connects_before = pool_counter(e, "grow", "connects");
    close(gop[1]);          /* go: the children release and exit */
    double t_rel = now_ms();
    int exited_bad = 0;
    for (int i = 0; i < GROW_N; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        untrack_child(kids[i]);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            exited_bad++;
    }
    close(resp[0]);
    print_message("grow: %d concurrent leases granted (slowest waited %d ms), backends %s; pg_stat_activity "
                  "shows %ld; a 7th acquire gave %s and the count stayed %ld\n",
                  got - bad, maxwait, pids, held_count, pb_strerror(rc7), after7);
    assert_int_equal(got, GROW_N);
    assert_int_equal(bad, 0);
    assert_int_equal(exited_bad, 0);
    assert_int_equal(held_count, GROW_N);
    assert_int_equal(rc7, PB_ETIMEDOUT);
    assert_true(after7 <= GROW_N);

    /* Shrink: idle_timeout_s = 1 closes the idle ones down to min_size. */
    long min_seen = 1000;
    double t_one = -1;
    while (now_ms() - t_rel < 10000) {
        long n = pg_count(e, "pblife_grow");
        if (n >= 0 && n < min_seen)
            min_seen = n;
        if (n == 1 && t_one < 0)
            t_one = now_ms() - t_rel;
        if (t_one >= 0 && now_ms() - t_rel > t_one + 1500)
            break;
        sleep_ms(50);
    }
    long final = pg_count(e, "pblife_grow");
    char surv[64];
    pg_pids(e, "pblife_grow", surv, sizeof surv);
    long long connects_after = pool_counter(e, "grow", "connects");
    print_message("shrink: back to 1 connection %.0f ms after release (idle_timeout_s=1); fewest seen %ld; "
                  "final %ld (pid %s, %s the 6); %lld connections made meanwhile\n",
                  t_one, min_seen, final, surv, in_list(pids, atoi(surv)) ? "one of" : "NOT one of",
                  connects_after - connects_before);
    grow_res.ran = 1;
    snprintf(grow_res.pids, sizeof grow_res.pids, "%s", pids);
    grow_res.connects_before = connects_before;
    grow_res.connects_after = connects_after;
    grow_res.min_seen = min_seen;
    grow_res.survivor = atoi(surv);
    cli_done(c);
    assert_true(t_one >= 0);
    assert_true(t_one < 6000);
    assert_int_equal(final, 1);
}

/* 3b. Shrinking stops at min_size: the survivor is one of the idle
 * connections, not a fresh one made after closing them all. */
static void test_pg_shrink_keeps_min_size(void **state)
{
    (void)state;
    if (!grow_res.ran)
        fail_msg("test_pg_grow_to_max_and_shrink did not get to the shrink");
    print_message("shrink: fewest connections seen %ld, %lld new connections, survivor pid %d in {%s}: %s\n",
                  grow_res.min_seen, grow_res.connects_after - grow_res.connects_before, grow_res.survivor,
                  grow_res.pids, in_list(grow_res.pids, grow_res.survivor) ? "yes" : "no");
    assert_int_equal(grow_res.connects_after - grow_res.connects_before, 0);
    assert_true(in_list(grow_res.pids, grow_res.survivor));
    assert_true(grow_res.min_seen >= 1);
}

/* 4a. max_uses = 3: a new backend after every 3 leases. */
static void test_pg_max_uses(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = cli(e);
    int pid[7];
    char seq[128] = "";
    for (int i = 0; i < 7; i++) {
        pb_lease *l = lease(c, "uses", 10000);
        pid[i] = (int)pg_int(l, "SELECT pg_backend_pid()");
        assert_int_equal(pb_lease_backend_pid(l), pid[i]);
        assert_int_equal(pb_release(l), PB_OK);
        size_t len = strlen(seq);
        snprintf(seq + len, sizeof seq - len, "%s%d", i ? "," : "", pid[i]);
    }
    print_message("max_uses=3: backend pids of 7 leases: %s\n", seq);
    assert_int_equal(pid[0], pid[1]);
    assert_int_equal(pid[1], pid[2]);
    assert_int_not_equal(pid[2], pid[3]);
    assert_int_equal(pid[3], pid[4]);
    assert_int_equal(pid[4], pid[5]);
    assert_int_not_equal(pid[5], pid[6]);
    cli_done(c);
}

/* 4b. max_lifetime_s = 1: an idle connection is replaced once its lifetime
 * has passed. */
static void test_pg_max_lifetime_recycles(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = cli(e);
    pb_lease *l = lease(c, "life", 10000);
    int a = (int)pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    sleep_ms(1500);
    l = lease(c, "life", 10000);
    int b = (int)pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    print_message("max_lifetime_s=1: pid %d, then %d after 1.5 s idle\n", a, b);
    assert_int_not_equal(a, b);
    cli_done(c);
}

/* 4c. ... but a lease is never interrupted by it. */
static void test_pg_max_lifetime_spares_leases(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = cli(e);
    pb_lease *l = lease(c, "life", 10000);
    int a = (int)pg_int(l, "SELECT pg_backend_pid()");
    double t0 = now_ms();
    int n = 0, other = 0, errs = 0;
    while (now_ms() - t0 < 2000) {
        pb_result *r = NULL;
        int rc = pb_pg_exec(l, "SELECT pg_backend_pid()", &r);
        if (rc != PB_OK || pb_result_status(r) != PB_RES_TUPLES_OK)
            errs++;
        else if (atoi(pb_getvalue(r, 0, 0)) != a)
            other++;
        pb_result_free(r);
        n++;
        sleep_ms(20);
    }
    int still = pb_lease_backend_pid(l);
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "life", 10000);
    int b = (int)pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    print_message("max_lifetime_s=1, lease held 2 s: %d queries, %d errors, %d on another backend; "
                  "pid %d throughout, next lease pid %d\n", n, errs, other, a, b);
    assert_int_equal(errs, 0);
    assert_int_equal(other, 0);
    assert_int_equal(still, a);
    assert_int_not_equal(b, a);
    cli_done(c);
}

/* 5. validate_after_idle_ms = 300: validations (empty queries) keep a
 * healthy connection; a killed one is replaced before the next lease's
 * first command. */
static void test_pg_validate_after_idle(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    assert_true(wait_pg_count(e, "pblife_val", 1, 10000) >= 0);
    pb_client *c = cli(e);
    pb_lease *l = lease(c, "val", 10000);
    int a = (int)pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    sleep_ms(1000);
    char act[256];
    assert_int_equal(th_psql(e, "SELECT state || '|' || query || '|' || pid FROM pg_stat_activity "
                                "WHERE application_name = 'pblife_val'", act, sizeof act), 0);
    l = lease(c, "val", 10000);
    char how[256];
    int pid = pg_first_command(l, how, sizeof how);
    long long n = pg_int(l, "SELECT count(*) FROM pg_stat_activity");
    assert_int_equal(pb_release(l), PB_OK);
    print_message("validate_after_idle_ms=300: after 1 s idle the backend shows '%s'; next lease first command "
                  "%s, pg_stat_activity count %lld\n", act, how, n);
    assert_int_equal(pid, a);
    assert_true(n >= 1);

    /* Killed while idle, lease 200 ms later. */
    sleep_ms(400);
    assert_int_equal(psql_int(e, "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE application_name = 'pblife_val') s"), 1);
    sleep_ms(200);
    l = lease(c, "val", 10000);
    int b = pg_first_command(l, how, sizeof how);
    assert_int_equal(pb_release(l), PB_OK);
    print_message("validate pool, killed, lease 200 ms later: first command %s\n", how);
    assert_true(b > 0);
    assert_int_not_equal(b, a);

    /* Killed while idle, lease at once (reported). */
    pb_lease *admin = lease(c, "admin", 10000);
    int fails = 0;
    for (int round = 0; round < 3; round++) {
        if (wait_pg_count(e, "pblife_val", 1, 10000) < 0)
            fail_msg("pool 'val' did not reconnect");
        sleep_ms(round == 2 ? 100 : 400);   /* idle past, and not past, 300 ms */
        pg_lease_terminate(admin, "pblife_val");
        double t0 = now_ms();
        l = NULL;
        int rc = pb_acquire(c, "val", 5000, &l);
        int p = 0;
        if (rc == PB_OK)
            p = pg_first_command(l, how, sizeof how);
        else
            snprintf(how, sizeof how, "pb_acquire -> %s", pb_strerror(rc));
        if (l)
            pb_release(l);
        if (p == 0)
            fails++;
        print_message("validate pool, killed, lease at once (idle %s 300 ms): first command %s after %.2f ms\n",
                      round == 2 ? "<" : ">", how, now_ms() - t0);
    }
    assert_int_equal(pb_release(admin), PB_OK);
    l = lease(c, "val", 10000);
    assert_int_equal(pg_int(l, "SELECT 3"), 3);
    assert_int_equal(pb_release(l), PB_OK);
    print_message("validate pool, lease at once after a kill: first command failed in %d of 3 rounds\n", fails);
    cli_done(c);
}

/* 7. Multi-host conninfo with the first host refusing. */
static void multi_host(const char *pool)
{
    th_env *e = &env_pg;
    pb_client *c = cli(e);
    double t0 = now_ms();
    pb_lease *l = lease(c, pool, 10000);
    double dt = now_ms() - t0;
    long long port = pg_int(l, "SELECT inet_server_port()");
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SHOW transaction_read_only", &r), PB_OK);
    char ro[16];
    snprintf(ro, sizeof ro, "%s", pb_result_status(r) == PB_RES_TUPLES_OK ? pb_getvalue(r, 0, 0) : "?");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    /* And again, on the pooled connection. */
    l = lease(c, pool, 10000);
    assert_int_equal(pg_int(l, "SELECT 5"), 5);
    assert_int_equal(pb_release(l), PB_OK);
    print_message("pool %s (host=127.0.0.1,127.0.0.1 port=1,%d): first lease in %.1f ms, server port %lld, "
                  "transaction_read_only=%s, connect_failures %lld\n",
                  pool, e->pg_port, dt, port, ro, pool_counter(e, pool, "connect_failures"));
    assert_int_equal(port, e->pg_port);
    assert_string_equal(ro, "off");
    cli_done(c);
}

static void test_pg_multi_host_first_refused(void **state)
{
    (void)state;
    multi_host("multi");
}

static void test_pg_multi_host_read_write(void **state)
{
    (void)state;
    multi_host("multirw");
}

/* ------------------------------------------------------- backend outages */

#define NPH 3                /* 0 before, 1 server down, 2 server back */
#define OUT_WORKERS 5        /* 4 on the main pool, 1 on the min_size=0 pool */
#define NCODES 18            /* -rc for PB_E*; 16: error result/reply; 17: wrong answer */

typedef struct wstat {
    long ok[NPH], acq_fail[NPH], exec_fail[NPH];
    long acq_code[NPH][NCODES], exec_code[NPH][NCODES];
    double acq_fail_ms_max[NPH], acq_fail_ms_sum[NPH];
    double exec_fail_ms_max[NPH];
    double call_ms_max;
    double first_ok_ms[NPH];  /* absolute, CLOCK_MONOTONIC */
} wstat;

typedef struct outage_shm {
    volatile int phase;
    volatile int stop;
    wstat w[OUT_WORKERS];
} outage_shm;

typedef struct outage_cfg {
    th_env *e;
    const char *label;
    const char *pool, *lazy_pool;
    int redis;
    int (*stop)(th_env *);
    int (*start)(th_env *);
} outage_cfg;

typedef struct outage_res {
    int ran;
    wstat w[OUT_WORKERS];
    double down_ms;           /* server down for (stop call to start return) */
    double stop_call_ms, start_call_ms;
    double recover_first_ms, recover_all_ms;   /* from the start's return */
    int hung;                 /* workers that had to be killed */
    int bad_exit;
    char health_during[32], error_during[160];
    char lazy_health_during[32];
    double healthy_after_ms;  /* from the start's return; -1 never */
    char health_final[32], lazy_health_final[32];
    double lazy_ok_after_ms;  /* the min_size=0 pool leased again; -1 never */
    double lazy_recover_ms;   /* its worker's first success after the restart; -1 never */
    char lazy_how[160];
} outage_res;

static outage_res pg_outage, redis_outage;

static int code_index(int rc)
{
    return rc < 0 && -rc < 16 ? -rc : 17;
}

/* One command on a lease; 0 if it answered as expected, else a code index. */
static int outage_command(pb_lease *l, int redis)
{
    if (redis) {
        redisReply *r = NULL;
        int rc = pb_redis_command(l, &r, "PING");
        if (rc != PB_OK)
            return code_index(rc);
        int good = r->type == REDIS_REPLY_STATUS && r->str && strcmp(r->str, "PONG") == 0;
        int err = r->type == REDIS_REPLY_ERROR;
        freeReplyObject(r);
        return good ? 0 : err ? 16 : 17;
    }
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, "SELECT 1", &r);
    if (rc != PB_OK)
        return code_index(rc);
    int st = pb_result_status(r);
    int good = st == PB_RES_TUPLES_OK && strcmp(pb_getvalue(r, 0, 0), "1") == 0;
    pb_result_free(r);
    return good ? 0 : st == PB_RES_ERROR ? 16 : 17;
}

static int outage_worker(const outage_cfg *cfg, outage_shm *sh, int idx, const char *pool)
{
    wstat *w = &sh->w[idx];
    pb_client *c = NULL;
    if (pb_connect(cfg->e->sock_path, &c) != PB_OK)
        return 1;
    while (!sh->stop) {
        int ph = sh->phase;
        pb_lease *l = NULL;
        double t0 = now_ms();
        int rc = pb_acquire(c, pool, 5000, &l);
        double t1 = now_ms();
        if (t1 - t0 > w->call_ms_max)
            w->call_ms_max = t1 - t0;
        if (rc != PB_OK) {
            /* A call the server's stop caught in flight belongs to the
             * outage, not to the phase it started in. */
            ph = sh->phase;
            w->acq_fail[ph]++;
            w->acq_code[ph][code_index(rc)]++;
            w->acq_fail_ms_sum[ph] += t1 - t0;
            if (t1 - t0 > w->acq_fail_ms_max[ph])
                w->acq_fail_ms_max[ph] = t1 - t0;
            sleep_ms(10);
            continue;
        }
        int bad = outage_command(l, cfg->redis);
        double t2 = now_ms();
        if (t2 - t1 > w->call_ms_max)
            w->call_ms_max = t2 - t1;
        pb_release(l);
        if (bad) {
            ph = sh->phase;
            w->exec_fail[ph]++;
            w->exec_code[ph][bad]++;
            if (t2 - t1 > w->exec_fail_ms_max[ph])
                w->exec_fail_ms_max[ph] = t2 - t1;
            sleep_ms(10);
            continue;
        }
        w->ok[ph]++;
        if (w->first_ok_ms[ph] == 0)
            w->first_ok_ms[ph] = t2;
        sleep_ms(2);
    }
    pb_disconnect(c);
    return 0;
}

static void pool_health(th_env *e, const char *pool, char *health, size_t hn, char *err, size_t en)
{
    static char json[262144];
    health[0] = '\0';
    if (err)
        err[0] = '\0';
    if (shmstat_json(e, json, sizeof json) != 0) {
        snprintf(health, hn, "(shmstat failed)");
        return;
    }
    json_pool_str(json, pool, "health", health, hn);
    if (err)
        json_pool_str(json, pool, "last_error", err, en);
}

static void codes_str(const long *codes, char *buf, size_t n)
{
    buf[0] = '\0';
    for (int k = 0; k < NCODES; k++) {
        if (!codes[k])
            continue;
        size_t len = strlen(buf);
        const char *name = k == 16 ? "error-reply" : k == 17 ? "wrong-answer" : pb_strerror(-k);
        snprintf(buf + len, n - len, "%s%s x%ld", len ? ", " : "", name, codes[k]);
    }
    if (!buf[0])
        snprintf(buf, n, "-");
}

static void outage_print(const outage_cfg *cfg, const outage_res *r)
{
    static const char *const names[NPH] = { "before", "down", "back" };
    for (int ph = 0; ph < NPH; ph++) {
        for (int i = 0; i < OUT_WORKERS; i++) {
            const wstat *w = &r->w[i];
            char ac[256], ec[256];
            codes_str(w->acq_code[ph], ac, sizeof ac);
            codes_str(w->exec_code[ph], ec, sizeof ec);
            print_message("%s outage, %-6s worker %d (%s): ok %ld; acquire failed %ld (%s; mean %.1f ms, "
                          "max %.1f ms); command failed %ld (%s; max %.1f ms)\n",
                          cfg->label, names[ph], i, i == OUT_WORKERS - 1 ? cfg->lazy_pool : cfg->pool, w->ok[ph],
                          w->acq_fail[ph], ac, w->acq_fail[ph] ? w->acq_fail_ms_sum[ph] / w->acq_fail[ph] : 0.0,
                          w->acq_fail_ms_max[ph], w->exec_fail[ph], ec, w->exec_fail_ms_max[ph]);
        }
    }
    double maxcall = 0;
    for (int i = 0; i < OUT_WORKERS; i++)
        if (r->w[i].call_ms_max > maxcall)
            maxcall = r->w[i].call_ms_max;
    print_message("%s outage: stop took %.0f ms, start %.0f ms, server down %.0f ms; first success %.0f ms and "
                  "all main-pool workers %.0f ms after the server was back; slowest single call %.0f ms; "
                  "%d workers hung, %d exited badly\n",
                  cfg->label, r->stop_call_ms, r->start_call_ms, r->down_ms, r->recover_first_ms, r->recover_all_ms,
                  maxcall, r->hung, r->bad_exit);
    print_message("%s outage: shmstat during: %s health \"%s\", last_error \"%s\"; %s health \"%s\"; "
                  "after: %s healthy %.0f ms after the restart (final \"%s\"), %s final \"%s\"; "
                  "%s leased again: %s (%.0f ms after the restart)\n",
                  cfg->label, cfg->pool, r->health_during, r->error_during, cfg->lazy_pool, r->lazy_health_during,
                  cfg->pool, r->healthy_after_ms, r->health_final, cfg->lazy_pool, r->lazy_health_final,
                  cfg->lazy_pool, r->lazy_how, r->lazy_ok_after_ms);
}

/* Run the outage scenario; results in *res.  Asserts only that nothing hung
 * and that the scenario itself could be run. */
static void outage_run(const outage_cfg *cfg, outage_res *res)
{
    th_env *e = cfg->e;
    memset(res, 0, sizeof *res);
    res->healthy_after_ms = res->lazy_ok_after_ms = res->recover_first_ms = res->recover_all_ms = -1;
    outage_shm *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);
    memset(sh, 0, sizeof *sh);

    pid_t kids[OUT_WORKERS];
    fflush(NULL);
    for (int i = 0; i < OUT_WORKERS; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0)
            _exit(outage_worker(cfg, sh, i, i == OUT_WORKERS - 1 ? cfg->lazy_pool : cfg->pool));
        track_child(kids[i]);
    }
    sleep_ms(1000);

    /* Down. */
    sh->phase = 1;
    double t_stop0 = now_ms();
    int stop_rc = cfg->stop(e);
    double t_stop1 = now_ms();
    res->stop_call_ms = t_stop1 - t_stop0;
    sleep_ms(1000);
    pool_health(e, cfg->pool, res->health_during, sizeof res->health_during, res->error_during,
                sizeof res->error_during);
    pool_health(e, cfg->lazy_pool, res->lazy_health_during, sizeof res->lazy_health_during, NULL, 0);
    double left = 2000 - (now_ms() - t_stop1);
    if (left > 0)
        sleep_ms((int)left);

    /* Back, on the same port. */
    double t_start0 = now_ms();
    int start_rc = cfg->start(e);
    double t_up = now_ms();
    res->start_call_ms = t_up - t_start0;
    res->down_ms = t_up - t_stop0;
    sh->phase = 2;

    /* Until every main-pool worker succeeded again and shmstat says healthy
     * (10 s at most), then one more second of load. */
    double t_done = -1;
    while (now_ms() - t_up < 10000) {
        int all = 1;
        for (int i = 0; i < OUT_WORKERS - 1; i++)
            if (sh->w[i].first_ok_ms[2] == 0)
                all = 0;
        if (res->healthy_after_ms < 0) {
            char h[32];
            pool_health(e, cfg->pool, h, sizeof h, NULL, 0);
            if (strcmp(h, "healthy") == 0)
                res->healthy_after_ms = now_ms() - t_up;
        }
        if (all && res->healthy_after_ms >= 0) {
            t_done = now_ms();
            break;
        }
        sleep_ms(50);
    }
    if (t_done >= 0)
        sleep_ms(1000);
    sh->stop = 1;

    /* No worker may hang: each call is bounded by the 5 s acquire timeout. */
    double t_wait = now_ms();
    for (int i = 0; i < OUT_WORKERS; i++) {
        int st = 0;
        pid_t w;
        while ((w = waitpid(kids[i], &st, WNOHANG)) == 0 && now_ms() - t_wait < 10000)
            sleep_ms(10);
        if (w != kids[i]) {
            res->hung++;
            kill(kids[i], SIGKILL);
            waitpid(kids[i], &st, 0);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            res->bad_exit++;
        }
        untrack_child(kids[i]);
    }
    memcpy(res->w, sh->w, sizeof res->w);
    munmap(sh, sizeof *sh);

    double first = -1, last = -1;
    int missing = 0;
    for (int i = 0; i < OUT_WORKERS - 1; i++) {
        double f = res->w[i].first_ok_ms[2];
        if (f == 0) {
            missing = 1;
            continue;
        }
        if (first < 0 || f - t_up < first)
            first = f - t_up;
        if (f - t_up > last)
            last = f - t_up;
    }
    res->recover_first_ms = first;
    res->recover_all_ms = missing ? -1 : last;
    double lf = res->w[OUT_WORKERS - 1].first_ok_ms[2];
    res->lazy_recover_ms = lf == 0 ? -1 : lf - t_up;

    /* The min_size = 0 pool: leased again without anyone doing anything? */
    pb_client *c = cli(e);
    snprintf(res->lazy_how, sizeof res->lazy_how, "never");
    double t_lazy0 = now_ms();
    while (now_ms() - t_lazy0 < 5000) {
        pb_lease *l = NULL;
        int rc = pb_acquire(c, cfg->lazy_pool, 1000, &l);
        if (rc == PB_OK) {
            int bad = outage_command(l, cfg->redis);
            pb_release(l);
            if (!bad) {
                res->lazy_ok_after_ms = now_ms() - t_up;
                snprintf(res->lazy_how, sizeof res->lazy_how, "ok");
                break;
            }
            snprintf(res->lazy_how, sizeof res->lazy_how, "command failed (code %d)", bad);
        } else {
            snprintf(res->lazy_how, sizeof res->lazy_how, "acquire %s", pb_strerror(rc));
        }
        sleep_ms(200);
    }
    cli_done(c);
    pool_health(e, cfg->pool, res->health_final, sizeof res->health_final, NULL, 0);
    pool_health(e, cfg->lazy_pool, res->lazy_health_final, sizeof res->lazy_health_final, NULL, 0);
    res->ran = 1;
    outage_print(cfg, res);
    assert_int_equal(stop_rc, 0);
    assert_int_equal(start_rc, 0);
}

/* 6a. The scenario: workers loop acquire + command + release while the
 * server is stopped for ~2 s and started again on the same port. */
static void outage_scenario_asserts(const outage_res *r)
{
    assert_int_equal(r->hung, 0);
    assert_int_equal(r->bad_exit, 0);
    for (int i = 0; i < OUT_WORKERS; i++) {
        assert_true(r->w[i].ok[0] > 0);
        assert_int_equal(r->w[i].acq_fail[0] + r->w[i].exec_fail[0], 0);
        /* Bounded by the acquire timeout (5 s): nothing hangs. */
        assert_true(r->w[i].call_ms_max < 6000);
    }
}

/* 6b. While the backend is known down, acquires fail with PB_EBACKEND at
 * once (not PB_ETIMEDOUT after the acquire timeout). */
static void outage_fail_fast_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    long fails = 0, timeouts = 0, ebackend = 0;
    double maxms = 0;
    for (int i = 0; i < OUT_WORKERS - 1; i++) {
        fails += r->w[i].acq_fail[1] + r->w[i].exec_fail[1];
        timeouts += r->w[i].acq_code[1][-PB_ETIMEDOUT];
        ebackend += r->w[i].acq_code[1][-PB_EBACKEND];
        if (r->w[i].acq_fail_ms_max[1] > maxms)
            maxms = r->w[i].acq_fail_ms_max[1];
    }
    print_message("%s outage, main pool while down: %ld failed calls, %ld acquires PB_EBACKEND, %ld PB_ETIMEDOUT; "
                  "slowest failing acquire %.1f ms\n", label, fails, ebackend, timeouts, maxms);
    assert_true(fails > 0);        /* the outage was seen */
    assert_true(ebackend > 0);
    assert_int_equal(timeouts, 0);
    assert_true(maxms < 1000);     /* "at once", generously */
}

/* 6c. Once the server is back, leases succeed again within a few seconds,
 * with no action from the workers. */
static void outage_recovery_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    print_message("%s outage: all main-pool workers succeeded again %.0f ms after the server was back\n", label,
                  r->recover_all_ms);
    for (int i = 0; i < OUT_WORKERS - 1; i++)
        assert_true(r->w[i].ok[2] > 0);
    assert_true(r->recover_all_ms >= 0);
    assert_true(r->recover_all_ms < 5000);
}

/* 6d. The same for a pool with min_size = 0 (no janitor-driven reconnects):
 * the broker must try again by itself once the backend may be back. */
static void outage_lazy_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    const wstat *w = &r->w[OUT_WORKERS - 1];
    print_message("%s outage, min_size=0 pool: ok %ld before, %ld down, %ld back (first success %.0f ms after the "
                  "restart); after the workers stopped: %s; health now \"%s\"\n",
                  label, w->ok[0], w->ok[1], w->ok[2], r->lazy_recover_ms, r->lazy_how, r->lazy_health_final);
    assert_true(w->ok[2] > 0);
    assert_true(r->lazy_ok_after_ms >= 0);
}

/* 8. shmstat --json: down (or degraded) with a last_error during the outage,
 * healthy after. */
static void outage_shmstat_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    print_message("%s outage, shmstat: during \"%s\" (\"%s\"), healthy %.0f ms after the restart, final \"%s\"\n",
                  label, r->health_during, r->error_during, r->healthy_after_ms, r->health_final);
    assert_true(strcmp(r->health_during, "down") == 0 || strcmp(r->health_during, "degraded") == 0);
    assert_true(r->error_during[0] != '\0');
    assert_true(r->healthy_after_ms >= 0);
    assert_string_equal(r->health_final, "healthy");
}

static const outage_cfg pg_outage_cfg = {
    .e = &env_pg, .label = "pg", .pool = "load", .lazy_pool = "lazy", .redis = 0,
    .stop = th_pg_stop, .start = th_pg_start_again,
};

static void test_pg_outage_under_load(void **state)
{
    (void)state;
    outage_run(&pg_outage_cfg, &pg_outage);
    outage_scenario_asserts(&pg_outage);
}

static void test_pg_outage_fail_fast(void **state)
{
    (void)state;
    outage_fail_fast_asserts("pg", &pg_outage);
}

static void test_pg_outage_recovery(void **state)
{
    (void)state;
    outage_recovery_asserts("pg", &pg_outage);
}

static void test_pg_outage_min_size_0_pool_recovers(void **state)
{
    (void)state;
    outage_lazy_asserts("pg", &pg_outage);
}

static void test_pg_outage_shmstat_health(void **state)
{
    (void)state;
    outage_shmstat_asserts("pg", &pg_outage);
}

/* ------------------------------------------------------------------ Redis */

#define REDIS_POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool rkill]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 2\n" \
    "max_size = 2\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 5000\n" \
    "\n" \
    "[pool rload]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 2\n" \
    "max_size = 3\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 5000\n" \
    "\n" \
    "[pool rlazy]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 0\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 5000\n"

static int redis_group_setup(void **state)
{
    (void)state;
    if (th_setup(&env_redis, 0, 1) < 0)
        return -1;
    if (th_broker_start(&env_redis, REDIS_POOLS) < 0)
        return -1;
    return 0;
}

static int redis_group_teardown(void **state)
{
    (void)state;
    test_cleanup(NULL);
    return th_teardown(&env_redis);
}

/* Client ids of the pool's connections (name=poolbroker:<pool>), from
 * CLIENT LIST text; returns how many. */
static int redis_ids_in(const char *list, const char *pool, long long *ids, int max)
{
    char name[96];
    snprintf(name, sizeof name, " name=poolbroker:%s ", pool);
    int n = 0;
    const char *line = list;
    while (line && *line) {
        const char *eol = strchr(line, '\n');
        size_t len = eol ? (size_t)(eol - line) : strlen(line);
        char buf[2048];
        if (len >= sizeof buf)
            len = sizeof buf - 1;
        memcpy(buf, line, len);
        buf[len] = '\0';
        if (strstr(buf, name) && strncmp(buf, "id=", 3) == 0 && n < max)
            ids[n++] = atoll(buf + 3);
        line = eol ? eol + 1 : NULL;
    }
    return n;
}

static int redis_ids(th_env *e, const char *pool, long long *ids, int max)
{
    static char out[65536];
    if (th_redis_cli(e, "CLIENT LIST", out, sizeof out) != 0)
        return -1;
    return redis_ids_in(out, pool, ids, max);
}

static double wait_redis_count(th_env *e, const char *pool, int want, int timeout_ms)
{
    double t0 = now_ms();
    long long ids[16];
    for (;;) {
        if (redis_ids(e, pool, ids, 16) == want)
            return now_ms() - t0;
        if (now_ms() - t0 > timeout_ms)
            return -1;
        sleep_ms(50);
    }
}

/* The first command of a Redis lease: PING; 1 if PONG. */
static int redis_first_command(pb_lease *l, char *how, size_t n)
{
    redisReply *r = NULL;
    int rc = pb_redis_command(l, &r, "PING");
    if (rc != PB_OK) {
        snprintf(how, n, "pb_redis_command -> %s", pb_strerror(rc));
        return 0;
    }
    int good = r->type == REDIS_REPLY_STATUS && r->str && strcmp(r->str, "PONG") == 0;
    snprintf(how, n, "%s reply type %d '%s'", good ? "ok:" : "bad:", r->type, r->str ? r->str : "");
    freeReplyObject(r);
    return good;
}

/* 1 (Redis). CLIENT KILL of idle pooled connections: 200 ms later, the
 * first command of each lease works. */
static void test_redis_idle_kill_then_lease_200ms(void **state)
{
    (void)state;
    th_env *e = &env_redis;
    static const char *const how_kill[2] = { "CLIENT KILL TYPE normal", "CLIENT KILL ID (each)" };
    for (int round = 0; round < 2; round++) {
        assert_true(wait_redis_count(e, "rkill", 2, 10000) >= 0);
        sleep_ms(300);
        long long ids[16];
        int n = redis_ids(e, "rkill", ids, 16);
        assert_int_equal(n, 2);
        char out[256];
        if (round == 0) {
            assert_int_equal(th_redis_cli(e, "CLIENT KILL TYPE normal", out, sizeof out), 0);
            assert_true(atoi(out) >= 2);
        } else {
            for (int i = 0; i < n; i++) {
                char cmd[64];
                snprintf(cmd, sizeof cmd, "CLIENT KILL ID %lld", ids[i]);
                assert_int_equal(th_redis_cli(e, cmd, out, sizeof out), 0);
                assert_string_equal(out, "1");
            }
        }
        double t_kill = now_ms();
        sleep_ms(200);
        pb_client *c = cli(e);
        pb_lease *l[2];
        int failed = 0;
        long long newid[2];
        for (int i = 0; i < 2; i++) {
            l[i] = lease(c, "rkill", 5000);
            newid[i] = pb_lease_backend_pid(l[i]);
            char how[256];
            if (!redis_first_command(l[i], how, sizeof how) || newid[i] == ids[0] || newid[i] == ids[1]) {
                failed++;
                print_message("redis %s: lease %d (client id %lld): first command %s\n", how_kill[round], i,
                              newid[i], how);
            }
        }
        for (int i = 0; i < 2; i++)
            assert_int_equal(pb_release(l[i]), PB_OK);
        cli_done(c);
        double refill = wait_redis_count(e, "rkill", 2, 10000);
        print_message("redis %s: killed ids %lld,%lld; 200 ms later leases on ids %lld,%lld, %d failed first "
                      "commands; 2 connections again %.0f ms after the kill\n",
                      how_kill[round], ids[0], ids[1], newid[0], newid[1], failed,
                      refill < 0 ? -1.0 : now_ms() - t_kill);
        assert_int_equal(failed, 0);
    }
}

/* 1b (Redis). Kill and lease at once (hiredis, no process spawn): reported. */
static void test_redis_idle_kill_then_lease_0ms(void **state)
{
    (void)state;
    th_env *e = &env_redis;
    redisContext *admin = redisConnect("127.0.0.1", e->redis_port);
    if (admin == NULL || admin->err)
        fail_msg("hiredis connect: %s", admin ? admin->errstr : "oom");
    pb_client *c = cli(e);
    int rounds = 5, failed = 0;
    for (int round = 0; round < rounds; round++) {
        if (wait_redis_count(e, "rkill", 2, 10000) < 0) {
            redisFree(admin);
            fail_msg("pool 'rkill' did not get back to 2 connections");
        }
        sleep_ms(300);
        redisReply *lst = redisCommand(admin, "CLIENT LIST");
        long long ids[16];
        int n = lst && lst->type == REDIS_REPLY_STRING ? redis_ids_in(lst->str, "rkill", ids, 16) : 0;
        if (lst)
            freeReplyObject(lst);
        int killed = 0;
        for (int i = 0; i < n; i++) {
            redisReply *k = redisCommand(admin, "CLIENT KILL ID %lld", ids[i]);
            if (k && k->type == REDIS_REPLY_INTEGER)
                killed += (int)k->integer;
            if (k)
                freeReplyObject(k);
        }
        double t0 = now_ms();
        pb_lease *l = NULL;
        int rc = pb_acquire(c, "rkill", 5000, &l);
        char how[256];
        int ok = 0;
        if (rc == PB_OK)
            ok = redis_first_command(l, how, sizeof how);
        else
            snprintf(how, sizeof how, "pb_acquire -> %s", pb_strerror(rc));
        double dt = now_ms() - t0;
        if (l)
            pb_release(l);
        if (!ok) {
            failed++;
            /* As for PostgreSQL: at most one failed first command per killed
             * connection. */
            for (int retry = 1, ok2 = 0; !ok2; retry++) {
                l = lease(c, "rkill", 5000);
                char how2[256];
                ok2 = redis_first_command(l, how2, sizeof how2);
                pb_release(l);
                if (!ok2 && retry >= killed) {
                    redisFree(admin);
                    fail_msg("%d leases after a failed first command failed too: %s", retry, how2);
                }
            }
        }
        print_message("redis idle kill, lease at once (round %d, %d killed): first command %s after %.2f ms\n",
                      round, killed, how, dt);
    }
    redisFree(admin);
    cli_done(c);
    print_message("redis idle kill, lease at once: first command failed in %d of %d rounds\n", failed, rounds);
}

static const outage_cfg redis_outage_cfg = {
    .e = &env_redis, .label = "redis", .pool = "rload", .lazy_pool = "rlazy", .redis = 1,
    .stop = th_redis_stop, .start = th_redis_start_again,
};

static void test_redis_outage_under_load(void **state)
{
    (void)state;
    outage_run(&redis_outage_cfg, &redis_outage);
    outage_scenario_asserts(&redis_outage);
}

static void test_redis_outage_fail_fast(void **state)
{
    (void)state;
    outage_fail_fast_asserts("redis", &redis_outage);
}

static void test_redis_outage_recovery(void **state)
{
    (void)state;
    outage_recovery_asserts("redis", &redis_outage);
}

static void test_redis_outage_min_size_0_pool_recovers(void **state)
{
    (void)state;
    outage_lazy_asserts("redis", &redis_outage);
}

static void test_redis_outage_shmstat_health(void **state)
{
    (void)state;
    outage_shmstat_asserts("redis", &redis_outage);
}

/* ------------------------------------------------------------------- main */

#define T(f) cmocka_unit_test_teardown(f, test_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_idle_kill_then_lease_200ms),
        T(test_pg_idle_kill_then_lease_0ms),
        T(test_pg_command_timeout_cancels),
        T(test_pg_grow_to_max_and_shrink),
        T(test_pg_shrink_keeps_min_size),
        T(test_pg_max_uses),
        T(test_pg_max_lifetime_recycles),
        T(test_pg_max_lifetime_spares_leases),
        T(test_pg_validate_after_idle),
        T(test_pg_multi_host_first_refused),
        T(test_pg_multi_host_read_write),
        /* Last: these stop and restart the server. */
        T(test_pg_outage_under_load),
        T(test_pg_outage_fail_fast),
        T(test_pg_outage_recovery),
        T(test_pg_outage_min_size_0_pool_recovers),
        T(test_pg_outage_shmstat_health),
    };
    const struct CMUnitTest redis_tests[] = {
        T(test_redis_idle_kill_then_lease_200ms),
        T(test_redis_idle_kill_then_lease_0ms),
        T(test_redis_outage_under_load),
        T(test_redis_outage_fail_fast),
        T(test_redis_outage_recovery),
        T(test_redis_outage_min_size_0_pool_recovers),
        T(test_redis_outage_shmstat_health),
    };
    int failed = cmocka_run_group_tests_name("lifecycle_pg", pg_tests, pg_group_setup, pg_group_teardown);
    failed += cmocka_run_group_tests_name("lifecycle_redis", redis_tests, redis_group_setup, redis_group_teardown);
    return failed;
}
