/*
 * test_session_state.c — session state is decided from what the server
 * reports (#14): every kind the broker tracks is left by one lease and looked
 * for from the next lease of the same backend (pools of one connection; the
 * backend pid is checked), which must not see it.  PostgreSQL: SET / RESET /
 * set_config() (ParameterStatus) / SET ROLE / SET SESSION AUTHORIZATION,
 * SQL PREPARE, LISTEN (also through a prepared statement), temporary
 * objects (CREATE TEMP TABLE ... AS and SELECT ... INTO TEMP too, which
 * report "SELECT n"), WITH HOLD cursors, LOAD, and what only pb_pin covers
 * (a session advisory lock).  PB_SF_RESET as the holder sees it
 * right after the reply that reported the state.  Library prepared statements after a
 * DEALLOCATE ALL inside a transaction, and past the broker's per-connection
 * record.  Redis: MULTI as an open transaction, pb_pin.
 *
 * Every check runs against each pool of PG_POOLS / REDIS_POOLS, one in each
 * pool_mode.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"
#include "pb_shm.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

/* The pools every check runs on, each with one connection (max_size = 1):
 * name, and the config lines that set its mode.  Add a row to run the whole
 * set on another mode, e.g. { "pg_txn", "pool_mode = transaction\n" }. */
typedef struct test_pool {
    const char *name;
    const char *mode;
} test_pool;
static const test_pool PG_POOLS[] = {
    { "pg_session", "pool_mode = session\n" },
    { "pg_txn", "pool_mode = transaction\n" },
};
static const test_pool REDIS_POOLS[] = {
    { "r_session", "pool_mode = session\n" },
    { "r_txn", "pool_mode = transaction\n" },
};
#define NPG (sizeof PG_POOLS / sizeof PG_POOLS[0])
#define NREDIS (sizeof REDIS_POOLS / sizeof REDIS_POOLS[0])

#define CONNINFO "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable\n"

static int group_setup(void **state)
{
    (void)state;
    static char pools[8192];
    size_t n = 0;
    for (size_t i = 0; i < NPG; i++)
        n += (size_t)snprintf(pools + n, sizeof pools - n,
                              "[pool %s]\ntype = postgres\n" CONNINFO "min_size = 1\nmax_size = 1\n%s\n",
                              PG_POOLS[i].name, PG_POOLS[i].mode);
    for (size_t i = 0; i < NREDIS; i++)
        n += (size_t)snprintf(pools + n, sizeof pools - n,
                              "[pool %s]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\n"
                              "min_size = 1\nmax_size = 1\n%s\n",
                              REDIS_POOLS[i].name, REDIS_POOLS[i].mode);
    if (n >= sizeof pools || th_setup(&env, 1, 1) < 0)
        return -1;
    if (th_psql(&env, "CREATE ROLE someone; CREATE TABLE items (v int)", NULL, 0))
        return -1;
    return th_broker_start(&env, pools) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

/* ---------------------------------------------------------------- helpers */

/* Run sql; the result, which must not be an error. */
static pb_result *must(pb_lease *l, const char *sql)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    if (rc != PB_OK)
        fail_msg("%s: %s", sql, pb_strerror(rc));
    if (pb_result_status(r) == PB_RES_ERROR)
        fail_msg("%s: %s", sql, pb_error_message(r));
    return r;
}

static void run(pb_lease *l, const char *sql)
{
    pb_result_free(must(l, sql));
}

/* The first value of sql's result, into buf. */
static const char *value(pb_lease *l, const char *sql, char *buf, size_t n)
{
    pb_result *r = must(l, sql);
    snprintf(buf, n, "%s", pb_ntuples(r) > 0 ? pb_getvalue(r, 0, 0) : "(no rows)");
    pb_result_free(r);
    return buf;
}

/* The SQLSTATE sql fails with ("" if it does not fail). */
static const char *sqlstate(pb_lease *l, const char *sql, char *buf, size_t n)
{
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, sql, &r), PB_OK);
    const char *st = pb_result_status(r) == PB_RES_ERROR ? pb_error_field(r, 'C') : "";
    snprintf(buf, n, "%s", st ? st : "?");
    pb_result_free(r);
    return buf;
}

