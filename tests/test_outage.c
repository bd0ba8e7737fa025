/*
 * test_outage.c — the backend goes away under load and comes back on the
 * same port, for PostgreSQL and for Redis:
 * nothing hangs, acquires fail fast (PB_EBACKEND) while the backend is known
 * down, leases succeed again within a few seconds of its return (a
 * min_size = 0 pool too), and shmstat shows the health meanwhile.
 *
 * Two groups, each with its own temp dir, server and broker:
 *   outage_pg     PostgreSQL pools "load" and "lazy" (min_size = 0)
 *   outage_redis  Redis pools "rload" and "rlazy" (min_size = 0)
 *
 * Timings are printed (print_message) and asserted only as far as needed to
 * prove the behaviour.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env_pg;
static th_env env_redis;

#define PG_POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool load]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_load\n" \
    "min_size = 2\n" \
    "max_size = 3\n" \
    "acquire_timeout_ms = 5000\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool lazy]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife_lazy\n" \
    "min_size = 0\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 5000\n" \
    "validate_after_idle_ms = 0\n"

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

#define REDIS_POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool rload]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 2\n" \
    "max_size = 3\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 5000\n" \
    "\n" \
    "[pool rlazy]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 0\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 5000\n"

static int redis_group_setup(void **state)
{
    (void)state;
    return pbt_group_start(&env_redis, 0, 1, REDIS_POOLS);
}

static int redis_group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&env_redis);
}

/* ------------------------------------------------------- backend outages */

#define NPH 3                /* 0 before, 1 server down, 2 server back */
#define OUT_WORKERS 5        /* 4 on the main pool, 1 on the min_size=0 pool */
#define NCODES 18            /* -rc for PB_E*; 16: error result/reply; 17: wrong answer */

typedef struct wstat {
    long ok[NPH], acq_fail[NPH], exec_fail[NPH];
    long acq_code[NPH][NCODES], exec_code[NPH][NCODES];
    double acq_fail_ms_max[NPH], acq_fail_ms_sum[NPH];
    double exec_fail_ms_max[NPH];
    double call_ms_max;
    double first_ok_ms[NPH];  /* absolute, CLOCK_MONOTONIC */
} wstat;

typedef struct outage_shm {
    volatile int phase;
    volatile int stop;
    wstat w[OUT_WORKERS];
} outage_shm;

typedef struct outage_cfg {
    th_env *e;
    const char *label;
    const char *pool, *lazy_pool;
    int redis;
    int (*stop)(th_env *);
    int (*start)(th_env *);
} outage_cfg;

typedef struct outage_res {
    int ran;
    wstat w[OUT_WORKERS];
    double down_ms;           /* server down for (stop call to start return) */
    double stop_call_ms, start_call_ms;
    double recover_first_ms, recover_all_ms;   /* from the start's return */
    int hung;                 /* workers that had to be killed */
    int bad_exit;
    char health_during[32], error_during[160];
    char lazy_health_during[32];
    double healthy_after_ms;  /* from the start's return; -1 never */
    char health_final[32], lazy_health_final[32];
    double lazy_ok_after_ms;  /* the min_size=0 pool leased again; -1 never */
    double lazy_recover_ms;   /* its worker's first success after the restart; -1 never */
    char lazy_how[160];
} outage_res;

static outage_res pg_outage, redis_outage;

static int code_index(int rc)
{
    return rc < 0 && -rc < 16 ? -rc : 17;
}

/* One command on a lease; 0 if it answered as expected, else a code index. */
static int outage_command(pb_lease *l, int redis)
{
    if (redis) {
        redisReply *r = NULL;
        int rc = pb_redis_command(l, &r, "PING");
        if (rc != PB_OK)
            return code_index(rc);
        int good = r->type == REDIS_REPLY_STATUS && r->str && strcmp(r->str, "PONG") == 0;
        int err = r->type == REDIS_REPLY_ERROR;
        freeReplyObject(r);
        return good ? 0 : err ? 16 : 17;
    }
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, "SELECT 1", &r);
    if (rc != PB_OK)
        return code_index(rc);
    int st = pb_result_status(r);
    int good = st == PB_RES_TUPLES_OK && strcmp(pb_getvalue(r, 0, 0), "1") == 0;
    pb_result_free(r);
    return good ? 0 : st == PB_RES_ERROR ? 16 : 17;
}

