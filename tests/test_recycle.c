/*
 * test_recycle.c — connections recycled by max_uses and max_lifetime_s, on
 * a real PostgreSQL: a new backend after
 * every max_uses leases; an idle connection replaced once its lifetime has
 * passed, but a lease never interrupted by it.
 *
 * One group (its own temp dir, server and broker): pools "uses" and "life".
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env_pg;

#define PG_POOLS \
    "shutdown_timeout_ms = 5000\n" \
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

/* 4a. max_uses = 3: a new backend after every 3 leases. */
static void test_pg_max_uses(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = pbt_cli(e);
    int pid[7];
    char seq[128] = "";
    for (int i = 0; i < 7; i++) {
        pb_lease *l = pbt_lease(c, "uses", 10000);
        pid[i] = (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
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
    pbt_cli_done(c);
}

/* 4b. max_lifetime_s = 1: an idle connection is replaced once its lifetime
 * has passed. */
static void test_pg_max_lifetime_recycles(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = pbt_cli(e);
    pb_lease *l = pbt_lease(c, "life", 10000);
    int a = (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    pbt_sleep_ms(1500);
    l = pbt_lease(c, "life", 10000);
    int b = (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    print_message("max_lifetime_s=1: pid %d, then %d after 1.5 s idle\n", a, b);
    assert_int_not_equal(a, b);
    pbt_cli_done(c);
}

/* 4c. ... but a lease is never interrupted by it. */
static void test_pg_max_lifetime_spares_leases(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = pbt_cli(e);
    pb_lease *l = pbt_lease(c, "life", 10000);
    int a = (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
    double t0 = pbt_now_ms();
    int n = 0, other = 0, errs = 0;
    while (pbt_now_ms() - t0 < 2000) {
        pb_result *r = NULL;
        int rc = pb_pg_exec(l, "SELECT pg_backend_pid()", &r);
        if (rc != PB_OK || pb_result_status(r) != PB_RES_TUPLES_OK)
            errs++;
        else if (atoi(pb_getvalue(r, 0, 0)) != a)
            other++;
        pb_result_free(r);
        n++;
        pbt_sleep_ms(20);
    }
    int still = pb_lease_backend_pid(l);
    assert_int_equal(pb_release(l), PB_OK);
    l = pbt_lease(c, "life", 10000);
    int b = (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);
    print_message("max_lifetime_s=1, lease held 2 s: %d queries, %d errors, %d on another backend; "
                  "pid %d throughout, next lease pid %d\n", n, errs, other, a, b);
    assert_int_equal(errs, 0);
    assert_int_equal(other, 0);
    assert_int_equal(still, a);
    assert_int_not_equal(b, a);
    pbt_cli_done(c);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_max_uses),
        T(test_pg_max_lifetime_recycles),
        T(test_pg_max_lifetime_spares_leases),
    };
    int failed = cmocka_run_group_tests_name("recycle", pg_tests, pg_group_setup, pg_group_teardown);
    return failed;
}
