/*
 * test_drv_ready.c — the drivers' "not ready yet" classification (issue
 * #19): which connect failures mean the server is up but does not serve
 * yet (PostgreSQL SQLSTATE 57P03 while starting up or in recovery, Redis
 * -LOADING), so that the broker retries with backoff instead of handing out
 * a connection or logging a failure every 20 tries.  The messages are the
 * ones libpq and redis-server really produce; test_not_ready.c drives the
 * Redis case end to end on a real server loading its dataset.  And libpq's
 * multi-line connect errors made one line that keeps every host's reason
 * (issue #18: the log and the pool's last_error were cut before the second
 * host's).
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

/* Two hosts refusing, as libpq 15 words it: one line, host by host. */
static void test_pg_error_flatten(void **state)
{
    (void)state;
    const char *two = "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n"
                      "\tIs the server running on that host and accepting TCP/IP connections?\n"
                      "connection to server at \"127.0.0.1\", port 2 failed: Connection refused\n"
                      "\tIs the server running on that host and accepting TCP/IP connections?\n";
    char out[CONN_ERROR_MAX];
    pg_error_flatten(two, out, sizeof out);
    assert_string_equal(out, "connection to server at \"127.0.0.1\", port 1 failed: Connection refused Is the "
                             "server running on that host and accepting TCP/IP connections?; connection to server "
                             "at \"127.0.0.1\", port 2 failed: Connection refused Is the server running on that "
                             "host and accepting TCP/IP connections?");
    /* FATAL with a DETAIL line, a trailing newline, a stray control byte. */
    pg_error_flatten("FATAL:  the database system is not accepting connections\nDETAIL:  Hot standby mode is "
                     "disabled.\n", out, sizeof out);
    assert_string_equal(out, "FATAL:  the database system is not accepting connections; DETAIL:  Hot standby "
                             "mode is disabled.");
    pg_error_flatten("a\rb\n\n", out, sizeof out);
    assert_string_equal(out, "a b");
    pg_error_flatten(NULL, out, sizeof out);
    assert_string_equal(out, "unknown error");
    /* Too long for the buffer: cut, and says so. */
    char small[24];
    pg_error_flatten(two, small, sizeof small);
    assert_string_equal(small, "connection to server...");
    assert_int_equal(strlen(small), sizeof small - 1);
    pg_error_flatten("abc", small, 4);
    assert_string_equal(small, "abc");
    pg_error_flatten("abcd", small, 4);
    assert_string_equal(small, "...");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_not_ready),
        cmocka_unit_test(test_pg_failures),
        cmocka_unit_test(test_redis_not_ready),
        cmocka_unit_test(test_pg_error_flatten),
    };
    return cmocka_run_group_tests_name("drv_ready", tests, NULL, NULL);
}
