/*
 * test_fairness.c — many workers waiting on a small pool are served fairly
 * (wait-time percentiles, nobody starved), on a real PostgreSQL (the fixture is death_fixture.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "death_fixture.h"

/* ============================================================== 4. fairness */

#define FAIR_WORKERS 24
#define FAIR_MS      3000
#define FAIR_MAXW    8192

struct fair_shared {
    _Atomic int ready;
    _Atomic int go;
    double start, end;
    int count[FAIR_WORKERS];
    int errors[FAIR_WORKERS];
    int first_err[FAIR_WORKERS];
    float wait[FAIR_WORKERS][FAIR_MAXW];
};

static struct fair_shared *fs;

static int fair_worker(void *p)
{
    int w = (int)(intptr_t)p;
    pb_client *c;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    atomic_fetch_add(&fs->ready, 1);
    while (!atomic_load(&fs->go))
        sleep_ms(1);
    while (now_ms() < fs->start)
        sleep_ms(0.2);
    while (now_ms() < fs->end) {
        pb_lease *l;
        double t = now_ms();
        int rc = pb_acquire(c, "fair", 10000, &l);
        double wt = now_ms() - t;
        if (rc != PB_OK) {
            if (!fs->errors[w]++)
                fs->first_err[w] = rc;
            continue;
        }
        if (c_exec(l, "SELECT pg_sleep(0.001)", NULL, 0) && !fs->errors[w]++)
            fs->first_err[w] = 1;
        if (pb_release(l) != PB_OK && !fs->errors[w]++)
            fs->first_err[w] = 2;
        if (fs->count[w] < FAIR_MAXW)
            fs->wait[w][fs->count[w]] = (float)wt;
        fs->count[w]++;
    }
    pb_disconnect(c);
    return 0;
}

static void test_fairness(void **state)
{
    (void)state;
    fs = shared_alloc(sizeof *fs);
    long long h0 = pool_stat("fair", "handoffs"), w0 = pool_stat("fair", "wakeups");
    long long a0 = pool_stat("fair", "acquires"), q0 = pool_stat("fair", "waits");
    pid_t pids[FAIR_WORKERS];
    for (int w = 0; w < FAIR_WORKERS; w++)
        pids[w] = spawn(fair_worker, (void *)(intptr_t)w);
    double until = now_ms() + 15000;
    while (atomic_load(&fs->ready) < FAIR_WORKERS) {
        if (now_ms() > until)
            fail_msg("only %d of %d workers attached", atomic_load(&fs->ready), FAIR_WORKERS);
        sleep_ms(5);
    }
    fs->start = now_ms() + 50;
    fs->end = fs->start + FAIR_MS;
    atomic_store(&fs->go, 1);
    int bad = 0;
    for (int w = 0; w < FAIR_WORKERS; w++) {
        int st;
        if (wait_kid(pids[w], &st, 30000) != 1) {
            fprintf(stderr, "fair worker %d still running 30 s later\n", w);
            bad++;
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "fair worker %d: status %d\n", w, st);
            bad++;
        }
    }
    long long h1 = pool_stat("fair", "handoffs"), w1 = pool_stat("fair", "wakeups");
    long long a1 = pool_stat("fair", "acquires"), q1 = pool_stat("fair", "waits");
    assert_int_equal(bad, 0);

    double counts[FAIR_WORKERS], sum = 0;
    size_t nw = 0;
    int errors = 0, first_err = 0;
    for (int w = 0; w < FAIR_WORKERS; w++) {
        counts[w] = fs->count[w];
        sum += counts[w];
        nw += (size_t)(fs->count[w] < FAIR_MAXW ? fs->count[w] : FAIR_MAXW);
        errors += fs->errors[w];
        if (fs->errors[w] && !first_err)
            first_err = fs->first_err[w];
    }
    double *waits = malloc((nw ? nw : 1) * sizeof *waits);
    assert_non_null(waits);
    size_t k = 0;
    for (int w = 0; w < FAIR_WORKERS; w++)
        for (int i = 0; i < fs->count[w] && i < FAIR_MAXW; i++)
            waits[k++] = fs->wait[w][i];
    qsort(counts, FAIR_WORKERS, sizeof counts[0], cmp_double);
    qsort(waits, nw, sizeof waits[0], cmp_double);
    double mean = sum / FAIR_WORKERS;
    double wmed = pct(waits, nw, 50), wp99 = pct(waits, nw, 99), wmax = nw ? waits[nw - 1] : 0;
    print_message("fairness, %d workers on 2 slots for %d ms: %.0f acquires (%.0f/s); per worker min %.0f, "
                  "median %.0f, max %.0f (mean %.1f); wait median %.2f ms, p99 %.2f ms, max %.2f ms; errors %d\n",
                  FAIR_WORKERS, FAIR_MS, sum, sum * 1000.0 / FAIR_MS, counts[0], pct(counts, FAIR_WORKERS, 50),
                  counts[FAIR_WORKERS - 1], mean, wmed, wp99, wmax, errors);
    if (h0 >= 0 && h1 >= 0)
        print_message("pool fair counters over the run: acquires +%lld, waits +%lld, handoffs +%lld, wakeups +%lld\n",
                      a1 - a0, q1 - q0, h1 - h0, w1 - w0);
    else
        print_message("pool fair: handoffs/wakeups not in shmstat --json output\n");
    free(waits);
    if (errors)
        fail_msg("%d failed acquires/execs/releases (first: %s)", errors,
                 first_err < 0 ? pb_strerror(first_err) : first_err == 1 ? "SQL error" : "release");
    assert_true(sum > 0);
    if (counts[0] < 0.25 * mean)
        fail_msg("a worker starved: %.0f acquires, mean %.1f", counts[0], mean);
    if (!(wmax < 20 * wmed + 100))
        fail_msg("max wait %.1f ms >= 20 x median (%.2f ms) + 100 ms", wmax, wmed);
    munmap(fs, sizeof *fs);
    fs = NULL;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_fairness, test_setup, test_teardown),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("fairness", tests, group_setup, group_teardown);
}
