/*
 * test_validate.c — validate_after_idle_ms on a real PostgreSQL: validations keep a healthy connection; one killed while
 * idle is replaced before the next lease's first command.
 *
 * One group (its own temp dir, server and broker): pools "val" and "admin".
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
    "[pool admin]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbadmin\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool val]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_val\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 300\n"

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

/* 5. validate_after_idle_ms = 300: validations (empty queries) keep a
 * healthy connection; a killed one is replaced before the next lease's
 * first command. */
static void test_pg_validate_after_idle(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    assert_true(pbt_wait_pg_count(e, "pblife_val", 1, 10000) >= 0);
    pb_client *c = pbt_cli(e);
    pb_lease *l = pbt_lease(c, "val", 10000);
    int a = (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    pbt_sleep_ms(1000);
    char act[256];
    assert_int_equal(th_psql(e, "SELECT state || '|' || query || '|' || pid FROM pg_stat_activity "
                                "WHERE application_name = 'pblife_val'", act, sizeof act), 0);
    l = pbt_lease(c, "val", 10000);
    char how[256];
    int pid = pbt_pg_first_command(l, how, sizeof how);
    long long n = pbt_pg_int(l, "SELECT count(*) FROM pg_stat_activity");
    assert_int_equal(pb_release(l), PB_OK);
    print_message("validate_after_idle_ms=300: after 1 s idle the backend shows '%s'; next lease first command "
                  "%s, pg_stat_activity count %lld\n", act, how, n);
    assert_int_equal(pid, a);
    assert_true(n >= 1);

    /* Killed while idle, lease 200 ms later. */
    pbt_sleep_ms(400);
    assert_int_equal(pbt_psql_int(e, "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE application_name = 'pblife_val') s"), 1);
    pbt_sleep_ms(200);
    l = pbt_lease(c, "val", 10000);
    int b = pbt_pg_first_command(l, how, sizeof how);
    assert_int_equal(pb_release(l), PB_OK);
    print_message("validate pool, killed, lease 200 ms later: first command %s\n", how);
    assert_true(b > 0);
    assert_int_not_equal(b, a);

    /* Killed while idle, lease at once (reported). */
    pb_lease *admin = pbt_lease(c, "admin", 10000);
    int fails = 0;
    for (int round = 0; round < 3; round++) {
        if (pbt_wait_pg_count(e, "pblife_val", 1, 10000) < 0)
            fail_msg("pool 'val' did not reconnect");
        pbt_sleep_ms(round == 2 ? 100 : 400);   /* idle past, and not past, 300 ms */
        pbt_pg_lease_terminate(admin, "pblife_val");
        double t0 = pbt_now_ms();
        l = NULL;
        int rc = pb_acquire(c, "val", 5000, &l);
        int p = 0;
        if (rc == PB_OK)
            p = pbt_pg_first_command(l, how, sizeof how);
        else
            snprintf(how, sizeof how, "pb_acquire -> %s", pb_strerror(rc));
        if (l)
            pb_release(l);
        if (p == 0)
            fails++;
        print_message("validate pool, killed, lease at once (idle %s 300 ms): first command %s after %.2f ms\n",
                      round == 2 ? "<" : ">", how, pbt_now_ms() - t0);
    }
    assert_int_equal(pb_release(admin), PB_OK);
    l = pbt_lease(c, "val", 10000);
    assert_int_equal(pbt_pg_int(l, "SELECT 3"), 3);
    assert_int_equal(pb_release(l), PB_OK);
    print_message("validate pool, lease at once after a kill: first command failed in %d of 3 rounds\n", fails);
    pbt_cli_done(c);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_validate_after_idle),
    };
    int failed = cmocka_run_group_tests_name("validate", pg_tests, pg_group_setup, pg_group_teardown);
    return failed;
}
