/*
 * test_pg.c — PostgreSQL through the broker, end to end, on a real server.
 *
 * The group starts its own PostgreSQL (tools/pg-start) and broker in a temp
 * dir; every test leases through libpoolbroker exactly as a worker would.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define POOLS \
    "[pool main]\n" \
    "type = postgres\n" \
    "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbtest\n" \
    "min_size = 2\n" \
    "max_size = 4\n" \
    "acquire_timeout_ms = 20000\n" \
    "request_buffer = 64k\n" \
    "reply_buffer = 256k\n" \
    "\n" \
    "[pool tiny]\n" \
    "type = postgres\n" \
    "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbtiny\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 300\n" \
    "\n" \
    "[pool discard]\n" \
    "type = postgres\n" \
    "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable\n" \
    "min_size = 0\n" \
    "max_size = 1\n" \
    "reset = discard_all\n"

static int group_setup(void **state)
{
    (void)state;
    if (th_setup(&env, 1, 0) < 0)
        return -1;
    if (th_psql(&env, "CREATE TABLE t (worker int, n int, note text)", NULL, 0) != 0)
        return -1;
    if (th_broker_start(&env, POOLS) < 0)
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
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

static void exec_void(pb_lease *l, const char *sql)
{
    pb_result_free(exec_ok(l, sql));
}

static void test_select_one(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    pb_result *r = exec_ok(l, "SELECT 1 AS one, 'two' AS two");
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_ntuples(r), 1);
    assert_int_equal(pb_nfields(r), 2);
    assert_string_equal(pb_fname(r, 0), "one");
    assert_int_equal(pb_ftype(r, 0), 23);
    assert_string_equal(pb_getvalue(r, 0, 0), "1");
    assert_string_equal(pb_getvalue(r, 0, 1), "two");
    assert_string_equal(pb_cmd_status(r), "SELECT 1");
    assert_int_equal(pb_cmd_tuples(r), 1);
    pb_result_free(r);
    assert_true(pb_lease_backend_pid(l) > 0);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_transaction_across_execs(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    exec_void(l, "BEGIN");
    exec_void(l, "CREATE TEMP TABLE tx (v int) ON COMMIT DROP");
    exec_void(l, "INSERT INTO tx VALUES (1), (2), (3)");
    pb_result *r = exec_ok(l, "SELECT sum(v) FROM tx");
    assert_string_equal(pb_getvalue(r, 0, 0), "6");
    pb_result_free(r);
    /* Several statements in one call: the last one's result. */
    r = exec_ok(l, "INSERT INTO tx VALUES (4); SELECT count(*) FROM tx");
    assert_string_equal(pb_getvalue(r, 0, 0), "4");
    pb_result_free(r);
    exec_void(l, "COMMIT");
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

/* From client/internal.h: what a program writing the protocol itself does. */
int pbi_submit(pb_lease *l, const void *req, size_t len, uint32_t nreplies);
int pbi_reply_wait(pb_lease *l, const uint8_t **p, size_t *avail);

/* A well-framed message the broker refuses by policy (Terminate) is refused
 * by name in the log, as a policy (info), not as a malformed request or a
 * segment repair; the connection stays for the next holder. */
