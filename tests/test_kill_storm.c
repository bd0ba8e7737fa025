/*
 * test_kill_storm.c — workers SIGKILLed at random points of their
 * transactions, over and over, while others run: no lost or doubled
 * updates, no leaked slots, every connection back, on a real PostgreSQL
 *  (the fixture is death_fixture.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "death_fixture.h"

/* ============================================================ 2. kill storm */

#define STORM_TXN    12
#define STORM_FAST   2
#define STORM_N      (STORM_TXN + STORM_FAST)
#define STORM_MS     5000
#define STORM_SLOTS  4

enum { PH_IDLE, PH_CONNECT, PH_ACQUIRE, PH_BEGIN, PH_UPDATE, PH_INSERT, PH_COMMIT, PH_RELEASE, PH_DONE };
static const char *const ph_name[] = { "idle", "connect", "acquire", "begin", "update", "insert", "commit",
                                       "release", "done" };

struct storm_worker {
    _Atomic int phase;
    double phase_ms;
    pid_t pid;
};

struct storm_shared {
    _Atomic int stop;
    _Atomic long commits, rollbacks, fast_cycles, errors;
    struct storm_worker w[STORM_N];
    char first_error[256];
    _Atomic int have_error;
};

static struct storm_shared *ss;

static void storm_phase(int w, int ph)
{
    ss->w[w].phase_ms = now_ms();
    atomic_store(&ss->w[w].phase, ph);
}

static int storm_error(int w, const char *what, int rc)
{
    atomic_fetch_add(&ss->errors, 1);
    int zero = 0;
    if (atomic_compare_exchange_strong(&ss->have_error, &zero, 1))
        snprintf(ss->first_error, sizeof ss->first_error, "worker %d (pid %d) in %s: %s", w, (int)getpid(), what,
                 rc < 0 ? pb_strerror(rc) : "SQL error");
    return 20;
}

static int storm_worker_main(void *p)
{
    int w = (int)(intptr_t)p;
    int fast = w >= STORM_TXN;
    char err[200];
    srandom((unsigned)getpid() ^ (unsigned)now_ms());
    storm_phase(w, PH_CONNECT);
    pb_client *c;
    int rc = pb_connect(env.sock_path, &c);
    if (rc != PB_OK)
        return storm_error(w, "pb_connect", rc);
    char wbuf[16], idbuf[16];
    snprintf(wbuf, sizeof wbuf, "%d", w);
    while (!atomic_load(&ss->stop)) {
        pb_lease *l;
        storm_phase(w, PH_ACQUIRE);
        rc = pb_acquire(c, "storm", 10000, &l);
        if (rc != PB_OK)
            return storm_error(w, "pb_acquire", rc);
        if (!fast) {
            snprintf(idbuf, sizeof idbuf, "%ld", 1 + random() % 4);
            const char *vals[2] = { wbuf, idbuf };
            storm_phase(w, PH_BEGIN);
            if ((rc = c_exec(l, "BEGIN", err, sizeof err)) != 0)
                return storm_error(w, err, rc);
            storm_phase(w, PH_UPDATE);
            if ((rc = c_exec_p(l, "UPDATE accounts SET n = n + 1 WHERE id = $1", 1, vals + 1, 1, err,
                               sizeof err)) != 0)
                return storm_error(w, err, rc);
            storm_phase(w, PH_INSERT);
            if ((rc = c_exec_p(l, "INSERT INTO dlog (worker, acct, note) VALUES ($1, $2, 'storm')", 2, vals, 1,
                               err, sizeof err)) != 0)
                return storm_error(w, err, rc);
            if (random() % 3) {
                storm_phase(w, PH_COMMIT);
                if ((rc = c_exec(l, "COMMIT", err, sizeof err)) != 0)
                    return storm_error(w, err, rc);
                atomic_fetch_add(&ss->commits, 1);
            } else {
                atomic_fetch_add(&ss->rollbacks, 1);    /* release mid-transaction: must roll back */
            }
        }
        storm_phase(w, PH_RELEASE);
        if ((rc = pb_release(l)) != PB_OK)
            return storm_error(w, "pb_release", rc);
        if (fast)
            atomic_fetch_add(&ss->fast_cycles, 1);
    }
    storm_phase(w, PH_DONE);
    pb_disconnect(c);
    return 0;
}

static void storm_spawn(int w)
{
    atomic_store(&ss->w[w].phase, PH_IDLE);
    ss->w[w].pid = spawn(storm_worker_main, (void *)(intptr_t)w);
}