static int outage_worker(const outage_cfg *cfg, outage_shm *sh, int idx, const char *pool)
{
    wstat *w = &sh->w[idx];
    pb_client *c = NULL;
    if (pb_connect(cfg->e->sock_path, &c) != PB_OK)
        return 1;
    while (!sh->stop) {
        int ph = sh->phase;
        pb_lease *l = NULL;
        double t0 = pbt_now_ms();
        int rc = pb_acquire(c, pool, 5000, &l);
        double t1 = pbt_now_ms();
        if (t1 - t0 > w->call_ms_max)
            w->call_ms_max = t1 - t0;
        if (rc != PB_OK) {
            /* A call the server's stop caught in flight belongs to the
             * outage, not to the phase it started in. */
            ph = sh->phase;
            w->acq_fail[ph]++;
            w->acq_code[ph][code_index(rc)]++;
            w->acq_fail_ms_sum[ph] += t1 - t0;
            if (t1 - t0 > w->acq_fail_ms_max[ph])
                w->acq_fail_ms_max[ph] = t1 - t0;
            pbt_sleep_ms(10);
            continue;
        }
        int bad = outage_command(l, cfg->redis);
        double t2 = pbt_now_ms();
        if (t2 - t1 > w->call_ms_max)
            w->call_ms_max = t2 - t1;
        pb_release(l);
        if (bad) {
            ph = sh->phase;
            w->exec_fail[ph]++;
            w->exec_code[ph][bad]++;
            if (t2 - t1 > w->exec_fail_ms_max[ph])
                w->exec_fail_ms_max[ph] = t2 - t1;
            pbt_sleep_ms(10);
            continue;
        }
        w->ok[ph]++;
        if (w->first_ok_ms[ph] == 0)
            w->first_ok_ms[ph] = t2;
        pbt_sleep_ms(2);
    }
    pb_disconnect(c);
    return 0;
}

static void pool_health(th_env *e, const char *pool, char *health, size_t hn, char *err, size_t en)
{
    static char json[1 << 20];
    health[0] = '\0';
    if (err)
        err[0] = '\0';
    if (pbt_shmstat_json(e, json, sizeof json) != 0) {
        snprintf(health, hn, "(shmstat failed)");
        return;
    }
    pbt_json_pool_str(json, pool, "health", health, hn);
    if (err)
        pbt_json_pool_str(json, pool, "last_error", err, en);
}

static void codes_str(const long *codes, char *buf, size_t n)
{
    buf[0] = '\0';
    for (int k = 0; k < NCODES; k++) {
        if (!codes[k])
            continue;
        size_t len = strlen(buf);
        const char *name = k == 16 ? "error-reply" : k == 17 ? "wrong-answer" : pb_strerror(-k);
        snprintf(buf + len, n - len, "%s%s x%ld", len ? ", " : "", name, codes[k]);
    }
    if (!buf[0])
        snprintf(buf, n, "-");
}

static void outage_print(const outage_cfg *cfg, const outage_res *r)
{
    static const char *const names[NPH] = { "before", "down", "back" };
    for (int ph = 0; ph < NPH; ph++) {
        for (int i = 0; i < OUT_WORKERS; i++) {
            const wstat *w = &r->w[i];
            char ac[256], ec[256];
            codes_str(w->acq_code[ph], ac, sizeof ac);
            codes_str(w->exec_code[ph], ec, sizeof ec);
            print_message("%s outage, %-6s worker %d (%s): ok %ld; acquire failed %ld (%s; mean %.1f ms, "
                          "max %.1f ms); command failed %ld (%s; max %.1f ms)\n",
                          cfg->label, names[ph], i, i == OUT_WORKERS - 1 ? cfg->lazy_pool : cfg->pool, w->ok[ph],
                          w->acq_fail[ph], ac, w->acq_fail[ph] ? w->acq_fail_ms_sum[ph] / w->acq_fail[ph] : 0.0,
                          w->acq_fail_ms_max[ph], w->exec_fail[ph], ec, w->exec_fail_ms_max[ph]);
        }
    }
    double maxcall = 0;
    for (int i = 0; i < OUT_WORKERS; i++)
        if (r->w[i].call_ms_max > maxcall)
            maxcall = r->w[i].call_ms_max;
    print_message("%s outage: stop took %.0f ms, start %.0f ms, server down %.0f ms; first success %.0f ms and "
                  "all main-pool workers %.0f ms after the server was back; slowest single call %.0f ms; "
                  "%d workers hung, %d exited badly\n",
                  cfg->label, r->stop_call_ms, r->start_call_ms, r->down_ms, r->recover_first_ms, r->recover_all_ms,
                  maxcall, r->hung, r->bad_exit);
    print_message("%s outage: shmstat during: %s health \"%s\", last_error \"%s\"; %s health \"%s\"; "
                  "after: %s healthy %.0f ms after the restart (final \"%s\"), %s final \"%s\"; "
                  "%s leased again: %s (%.0f ms after the restart)\n",
                  cfg->label, cfg->pool, r->health_during, r->error_during, cfg->lazy_pool, r->lazy_health_during,
                  cfg->pool, r->healthy_after_ms, r->health_final, cfg->lazy_pool, r->lazy_health_final,
                  cfg->lazy_pool, r->lazy_how, r->lazy_ok_after_ms);
}

