/*
 * test_pgext.c — PostgreSQL beyond simple queries, on a real server:
 * prepared statements that survive pooling (auto and discard_all
 * policies), pipelining, COPY in and out through bounded buffers,
 * LISTEN/NOTIFY, notices, custom reset SQL.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

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

#define CONNINFO "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable\n"
/* Custom reset SQL (each pool has one connection, so the next lease is on the
 * same backend unless the broker closed it). A ';' or '#' after whitespace
 * starts a comment in the config, so the statements are joined with ";"
 * right after the previous word ("ALL;" not "ALL ;"). */
#define CUSTOM_POOLS \
    "[pool custom]\ntype = postgres\n" CONNINFO "min_size = 1\nmax_size = 1\n" \
    "reset = RESET ALL; SELECT pg_advisory_unlock_all()\n\n" \
    "[pool custom_dealloc]\ntype = postgres\n" CONNINFO "min_size = 1\nmax_size = 1\nreset = DEALLOCATE ALL\n\n" \
    "[pool custom_fail]\ntype = postgres\n" CONNINFO "min_size = 1\nmax_size = 1\nreset = SELECT 1/0\n\n" \
    "[pool custom_fail_state]\ntype = postgres\n" CONNINFO "min_size = 1\nmax_size = 1\n" \
    "reset = RESET ALL; SELECT 1/0\n\n" \
    "[pool custom_begin]\ntype = postgres\n" CONNINFO "min_size = 1\nmax_size = 1\nreset = BEGIN\n\n"
#define POOLS \
    "[pool main]\ntype = postgres\n" CONNINFO "min_size = 4\nmax_size = 4\n" \
    "request_buffer = 64k\nreply_buffer = 256k\n\n" \
    "[pool discard]\ntype = postgres\n" CONNINFO "min_size = 2\nmax_size = 2\nreset = discard_all\n\n" \
    "[pool one]\ntype = postgres\n" CONNINFO "min_size = 1\nmax_size = 1\n\n" \
    CUSTOM_POOLS

