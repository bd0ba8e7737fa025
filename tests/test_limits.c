/*
 * test_limits.c — the edges users hit first (issue #18), against a real
 * broker, PostgreSQL and Redis:
 *   - acquire_timeout_ms at the top of its range (4294967295) waits instead
 *     of timing out at once, and at the bottom (0) fails at once;
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_acquire_timeout_range, stop_broker),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