/* Run the outage scenario; results in *res.  Asserts only that nothing hung
 * and that the scenario itself could be run. */
static void outage_run(const outage_cfg *cfg, outage_res *res)
{
    th_env *e = cfg->e;
    memset(res, 0, sizeof *res);
    res->healthy_after_ms = res->lazy_ok_after_ms = res->recover_first_ms = res->recover_all_ms = -1;
    outage_shm *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);
    memset(sh, 0, sizeof *sh);

    pid_t kids[OUT_WORKERS];
    fflush(NULL);
    for (int i = 0; i < OUT_WORKERS; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0)
            _exit(outage_worker(cfg, sh, i, i == OUT_WORKERS - 1 ? cfg->lazy_pool : cfg->pool));
        pbt_track_child(kids[i]);
    }
    pbt_sleep_ms(1000);

    /* Down. */
    sh->phase = 1;
    double t_stop0 = pbt_now_ms();
    int stop_rc = cfg->stop(e);
    double t_stop1 = pbt_now_ms();
    res->stop_call_ms = t_stop1 - t_stop0;
    pbt_sleep_ms(1000);
    pool_health(e, cfg->pool, res->health_during, sizeof res->health_during, res->error_during,
                sizeof res->error_during);
    pool_health(e, cfg->lazy_pool, res->lazy_health_during, sizeof res->lazy_health_during, NULL, 0);
    double left = 2000 - (pbt_now_ms() - t_stop1);
    if (left > 0)
        pbt_sleep_ms((int)left);

    /* Back, on the same port. */
    double t_start0 = pbt_now_ms();
    int start_rc = cfg->start(e);
    double t_up = pbt_now_ms();
    res->start_call_ms = t_up - t_start0;
    res->down_ms = t_up - t_stop0;
    sh->phase = 2;

    /* Until every main-pool worker succeeded again and shmstat says healthy
     * (10 s at most), then one more second of load. */
    double t_done = -1;
    while (pbt_now_ms() - t_up < 10000) {
        int all = 1;
        for (int i = 0; i < OUT_WORKERS - 1; i++)
            if (sh->w[i].first_ok_ms[2] == 0)
                all = 0;
        if (res->healthy_after_ms < 0) {
            char h[32];
            pool_health(e, cfg->pool, h, sizeof h, NULL, 0);
            if (strcmp(h, "healthy") == 0)
                res->healthy_after_ms = pbt_now_ms() - t_up;
        }
        if (all && res->healthy_after_ms >= 0) {
            t_done = pbt_now_ms();
            break;
        }
        pbt_sleep_ms(50);
    }
    if (t_done >= 0)
        pbt_sleep_ms(1000);
    sh->stop = 1;

    /* No worker may hang: each call is bounded by the 5 s acquire timeout. */
    double t_wait = pbt_now_ms();
    for (int i = 0; i < OUT_WORKERS; i++) {
        int st = 0;
        pid_t w;
        while ((w = waitpid(kids[i], &st, WNOHANG)) == 0 && pbt_now_ms() - t_wait < 10000)
            pbt_sleep_ms(10);
        if (w != kids[i]) {
            res->hung++;
            kill(kids[i], SIGKILL);
            waitpid(kids[i], &st, 0);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            res->bad_exit++;
        }
        pbt_untrack_child(kids[i]);
    }
    memcpy(res->w, sh->w, sizeof res->w);
    munmap(sh, sizeof *sh);

    double first = -1, last = -1;
    int missing = 0;
    for (int i = 0; i < OUT_WORKERS - 1; i++) {
        double f = res->w[i].first_ok_ms[2];
        if (f == 0) {
            missing = 1;
            continue;
        }
        if (first < 0 || f - t_up < first)
            first = f - t_up;
        if (f - t_up > last)
            last = f - t_up;
    }
    res->recover_first_ms = first;
    res->recover_all_ms = missing ? -1 : last;
    double lf = res->w[OUT_WORKERS - 1].first_ok_ms[2];
    res->lazy_recover_ms = lf == 0 ? -1 : lf - t_up;

    /* The min_size = 0 pool: leased again without anyone doing anything? */
    pb_client *c = pbt_cli(e);
    snprintf(res->lazy_how, sizeof res->lazy_how, "never");
    double t_lazy0 = pbt_now_ms();
    while (pbt_now_ms() - t_lazy0 < 5000) {
        pb_lease *l = NULL;
        int rc = pb_acquire(c, cfg->lazy_pool, 1000, &l);
        if (rc == PB_OK) {
            int bad = outage_command(l, cfg->redis);
            pb_release(l);
            if (!bad) {
                res->lazy_ok_after_ms = pbt_now_ms() - t_up;
                snprintf(res->lazy_how, sizeof res->lazy_how, "ok");
                break;
            }
            snprintf(res->lazy_how, sizeof res->lazy_how, "command failed (code %d)", bad);
        } else {
            snprintf(res->lazy_how, sizeof res->lazy_how, "acquire %s", pb_strerror(rc));
        }
        pbt_sleep_ms(200);
    }
    pbt_cli_done(c);
    pool_health(e, cfg->pool, res->health_final, sizeof res->health_final, NULL, 0);
    pool_health(e, cfg->lazy_pool, res->lazy_health_final, sizeof res->lazy_health_final, NULL, 0);
    res->ran = 1;
    outage_print(cfg, res);
    assert_int_equal(stop_rc, 0);
    assert_int_equal(start_rc, 0);
}

