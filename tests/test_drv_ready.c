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
 *
 * And what a server says in a reply that makes a pool follow a failover
 * (issue #16, broker/failover.c): the SQLSTATE of an ErrorResponse (25006
 * read-only, 57P01/57P02/57P03 going away) and Redis -READONLY /
 * -MASTERDOWN, found by the drivers' reply scanners whole and when the
 * stream arrives one byte at a time; other errors say nothing.
 * test_failover.c drives both end to end on real replicas.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "broker.h"

broker B;                   /* pg.c reads the loop's clock, B.now_ms */

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

/* The scanners keep their state in c->drv: zeroed memory of ample size
 * stands in for it, as in the fuzz targets. */
static _Alignas(16) unsigned char drv_mem[1024];

/* Scan stream[0..n) with drv (whole, or one byte at a time) until one reply
 * completes; what it said of the server in *out. */
static void scan_one(const driver *drv, const char *stream, size_t n, int bytewise, drv_reply *out)
{
    conn c;
    memset(&c, 0, sizeof c);
    memset(drv_mem, 0, sizeof drv_mem);
    c.drv = drv_mem;
    size_t off = 0;
    int rc = DRV_AGAIN;
    while (off < n && rc == DRV_AGAIN) {
        size_t used = 0, len = bytewise ? 1 : n - off;
        memset(out, 0, sizeof *out);
        rc = drv->scan_reply(&c, (const uint8_t *)stream + off, len, &used, out);
        assert_true(rc == DRV_OK || rc == DRV_AGAIN);
        off += used;
    }
    assert_int_equal(rc, DRV_OK);
    assert_int_equal(off, n);
}

/* An ErrorResponse with SQLSTATE code (severity, code, message), then
 * ReadyForQuery 'I'; its length in *n. */
static char *pg_error_stream(const char *code, size_t *n)
{
    static char buf[256];
    char body[200];
    int blen = snprintf(body, sizeof body, "SERROR%cVERROR%cC%s%cMsomething%c%c", 0, 0, code, 0, 0, 0);
    uint32_t mlen = (uint32_t)blen + 4;
    buf[0] = 'E';
    buf[1] = (char)(mlen >> 24);
    buf[2] = (char)(mlen >> 16);
    buf[3] = (char)(mlen >> 8);
    buf[4] = (char)mlen;
    memcpy(buf + 5, body, (size_t)blen);
    memcpy(buf + 5 + blen, "Z\0\0\0\5I", 6);
    *n = 5 + (size_t)blen + 6;
    return buf;
}

static void test_pg_failover_codes(void **state)
{
    (void)state;
    static const struct {
        const char *code;
        int gone, readonly;
    } cases[] = {
        { "25006", 0, 1 }, { "57P01", 1, 0 }, { "57P02", 1, 0 }, { "57P03", 1, 0 },
        { "23505", 0, 0 }, { "57014", 0, 0 }, { "25006X", 0, 0 }, { "2500", 0, 0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int bytewise = 0; bytewise < 2; bytewise++) {
            size_t n;
            const char *st = pg_error_stream(cases[i].code, &n);
            drv_reply r;
            scan_one(&pg_driver, st, n, bytewise, &r);
            assert_int_equal(r.errors, 1);
            assert_int_equal(r.server_gone != NULL, cases[i].gone);
            assert_int_equal(r.server_readonly != NULL, cases[i].readonly);
        }
    }
}

static void test_redis_failover_replies(void **state)
{
    (void)state;
    static const struct {
        const char *stream;
        int gone, readonly;
    } cases[] = {
        { "-READONLY You can't write against a read only replica.\r\n", 0, 1 },
        { "-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n", 1, 0 },
        { "*2\r\n-READONLY You can't write against a read only replica.\r\n:1\r\n", 0, 1 },
        { "-ERR READONLY is not a command\r\n", 0, 0 },
        { "+READONLY\r\n", 0, 0 },
        { "$8\r\nREADONLY\r\n", 0, 0 },
        { ":1\r\n", 0, 0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int bytewise = 0; bytewise < 2; bytewise++) {
            drv_reply r;
            scan_one(&redis_driver, cases[i].stream, strlen(cases[i].stream), bytewise, &r);
            assert_int_equal(r.server_gone != NULL, cases[i].gone);
            assert_int_equal(r.server_readonly != NULL, cases[i].readonly);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_not_ready),
        cmocka_unit_test(test_pg_failures),
        cmocka_unit_test(test_redis_not_ready),
        cmocka_unit_test(test_pg_error_flatten),
        cmocka_unit_test(test_pg_failover_codes),
        cmocka_unit_test(test_redis_failover_replies),
    };
    return cmocka_run_group_tests_name("drv_ready", tests, NULL, NULL);
}
