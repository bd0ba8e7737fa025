/*
 * test_broker_death.c — the broker SIGKILLed under workers holding and
 * waiting for leases: every worker's call returns an error (none hangs) and
 * a restarted broker serves again, on a real PostgreSQL (the fixture is death_fixture.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "death_fixture.h"

/* ========================================================= 5. broker death */

enum { BD_HOLDER = 0, BD_WAITER1, BD_WAITER2, BD_WAITER3, BD_SLEEPER, BD_N };

struct bd_worker {
    int rc1;                    /* what the broker's death returned */
    double t1;                  /* when (CLOCK_MONOTONIC ms) */
    _Atomic int have1;
    int rc_rel;                 /* releasing the orphaned lease */
    double rel_ms;
    _Atomic int have_rel;
    int rc2;                    /* after the restart: PB_OK hoped for */
    int attempts;
    double t2;
    _Atomic int have2;
};

struct bd_shared {
    _Atomic int ready;
    _Atomic int go_wait;        /* holder has the slot: waiters may queue */
    _Atomic int go_release;     /* holder: release the orphaned lease */
    _Atomic int go_again;       /* broker restarted */
    struct bd_worker w[BD_N];
};

static struct bd_shared *bs;

static int bd_worker_main(void *p)
{
    int w = (int)(intptr_t)p;
    struct bd_worker *me = &bs->w[w];
    const char *pool = w == BD_SLEEPER ? "bdsleep" : "bd";
    pb_client *c;
    pb_lease *l = NULL;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    if (w == BD_HOLDER || w == BD_SLEEPER) {
        if (pb_acquire(c, pool, 10000, &l) != PB_OK)
            return 11;
    }
    atomic_fetch_add(&bs->ready, 1);
    if (w == BD_HOLDER) {
        while (!atomic_load(&bs->go_release))
            sleep_ms(1);
        double t = now_ms();
        me->rc_rel = pb_release(l);
        me->rel_ms = now_ms() - t;
        atomic_store(&me->have_rel, 1);
    } else if (w == BD_SLEEPER) {
        pb_result *r = NULL;
        me->rc1 = pb_pg_exec(l, "SELECT pg_sleep(5)", &r);
        me->t1 = now_ms();
        pb_result_free(r);
        atomic_store(&me->have1, 1);
        double t = now_ms();
        me->rc_rel = pb_release(l);
        me->rel_ms = now_ms() - t;
        atomic_store(&me->have_rel, 1);
    } else {
        while (!atomic_load(&bs->go_wait))
            sleep_ms(1);
        me->rc1 = pb_acquire(c, pool, 10000, &l);
        me->t1 = now_ms();
        atomic_store(&me->have1, 1);
        if (me->rc1 == PB_OK)
            pb_release(l);
    }
    while (!atomic_load(&bs->go_again))
        sleep_ms(1);
    /* Same process, same pb_client: retry until the new broker serves us. */
    double t0 = now_ms();
    for (;;) {
        me->attempts++;
        me->rc2 = pb_acquire(c, pool, 2000, &l);
        if (me->rc2 == PB_OK) {
            if (c_exec(l, "SELECT 1", NULL, 0))
                me->rc2 = 1;
            pb_release(l);
            break;
        }
        if (now_ms() - t0 > 10000)
            break;
        sleep_ms(50);
    }
    me->t2 = now_ms();
    atomic_store(&me->have2, 1);
    pb_disconnect(c);
    return 0;
}

static const char *const bd_name[BD_N] = { "holder", "waiter 1", "waiter 2", "waiter 3", "sleeper" };