/* The backend a lease's statements run on: asked of the server, since in
 * transaction mode a lease has none before its first statement.  A Redis
 * lease: its connection's CLIENT ID. */
static int lease_backend(pb_lease *l, int redis)
{
    if (redis) {
        redisReply *r = NULL;
        assert_int_equal(pb_redis_command(l, &r, "CLIENT ID"), PB_OK);
        assert_int_equal(r->type, REDIS_REPLY_INTEGER);
        int id = (int)r->integer;
        freeReplyObject(r);
        return id;
    }
    return (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
}

static int pool_is_redis(const char *pool)
{
    return pool[0] == 'r' && pool[1] == '_';
}

/* Lease pool; *pid: its backend. */
static pb_lease *first_lease(pb_client *c, const char *pool, int *pid)
{
    pb_lease *l = pbt_lease(c, pool, 10000);
    *pid = lease_backend(l, pool_is_redis(pool));
    assert_true(*pid > 0);
    return l;
}

/* Lease pool again: the same backend (one connection, kept). */
static pb_lease *next_lease(pb_client *c, const char *pool, int pid)
{
    pb_lease *l = pbt_lease(c, pool, 10000);
    int now = lease_backend(l, pool_is_redis(pool));
    if (now != pid)
        fail_msg("pool %s: next lease on backend %d, not %d (the connection was replaced)", pool, now, pid);
    return l;
}

/* One lease runs each of setup[] and sees check answer `during`; the next
 * lease of the same backend gets what the first one got before its setup,
 * and the broker counted a reset for it. */
static void leaves_nothing(const char *pool, const char *const *setup, const char *check, const char *during)
{
    pb_client *c = pbt_cli(&env);
    int pid;
    char v[256], after[256];
    long long resets = pbt_pool_counter(&env, pool, "resets");
    pb_lease *l = first_lease(c, pool, &pid);
    value(l, check, after, sizeof after);
    if (strcmp(after, during) == 0)
        fail_msg("pool %s: %s gives %s already: the check could not fail", pool, check, during);
    for (; *setup; setup++)
        run(l, *setup);
    if (strcmp(value(l, check, v, sizeof v), during) != 0)
        fail_msg("pool %s: %s gives %s in the lease that set it, want %s", pool, check, v, during);
    assert_int_equal(pb_release(l), PB_OK);
    l = next_lease(c, pool, pid);
    if (strcmp(value(l, check, v, sizeof v), after) != 0)
        fail_msg("pool %s: after %s, the next lease's %s gives %s, want %s", pool, setup[-1], check, v, after);
    assert_int_equal(pb_release(l), PB_OK);
    assert_true(pbt_pool_counter(&env, pool, "resets") > resets);
    pbt_cli_done(c);
}

#define SETUP(...) ((const char *const[]){ __VA_ARGS__, NULL })

/* ---------------------------------------------------------------- GUC state */

static void test_set_and_reset(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        leaves_nothing(p, SETUP("SET work_mem = '7MB'"), "SHOW work_mem", "7MB");
        /* RESET of one setting after SET of another: still state */
        leaves_nothing(p, SETUP("SET statement_timeout = '5s'", "RESET work_mem"), "SHOW statement_timeout", "5s");
        /* a transaction-level SET ... that was a session SET after all */
        leaves_nothing(p, SETUP("BEGIN", "SET search_path = pg_catalog", "COMMIT"), "SHOW search_path",
                       "pg_catalog");
        /* RESET ALL does not undo SET ROLE or SET SESSION AUTHORIZATION;
         * the reset's SET SESSION AUTHORIZATION DEFAULT does. */
        leaves_nothing(p, SETUP("SET ROLE someone"), "SELECT current_user", "someone");
        leaves_nothing(p, SETUP("SET SESSION AUTHORIZATION someone"), "SELECT session_user", "someone");
    }
}

/* set_config() through a SELECT has no SET tag: the ParameterStatus the
 * server sends for a reported setting is what the broker sees. */
