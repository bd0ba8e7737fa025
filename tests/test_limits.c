/*
 * test_limits.c — the edges users hit first (issue #18), against a real
 * broker, PostgreSQL and Redis:
 *   - acquire_timeout_ms at the top of its range (4294967295) waits instead
 *     of timing out at once, and at the bottom (0) fails at once;
 *   - a conninfo libpq would refuse (`bogus_option=1`) fails `poolbroker -t`
 *     naming file, line and key, and a SIGHUP with it is refused: the
 *     running pool keeps its configuration and its connection;
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define PG "type = postgres\nconninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres " \
           "sslmode=disable application_name=pblimits\n"
#define RD "type = redis\nhost = 127.0.0.1\nport = @REDISPORT@\n"

static int group_setup(void **state)
{
    (void)state;
    return th_setup(&env, 1, 1);
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

/* Each test starts its own broker; stop whatever one left behind. */
static int stop_broker(void **state)
{
    (void)state;
    if (env.broker_pid)
        th_broker_stop(&env, SIGTERM);
    return 0;
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* A pool of one connection, held by us; a child asks for it with the pool's
 * acquire_timeout_ms (timeout -1) and reports what it got through a pipe.
 * Returns the child's result; *waited_ms is how long it took. */
static int contended_acquire(const char *pool, int release_after_ms, uint64_t *waited_ms)
{
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, pool, 5000, &l), PB_OK);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        pb_client *cc = NULL;
        int out[2] = { PB_EBROKER, 0 };
        if (pb_connect(env.sock_path, &cc) == PB_OK) {
            pb_lease *ll = NULL;
            uint64_t t0 = mono_ms();
            out[0] = pb_acquire(cc, pool, -1, &ll);
            out[1] = (int)(mono_ms() - t0);
            pb_release(ll);
            pb_disconnect(cc);
        }
        (void)!write(fds[1], out, sizeof out);
        _exit(0);
    }
    close(fds[1]);
    if (release_after_ms >= 0) {
        usleep((useconds_t)release_after_ms * 1000);
        assert_int_equal(pb_release(l), PB_OK);
        l = NULL;
    }
    int got[2] = { 1, 0 };
    assert_int_equal(read(fds[0], got, sizeof got), (ssize_t)sizeof got);
    close(fds[0]);
    int st;
    waitpid(pid, &st, 0);
    if (l)
        pb_release(l);
    pb_disconnect(c);
    *waited_ms = (uint64_t)got[1];
    return got[0];
}

/* acquire_timeout_ms = 4294967295 (the top of the documented range): a
 * waiter waits (until we release, 300 ms later) instead of timing out at
 * once; 0 (the bottom) times out at once; and 2^31 + 1, past an int, waits
 * too.  Both pool types share the client code; one is enough. */
static void test_acquire_timeout_range(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool top]\n" RD "max_size = 1\nacquire_timeout_ms = 4294967295\n"
                                           "[pool past_int]\n" RD "max_size = 1\nacquire_timeout_ms = 2147483649\n"
                                           "[pool bottom]\n" RD "max_size = 1\nacquire_timeout_ms = 0\n"),
                     0);
    uint64_t waited;
    assert_int_equal(contended_acquire("top", 300, &waited), PB_OK);
    assert_true(waited >= 200);
    assert_int_equal(contended_acquire("past_int", 300, &waited), PB_OK);
    assert_true(waited >= 200);
    assert_int_equal(contended_acquire("bottom", -1, &waited), PB_ETIMEDOUT);
}

/* Read a whole small file into buf (NUL-terminated). */
static void slurp(const char *path, char *buf, size_t n)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t got = fread(buf, 1, n - 1, f);
    buf[got] = 0;
    fclose(f);
}

static void put_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fchmod(fileno(f), 0600);
    fputs(text, f);
    fclose(f);
}

/* The line number of the first line of text holding needle (1-based). */
static int line_of(const char *text, const char *needle)
{
    const char *at = strstr(text, needle);
    assert_non_null(at);
    int line = 1;
    for (const char *s = text; s < at; s++)
        line += *s == '\n';
    return line;
}

static void test_conninfo_checked_by_t_and_reload(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PG "min_size = 1\nmax_size = 2\n"), 0);
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    int pid_before = pb_lease_backend_pid(l);
    assert_true(pid_before > 0);
    assert_int_equal(pb_release(l), PB_OK);

    /* The same file with a key libpq does not know. */
    char text[8192], bad[8400], out[2048];
    slurp(env.conf_path, text, sizeof text);
    char *at = strstr(text, "application_name=pblimits");
    assert_non_null(at);
    snprintf(bad, sizeof bad, "%.*sbogus_option=1 %s", (int)(at - text), text, at);
    char check[400];
    snprintf(check, sizeof check, "%s/check.conf", env.dir);
    put_file(check, bad);
    const char *broker = getenv("PB_BROKER") ? getenv("PB_BROKER") : "build/poolbroker";
    char cmd[1024], expect[512];
    snprintf(cmd, sizeof cmd, "%s -t -c %s 2>&1", broker, check);
    FILE *pp = popen(cmd, "r");
    assert_non_null(pp);
    size_t n = fread(out, 1, sizeof out - 1, pp);
    out[n] = 0;
    int st = pclose(pp);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 1);
    snprintf(expect, sizeof expect, "%s:%d: key 'conninfo': invalid connection option \"bogus_option\"", check,
             line_of(bad, "conninfo"));
    if (!strstr(out, expect))
        fail_msg("-t said \"%s\", not \"%s\"", out, expect);

    /* The reload with it is refused; the pool keeps working on the same
     * connection. */
    put_file(env.conf_path, bad);
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "keeping the current configuration", 1, 10000), 0);
    assert_true(th_count_lines(env.broker_log, "invalid connection option \"bogus_option\"") >= 1);
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    pb_result_free(r);
    assert_int_equal(pb_lease_backend_pid(l), pid_before);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
    put_file(env.conf_path, text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_acquire_timeout_range, stop_broker),
        cmocka_unit_test_teardown(test_conninfo_checked_by_t_and_reload, stop_broker),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