static void test_broker_death(void **state)
{
    (void)state;
    bs = shared_alloc(sizeof *bs);
    pid_t pids[BD_N];
    pids[BD_HOLDER] = spawn(bd_worker_main, (void *)(intptr_t)BD_HOLDER);
    double until = now_ms() + 10000;
    while (atomic_load(&bs->ready) < 1) {
        if (now_ms() > until)
            fail_msg("holder did not get the bd slot");
        sleep_ms(5);
    }
    for (int w = BD_WAITER1; w < BD_N; w++)
        pids[w] = spawn(bd_worker_main, (void *)(intptr_t)w);
    while (atomic_load(&bs->ready) < BD_N) {
        if (now_ms() > until)
            fail_msg("only %d of %d broker-death workers ready", atomic_load(&bs->ready), BD_N);
        sleep_ms(5);
    }
    atomic_store(&bs->go_wait, 1);
    /* Three queued on bd, one inside pg_sleep(5). */
    long long waiting = -1, sleeping = -1;
    until = now_ms() + 5000;
    while (now_ms() < until) {
        waiting = pool_stat("bd", "waiting");
        sleeping = psql_ll("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbdeath' "
                           "AND state = 'active' AND query LIKE 'SELECT pg_sleep(5)%'");
        if (waiting >= 3 && sleeping == 1)
            break;
        sleep_ms(20);
    }
    if (waiting < 3 || sleeping != 1)
        fail_msg("setup: %lld waiters queued on bd, %lld backends in pg_sleep(5)", waiting, sleeping);

    double t_kill = now_ms();
    int st = th_broker_stop(&env, SIGKILL);
    assert_true(st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);

    /* A worker may also die (crash) instead of answering: watch for both. */
    int exited[BD_N], wst[BD_N];
    for (int w = 0; w < BD_N; w++)
        exited[w] = 0;
#define BD_REAP(w) (exited[w] || (exited[w] = wait_kid(pids[w], &wst[w], 0) == 1))
    until = now_ms() + 8000;
    for (int w = BD_WAITER1; w < BD_N; w++)
        while (!atomic_load(&bs->w[w].have1) && !BD_REAP(w) && now_ms() < until)
            sleep_ms(2);
    atomic_store(&bs->go_release, 1);
    for (int w = 0; w < BD_N; w++)
        if (w == BD_HOLDER || w == BD_SLEEPER)
            while (!atomic_load(&bs->w[w].have_rel) && !BD_REAP(w) && now_ms() < until + 5000)
                sleep_ms(2);
    double worst = 0;
    int crashed = 0;
    for (int w = 0; w < BD_N; w++) {
        if (BD_REAP(w) && !(WIFEXITED(wst[w]) && WEXITSTATUS(wst[w]) == 0)) {
            crashed++;
            print_message("%s: DIED after the broker was killed (%s %d)\n", bd_name[w],
                          WIFSIGNALED(wst[w]) ? "signal" : "exit status",
                          WIFSIGNALED(wst[w]) ? WTERMSIG(wst[w]) : WEXITSTATUS(wst[w]));
        }
    }
    for (int w = BD_WAITER1; w < BD_N; w++) {
        struct bd_worker *x = &bs->w[w];
        if (!atomic_load(&x->have1)) {
            if (!exited[w])
                print_message("%s: still blocked %.0f ms after the broker was killed\n", bd_name[w],
                              now_ms() - t_kill);
            worst = 1e9;
            continue;
        }
        double dt = x->t1 - t_kill;
        if (dt > worst)
            worst = dt;
        print_message("%s (%s): %s %.0f ms after the broker was SIGKILLed\n", bd_name[w],
                      w == BD_SLEEPER ? "in pb_pg_exec(SELECT pg_sleep(5))" : "in pb_acquire, 10 s timeout",
                      pb_strerror(x->rc1), dt);
    }
    for (int w = 0; w < BD_N; w++)
        if ((w == BD_HOLDER || w == BD_SLEEPER) && !exited[w])
            print_message("%s: pb_release of the orphaned lease: %s in %.1f ms%s\n", bd_name[w],
                          atomic_load(&bs->w[w].have_rel) ? pb_strerror(bs->w[w].rc_rel) : "(no answer)",
                          bs->w[w].rel_ms, atomic_load(&bs->w[w].have_rel) ? "" : " - STILL BLOCKED");

    /* The supervisor restarts it; the same processes carry on. */
    double t_restart = now_ms();
    assert_int_equal(th_broker_restart(&env), 0);
    double t_ready = now_ms();
    atomic_store(&bs->go_again, 1);
    int bad = 0;
    for (int w = 0; w < BD_N; w++) {
        if (exited[w] && !(WIFEXITED(wst[w]) && WEXITSTATUS(wst[w]) == 0)) {
            bad++;
            continue;
        }
        if (!exited[w] && wait_kid(pids[w], &wst[w], 30000) != 1) {
            print_message("%s: still running 30 s after the restart\n", bd_name[w]);
            bad++;
            continue;
        }
        exited[w] = 1;
        if (!WIFEXITED(wst[w]) || WEXITSTATUS(wst[w]) != 0) {
            print_message("%s: did not finish cleanly (status %d)\n", bd_name[w], wst[w]);
            bad++;
            continue;
        }
        struct bd_worker *x = &bs->w[w];
        print_message("%s after the restart: %s after %d attempt(s), %.0f ms after the new broker was ready\n",
                      bd_name[w], x->rc2 == PB_OK ? "served" : x->rc2 > 0 ? "SQL error" : pb_strerror(x->rc2),
                      x->attempts, x->t2 - t_ready);
        if (x->rc2 != PB_OK)
            bad++;
    }
#undef BD_REAP
    print_message("broker restart took %.0f ms\n", t_ready - t_restart);

    for (int w = BD_WAITER1; w < BD_N; w++)
        assert_int_equal(bs->w[w].rc1, PB_EBROKER);
    assert_int_equal(crashed, 0);
    assert_true(worst < 3000);
    assert_true(atomic_load(&bs->w[BD_HOLDER].have_rel));
    assert_true(atomic_load(&bs->w[BD_SLEEPER].have_rel));
    assert_int_equal(bad, 0);
    munmap(bs, sizeof *bs);
    bs = NULL;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_broker_death, test_setup, test_teardown),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("broker_death", tests, group_setup, group_teardown);
}