static void test_parameter_status(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        leaves_nothing(p, SETUP("SELECT set_config('application_name', 'leaked', false)"),
                       "SHOW application_name", "leaked");
        leaves_nothing(p, SETUP("SELECT set_config('TimeZone', 'Asia/Tokyo', false)"), "SHOW TimeZone",
                       "Asia/Tokyo");
        /* The same through the extended protocol. */
        pb_client *c = pbt_cli(&env);
        int pid;
        char v[64];
        pb_lease *l = first_lease(c, p, &pid);
        char before[64];
        value(l, "SHOW DateStyle", before, sizeof before);
        const char *vals[2] = { "DateStyle", "SQL, DMY" };
        pb_result *r = NULL;
        assert_int_equal(pb_pg_exec_params(l, "SELECT set_config($1, $2, false)", 2, NULL, vals, NULL, NULL, 0, &r),
                         PB_OK);
        assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
        pb_result_free(r);
        assert_int_equal(pb_release(l), PB_OK);
        l = next_lease(c, p, pid);
        assert_string_equal(value(l, "SHOW DateStyle", v, sizeof v), before);
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* ---------------------------------------------------- prepared, listening */

static void test_sql_prepare(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        int pid;
        char v[64];
        pb_result *r = NULL;
        const char *vals[1] = { "21" };
        pb_lease *l = first_lease(c, p, &pid);
        assert_int_equal(pb_pg_prepare(l, "lib", "SELECT $1::int4 * 2", 0, NULL, &r), PB_OK);
        pb_result_free(r);
        run(l, "PREPARE leaky AS SELECT 1");
        assert_string_equal(value(l, "EXECUTE leaky", v, sizeof v), "1");
        assert_int_equal(pb_release(l), PB_OK);
        l = next_lease(c, p, pid);
        assert_string_equal(sqlstate(l, "EXECUTE leaky", v, sizeof v), "26000");
        /* the reset's DEALLOCATE ALL took the library's statement too: it is
         * parsed again, not lost */
        assert_int_equal(pb_pg_exec_prepared(l, "lib", 1, vals, NULL, NULL, 0, &r), PB_OK);
        if (pb_result_status(r) != PB_RES_TUPLES_OK)
            fail_msg("pool %s: %s", p, pb_error_message(r));
        assert_string_equal(pb_getvalue(r, 0, 0), "42");
        pb_result_free(r);
        /* DEALLOCATE ALL by the lease itself: nothing left to reset */
        long long resets = pbt_pool_counter(&env, p, "resets");
        run(l, "PREPARE again AS SELECT 2");
        run(l, "DEALLOCATE ALL");
        assert_int_equal(pb_release(l), PB_OK);
        l = next_lease(c, p, pid);
        assert_int_equal(pbt_pool_counter(&env, p, "resets"), resets);
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* The next holder neither listens nor gets the notification. */
static void not_listening(pb_client *c, const char *pool, int pid, const char *channel)
{
    char v[64], sql[128];
    pb_notify *n = NULL;
    pb_lease *l = next_lease(c, pool, pid);
    assert_string_equal(value(l, "SELECT count(*) FROM pg_listening_channels()", v, sizeof v), "0");
    snprintf(sql, sizeof sql, "NOTIFY %s, 'for nobody'", channel);
    assert_int_equal(th_psql(&env, sql, NULL, 0), 0);
    assert_int_equal(pb_pg_wait_notify(l, 300, &n), PB_ETIMEDOUT);
    assert_int_equal(pb_release(l), PB_OK);
}

static void test_listen(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        int pid;
        pb_notify *n = NULL;
        pb_lease *l = first_lease(c, p, &pid);
        run(l, "LISTEN plain_ch");
        assert_int_equal(th_psql(&env, "NOTIFY plain_ch, 'hello'", NULL, 0), 0);
        assert_int_equal(pb_pg_wait_notify(l, 5000, &n), PB_OK);
        assert_string_equal(pb_notify_payload(n), "hello");
        pb_notify_free(n);
        assert_int_equal(pb_release(l), PB_OK);
        not_listening(c, p, pid, "plain_ch");
        pbt_cli_done(c);
    }
}

/* The case of #14: LISTEN run as a prepared statement, which no look at the
 * SQL text on the client's side would catch: the server's LISTEN tag does. */
static void test_listen_through_prepared(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        int pid;
        pb_result *r = NULL;
        pb_lease *l = first_lease(c, p, &pid);
        assert_int_equal(pb_pg_prepare(l, "s", "LISTEN prep_ch", 0, NULL, &r), PB_OK);
        assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
        pb_result_free(r);
        assert_int_equal(pb_pg_exec_prepared(l, "s", 0, NULL, NULL, NULL, 0, &r), PB_OK);
        assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
        pb_result_free(r);
        assert_int_equal(pb_release(l), PB_OK);
        not_listening(c, p, pid, "prep_ch");
        pbt_cli_done(c);
    }
}

