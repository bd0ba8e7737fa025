/*
 * test_multi_host.c — multi-host conninfo (host=a,b port=1,<port>) with
 * the first host refusing, plain and with target_session_attrs=read-write,
 * on a real PostgreSQL.
 *
 * One group (its own temp dir, server and broker): pools "multi", "multirw".
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env_pg;

#define PG_POOLS \
    "shutdown_timeout_ms = 5000\n" \
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
    "max_size = 1\n"

static int pg_group_setup(void **state)
{
    (void)state;
    return pbt_group_start(&env_pg, 1, 0, PG_POOLS);
}

static int pg_group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&env_pg);
}

/* 7. Multi-host conninfo with the first host refusing. */
static void multi_host(const char *pool)
{
    th_env *e = &env_pg;
    pb_client *c = pbt_cli(e);
    double t0 = pbt_now_ms();
    pb_lease *l = pbt_lease(c, pool, 10000);
    double dt = pbt_now_ms() - t0;
    long long port = pbt_pg_int(l, "SELECT inet_server_port()");
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SHOW transaction_read_only", &r), PB_OK);
    char ro[16];
    snprintf(ro, sizeof ro, "%s", pb_result_status(r) == PB_RES_TUPLES_OK ? pb_getvalue(r, 0, 0) : "?");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    /* And again, on the pooled connection. */
    l = pbt_lease(c, pool, 10000);
    assert_int_equal(pbt_pg_int(l, "SELECT 5"), 5);
    assert_int_equal(pb_release(l), PB_OK);
    print_message("pool %s (host=127.0.0.1,127.0.0.1 port=1,%d): first lease in %.1f ms, server port %lld, "
                  "transaction_read_only=%s, connect_failures %lld\n",
                  pool, e->pg_port, dt, port, ro, pbt_pool_counter(e, pool, "connect_failures"));
    assert_int_equal(port, e->pg_port);
    assert_string_equal(ro, "off");
    pbt_cli_done(c);
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

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_multi_host_first_refused),
        T(test_pg_multi_host_read_write),
    };
    int failed = cmocka_run_group_tests_name("multi_host", pg_tests, pg_group_setup, pg_group_teardown);
    return failed;
}
