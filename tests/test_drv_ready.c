/*
 * test_drv_ready.c — the drivers' "not ready yet" classification (issue
 * #19): which connect failures mean the server is up but does not serve
 * yet (PostgreSQL SQLSTATE 57P03 while starting up or in recovery, Redis
 * -LOADING), so that the broker retries with backoff instead of handing out
 * a connection or logging a failure every 20 tries.  The messages are the
 * ones libpq and redis-server really produce; test_not_ready.c drives the
 * Redis case end to end on a real server loading its dataset.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "broker.h"

static void test_pg_not_ready(void **state)
{
    (void)state;
    /* PQerrorMessage() after PQconnectPoll failed, as libpq 15/16 words it. */
    assert_true(pg_error_not_ready("connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  the "
                                   "database system is starting up"));
    assert_true(pg_error_not_ready("FATAL:  the database system is not yet accepting connections\nDETAIL:  "
                                   "Consistent recovery state has not been yet reached."));
    assert_true(pg_error_not_ready("FATAL:  the database system is not accepting connections\nDETAIL:  Hot "
                                   "standby mode is disabled."));
    assert_true(pg_error_not_ready("FATAL:  the database system is in recovery mode"));
}

static void test_pg_failures(void **state)
{
    (void)state;
    /* A server going away, refusing, or refusing us: real failures. */
    assert_false(pg_error_not_ready("FATAL:  the database system is shutting down"));
    assert_false(pg_error_not_ready("connection to server at \"127.0.0.1\", port 5432 failed: Connection "
                                    "refused\n\tIs the server running on that host and accepting TCP/IP "
                                    "connections?"));
    assert_false(pg_error_not_ready("FATAL:  password authentication failed for user \"app\""));
    assert_false(pg_error_not_ready("FATAL:  database \"nope\" does not exist"));
    assert_false(pg_error_not_ready("FATAL:  sorry, too many clients already"));
    assert_false(pg_error_not_ready(""));
    assert_false(pg_error_not_ready(NULL));
}

static void test_redis_not_ready(void **state)
{
    (void)state;
    assert_true(redis_error_not_ready("LOADING Redis is loading the dataset in memory"));
    assert_true(redis_error_not_ready("LOADING"));
    assert_false(redis_error_not_ready("LOADINGX something"));
    assert_false(redis_error_not_ready("ERR unknown command 'LOADING'"));
    assert_false(redis_error_not_ready("WRONGPASS invalid username-password pair or user is disabled."));
    assert_false(redis_error_not_ready("NOAUTH Authentication required."));
    assert_false(redis_error_not_ready("ERR DB index is out of range"));
    assert_false(redis_error_not_ready(""));
    assert_false(redis_error_not_ready(NULL));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_not_ready),
        cmocka_unit_test(test_pg_failures),
        cmocka_unit_test(test_redis_not_ready),
    };
    return cmocka_run_group_tests_name("drv_ready", tests, NULL, NULL);
}