/* ---------------------------------------------------- temp objects, cursors */

static void test_temp_objects(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        leaves_nothing(p, SETUP("CREATE TEMP TABLE tt (a int)", "INSERT INTO tt VALUES (1)"),
                       "SELECT to_regclass('pg_temp.tt') IS NOT NULL", "t");
        leaves_nothing(p, SETUP("CREATE TEMP SEQUENCE ts"), "SELECT to_regclass('pg_temp.ts') IS NOT NULL", "t");
        leaves_nothing(p, SETUP("CREATE TEMP VIEW tv AS SELECT 1 AS one"),
                       "SELECT to_regclass('pg_temp.tv') IS NOT NULL", "t");
        leaves_nothing(p, SETUP("CREATE FUNCTION pg_temp.tf() RETURNS int LANGUAGE sql AS 'SELECT 7'"),
                       "SELECT count(*) FROM pg_proc WHERE proname = 'tf'", "1");
        /* These report "SELECT n", as a query does, but return no rows
         * (no RowDescription, no DataRow): that is what gives them away. */
        leaves_nothing(p, SETUP("CREATE TEMP TABLE ctas AS SELECT g FROM generate_series(1, 3) g"),
                       "SELECT to_regclass('pg_temp.ctas') IS NOT NULL", "t");
        leaves_nothing(p, SETUP("SELECT 1 AS one INTO TEMP sinto"), "SELECT to_regclass('pg_temp.sinto') IS NOT NULL",
                       "t");
        leaves_nothing(p, SETUP("CREATE TEMP TABLE ctas0 AS SELECT 1 AS one WHERE false"),
                       "SELECT to_regclass('pg_temp.ctas0') IS NOT NULL", "t");
        /* EXPLAIN ANALYZE runs the statement; the tag is EXPLAIN */
        leaves_nothing(p, SETUP("EXPLAIN ANALYZE CREATE TEMP TABLE ectas AS SELECT 1 AS one"),
                       "SELECT to_regclass('pg_temp.ectas') IS NOT NULL", "t");
        /* the extended protocol (pb_pg_exec_params: Describe answers NoData) */
        pb_client *c = pbt_cli(&env);
        int pid;
        char v[64];
        pb_lease *l = first_lease(c, p, &pid);
        const char *vals[1] = { "5" };
        pb_result *r = NULL;
        assert_int_equal(pb_pg_exec_params(l, "CREATE TEMP TABLE ctasp AS SELECT $1::int AS five", 1, NULL, vals,
                                           NULL, NULL, 0, &r),
                         PB_OK);
        if (pb_result_status(r) == PB_RES_ERROR)
            fail_msg("CREATE TEMP TABLE ... AS with a parameter: %s", pb_error_message(r));
        pb_result_free(r);
        assert_string_equal(value(l, "SELECT five FROM pg_temp.ctasp", v, sizeof v), "5");
        assert_int_equal(pb_release(l), PB_OK);
        l = next_lease(c, p, pid);
        assert_string_equal(value(l, "SELECT to_regclass('pg_temp.ctasp') IS NOT NULL", v, sizeof v), "f");
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

static void test_cursor_with_hold(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        leaves_nothing(p, SETUP("BEGIN", "DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g",
                                "COMMIT", "FETCH 1 FROM held"),
                       "SELECT count(*) FROM pg_cursors", "1");
    }
}

/* LOAD leaves a library loaded, which nothing undoes: the connection is
 * retired on release. */