static void test_policy_refusal_named(void **state)
{
    (void)state;
    PBT_SESSION_MODE_ONLY();        /* it compares the backend a lease has from its acquire on */
    long malformed0 = th_count_lines(env.broker_log, "malformed");
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    assert_int_equal(pb_acquire(c, "tiny", 10000, &l), PB_OK);
    int pid = pb_lease_backend_pid(l);
    static const uint8_t terminate[] = { 'X', 0, 0, 0, 4 };
    const uint8_t *p;
    size_t n;
    int rc = pbi_submit(l, terminate, sizeof terminate, 1);
    if (rc == PB_OK)
        rc = pbi_reply_wait(l, &p, &n);
    assert_int_equal(rc, PB_EPROTO);
    assert_int_equal(pb_release(l), PB_OK);
    assert_true(th_wait_log(&env, "request refused: Terminate ('X')", 1, 5000) == 0);
    assert_int_equal(th_count_lines(env.broker_log, "malformed"), malformed0);
    assert_int_equal(pb_acquire(c, "tiny", 10000, &l), PB_OK);
    assert_int_equal(pb_lease_backend_pid(l), pid);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_sql_error_keeps_lease(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT * FROM no_such_table", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_string_equal(pb_error_field(r, 'C'), "42P01");
    assert_non_null(strstr(pb_error_field(r, 'M'), "no_such_table"));
    assert_string_equal(pb_error_field(r, 'V'), "ERROR");
    assert_non_null(pb_error_field(r, 'P'));        /* position */
    assert_null(pb_error_field(r, 'n'));            /* no constraint here */
    pb_result_free(r);

    assert_int_equal(pb_pg_exec(l, "SELECT 1/0", &r), PB_OK);
    assert_string_equal(pb_error_field(r, 'C'), "22012");
    pb_result_free(r);

    /* A failed transaction, then a rollback, on the same lease. */
    exec_void(l, "BEGIN");
    assert_int_equal(pb_pg_exec(l, "SELECT 1/0", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_OK);
    assert_string_equal(pb_error_field(r, 'C'), "25P02");  /* in failed transaction */
    pb_result_free(r);
    exec_void(l, "ROLLBACK");
    r = exec_ok(l, "SELECT 42");
    assert_string_equal(pb_getvalue(r, 0, 0), "42");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_release_mid_transaction_rolls_back(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r;
    /* "tiny" has one connection, so the next lease gets the same one. */
    assert_int_equal(pb_acquire(c, "tiny", -1, &l), PB_OK);
    int pid1 = pb_lease_backend_pid(l);
    exec_void(l, "BEGIN");
    exec_void(l, "INSERT INTO t VALUES (-1, -1, 'uncommitted')");
    assert_int_equal(pb_release(l), PB_OK);

    assert_int_equal(pb_acquire(c, "tiny", 5000, &l), PB_OK);
    assert_int_equal(pb_lease_backend_pid(l), pid1);
    r = exec_ok(l, "SELECT count(*) FROM t WHERE worker = -1");
    assert_string_equal(pb_getvalue(r, 0, 0), "0");
    pb_result_free(r);
    /* Not in a transaction block any more: SAVEPOINT says so. */
    assert_int_equal(pb_pg_exec(l, "SAVEPOINT x", &r), PB_OK);
    assert_string_equal(pb_error_field(r, 'C'), "25P01");
    pb_result_free(r);

    /* The same for a failed transaction. */
    exec_void(l, "BEGIN");
    assert_int_equal(pb_pg_exec(l, "SELECT 1/0", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "tiny", 5000, &l), PB_OK);
    r = exec_ok(l, "SELECT 7");
    assert_string_equal(pb_getvalue(r, 0, 0), "7");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_discard_all_policy(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r;
    assert_int_equal(pb_acquire(c, "discard", 10000, &l), PB_OK);
    exec_void(l, "SET application_name = 'dirty'");
    exec_void(l, "CREATE TEMP TABLE leftover (x int)");
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "discard", 10000, &l), PB_OK);
    r = exec_ok(l, "SELECT current_setting('application_name'), to_regclass('pg_temp.leftover') IS NULL");
    assert_string_not_equal(pb_getvalue(r, 0, 0), "dirty");
    assert_string_equal(pb_getvalue(r, 0, 1), "t");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_nulls_binary_empty(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);

    /* Text parameters with a NULL. */
    const char *vals[2] = { "hello", NULL };
    assert_int_equal(pb_pg_exec_params(l, "SELECT $1::text AS a, $2::text AS b, $2 IS NULL AS isnull", 2, NULL,
                                       vals, NULL, NULL, 0, &r),
                     PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "hello");
    assert_int_equal(pb_getisnull(r, 0, 1), 1);
    assert_int_equal(pb_getisnull(r, 0, 0), 0);
    assert_string_equal(pb_getvalue(r, 0, 2), "t");
    pb_result_free(r);

    /* A binary int4 parameter and a binary result. */
    uint32_t be = htonl(41);
    const char *bvals[1] = { (const char *)&be };
    int lens[1] = { 4 }, fmts[1] = { 1 };
    unsigned types[1] = { 23 };
    assert_int_equal(pb_pg_exec_params(l, "SELECT $1 + 1, NULL::int4", 1, types, bvals, lens, fmts, 1, &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_getlength(r, 0, 0), 4);
    assert_int_equal(pb_fformat(r, 0), 1);
    uint32_t got;
    memcpy(&got, pb_getvalue(r, 0, 0), 4);
    assert_int_equal(ntohl(got), 42);
    assert_int_equal(pb_getisnull(r, 0, 1), 1);
    pb_result_free(r);

    /* Binary bytea with embedded NUL bytes, round trip. */
    const char blob[6] = { 'a', 0, 'b', 0, (char)0xff, 'z' };
    const char *pv[1] = { blob };
    int pl[1] = { 6 }, pf[1] = { 1 };
    unsigned pt[1] = { 17 };
    assert_int_equal(pb_pg_exec_params(l, "SELECT $1::bytea", 1, pt, pv, pl, pf, 1, &r), PB_OK);
    assert_int_equal(pb_getlength(r, 0, 0), 6);
    assert_memory_equal(pb_getvalue(r, 0, 0), blob, 6);
    pb_result_free(r);

    /* Empty query. */
    assert_int_equal(pb_pg_exec(l, "", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_EMPTY_QUERY);
    pb_result_free(r);

    /* Parameterised INSERT reports its row count. */
    const char *iv[3] = { "-5", "1", "param" };
    assert_int_equal(pb_pg_exec_params(l, "INSERT INTO t VALUES ($1, $2, $3)", 3, NULL, iv, NULL, NULL, 0, &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_int_equal(pb_cmd_tuples(r), 1);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_large_result_streams(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    /* 100,000 rows of 1,000 bytes: ~100 MB through a 256 KiB reply ring. */
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    pb_result *r = exec_ok(l, "SELECT g, repeat('x', 1000) FROM generate_series(1, 100000) g");
    assert_int_equal(pb_ntuples(r), 100000);
    assert_int_equal(pb_getlength(r, 99999, 1), 1000);
    assert_string_equal(pb_getvalue(r, 99999, 0), "100000");
    pb_result_free(r);
    /* The connection is in step afterwards. */
    r = exec_ok(l, "SELECT 'after'");
    assert_string_equal(pb_getvalue(r, 0, 0), "after");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

/* A query larger than the 64k request buffer streams through it (#18). */
static void test_request_over_buffer(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    size_t n = 70000;
    char *sql = malloc(n + 32);
    strcpy(sql, "SELECT '");
    memset(sql + 8, 'y', n);
    strcpy(sql + 8 + n, "'");
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, sql, &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_getlength(r, 0, 0), (int)n);
    assert_memory_equal(pb_getvalue(r, 0, 0), sql + 8, n);
    pb_result_free(r);
    free(sql);
    r = exec_ok(l, "SELECT 'still fine'");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_unknown_pool_and_timeout(void **state)
{
    (void)state;
    PBT_SESSION_MODE_ONLY();        /* transaction mode: an acquire never waits for a backend */
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL, *l2 = NULL;
    assert_int_equal(pb_acquire(c, "nope", -1, &l), PB_ENOPOOL);
    assert_null(l);
    assert_int_equal(pb_acquire(c, "", -1, &l), PB_ENOPOOL);
    assert_int_equal(pb_acquire(NULL, "main", -1, &l), PB_EINVAL);

    assert_int_equal(pb_acquire(c, "tiny", -1, &l), PB_OK);
    assert_int_equal(pb_acquire(c, "tiny", 200, &l2), PB_ETIMEDOUT);
    assert_null(l2);
    assert_int_equal(pb_acquire(c, "tiny", -1, &l2), PB_ETIMEDOUT);   /* pool default: 300 ms */
    assert_int_equal(pb_acquire(c, "tiny", 0, &l2), PB_ETIMEDOUT);
    assert_int_equal(pb_release(l), PB_OK);
    /* Freed: the next acquire gets it. */
    assert_int_equal(pb_acquire(c, "tiny", 2000, &l2), PB_OK);
    assert_int_equal(pb_release(l2), PB_OK);
    pb_disconnect(c);
}

static void test_stale_handles(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_release(l), PB_ESTALE);              /* double release */
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_ESTALE);  /* use after release */
    assert_int_equal(pb_release(NULL), PB_EINVAL);
    pb_disconnect(c);
    pb_disconnect(NULL);
}

static void test_fork_reattach(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *held;
    assert_int_equal(pb_acquire(c, "main", -1, &held), PB_OK);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int bad = 0;
        pb_result *r = NULL;
        /* The parent's lease is not ours. */
        if (pb_pg_exec(held, "SELECT 1", &r) != PB_ESTALE)
            bad |= 1;
        if (pb_release(held) != PB_ESTALE)
            bad |= 2;
        /* The client re-attaches by itself. */
        pb_lease *mine;
        if (pb_acquire(c, "main", 5000, &mine) != PB_OK)
            bad |= 4;
        else {
            if (pb_pg_exec(mine, "SELECT pg_backend_pid()", &r) != PB_OK || pb_ntuples(r) != 1)
                bad |= 8;
            pb_result_free(r);
            if (pb_release(mine) != PB_OK)
                bad |= 16;
        }
        pb_disconnect(c);
        _exit(bad);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    /* The parent's lease is untouched. */
    pb_result *r = exec_ok(held, "SELECT 'parent'");
    assert_string_equal(pb_getvalue(r, 0, 0), "parent");
    pb_result_free(r);
    assert_int_equal(pb_release(held), PB_OK);
    pb_disconnect(c);
}

/* 64 forked workers x 200 transactions through a pool of at most 4. */
#define WORKERS 64
#define TXNS    200

static int worker_main(int w)
{
    pb_client *c;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 1;
    char wbuf[16], nbuf[16];
    snprintf(wbuf, sizeof wbuf, "%d", w);
    for (int i = 0; i < TXNS; i++) {
        pb_lease *l;
        pb_result *r = NULL;
        int rc = pb_acquire(c, "main", 30000, &l);
        if (rc != PB_OK) {
            fprintf(stderr, "worker %d: acquire: %s\n", w, pb_strerror(rc));
            return 2;
        }
        snprintf(nbuf, sizeof nbuf, "%d", i);
        const char *vals[3] = { wbuf, nbuf, "load" };
        if (pb_pg_exec(l, "BEGIN", &r) != PB_OK || pb_result_status(r) != PB_RES_COMMAND_OK)
            return 3;
        pb_result_free(r);
        if (pb_pg_exec_params(l, "INSERT INTO t VALUES ($1, $2, $3)", 3, NULL, vals, NULL, NULL, 0, &r) != PB_OK ||
            pb_cmd_tuples(r) != 1)
            return 4;
        pb_result_free(r);
        if (pb_pg_exec_params(l, "SELECT count(*) FROM t WHERE worker = $1", 1, NULL, vals, NULL, NULL, 0, &r) !=
                PB_OK ||
            atoi(pb_getvalue(r, 0, 0)) != i + 1)
            return 5;
        pb_result_free(r);
        if (pb_pg_exec(l, "COMMIT", &r) != PB_OK || pb_result_status(r) != PB_RES_COMMAND_OK)
            return 6;
        pb_result_free(r);
        if (pb_release(l) != PB_OK)
            return 7;
    }
    pb_disconnect(c);
    return 0;
}

static void test_many_workers_small_pool(void **state)
{
    (void)state;
    pid_t pids[WORKERS];
    for (int w = 0; w < WORKERS; w++) {
        fflush(NULL);
        pids[w] = fork();
        assert_true(pids[w] >= 0);
        if (pids[w] == 0)
            _exit(worker_main(1000 + w));
    }
    /* Watch the server's side while they run. */
    int running = WORKERS, max_seen = 0, bad = 0;
    while (running > 0) {
        char out[64];
        if (th_psql(&env, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbtest'", out,
                    sizeof out) == 0) {
            int n = atoi(out);
            if (n > max_seen)
                max_seen = n;
        }
        int st;
        pid_t p;
        while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
            running--;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                bad++;
                fprintf(stderr, "worker %d exited with status %d\n", (int)p, st);
            }
        }
        usleep(100000);
    }
    assert_int_equal(bad, 0);
    assert_true(max_seen >= 1);
    assert_true(max_seen <= 4);
    char out[64];
    assert_int_equal(th_psql(&env, "SELECT count(*) FROM t WHERE worker >= 1000", out, sizeof out), 0);
    assert_int_equal(atoi(out), WORKERS * TXNS);
    print_message("64 workers x 200 transactions: %d rows, at most %d backend connections seen\n",
                  WORKERS * TXNS, max_seen);
}

static void test_shmstat_sees_pools(void **state)
{
    (void)state;
    char out[65536];
    char shmstat[512];
    snprintf(shmstat, sizeof shmstat, "%s/shmstat", getenv("PB_BUILD") ? getenv("PB_BUILD") : "build");
    char *argv[] = { shmstat, "-s", env.shm_name, "--json", NULL };
    assert_int_equal(th_run(argv, out, sizeof out, 10000), 0);
    assert_non_null(strstr(out, "\"main\""));
    assert_non_null(strstr(out, "\"tiny\""));
    assert_non_null(strstr(out, "\"running\""));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_select_one),
        cmocka_unit_test(test_transaction_across_execs),
        cmocka_unit_test(test_sql_error_keeps_lease),
        cmocka_unit_test(test_release_mid_transaction_rolls_back),
        cmocka_unit_test(test_discard_all_policy),
        cmocka_unit_test(test_nulls_binary_empty),
        cmocka_unit_test(test_large_result_streams),
        cmocka_unit_test(test_request_over_buffer),
        cmocka_unit_test(test_unknown_pool_and_timeout),
        cmocka_unit_test(test_stale_handles),
        cmocka_unit_test(test_fork_reattach),
        cmocka_unit_test(test_many_workers_small_pool),
        cmocka_unit_test(test_shmstat_sees_pools),
        cmocka_unit_test(test_policy_refusal_named),
    };
    return cmocka_run_group_tests_name("pg", tests, group_setup, group_teardown);
}