static void test_kill_storm(void **state)
{
    (void)state;
    assert_int_equal(th_psql(&env, "UPDATE accounts SET n = 0; DELETE FROM dlog", NULL, 0), 0);
    ss = shared_alloc(sizeof *ss);
    long long reclaims0 = pool_stat("storm", "reclaims");
    for (int w = 0; w < STORM_N; w++)
        storm_spawn(w);
    sleep_ms(300);

    srandom((unsigned)getpid());
    int kills = 0, kills_fast = 0, early_exits = 0;
    double t_end = now_ms() + STORM_MS;
    while (now_ms() < t_end) {
        sleep_ms(5 + random() % 20);
        int w = (int)(random() % STORM_N);
        pid_t pid = ss->w[w].pid;
        kill(pid, SIGKILL);
        int st;
        if (wait_kid(pid, &st, 5000) != 1)
            fail_msg("worker %d did not die", w);
        if (WIFSIGNALED(st)) {
            kills++;
            kills_fast += w >= STORM_TXN;
        } else {
            early_exits++;      /* it exited by itself: an error it reported */
        }
        storm_spawn(w);
        /* Any other worker that exited by itself reported an error. */
        for (int o = 0; o < STORM_N; o++) {
            if (o == w)
                continue;
            pid_t r = waitpid(ss->w[o].pid, &st, WNOHANG);
            if (r == ss->w[o].pid) {
                kid_untrack(r);
                early_exits++;
                storm_spawn(o);
            }
        }
    }
    atomic_store(&ss->stop, 1);
    int stuck = 0;
    char stuck_msg[1024] = "";
    double t_stop = now_ms();
    for (int w = 0; w < STORM_N; w++) {
        int st;
        int left = 20000 - (int)(now_ms() - t_stop);
        if (wait_kid(ss->w[w].pid, &st, left > 0 ? left : 0) != 1) {
            stuck++;
            int ph = atomic_load(&ss->w[w].phase);
            size_t n = strlen(stuck_msg);
            snprintf(stuck_msg + n, sizeof stuck_msg - n, " [worker %d pid %d: in %s for %.0f ms]", w,
                     (int)ss->w[w].pid, ph_name[ph], now_ms() - ss->w[w].phase_ms);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            early_exits++;
        }
    }
    double t_drained = now_ms();

    /* Every slot free again: all of them at once. */
    pb_lease *ls[STORM_SLOTS] = { 0 };
    int got = 0;
    if (!stuck) {
        connect_parent();
        for (int i = 0; i < STORM_SLOTS; i++) {
            int rc = pb_acquire(pc, "storm", 5000, &ls[i]);
            if (rc != PB_OK) {
                fprintf(stderr, "storm: acquire %d of %d: %s\n", i + 1, STORM_SLOTS, pb_strerror(rc));
                break;
            }
            got++;
        }
    }
    double t_all = now_ms();
    char out[64];
    long long locks = psql_ll(LOCKS_SQL);
    /* Idle connections hold no lock of any kind. */
    long long any_locks = psql_ll("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                                  "WHERE a.application_name = 'pbdeath'");
    long long idle_in_txn = psql_ll("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbdeath' "
                                    "AND state LIKE 'idle in transaction%'");
    assert_int_equal(th_psql(&env, "SELECT coalesce(sum(n), 0) FROM accounts", out, sizeof out), 0);
    long long sum = atoll(out);
    long long rows = psql_ll("SELECT count(*) FROM dlog WHERE note = 'storm'");
    for (int i = 0; i < got; i++) {
        assert_not_in_txn(ls[i]);
        assert_int_equal(pb_release(ls[i]), PB_OK);
    }
    long long reclaims1 = pool_stat("storm", "reclaims");
    long long leased = pool_stat("storm", "leased");
    if (got < STORM_SLOTS || idle_in_txn)
        dump_slots("storm");

    print_message("kill storm, %d ms: %d SIGKILLs (%d of acquire/release-only workers), %ld commits and %ld "
                  "releases mid-transaction seen by workers, %ld fast cycles; broker reclaims +%lld; "
                  "workers stopped %.0f ms after the stop flag, all %d slots leased %.0f ms after that (%d got)\n",
                  STORM_MS, kills, kills_fast, atomic_load(&ss->commits), atomic_load(&ss->rollbacks),
                  atomic_load(&ss->fast_cycles), reclaims1 - reclaims0, t_drained - t_stop, STORM_SLOTS,
                  t_all - t_drained, got);
    print_message("after the storm: sum(n) = %lld, committed rows = %lld, transactionid locks = %lld "
                  "(locks of any kind %lld), idle-in-transaction backends = %lld, slots leased now = %lld\n",
                  sum, rows, locks, any_locks, idle_in_txn, leased);
    if (atomic_load(&ss->have_error))
        print_message("first worker error: %s\n", ss->first_error);
    if (stuck)
        fail_msg("%d worker(s) never finished after the stop flag:%s", stuck, stuck_msg);
    if (early_exits || atomic_load(&ss->errors))
        fail_msg("%d worker(s) failed on their own (%ld errors); first: %s", early_exits,
                 atomic_load(&ss->errors), ss->first_error);
    assert_int_equal(got, STORM_SLOTS);
    assert_int_equal(locks, 0);
    assert_int_equal(any_locks, 0);
    assert_int_equal(idle_in_txn, 0);
    assert_int_equal(sum, rows);
    assert_true(rows >= atomic_load(&ss->commits));
    assert_true(kills >= 100);
    munmap(ss, sizeof *ss);
    ss = NULL;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_kill_storm, test_setup, test_teardown),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("kill_storm", tests, group_setup, group_teardown);
}