static void test_load_retires(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        int pid;
        pb_lease *l = first_lease(c, p, &pid);
        run(l, "LOAD 'auto_explain'");
        run(l, "SET auto_explain.log_min_duration = 0");
        assert_int_equal(pb_release(l), PB_OK);
        l = pbt_lease(c, p, 10000);
        assert_int_not_equal(lease_backend(l, 0), pid);
        char v[64];
        assert_string_equal(sqlstate(l, "SHOW auto_explain.log_min_duration", v, sizeof v), "42704");
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* ------------------------------------------------------ what needs pb_pin */

static long advisory_holders(int key)
{
    char sql[160];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = 0 AND objid = %d",
             key);
    return pbt_psql_int(&env, sql);
}

static void test_pin(void **state)
{
    (void)state;
    assert_int_equal(pb_pin(NULL), PB_EINVAL);
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        int pid;
        char v[64];
        /* A session advisory lock: no tag says so.  Pinned before the
         * statement: in transaction mode the pin keeps the backend that
         * runs the lease's next statement. */
        pb_lease *l = first_lease(c, p, &pid);
        assert_int_equal(pb_pin(l), PB_OK);
        assert_int_equal(pb_pin(l), PB_OK);             /* idempotent */
        run(l, "SELECT pg_advisory_lock(4242)");
        assert_int_equal(advisory_holders(4242), 1);    /* seen from another session */
        assert_int_equal(pb_release(l), PB_OK);
        l = next_lease(c, p, pid);
        assert_int_equal(advisory_holders(4242), 0);
        /* pinned or not, a temporary table made by CREATE TABLE ... AS
         * (detected since: test_temp_objects) goes with the release */
        assert_int_equal(pb_pin(l), PB_OK);
        run(l, "CREATE TEMP TABLE ctas AS SELECT 1 AS one");
        assert_string_equal(value(l, "SELECT to_regclass('pg_temp.ctas') IS NOT NULL", v, sizeof v), "t");
        assert_int_equal(pb_release(l), PB_OK);
        l = next_lease(c, p, pid);
        assert_string_equal(value(l, "SELECT to_regclass('pg_temp.ctas') IS NOT NULL", v, sizeof v), "f");
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* A lease that leaves nothing costs no reset (and releases straight to the
 * free map). */
static void test_clean_lease_costs_nothing(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        long long resets = pbt_pool_counter(&env, p, "resets");
        unsigned types[1] = { 23 };
        pb_result *r = NULL;
        for (int k = 0; k < 5; k++) {
            pb_lease *l = pbt_lease(c, p, 10000);
            run(l, "SELECT 1");
            run(l, "SELECT 1 WHERE false");         /* "SELECT 0", with a RowDescription */
            pb_result *z = NULL;
            const char *one[1] = { "1" };
            assert_int_equal(pb_pg_exec_params(l, "SELECT $1::int WHERE false", 1, NULL, one, NULL, NULL, 0, &z), PB_OK);
            assert_int_equal(pb_ntuples(z), 0);
            pb_result_free(z);
            run(l, "BEGIN");
            run(l, "INSERT INTO items VALUES (0)");
            run(l, "ROLLBACK");
            assert_int_equal(pb_pg_prepare(l, "cheap", "SELECT $1::int4", 1, types, &r), PB_OK);
            pb_result_free(r);
            assert_int_equal(pb_release(l), PB_OK);
        }
        assert_int_equal(pbt_pool_counter(&env, p, "resets"), resets);
        pbt_cli_done(c);
    }
}

/* ------------------------------------------------ library prepared statements */

/* The case of #14: DEALLOCATE ALL inside a transaction, then a library
 * prepared statement: 42, and the transaction goes on (it used to get
 * 26000 on a Bind-only execution, which aborted the transaction).  Then a
 * DEALLOCATE of its server-side name by SQL, and one inside a function,
 * which no tag reports. */
