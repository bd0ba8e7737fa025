/*
 * test_harness_selftest.c - proves the integration-test harness on its own,
 * without the broker: it starts a real PostgreSQL and a real Redis in a
 * temp dir, talks to both with their command-line clients, and tears them
 * down (teardown fails the group if anything is left unclean).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "harness.h"

static th_env env;

static int group_setup(void **state)
{
    (void)state;
    return th_setup(&env, 1, 1) == 0 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env) == 0 ? 0 : -1;
}

static void test_env_filled(void **state)
{
    (void)state;
    struct stat st;
    assert_int_equal(strncmp(env.dir, "/tmp/pbtest.", 12), 0);
    assert_int_equal(stat(env.dir, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0755);
    assert_true(env.pg_port > 0 && env.pg_port < 65536);
    assert_true(env.redis_port > 0 && env.redis_port < 65536);
    assert_int_not_equal(env.pg_port, env.redis_port);
    assert_int_equal(access(env.pg_host, X_OK), 0);
    assert_int_equal(access(env.redis_socket, F_OK), 0);
    assert_int_equal(strncmp(env.shm_name, "/pbtest-", 8), 0);
    assert_non_null(strstr(env.sock_path, "/pb.sock"));
    assert_int_equal(env.broker_pid, 0);
}

static void test_psql_select(void **state)
{
    (void)state;
    char out[256];
    assert_int_equal(th_psql(&env, "SELECT 1", out, sizeof(out)), 0);
    assert_string_equal(out, "1");
    /* We are the only client of this throwaway server. */
    assert_int_equal(th_psql(&env, "SELECT current_user || ':' || "
                     "current_setting('fsync')", out, sizeof(out)), 0);
    assert_string_equal(out, "postgres:off");
    /* Errors come back as a non-zero status. */
    assert_int_not_equal(th_psql(&env, "SELECT nosuchcolumn", out, sizeof(out)), 0);
}

static void test_redis_ping(void **state)
{
    (void)state;
    char out[256];
    assert_int_equal(th_redis_cli(&env, "PING", out, sizeof(out)), 0);
    assert_string_equal(out, "PONG");
    assert_int_equal(th_redis_cli(&env, "SET k \"two words\"", out, sizeof(out)), 0);
    assert_string_equal(out, "OK");
    assert_int_equal(th_redis_cli(&env, "GET k", out, sizeof(out)), 0);
    assert_string_equal(out, "two words");
}

static void test_helpers(void **state)
{
    (void)state;
    char path[512], out[64];
    snprintf(path, sizeof(path), "%s/lines.txt", env.dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("alpha ready\nbeta\nready gamma\n", f);
    fclose(f);
    assert_int_equal(th_count_lines(path, "ready"), 2);
    assert_int_equal(th_count_lines(path, "delta"), 0);
    assert_int_equal(th_count_lines("/nonexistent/x", "a"), -1);

    int port = th_free_port();
    assert_true(port > 0 && port < 65536);

    char *const argv[] = { (char *)"sh", (char *)"-c",
                           (char *)"echo hello; exit 3", NULL };
    assert_int_equal(th_run(argv, out, sizeof(out), 10000), 3);
    assert_string_equal(out, "hello");
    char *const slow[] = { (char *)"sleep", (char *)"30", NULL };
    assert_int_equal(th_run(slow, NULL, 0, 200), -1);  /* timed out, reaped */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_env_filled),
        cmocka_unit_test(test_psql_select),
        cmocka_unit_test(test_redis_ping),
        cmocka_unit_test(test_helpers),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