static int group_setup(void **state)
{
    (void)state;
    if (th_setup(&env, 1, 0) < 0)
        return -1;
    if (th_psql(&env, "CREATE UNLOGGED TABLE big (id bigint, body text); CREATE TABLE kv (k int, v text)", NULL, 0))
        return -1;
    return th_broker_start(&env, POOLS) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

/* Check a call that produced *rp (a pointer, read after the call). */
static pb_result *ok(int rc, pb_result **rp, const char *what)
{
    pb_result *r = *rp;
    if (rc != PB_OK)
        fail_msg("%s: %s", what, pb_strerror(rc));
    if (pb_result_status(r) == PB_RES_ERROR)
        fail_msg("%s: %s", what, pb_error_message(r));
    return r;
}

static void prepared_across_leases(const char *pool)
{
    pb_client *c = pbt_connect(&env);
    pb_lease *l[4];
    pb_result *r = NULL;
    unsigned types[1] = { 23 };
    assert_int_equal(pb_acquire(c, pool, 5000, &l[0]), PB_OK);
    pb_result_free(ok(pb_pg_prepare(l[0], "add", "SELECT $1::int4 + 1000", 1, types, &r), &r, "prepare"));
    assert_int_equal(pb_release(l[0]), PB_OK);

    /* A bad statement fails at prepare time, as an SQL error. */
    assert_int_equal(pb_acquire(c, pool, 5000, &l[0]), PB_OK);
    assert_int_equal(pb_pg_prepare(l[0], "bad", "SELEC nonsense", 0, NULL, &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_string_equal(pb_error_field(r, 'C'), "42601");
    pb_result_free(r);
    assert_int_equal(pb_release(l[0]), PB_OK);

    int pids[64] = { 0 }, npids = 0, execs = 0;
    int n = strcmp(pool, "discard") == 0 ? 2 : 4;
    for (int round = 0; execs < 100; round++) {
        /* Hold every connection at once so all of them run it. */
        for (int k = 0; k < n; k++)
            assert_int_equal(pb_acquire(c, pool, 5000, &l[k]), PB_OK);
        for (int k = 0; k < n; k++) {
            char v[16];
            snprintf(v, sizeof v, "%d", execs);
            const char *vals[1] = { v };
            pb_result_free(ok(pb_pg_exec_prepared(l[k], "add", 1, vals, NULL, NULL, 0, &r), &r, "exec_prepared"));
            assert_int_equal(pb_pg_exec_prepared(l[k], "add", 1, vals, NULL, NULL, 0, &r), PB_OK);
            assert_int_equal(atoi(pb_getvalue(r, 0, 0)), execs + 1000);
            pb_result_free(r);
            int pid = pb_lease_backend_pid(l[k]), seen = 0;
            for (int i = 0; i < npids; i++)
                seen |= pids[i] == pid;
            if (!seen && npids < 64)
                pids[npids++] = pid;
            execs++;
        }
        for (int k = 0; k < n; k++)
            assert_int_equal(pb_release(l[k]), PB_OK);
    }
    assert_int_equal(npids, n);
    assert_int_equal(pb_acquire(c, pool, 5000, &l[0]), PB_OK);
    const char *vals[1] = { "1" };
    assert_int_equal(pb_pg_exec_prepared(l[0], "never-prepared", 1, vals, NULL, NULL, 0, &r), PB_EINVAL);
    assert_int_equal(pb_release(l[0]), PB_OK);
    print_message("pool %s: prepared statement ran %d times on %d connections\n", pool, execs, npids);
    pb_disconnect(c);
}

static void test_prepared_rollback_policy(void **state)
{
    (void)state;
    prepared_across_leases("main");
    /* No extra round trip when the connection has it: the server holds one
     * named statement per connection, not one per execution. */
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    pb_result_free(ok(pb_pg_exec(l, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pb\\_%'", &r), &r,
                      "count"));
    assert_int_equal(pb_pg_exec(l, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pb\\_%'", &r),
                     PB_OK);
    assert_int_equal(atoi(pb_getvalue(r, 0, 0)), 1);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_prepared_discard_all_policy(void **state)
{
    (void)state;
    prepared_across_leases("discard");
}

static void test_pipeline_10000_with_error(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    char v[16];
    for (int i = 0; i < 10000; i++) {
        snprintf(v, sizeof v, "%d", i);
        const char *vals[1] = { v };
        const char *sql = i == 5000 ? "SELECT 1 / ($1::int - 5000)" : "SELECT $1::int * 2";
        assert_int_equal(pb_pg_send_params(l, sql, 1, NULL, vals, NULL, NULL, 0), PB_OK);
    }
    /* Other calls wait their turn. */
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_EBUSY);
    int errors = 0;
    for (int i = 0; i < 10000; i++) {
        assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
        assert_non_null(r);
        if (i == 5000) {
            assert_int_equal(pb_result_status(r), PB_RES_ERROR);
            assert_string_equal(pb_error_field(r, 'C'), "22012");
            errors++;
        } else {
            assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
            assert_int_equal(atoi(pb_getvalue(r, 0, 0)), i * 2);
        }
        pb_result_free(r);
    }
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    assert_null(r);                                 /* all returned */
    assert_int_equal(errors, 1);
    pb_result_free(ok(pb_pg_exec(l, "SELECT 'after'", &r), &r, "after"));
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static double secs(struct timespec a, struct timespec b)
{
    return (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
}

static void test_copy_in_out_bounded(void **state)
{
    (void)state;
    /* PB_COPY_MB (default 1024) of rows in, and back out. */
    long mb = getenv("PB_COPY_MB") ? atol(getenv("PB_COPY_MB")) : 1024;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    char row[1024];
    memset(row, 'x', sizeof row);
    long long rows = mb * 1024;                     /* 1 KiB per row */
    struct timespec t0, t1, t2;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(pb_pg_copy_in_begin(l, "COPY big (id, body) FROM STDIN"), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_EBUSY);
    for (long long i = 0; i < rows; i++) {
        int n = snprintf(row, 24, "%lld\t", i);
        row[n] = 'x';                               /* snprintf's NUL */
        row[sizeof row - 1] = '\n';
        assert_int_equal(pb_pg_put_copy_data(l, row, sizeof row), PB_OK);
    }
    assert_int_equal(pb_pg_put_copy_end(l, NULL, &r), PB_OK);
    ok(PB_OK, &r, "copy in");
    assert_int_equal(pb_cmd_tuples(r), rows);
    pb_result_free(r);
    clock_gettime(CLOCK_MONOTONIC, &t1);

    assert_int_equal(pb_pg_copy_out_begin(l, "COPY big TO STDOUT"), PB_OK);
    long long got_rows = 0, got_bytes = 0;
    char *buf;
    int n;
    while ((n = pb_pg_get_copy_data(l, &buf)) > 0) {
        got_rows++;
        got_bytes += n;
        pb_freemem(buf);
    }
    assert_int_equal(n, 0);
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    ok(PB_OK, &r, "copy out");
    assert_int_equal(pb_cmd_tuples(r), rows);
    pb_result_free(r);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    assert_int_equal(got_rows, rows);
    assert_int_equal(got_bytes, rows * (long long)sizeof row);
    print_message("COPY %ld MB in: %.1f s, out: %.1f s, through a 64 KiB request buffer and 256 KiB ring\n", mb,
                  secs(t0, t1), secs(t1, t2));

    /* A refused COPY, and an aborted one. */
    assert_int_equal(pb_pg_copy_in_begin(l, "COPY no_such_table FROM STDIN"), PB_ESERVER);
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    assert_string_equal(pb_error_field(r, 'C'), "42P01");
    pb_result_free(r);
    assert_int_equal(pb_pg_copy_in_begin(l, "COPY kv FROM STDIN"), PB_OK);
    assert_int_equal(pb_pg_put_copy_data(l, "1\tone\n", 6), PB_OK);
    assert_int_equal(pb_pg_put_copy_end(l, "changed my mind", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    pb_result_free(r);
    assert_int_equal(pb_pg_exec(l, "SELECT count(*) FROM kv", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "0");
    pb_result_free(r);
    pb_result_free(ok(pb_pg_exec(l, "TRUNCATE big", &r), &r, "truncate"));
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_listen_notify(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    pb_notify *n = NULL;
    assert_int_equal(pb_acquire(c, "one", 5000, &l), PB_OK);
    pb_result_free(ok(pb_pg_exec(l, "LISTEN jobs", &r), &r, "listen"));
    assert_int_equal(pb_pg_wait_notify(l, 0, &n), PB_ETIMEDOUT);

    /* Another worker notifies while we wait. */
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        usleep(200000);
        char out[64];
        _exit(th_psql(&env, "NOTIFY jobs, 'job-42'", out, sizeof out) == 0 ? 0 : 1);
    }
    assert_int_equal(pb_pg_wait_notify(l, 10000, &n), PB_OK);
    assert_string_equal(pb_notify_channel(n), "jobs");
    assert_string_equal(pb_notify_payload(n), "job-42");
    assert_true(pb_notify_be_pid(n) > 0);
    pb_notify_free(n);
    int st;
    waitpid(pid, &st, 0);
    assert_int_equal(WEXITSTATUS(st), 0);

    /* Notifications during other commands are queued for the lease. */
    pb_result_free(ok(pb_pg_exec(l, "NOTIFY jobs, 'self'", &r), &r, "notify"));
    pb_result_free(ok(pb_pg_exec(l, "SELECT 1", &r), &r, "select"));
    assert_int_equal(pb_pg_wait_notify(l, 1000, &n), PB_OK);
    assert_string_equal(pb_notify_payload(n), "self");
    pb_notify_free(n);
    assert_int_equal(pb_release(l), PB_OK);

    /* The next holder of the same connection hears nothing. */
    assert_int_equal(pb_acquire(c, "one", 5000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT count(*) FROM pg_listening_channels()", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "0");
    pb_result_free(r);
    char out[64];
    assert_int_equal(th_psql(&env, "NOTIFY jobs, 'nobody'", out, sizeof out), 0);
    assert_int_equal(pb_pg_wait_notify(l, 300, &n), PB_ETIMEDOUT);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static int notices_seen;
static char notice_text[256];

static void on_notice(void *arg, const pb_result *n)
{
    (void)arg;
    notices_seen++;
    snprintf(notice_text, sizeof notice_text, "%s", pb_error_field(n, 'M') ? pb_error_field(n, 'M') : "");
}

static void test_notices(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    pb_set_notice_handler(c, on_notice, NULL);
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_null(pb_error_field(r, 'M'));            /* not mixed into the result */
    pb_result_free(r);
    assert_int_equal(notices_seen, 1);
    assert_string_equal(notice_text, "hello 42");
    pb_set_notice_handler(c, NULL, NULL);
    assert_int_equal(pb_pg_exec(l, "DO $$ BEGIN RAISE NOTICE 'dropped'; END $$", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(notices_seen, 1);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_session_state_reset(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    pb_result *r = NULL;
    /* discard_all: SET, temp tables, advisory locks are gone. */
    assert_int_equal(pb_acquire(c, "discard", 5000, &l), PB_OK);
    int pid = pb_lease_backend_pid(l);
    pb_result_free(ok(pb_pg_exec(l, "SET work_mem = '7MB'; CREATE TEMP TABLE t1 (x int); "
                                    "SELECT pg_advisory_lock(4242)", &r), &r, "state"));
    assert_int_equal(pb_release(l), PB_OK);
    pb_lease *l2, *l3;
    assert_int_equal(pb_acquire(c, "discard", 5000, &l2), PB_OK);
    assert_int_equal(pb_acquire(c, "discard", 5000, &l3), PB_OK);
    pb_lease *same = pb_lease_backend_pid(l2) == pid ? l2 : l3;
    assert_int_equal(pb_pg_exec(same, "SELECT current_setting('work_mem'), to_regclass('pg_temp.t1') IS NULL, "
                                      "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = "
                                      "pg_backend_pid())",
                                &r),
                     PB_OK);
    assert_string_not_equal(pb_getvalue(r, 0, 0), "7MB");
    assert_string_equal(pb_getvalue(r, 0, 1), "t");
    assert_string_equal(pb_getvalue(r, 0, 2), "0");
    pb_result_free(r);
    assert_int_equal(pb_release(l2), PB_OK);
    assert_int_equal(pb_release(l3), PB_OK);
    pb_disconnect(c);
}

/* ------------------------------------------------------------ custom reset */

/* The client of the running custom-reset test. Its per-test teardown
 * disconnects it, which releases any lease a failed assertion left out, so
 * one failure does not starve the next test of its pool's one connection. */
static pb_client *custom_c;

static pb_client *custom_connect(void)
{
    if (custom_c)
        pb_disconnect(custom_c);
    custom_c = pbt_connect(&env);
    return custom_c;
}

static int custom_teardown(void **state)
{
    (void)state;
    if (custom_c)
        pb_disconnect(custom_c);
    custom_c = NULL;
    return 0;
}

/* Run sql on l, which must succeed, and copy its first value into buf. */
static const char *value_of(pb_lease *l, const char *sql, char *buf, size_t n)
{
    pb_result *r = NULL;
    ok(pb_pg_exec(l, sql, &r), &r, sql);
    if (pb_ntuples(r) < 1 || pb_nfields(r) < 1)
        fail_msg("%s: no value", sql);
    snprintf(buf, n, "%s", pb_getvalue(r, 0, 0));
    pb_result_free(r);
    return buf;
}

/* l is in no transaction block: SAVEPOINT outside one fails with 25P01 (it
 * would succeed in an open transaction and fail with 25P02 in a failed one). */
static void assert_no_transaction(pb_lease *l)
{
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SAVEPOINT pb_probe", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_string_equal(pb_error_field(r, 'C'), "25P01");
    pb_result_free(r);
}

/* The server's default work_mem, as a fresh session sees it. */
static void default_work_mem(char *buf, size_t n)
{
    assert_int_equal(th_psql(&env, "SHOW work_mem", buf, n), 0);
    assert_string_not_equal(buf, "7MB");
}

/* Advisory locks on key 42 held by any session (classid 0, objid 42). */
static int advisory_42_holders(void)
{
    char out[32];
    assert_int_equal(th_psql(&env, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                                   "AND classid = 0 AND objid = 42", out, sizeof out), 0);
    return atoi(out);
}

/* reset = RESET ALL; SELECT pg_advisory_unlock_all(): the next holder of the
 * same backend sees neither the SET nor the session advisory lock, and (the
 * UNLISTEN * the broker adds after a lease that ran LISTEN) no LISTEN. */
static void test_custom_reset_clears_session_state(void **state)
{
    (void)state;
    char def[64], v[64];
    default_work_mem(def, sizeof def);
    pb_client *c = custom_connect();
    pb_lease *l;
    pb_result *r = NULL;
    pb_notify *n = NULL;
    assert_int_equal(pb_acquire(c, "custom", 5000, &l), PB_OK);
    int pid = pb_lease_backend_pid(l);
    assert_true(pid > 0);
    pb_result_free(ok(pb_pg_exec(l, "SET work_mem = '7MB'", &r), &r, "set"));
    pb_result_free(ok(pb_pg_exec(l, "SELECT pg_advisory_lock(42)", &r), &r, "lock"));
    pb_result_free(ok(pb_pg_exec(l, "LISTEN custom_jobs", &r), &r, "listen"));
    /* The state is really there while the lease holds it. */
    assert_string_equal(value_of(l, "SELECT current_setting('work_mem')", v, sizeof v), "7MB");
    assert_int_equal(advisory_42_holders(), 1);
    assert_string_equal(value_of(l, "SELECT count(*) FROM pg_listening_channels()", v, sizeof v), "1");
    assert_int_equal(pb_release(l), PB_OK);

    assert_int_equal(pb_acquire(c, "custom", 5000, &l), PB_OK);
    assert_int_equal(pb_lease_backend_pid(l), pid);            /* same connection */
    assert_string_equal(value_of(l, "SELECT current_setting('work_mem')", v, sizeof v), def);
    assert_string_equal(value_of(l, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                                    "pid = pg_backend_pid()", v, sizeof v), "0");
    assert_int_equal(advisory_42_holders(), 0);                /* nobody holds it */
    assert_string_equal(value_of(l, "SELECT count(*) FROM pg_listening_channels()", v, sizeof v), "0");
    assert_int_equal(th_psql(&env, "NOTIFY custom_jobs, 'nobody'", v, sizeof v), 0);
    assert_int_equal(pb_pg_wait_notify(l, 300, &n), PB_ETIMEDOUT);
    assert_int_equal(pb_release(l), PB_OK);
}

/* Released inside an open, then a failed, transaction: the broker sends
 * ROLLBACK before the custom SQL, so the next holder of the same backend is
 * in no transaction, the INSERT is gone, and the custom SQL did run (had it
 * been sent inside the failed transaction it would have failed with 25P02,
 * leaving work_mem and the lock). */
static void test_custom_reset_rolls_back_first(void **state)
{
    (void)state;
    char def[64], v[64];
    default_work_mem(def, sizeof def);
    assert_int_equal(th_psql(&env, "CREATE TABLE IF NOT EXISTS custom_reset_rows (k int)", NULL, 0), 0);
    pb_client *c = custom_connect();
    pb_lease *l;
    pb_result *r = NULL;

    /* An open transaction. */
    assert_int_equal(pb_acquire(c, "custom", 5000, &l), PB_OK);
    int pid = pb_lease_backend_pid(l);
    pb_result_free(ok(pb_pg_exec(l, "BEGIN", &r), &r, "begin"));
    pb_result_free(ok(pb_pg_exec(l, "INSERT INTO custom_reset_rows VALUES (1)", &r), &r, "insert"));
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "custom", 5000, &l), PB_OK);
    assert_int_equal(pb_lease_backend_pid(l), pid);
    assert_no_transaction(l);
    assert_string_equal(value_of(l, "SELECT count(*) FROM custom_reset_rows", v, sizeof v), "0");
    assert_int_equal(pb_release(l), PB_OK);

    /* A failed transaction, after session state the custom SQL clears. */
    assert_int_equal(pb_acquire(c, "custom", 5000, &l), PB_OK);
    assert_int_equal(pb_lease_backend_pid(l), pid);
    pb_result_free(ok(pb_pg_exec(l, "SET work_mem = '7MB'", &r), &r, "set"));
    pb_result_free(ok(pb_pg_exec(l, "SELECT pg_advisory_lock(42)", &r), &r, "lock"));
    pb_result_free(ok(pb_pg_exec(l, "BEGIN", &r), &r, "begin"));
    pb_result_free(ok(pb_pg_exec(l, "INSERT INTO custom_reset_rows VALUES (2)", &r), &r, "insert"));
    assert_int_equal(pb_pg_exec(l, "SELECT 1/0", &r), PB_OK);
    assert_string_equal(pb_error_field(r, 'C'), "22012");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "custom", 5000, &l), PB_OK);
    assert_int_equal(pb_lease_backend_pid(l), pid);
    assert_no_transaction(l);
    assert_string_equal(value_of(l, "SELECT count(*) FROM custom_reset_rows", v, sizeof v), "0");
    assert_string_equal(value_of(l, "SELECT current_setting('work_mem')", v, sizeof v), def);
    assert_int_equal(advisory_42_holders(), 0);
    assert_int_equal(pb_release(l), PB_OK);
}

/* reset = SELECT 1/0 fails on the server every time.  The broker closes a
 * connection whose reset failed (and logs it), so every lease gets a new
 * backend, which works at its first command, in no transaction. */
static void test_custom_reset_that_fails(void **state)
{
    (void)state;
    pb_client *c = custom_connect();
    pb_lease *l;
    pb_result *r = NULL;
    int pids[32], npids = 0;
    for (int i = 0; i < 20; i++) {
        assert_int_equal(pb_acquire(c, "custom_fail", 5000, &l), PB_OK);
        int pid = pb_lease_backend_pid(l), seen = 0;
        for (int k = 0; k < npids; k++)
            seen |= pids[k] == pid;
        if (!seen)
            pids[npids++] = pid;
        char v[16];
        assert_string_equal(value_of(l, "SELECT 42", v, sizeof v), "42");    /* the first command */
        assert_no_transaction(l);
        if (i % 2) {    /* every other lease also leaves a failed transaction */
            assert_int_equal(pb_pg_exec(l, "BEGIN; SELECT 1/0", &r), PB_OK);
            pb_result_free(r);
        }
        assert_int_equal(pb_release(l), PB_OK);
    }
    print_message("reset = SELECT 1/0: 20 leases, every first command worked, on %d backend(s)\n", npids);
    assert_int_equal(npids, 20);
}

/* As documented: a connection still in a transaction after its reset
 * (reset = BEGIN) is closed, not handed out; the next lease gets a new
 * backend that works and is in no transaction. */
static void test_custom_reset_leaving_transaction_closes(void **state)
{
    (void)state;
    pb_client *c = custom_connect();
    pb_lease *l;
    char v[16];
    assert_int_equal(pb_acquire(c, "custom_begin", 5000, &l), PB_OK);
    int pid = pb_lease_backend_pid(l);
    assert_string_equal(value_of(l, "SELECT 1", v, sizeof v), "1");
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "custom_begin", 5000, &l), PB_OK);
    assert_int_not_equal(pb_lease_backend_pid(l), pid);
    assert_string_equal(value_of(l, "SELECT 2", v, sizeof v), "2");
    assert_no_transaction(l);
    assert_int_equal(pb_release(l), PB_OK);
}

/* reset = RESET ALL; SELECT 1/0: a multi-statement simple query runs as one
 * implicit transaction, so the error undoes the RESET ALL too. The safe
 * outcome is that the next holder never sees the previous lease's SET: the
 * failed reset's connection is closed, not reused. */
static void test_custom_reset_failure_leaks_no_state(void **state)
{
    (void)state;
    char def[64], v[64];
    default_work_mem(def, sizeof def);
    pb_client *c = custom_connect();
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(c, "custom_fail_state", 5000, &l), PB_OK);
    int pid = pb_lease_backend_pid(l);
    pb_result_free(ok(pb_pg_exec(l, "SET work_mem = '7MB'", &r), &r, "set"));
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "custom_fail_state", 5000, &l), PB_OK);
    int pid2 = pb_lease_backend_pid(l);
    value_of(l, "SELECT current_setting('work_mem')", v, sizeof v);
    assert_int_equal(pb_release(l), PB_OK);
    if (pid2 == pid)
        fail_msg("the reset failed on the server and its connection was handed out anyway: backend %d, "
                 "work_mem %s (default %s)", pid2, v, def);
    assert_string_equal(v, def);
}

/* pb_pg_prepare under custom resets: the broker clears the connection's
 * record of prepared statements, so the next lease re-prepares (Close +
 * Parse in the same write). Run inside a transaction, where a Bind of a
 * statement the server no longer has (26000) would abort the transaction
 * and the library's retry could not recover (25P02). */
static void prepared_custom(const char *pool)
{
    pb_client *c = custom_connect();
    pb_lease *l;
    pb_result *r = NULL;
    unsigned types[1] = { 23 };
    const char *one[1] = { "1" }, *five[1] = { "5" };
    char v[16];
    assert_int_equal(pb_acquire(c, pool, 5000, &l), PB_OK);
    int pid = pb_lease_backend_pid(l);
    pb_result_free(ok(pb_pg_prepare(l, "cadd", "SELECT $1::int4 + 2000", 1, types, &r), &r, "prepare"));
    ok(pb_pg_exec_prepared(l, "cadd", 1, one, NULL, NULL, 0, &r), &r, "exec_prepared");
    assert_string_equal(pb_getvalue(r, 0, 0), "2001");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);

    for (int round = 0; round < 3; round++) {
        assert_int_equal(pb_acquire(c, pool, 5000, &l), PB_OK);
        assert_int_equal(pb_lease_backend_pid(l), pid);
        pb_result_free(ok(pb_pg_exec(l, "BEGIN", &r), &r, "begin"));
        ok(pb_pg_exec_prepared(l, "cadd", 1, five, NULL, NULL, 0, &r), &r, "exec_prepared after reset");
        assert_string_equal(pb_getvalue(r, 0, 0), "2005");
        pb_result_free(r);
        /* One server-side statement: the re-prepare replaced, not added. */
        assert_string_equal(value_of(l, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pb\\_%'",
                                     v, sizeof v), "1");
        pb_result_free(ok(pb_pg_exec(l, "COMMIT", &r), &r, "commit"));
        assert_int_equal(pb_release(l), PB_OK);
    }
}

static void test_custom_reset_prepared(void **state)
{
    (void)state;
    prepared_custom("custom");          /* the statement survives on the server */
    prepared_custom("custom_dealloc");  /* the reset drops it */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prepared_rollback_policy),
        cmocka_unit_test(test_prepared_discard_all_policy),
        cmocka_unit_test(test_pipeline_10000_with_error),
        cmocka_unit_test(test_copy_in_out_bounded),
        cmocka_unit_test(test_listen_notify),
        cmocka_unit_test(test_notices),
        cmocka_unit_test(test_session_state_reset),
        cmocka_unit_test_teardown(test_custom_reset_clears_session_state, custom_teardown),
        cmocka_unit_test_teardown(test_custom_reset_rolls_back_first, custom_teardown),
        cmocka_unit_test_teardown(test_custom_reset_that_fails, custom_teardown),
        cmocka_unit_test_teardown(test_custom_reset_leaving_transaction_closes, custom_teardown),
        cmocka_unit_test_teardown(test_custom_reset_prepared, custom_teardown),
        cmocka_unit_test_teardown(test_custom_reset_failure_leaks_no_state, custom_teardown),
    };
    /* PB_TEST_FILTER=test_custom* runs only the matching tests. */
    const char *filter = getenv("PB_TEST_FILTER");
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests_name("pgext", tests, group_setup, group_teardown);
}