static void test_deallocate_all_in_transaction(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        pb_result *r = NULL;
        char v[64];
        const char *vals[1] = { "21" };
        pb_lease *l = pbt_lease(c, p, 10000);
        run(l, "DELETE FROM items");
        assert_int_equal(pb_pg_prepare(l, "dbl", "SELECT $1::int4 * 2", 0, NULL, &r), PB_OK);
        assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
        pb_result_free(r);
        run(l, "BEGIN");
        run(l, "INSERT INTO items VALUES (1)");
        run(l, "DEALLOCATE ALL");
        assert_int_equal(pb_pg_exec_prepared(l, "dbl", 1, vals, NULL, NULL, 0, &r), PB_OK);
        if (pb_result_status(r) != PB_RES_TUPLES_OK)
            fail_msg("pool %s: %s", p, pb_error_message(r));
        assert_string_equal(pb_getvalue(r, 0, 0), "42");
        pb_result_free(r);
        assert_int_equal(pb_transaction_status(l), PB_TRANS_INTRANS);
        /* and a DEALLOCATE of its own server-side name, by SQL */
        run(l, "DEALLOCATE ALL");
        assert_int_equal(pb_pg_exec_prepared(l, "dbl", 1, vals, NULL, NULL, 0, &r), PB_OK);
        assert_string_equal(pb_getvalue(r, 0, 0), "42");
        pb_result_free(r);
        char name[64];
        value(l, "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pb\\_%'", name, sizeof name);
        char sql[128];
        snprintf(sql, sizeof sql, "DEALLOCATE %s", name);
        run(l, sql);
        assert_int_equal(pb_pg_exec_prepared(l, "dbl", 1, vals, NULL, NULL, 0, &r), PB_OK);
        assert_string_equal(pb_getvalue(r, 0, 0), "42");
        pb_result_free(r);
        run(l, "COMMIT");
        assert_string_equal(value(l, "SELECT count(*) FROM items WHERE v = 1", v, sizeof v), "1");
        /* A DEALLOCATE no tag reports (inside a DO block): the next
         * execution fails (26000) and the one after works again. */
        char sql2[200];
        snprintf(sql2, sizeof sql2, "DO $$ BEGIN EXECUTE 'DEALLOCATE %s'; END $$", name);
        run(l, sql2);
        assert_int_equal(pb_pg_exec_prepared(l, "dbl", 1, vals, NULL, NULL, 0, &r), PB_OK);
        assert_int_equal(pb_result_status(r), PB_RES_ERROR);
        assert_string_equal(pb_error_field(r, 'C'), "26000");
        pb_result_free(r);
        assert_int_equal(pb_pg_exec_prepared(l, "dbl", 1, vals, NULL, NULL, 0, &r), PB_OK);
        assert_string_equal(pb_getvalue(r, 0, 0), "42");
        pb_result_free(r);
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* More distinct statements than the broker remembers per connection (128):
 * every one still runs right, the oldest are closed on the server to make
 * room, and a statement run again is not parsed again. */
static void test_statement_record_bounded(void **state)
{
    (void)state;
    enum { N = 150 };
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        pb_result *r = NULL;
        char name[16], sql[64], want[16], v[32];
        pb_lease *l = pbt_lease(c, p, 10000);
        for (int round = 0; round < 2; round++) {
            for (int k = 0; k < N; k++) {
                snprintf(name, sizeof name, "s%d", k);
                snprintf(sql, sizeof sql, "SELECT %d + $1::int4", k);
                if (round == 0) {
                    assert_int_equal(pb_pg_prepare(l, name, sql, 0, NULL, &r), PB_OK);
                    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
                    pb_result_free(r);
                }
                const char *vals[1] = { "1000" };
                assert_int_equal(pb_pg_exec_prepared(l, name, 1, vals, NULL, NULL, 0, &r), PB_OK);
                snprintf(want, sizeof want, "%d", k + 1000);
                if (pb_result_status(r) != PB_RES_TUPLES_OK)
                    fail_msg("%s: %s", name, pb_error_message(r));
                assert_string_equal(pb_getvalue(r, 0, 0), want);
                pb_result_free(r);
            }
        }
        long held = atol(value(l, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pb\\_%'", v, sizeof v));
        assert_true(held > 0 && held <= 128);
        /* the most recent one is remembered: run again, it is not parsed */
        long long before = atoll(value(l, "SELECT sum(generic_plans + custom_plans) FROM pg_prepared_statements", v,
                                       sizeof v));
        const char *vals[1] = { "1" };
        snprintf(name, sizeof name, "s%d", N - 1);
        assert_int_equal(pb_pg_exec_prepared(l, name, 1, vals, NULL, NULL, 0, &r), PB_OK);
        pb_result_free(r);
        long long after = atoll(value(l, "SELECT sum(generic_plans + custom_plans) FROM pg_prepared_statements", v,
                                      sizeof v));
        assert_int_equal(after, before + 1);
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* --------------------------------------------------- the slot as published */

/* The slot of a lease's connection in the segment (by its backend pid or
 * Redis client id, and the pool type): *txn its txn_status, *flags its
 * flags, as the broker published them.  0, or -1 if not found. */
static int slot_words(int pid, unsigned type, unsigned *txn, unsigned *flags)
{
    int fd = shm_open(env.shm_name, O_RDONLY, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED)
        return -1;
    const pb_shm_header *h = base;
    int rc = -1;
    if (h->slot_off + (uint64_t)h->nslots * sizeof(pb_shm_slot) <= (uint64_t)st.st_size) {
        const pb_shm_slot *s = (const pb_shm_slot *)((const char *)base + h->slot_off);
        const pb_shm_pool *pools = (const pb_shm_pool *)((const char *)base + h->pool_off);
        for (uint32_t i = 0; i < h->nslots && rc < 0; i++)
            if (atomic_load(&s[i].backend_pid) == pid && s[i].pool < PB_MAX_POOLS && pools[s[i].pool].type == type) {
                *txn = atomic_load(&s[i].txn_status);
                *flags = atomic_load(&s[i].flags);
                rc = 0;
            }
    }
    munmap(base, (size_t)st.st_size);
    return rc;
}

static unsigned redis_txn_status(int id)
{
    unsigned txn = 0, flags = 0;
    assert_int_equal(slot_words(id, PB_POOL_REDIS, &txn, &flags), 0);
    return txn;
}

/* Does the holder see PB_SF_RESET (release through the broker) now? */
static int pg_reset_flag(pb_lease *l)
{
    unsigned txn = 0, flags = 0;
    assert_int_equal(slot_words(pb_lease_backend_pid(l), PB_POOL_POSTGRES, &txn, &flags), 0);
    return (flags & PB_SF_RESET) != 0;
}

/* The holder sees PB_SF_RESET as soon as it has the reply that reported the
 * state (the broker stores it before it publishes the reply's bytes), and
 * no longer once the lease undid the state itself. */
static void test_reset_flag_published(void **state)
{
    (void)state;
    for (size_t i = 0; i < NPG; i++) {
        const char *p = PG_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        pb_lease *l = pbt_lease(c, p, 10000);
        run(l, "SELECT 1");
        assert_false(pg_reset_flag(l));
        run(l, "SET work_mem = '9MB'");
        assert_true(pg_reset_flag(l));
        run(l, "LISTEN flag_ch");
        run(l, "DISCARD ALL");
        assert_false(pg_reset_flag(l));
        run(l, "CREATE TEMP TABLE flag_t (a int)");
        assert_true(pg_reset_flag(l));
        run(l, "DISCARD TEMP");
        assert_false(pg_reset_flag(l));
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* ------------------------------------------------------------------- Redis */

static redisReply *rcmd(pb_lease *l, const char *line)
{
    redisReply *r = NULL;
    int rc = pb_redis_command(l, &r, line);
    if (rc != PB_OK)
        fail_msg("%s: %s", line, pb_strerror(rc));
    return r;
}

static long long reset_calls(void)
{
    char out[8192];
    if (th_redis_cli(&env, "INFO commandstats", out, sizeof out) != 0)
        return -1;
    const char *p = strstr(out, "cmdstat_reset:calls=");
    return p ? atoll(p + strlen("cmdstat_reset:calls=")) : 0;
}

/* MULTI is an open transaction (c->txn 'T': what pins a transaction-mode
 * lease) until the reply to its EXEC or DISCARD.  Read from the slot the
 * lease holds, found by backend: a session-mode pool's (test_txn covers
 * transaction mode, where a lease changes backend). */
static void test_redis_multi_is_a_transaction(void **state)
{
    (void)state;
    for (size_t i = 0; i < NREDIS; i++) {
        const char *p = REDIS_POOLS[i].name;
        if (strcmp(p, "r_session") != 0)
            continue;
        pb_client *c = pbt_cli(&env);
        pb_lease *l = pbt_lease(c, p, 10000);
        int id = pb_lease_backend_pid(l);
        freeReplyObject(rcmd(l, "SET k 1"));
        assert_int_equal(redis_txn_status(id), 'I');
        freeReplyObject(rcmd(l, "MULTI"));
        assert_int_equal(redis_txn_status(id), 'T');
        freeReplyObject(rcmd(l, "INCR k"));
        assert_int_equal(redis_txn_status(id), 'T');
        redisReply *r = rcmd(l, "EXEC");
        assert_int_equal(r->type, REDIS_REPLY_ARRAY);
        freeReplyObject(r);
        assert_int_equal(redis_txn_status(id), 'I');
        freeReplyObject(rcmd(l, "MULTI"));
        freeReplyObject(rcmd(l, "DISCARD"));
        assert_int_equal(redis_txn_status(id), 'I');
        /* MULTI and EXEC in one pipeline */
        assert_int_equal(pb_redis_append_command(l, "MULTI"), PB_OK);
        assert_int_equal(pb_redis_append_command(l, "INCR k"), PB_OK);
        assert_int_equal(pb_redis_append_command(l, "EXEC"), PB_OK);
        for (int k = 0; k < 3; k++) {
            assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
            freeReplyObject(r);
        }
        assert_int_equal(redis_txn_status(id), 'I');
        /* left open: the release resets it, the next lease is in none */
        freeReplyObject(rcmd(l, "MULTI"));
        assert_int_equal(pb_release(l), PB_OK);
        l = pbt_lease(c, p, 10000);
        assert_int_equal(pb_lease_backend_pid(l), id);
        r = rcmd(l, "GET k");
        assert_string_equal(r->str, "3");
        freeReplyObject(r);
        /* (published with the first reply: the reset's went to the sink) */
        assert_int_equal(redis_txn_status(id), 'I');
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

/* pb_pin on a Redis lease: the release runs RESET even though no command
 * left state. */
static void test_redis_pin(void **state)
{
    (void)state;
    for (size_t i = 0; i < NREDIS; i++) {
        const char *p = REDIS_POOLS[i].name;
        pb_client *c = pbt_cli(&env);
        long long before = reset_calls();
        pb_lease *l = pbt_lease(c, p, 10000);
        freeReplyObject(rcmd(l, "GET k"));
        assert_int_equal(pb_release(l), PB_OK);
        assert_int_equal(reset_calls(), before);
        l = pbt_lease(c, p, 10000);
        assert_int_equal(pb_pin(l), PB_OK);     /* before: in transaction mode it pins the next command's backend */
        freeReplyObject(rcmd(l, "GET k"));
        assert_int_equal(pb_release(l), PB_OK);
        l = pbt_lease(c, p, 10000);    /* after the reset has run */
        assert_int_equal(reset_calls(), before + 1);
        assert_int_equal(pb_release(l), PB_OK);
        pbt_cli_done(c);
    }
}

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_set_and_reset, pbt_cleanup),
        cmocka_unit_test_teardown(test_parameter_status, pbt_cleanup),
        cmocka_unit_test_teardown(test_sql_prepare, pbt_cleanup),
        cmocka_unit_test_teardown(test_listen, pbt_cleanup),
        cmocka_unit_test_teardown(test_listen_through_prepared, pbt_cleanup),
        cmocka_unit_test_teardown(test_temp_objects, pbt_cleanup),
        cmocka_unit_test_teardown(test_cursor_with_hold, pbt_cleanup),
        cmocka_unit_test_teardown(test_load_retires, pbt_cleanup),
        cmocka_unit_test_teardown(test_pin, pbt_cleanup),
        cmocka_unit_test_teardown(test_clean_lease_costs_nothing, pbt_cleanup),
        cmocka_unit_test_teardown(test_reset_flag_published, pbt_cleanup),
        cmocka_unit_test_teardown(test_deallocate_all_in_transaction, pbt_cleanup),
        cmocka_unit_test_teardown(test_statement_record_bounded, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_multi_is_a_transaction, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_pin, pbt_cleanup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
