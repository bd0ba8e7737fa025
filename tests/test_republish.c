/*
 * test_republish.c — fields the broker republishes while clients read them
 * stay read-consistent (issue #19: PB_ENOPOOL for a pool that exists).
 *
 * A broker with 20 Redis pools and its janitor running every millisecond
 * (PB_TEST_JANITOR_MS): four processes alternate lease+release between two
 * of the pools (so the library's last-pool cache never answers and every
 * acquire looks the name up in the segment) for a few seconds.  Not one
 * acquire may fail with PB_ENOPOOL; any other error fails the test too.
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
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

#define NPOOLS   20
#define NWORKERS 4
#define RUN_MS   3000

static th_env env;

static int group_setup(void **state)
{
    (void)state;
    setenv("PB_TEST_JANITOR_MS", "1", 1);
    return th_setup(&env, 0, 1);
}

static int group_teardown(void **state)
{
    (void)state;
    unsetenv("PB_TEST_JANITOR_MS");
    return th_teardown(&env);
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

typedef struct counts {
    long acquires;
    long enopool;
    long other;                     /* any other error */
    int last_other;
} counts;

static void worker(counts *out)
{
    pb_client *c = NULL;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        _exit(2);
    const char *pools[2] = { "pool07", "pool13" };
    uint64_t end = mono_ms() + RUN_MS;
    for (long i = 0; mono_ms() < end; i++) {
        pb_lease *l = NULL;
        int rc = pb_acquire(c, pools[i & 1], 5000, &l);
        if (rc == PB_OK) {
            out->acquires++;
            pb_release(l);
        } else if (rc == PB_ENOPOOL) {
            out->enopool++;
        } else {
            out->other++;
            out->last_other = rc;
        }
    }
    pb_disconnect(c);
    _exit(0);
}

static void test_no_enopool_under_janitor(void **state)
{
    (void)state;
    char ini[NPOOLS * 160];
    size_t used = 0;
    for (int i = 0; i < NPOOLS; i++)
        used += (size_t)snprintf(ini + used, sizeof ini - used,
                                 "[pool pool%02d]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\n"
                                 "min_size = 0\nmax_size = 2\n\n", i);
    assert_int_equal(th_broker_start(&env, ini), 0);

    counts *cnt = mmap(NULL, NWORKERS * sizeof *cnt, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(cnt != MAP_FAILED);
    memset(cnt, 0, NWORKERS * sizeof *cnt);
    pid_t pids[NWORKERS];
    for (int i = 0; i < NWORKERS; i++) {
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0)
            worker(&cnt[i]);
    }
    long acquires = 0, enopool = 0, other = 0;
    for (int i = 0; i < NWORKERS; i++) {
        int st;
        assert_int_equal(waitpid(pids[i], &st, 0), pids[i]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        acquires += cnt[i].acquires;
        enopool += cnt[i].enopool;
        other += cnt[i].other;
        if (cnt[i].other)
            print_message("worker %d: %ld errors, last %s\n", i, cnt[i].other, pb_strerror(cnt[i].last_other));
    }
    munmap(cnt, NWORKERS * sizeof *cnt);
    print_message("%ld acquires, %ld PB_ENOPOOL, %ld other errors\n", acquires, enopool, other);
    assert_true(acquires > 1000);
    assert_int_equal(enopool, 0);
    assert_int_equal(other, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_enopool_under_janitor),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
