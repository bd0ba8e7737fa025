/*
 * test_pool_size.c — a pool grows to max_size under concurrent demand and
 * shrinks back to min_size after idle_timeout_s, on a real PostgreSQL.
 *
 * One group (its own temp dir, server and broker): pool "grow".
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env_pg;

#define PG_POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool grow]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_grow\n" \
    "min_size = 1\n" \
    "max_size = 6\n" \
    "idle_timeout_s = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 10000\n"

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

/* 3. Growth to max_size under concurrent demand, and the shrink back to
 * min_size after idle_timeout_s. */
#define GROW_N 6
static struct {
    int ran;
    char pids[256];          /* the 6 backends */
    long long connects_before, connects_after;
    long min_seen;           /* fewest connections seen while shrinking */
    int survivor;
} grow_res;

static void grow_child(th_env *e, int i, int res_fd, int go_fd)
{
    pb_client *c = NULL;
    int out[3] = { i, -100, 0 };
    double t0 = pbt_now_ms();
    if (pb_connect(e->sock_path, &c) == PB_OK) {
        pb_lease *l = NULL;
        out[1] = pb_acquire(c, "grow", 10000, &l);
        if (out[1] == PB_OK) {
            pb_result *r = NULL;
            if (pb_pg_exec(l, "SELECT pg_backend_pid()", &r) == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK)
                out[2] = atoi(pb_getvalue(r, 0, 0));
            pb_result_free(r);
        }
        int ms = (int)(pbt_now_ms() - t0);
        int msg[4] = { out[0], out[1], out[2], ms };
        if (write(res_fd, msg, sizeof msg) != sizeof msg)
            _exit(3);
        char b;
        while (read(go_fd, &b, 1) < 0 && errno == EINTR)
            ;
        if (l)
            pb_release(l);
        pb_disconnect(c);
        _exit(0);
    }
    int msg[4] = { i, PB_EBROKER, 0, 0 };
    if (write(res_fd, msg, sizeof msg) < 0)
        _exit(2);
    _exit(1);
}

static void test_pg_grow_to_max_and_shrink(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    memset(&grow_res, 0, sizeof grow_res);
    assert_true(pbt_wait_pg_count(e, "pblife_grow", 1, 10000) >= 0);

    int resp[2], gop[2];
    assert_int_equal(pipe(resp), 0);
    assert_int_equal(pipe(gop), 0);
    pid_t kids[GROW_N];
    fflush(NULL);
    for (int i = 0; i < GROW_N; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            close(resp[0]);
            close(gop[1]);
            grow_child(e, i, resp[1], gop[0]);
        }
        pbt_track_child(kids[i]);
    }
    close(resp[1]);
    close(gop[0]);
    int got = 0, bad = 0, maxwait = 0;
    char pids[256] = "";
    while (got < GROW_N) {
        struct pollfd p = { .fd = resp[0], .events = POLLIN };
        if (poll(&p, 1, 15000) <= 0)
            break;
        int msg[4];
        if (read(resp[0], msg, sizeof msg) != sizeof msg)
            break;
        got++;
        if (msg[1] != PB_OK || msg[2] <= 0) {
            bad++;
            print_message("grow child %d: acquire %s, pid %d\n", msg[0], pb_strerror(msg[1]), msg[2]);
        } else {
            size_t len = strlen(pids);
            snprintf(pids + len, sizeof pids - len, "%s%d", len ? "," : "", msg[2]);
        }
        if (msg[3] > maxwait)
            maxwait = msg[3];
    }
    long held_count = pbt_pg_count(e, "pblife_grow");
    /* A 7th lease must not grow the pool past max_size. */
    pb_client *c = pbt_cli(e);
    pb_lease *l7 = NULL;
    int rc7 = pb_acquire(c, "grow", 300, &l7);
    if (l7)
        pb_release(l7);
    long after7 = pbt_pg_count(e, "pblife_grow");
    long long connects_before = pbt_pool_counter(e, "grow", "connects");
    close(gop[1]);          /* go: the children release and exit */
    double t_rel = pbt_now_ms();
    int exited_bad = 0;
    for (int i = 0; i < GROW_N; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        pbt_untrack_child(kids[i]);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            exited_bad++;
    }
    close(resp[0]);
    print_message("grow: %d concurrent leases granted (slowest waited %d ms), backends %s; pg_stat_activity "
                  "shows %ld; a 7th acquire gave %s and the count stayed %ld\n",
                  got - bad, maxwait, pids, held_count, pb_strerror(rc7), after7);
    assert_int_equal(got, GROW_N);
    assert_int_equal(bad, 0);
    assert_int_equal(exited_bad, 0);
    assert_int_equal(held_count, GROW_N);
    assert_int_equal(rc7, PB_ETIMEDOUT);
    assert_true(after7 <= GROW_N);

    /* Shrink: idle_timeout_s = 1 closes the idle ones down to min_size. */
    long min_seen = 1000;
    double t_one = -1;
    while (pbt_now_ms() - t_rel < 10000) {
        long n = pbt_pg_count(e, "pblife_grow");
        if (n >= 0 && n < min_seen)
            min_seen = n;
        if (n == 1 && t_one < 0)
            t_one = pbt_now_ms() - t_rel;
        if (t_one >= 0 && pbt_now_ms() - t_rel > t_one + 1500)
            break;
        pbt_sleep_ms(50);
    }
    long final = pbt_pg_count(e, "pblife_grow");
    char surv[64];
    pbt_pg_pids(e, "pblife_grow", surv, sizeof surv);
    long long connects_after = pbt_pool_counter(e, "grow", "connects");
    print_message("shrink: back to 1 connection %.0f ms after release (idle_timeout_s=1); fewest seen %ld; "
                  "final %ld (pid %s, %s the 6); %lld connections made meanwhile\n",
                  t_one, min_seen, final, surv, pbt_in_list(pids, atoi(surv)) ? "one of" : "NOT one of",
                  connects_after - connects_before);
    grow_res.ran = 1;
    snprintf(grow_res.pids, sizeof grow_res.pids, "%s", pids);
    grow_res.connects_before = connects_before;
    grow_res.connects_after = connects_after;
    grow_res.min_seen = min_seen;
    grow_res.survivor = atoi(surv);
    pbt_cli_done(c);
    assert_true(t_one >= 0);
    assert_true(t_one < 6000);
    assert_int_equal(final, 1);
}

/* 3b. Shrinking stops at min_size: the survivor is one of the idle
 * connections, not a fresh one made after closing them all. */
static void test_pg_shrink_keeps_min_size(void **state)
{
    (void)state;
    if (!grow_res.ran)
        fail_msg("test_pg_grow_to_max_and_shrink did not get to the shrink");
    print_message("shrink: fewest connections seen %ld, %lld new connections, survivor pid %d in {%s}: %s\n",
                  grow_res.min_seen, grow_res.connects_after - grow_res.connects_before, grow_res.survivor,
                  grow_res.pids, pbt_in_list(grow_res.pids, grow_res.survivor) ? "yes" : "no");
    assert_int_equal(grow_res.connects_after - grow_res.connects_before, 0);
    assert_true(pbt_in_list(grow_res.pids, grow_res.survivor));
    assert_true(grow_res.min_seen >= 1);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_grow_to_max_and_shrink),
        T(test_pg_shrink_keeps_min_size),
    };
    int failed = cmocka_run_group_tests_name("pool_size", pg_tests, pg_group_setup, pg_group_teardown);
    return failed;
}
