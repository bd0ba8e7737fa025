/*
 * test_log.c — unit tests for broker/log.c: one event, one line (issue
 * #18).  A message with libpq's newlines and tabs (a multi-host connect
 * failure) is written as a single line with the control characters turned
 * into single spaces; errno text and the file:line suffix stay on it.
 * stderr is redirected into a pipe for the duration of each call.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

/* Run log_msg(level, "f.c", 7, err, "%s", msg) with stderr captured. */
static void capture(int err, const char *msg, char *out, size_t n)
{
    int fds[2], saved = dup(STDERR_FILENO);
    assert_int_equal(pipe(fds), 0);
    assert_true(dup2(fds[1], STDERR_FILENO) >= 0);
    log_msg(LOG_LVL_WARN, "f.c", 7, err, "%s", msg);
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(fds[1]);
    ssize_t got = read(fds[0], out, n - 1);
    close(fds[0]);
    out[got > 0 ? got : 0] = '\0';
}

static void test_one_line(void **state)
{
    (void)state;
    char out[2048];
    const char *libpq = "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n"
                        "\tIs the server running on that host and accepting TCP/IP connections?\n"
                        "connection to server on socket \"/tmp/x/.s.PGSQL.2\" failed: No such file or directory\n";
    capture(0, libpq, out, sizeof out);
    char *nl = strchr(out, '\n');
    assert_non_null(nl);
    assert_null(strchr(nl + 1, '\n'));                  /* exactly one line */
    assert_non_null(strstr(out, "port 1 failed: Connection refused Is the server running"));
    assert_non_null(strstr(out, "connections? connection to server on socket"));
    assert_non_null(strstr(out, "No such file or directory (f.c:7)\n"));
    assert_null(strchr(out, '\t'));

    capture(ENOENT, "open x\r\n", out, sizeof out);
    assert_non_null(strstr(out, "open x: No such file or directory (f.c:7)\n"));
    capture(0, "\n\nleading and \x01 inner \x7f control\n", out, sizeof out);
    assert_non_null(strstr(out, "] leading and inner control (f.c:7)\n"));
}

static void test_level_names(void **state)
{
    (void)state;
    assert_int_equal(log_level_parse("warning"), LOG_LVL_WARN);
    assert_int_equal(log_level_parse("WARN"), LOG_LVL_WARN);
    assert_int_equal(log_level_parse("notice"), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_line),
        cmocka_unit_test(test_level_names),
    };
    return cmocka_run_group_tests_name("log", tests, NULL, NULL);
}