/* 6a. The scenario: workers loop acquire + command + release while the
 * server is stopped for ~2 s and started again on the same port. */
static void outage_scenario_asserts(const outage_res *r)
{
    assert_int_equal(r->hung, 0);
    assert_int_equal(r->bad_exit, 0);
    for (int i = 0; i < OUT_WORKERS; i++) {
        assert_true(r->w[i].ok[0] > 0);
        assert_int_equal(r->w[i].acq_fail[0] + r->w[i].exec_fail[0], 0);
        /* Bounded by the acquire timeout (5 s): nothing hangs. */
        assert_true(r->w[i].call_ms_max < 6000);
    }
}

/* 6b. While the backend is known down, acquires fail with PB_EBACKEND at
 * once (not PB_ETIMEDOUT after the acquire timeout). */
static void outage_fail_fast_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    long fails = 0, timeouts = 0, ebackend = 0;
    double maxms = 0;
    for (int i = 0; i < OUT_WORKERS - 1; i++) {
        fails += r->w[i].acq_fail[1] + r->w[i].exec_fail[1];
        timeouts += r->w[i].acq_code[1][-PB_ETIMEDOUT];
        ebackend += r->w[i].acq_code[1][-PB_EBACKEND];
        if (r->w[i].acq_fail_ms_max[1] > maxms)
            maxms = r->w[i].acq_fail_ms_max[1];
    }
    print_message("%s outage, main pool while down: %ld failed calls, %ld acquires PB_EBACKEND, %ld PB_ETIMEDOUT; "
                  "slowest failing acquire %.1f ms\n", label, fails, ebackend, timeouts, maxms);
    assert_true(fails > 0);        /* the outage was seen */
    assert_true(ebackend > 0);
    assert_int_equal(timeouts, 0);
    assert_true(maxms < 1000);     /* "at once", generously */
}

/* 6c. Once the server is back, leases succeed again within a few seconds,
 * with no action from the workers. */
static void outage_recovery_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    print_message("%s outage: all main-pool workers succeeded again %.0f ms after the server was back\n", label,
                  r->recover_all_ms);
    for (int i = 0; i < OUT_WORKERS - 1; i++)
        assert_true(r->w[i].ok[2] > 0);
    assert_true(r->recover_all_ms >= 0);
    assert_true(r->recover_all_ms < 5000);
}

