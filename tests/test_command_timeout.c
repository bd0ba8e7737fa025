/*
 * test_command_timeout.c — command_timeout_ms on a real PostgreSQL: a pg_sleep past it is cancelled (SQLSTATE 57014)
 * well before the sleep would end, and the lease stays usable on the same
 * connection.
 *
 * One group (its own temp dir, server and broker): pool "slow".
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
    "[pool slow]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_to\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "command_timeout_ms = 500\n" \
    "validate_after_idle_ms = 0\n"

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

/* 2. pg_sleep past command_timeout_ms: cancelled (57014) well before the
 * sleep would end, and the lease stays usable on the same connection. */
static void test_pg_command_timeout_cancels(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = pbt_cli(e);
    pb_lease *l = pbt_lease(c, "slow", 10000);
    int pid0 = pb_lease_backend_pid(l);
    pb_result *r = NULL;
    double t0 = pbt_now_ms();
    int rc = pb_pg_exec(l, "SELECT pg_sleep(5)", &r);
    double dt = pbt_now_ms() - t0;
    const char *st = r ? pb_error_field(r, 'C') : NULL;
    print_message("pg_sleep(5) with command_timeout_ms=500: %s, status %d, SQLSTATE %s after %.0f ms\n",
                  pb_strerror(rc), r ? pb_result_status(r) : -1, st ? st : "-", dt);
    assert_int_equal(rc, PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_non_null(st);
    assert_string_equal(st, "57014");
    assert_true(dt < 2500);
    pb_result_free(r);
    assert_int_equal(pbt_pg_int(l, "SELECT 1"), 1);
    assert_int_equal(pbt_pg_int(l, "SELECT pg_backend_pid()"), pid0);
    assert_int_equal(pb_release(l), PB_OK);
    l = pbt_lease(c, "slow", 10000);
    assert_int_equal(pbt_pg_int(l, "SELECT 2"), 2);
    print_message("after the cancel: same lease and the next one work (pid %d then %d)\n", pid0,
                  pb_lease_backend_pid(l));
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_command_timeout_cancels),
    };
    int failed = cmocka_run_group_tests_name("command_timeout", pg_tests, pg_group_setup, pg_group_teardown);
    return failed;
}