/* 6d. The same for a pool with min_size = 0 (no janitor-driven reconnects):
 * the broker must try again by itself once the backend may be back. */
static void outage_lazy_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    const wstat *w = &r->w[OUT_WORKERS - 1];
    print_message("%s outage, min_size=0 pool: ok %ld before, %ld down, %ld back (first success %.0f ms after the "
                  "restart); after the workers stopped: %s; health now \"%s\"\n",
                  label, w->ok[0], w->ok[1], w->ok[2], r->lazy_recover_ms, r->lazy_how, r->lazy_health_final);
    assert_true(w->ok[2] > 0);
    assert_true(r->lazy_ok_after_ms >= 0);
}

/* 8. shmstat --json: down (or degraded) with a last_error during the outage,
 * healthy after. */
static void outage_shmstat_asserts(const char *label, const outage_res *r)
{
    if (!r->ran)
        fail_msg("the %s outage scenario did not run", label);
    print_message("%s outage, shmstat: during \"%s\" (\"%s\"), healthy %.0f ms after the restart, final \"%s\"\n",
                  label, r->health_during, r->error_during, r->healthy_after_ms, r->health_final);
    assert_true(strcmp(r->health_during, "down") == 0 || strcmp(r->health_during, "degraded") == 0);
    assert_true(r->error_during[0] != '\0');
    assert_true(r->healthy_after_ms >= 0);
    assert_string_equal(r->health_final, "healthy");
}

static const outage_cfg pg_outage_cfg = {
    .e = &env_pg, .label = "pg", .pool = "load", .lazy_pool = "lazy", .redis = 0,
    .stop = th_pg_stop, .start = th_pg_start_again,
};

static void test_pg_outage_under_load(void **state)
{
    (void)state;
    outage_run(&pg_outage_cfg, &pg_outage);
    outage_scenario_asserts(&pg_outage);
}

static void test_pg_outage_fail_fast(void **state)
{
    (void)state;
    outage_fail_fast_asserts("pg", &pg_outage);
}

static void test_pg_outage_recovery(void **state)
{
    (void)state;
    outage_recovery_asserts("pg", &pg_outage);
}

static void test_pg_outage_min_size_0_pool_recovers(void **state)
{
    (void)state;
    outage_lazy_asserts("pg", &pg_outage);
}

static void test_pg_outage_shmstat_health(void **state)
{
    (void)state;
    outage_shmstat_asserts("pg", &pg_outage);
}

static const outage_cfg redis_outage_cfg = {
    .e = &env_redis, .label = "redis", .pool = "rload", .lazy_pool = "rlazy", .redis = 1,
    .stop = th_redis_stop, .start = th_redis_start_again,
};

static void test_redis_outage_under_load(void **state)
{
    (void)state;
    outage_run(&redis_outage_cfg, &redis_outage);
    outage_scenario_asserts(&redis_outage);
}

static void test_redis_outage_fail_fast(void **state)
{
    (void)state;
    outage_fail_fast_asserts("redis", &redis_outage);
}

static void test_redis_outage_recovery(void **state)
{
    (void)state;
    outage_recovery_asserts("redis", &redis_outage);
}

static void test_redis_outage_min_size_0_pool_recovers(void **state)
{
    (void)state;
    outage_lazy_asserts("redis", &redis_outage);
}

static void test_redis_outage_shmstat_health(void **state)
{
    (void)state;
    outage_shmstat_asserts("redis", &redis_outage);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_outage_under_load),
        T(test_pg_outage_fail_fast),
        T(test_pg_outage_recovery),
        T(test_pg_outage_min_size_0_pool_recovers),
        T(test_pg_outage_shmstat_health),
    };
    const struct CMUnitTest redis_tests[] = {
        T(test_redis_outage_under_load),
        T(test_redis_outage_fail_fast),
        T(test_redis_outage_recovery),
        T(test_redis_outage_min_size_0_pool_recovers),
        T(test_redis_outage_shmstat_health),
    };
    int failed = cmocka_run_group_tests_name("outage_pg", pg_tests, pg_group_setup, pg_group_teardown);
    failed += cmocka_run_group_tests_name("outage_redis", redis_tests, redis_group_setup, redis_group_teardown);
    return failed;
}
