/*
 * test_shrink.c — a busy pool shrinks when a reload lowers max_size, and
 * connections retire (max_uses) while waiters are always queued (issue #19:
 * a release with waiters queued handed the connection straight on, so a
 * pool of 4 lowered to 2 kept 4 backends for as long as the load lasted).
 *
 * One group (its own temp dir, PostgreSQL, Redis and broker).  Twelve
 * worker processes hammer a pool of 4 (so waiters are queued nearly all the
 * time); the test rewrites max_size to 2, sends SIGHUP and, while the load
 * goes on, polls the server's own count of the pool's connections.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define POOLS \
    "[pool pgshrink]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbshrink\n" \
    "min_size = 1\n" \
    "max_size = 4\n" \
    "acquire_timeout_ms = 10000\n" \
    "\n" \
    "[pool rshrink]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 1\n" \
    "max_size = 4\n" \
    "acquire_timeout_ms = 10000\n" \
    "\n" \
    "[pool pguses]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbuses\n" \
    "min_size = 1\n" \
    "max_size = 2\n" \
    "max_uses = 20\n" \
    "acquire_timeout_ms = 10000\n"

static int group_setup(void **state)
{
    (void)state;
    return pbt_group_start(&env, 1, 1, POOLS);
}

static int group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&env);
}

#define NWORKERS 12

/* One worker: lease, one command, release, until the stop pipe closes; then
 * report {ops, errors, first error code, distinct backend pids seen (pg)}. */
static void worker(const char *pool, int redis, int stop_fd, int res_fd)
{
    long msg[4] = { 0, 0, 0, 0 };
    int pids[64], npids = 0;
    pb_client *c = NULL;
    if (pb_connect(env.sock_path, &c) != PB_OK) {
        msg[1] = 1;
        msg[2] = PB_EBROKER;
        goto out;
    }
    for (;;) {
        struct pollfd p = { .fd = stop_fd, .events = POLLIN };
        if (poll(&p, 1, 0) != 0)
            break;
        pb_lease *l = NULL;
        int rc = pb_acquire(c, pool, 10000, &l);
        if (rc == PB_OK && redis) {
            redisReply *r = NULL;
            rc = pb_redis_command(l, &r, "INCR shrink:%d", (int)getpid());
            if (rc == PB_OK && (!r || r->type != REDIS_REPLY_INTEGER))
                rc = PB_EPROTO;
            if (r)
                freeReplyObject(r);
        } else if (rc == PB_OK) {
            pb_result *r = NULL;
            rc = pb_pg_exec(l, "SELECT pg_backend_pid() FROM pg_sleep(0.002)", &r);
            if (rc == PB_OK && pb_result_status(r) != PB_RES_TUPLES_OK)
                rc = PB_EPROTO;
            if (rc == PB_OK) {
                int pid = atoi(pb_getvalue(r, 0, 0));
                int seen = 0;
                for (int i = 0; i < npids; i++)
                    seen |= pids[i] == pid;
                if (!seen && npids < 64)
                    pids[npids++] = pid;
            }
            pb_result_free(r);
        }
        if (l) {
            int rr = pb_release(l);
            if (rc == PB_OK)
                rc = rr;
        }
        if (rc == PB_OK) {
            msg[0]++;
        } else {
            if (!msg[1])
                msg[2] = rc;
            msg[1]++;
        }
    }
    pb_disconnect(c);
out:
    msg[3] = npids;
    _exit(write(res_fd, msg, sizeof msg) == sizeof msg ? 0 : 3);
}

typedef struct load {
    pid_t kids[NWORKERS];
    int stop_w, res_r;
} load;

static void load_start(load *ld, const char *pool, int redis)
{
    int stopp[2], resp[2];
    assert_int_equal(pipe(stopp), 0);
    assert_int_equal(pipe(resp), 0);
    fflush(NULL);
    for (int i = 0; i < NWORKERS; i++) {
        ld->kids[i] = fork();
        assert_true(ld->kids[i] >= 0);
        if (ld->kids[i] == 0) {
            close(stopp[1]);
            close(resp[0]);
            worker(pool, redis, stopp[0], resp[1]);
        }
        pbt_track_child(ld->kids[i]);
    }
    close(stopp[0]);
    close(resp[1]);
    ld->stop_w = stopp[1];
    ld->res_r = resp[0];
}

/* Stop the workers; sum their figures into out[4] (ops, errors, first
 * error, the most distinct backends one worker saw). */
static void load_stop(load *ld, long out[4])
{
    memset(out, 0, 4 * sizeof *out);
    close(ld->stop_w);
    for (int got = 0; got < NWORKERS; got++) {
        struct pollfd p = { .fd = ld->res_r, .events = POLLIN };
        if (poll(&p, 1, 20000) <= 0)
            fail_msg("worker %d of %d did not report", got, NWORKERS);
        long msg[4];
        assert_int_equal(read(ld->res_r, msg, sizeof msg), sizeof msg);
        out[0] += msg[0];
        if (msg[1] && !out[1])
            out[2] = msg[2];
        out[1] += msg[1];
        if (msg[3] > out[3])
            out[3] = msg[3];
    }
    close(ld->res_r);
    for (int i = 0; i < NWORKERS; i++) {
        int st;
        waitpid(ld->kids[i], &st, 0);
        pbt_untrack_child(ld->kids[i]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
}

/* Rewrite the broker's config with "max_size = 4" of pool `pool` as
 * max_size = to, and SIGHUP it. */
static void reload_max_size(const char *pool, int to)
{
    static char text[16384];
    FILE *f = fopen(env.conf_path, "r");
    assert_non_null(f);
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char head[64];
    snprintf(head, sizeof head, "[pool %s]\n", pool);
    char *sec = strstr(text, head);
    assert_non_null(sec);
    char *m = strstr(sec, "max_size = 4\n");
    assert_non_null(m);
    m[strlen("max_size = ")] = (char)('0' + to);
    f = fopen(env.conf_path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, n, f), n);
    fclose(f);
    long before = th_count_lines(env.broker_log, "reload:");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "reload:", before + 1, 5000), 0);
}

/* The pool's connections as the server counts them. */
static long backends(const char *pool, int redis)
{
    if (redis) {
        long long ids[16];
        return pbt_redis_ids(&env, pool, ids, 16);
    }
    return pbt_pg_count(&env, "pbshrink");
}

static void shrink_under_load(const char *pool, int redis)
{
    load ld;
    load_start(&ld, pool, redis);
    /* The load opens all 4. */
    double t0 = pbt_now_ms();
    long n;
    while ((n = backends(pool, redis)) != 4 && pbt_now_ms() - t0 < 10000)
        pbt_sleep_ms(50);
    assert_int_equal(n, 4);

    reload_max_size(pool, 2);
    /* Within 2 s, while the 12 workers go on. */
    t0 = pbt_now_ms();
    while ((n = backends(pool, redis)) > 2 && pbt_now_ms() - t0 < 2000)
        pbt_sleep_ms(50);
    double took = pbt_now_ms() - t0;
    /* And it stays there, with the load still on. */
    long most = 0, most_size = 0, maxs = 0;
    for (int i = 0; i < 10; i++) {
        pbt_sleep_ms(100);
        long b = backends(pool, redis);
        long s = (long)pbt_pool_counter(&env, pool, "size");
        maxs = (long)pbt_pool_counter(&env, pool, "max_size");
        if (b > most)
            most = b;
        if (s > most_size)
            most_size = s;
    }
    long r[4];
    load_stop(&ld, r);
    print_message("%s: 4 -> %ld backends in %.0f ms under load; after: at most %ld backends, shmstat size %ld "
                  "max %ld; %ld ops, %ld errors (first: %s)\n",
                  pool, n, took, most, most_size, maxs, r[0], r[1], r[1] ? pb_strerror((int)r[2]) : "none");
    assert_true(n <= 2);
    assert_true(most <= 2);
    assert_int_equal(maxs, 2);
    assert_true(most_size <= 2);
    assert_int_equal(r[1], 0);
    assert_true(r[0] > 0);
}

static void test_pg_shrinks_under_load(void **state)
{
    (void)state;
    shrink_under_load("pgshrink", 0);
}

static void test_redis_shrinks_under_load(void **state)
{
    (void)state;
    shrink_under_load("rshrink", 1);
}

/* max_uses = 20 on a pool of 2 that always has waiters: connections are
 * handed from release to waiter without ever going free, and still retire
 * and are replaced, and never more than 2 at a time. */
static void test_max_uses_under_waiters(void **state)
{
    (void)state;
    long long connects0 = pbt_pool_counter(&env, "pguses", "connects");
    load ld;
    load_start(&ld, "pguses", 0);
    long most = 0;
    double t0 = pbt_now_ms();
    while (pbt_now_ms() - t0 < 1500) {
        long b = pbt_pg_count(&env, "pbuses");
        if (b > most)
            most = b;
        pbt_sleep_ms(100);
    }
    long r[4];
    load_stop(&ld, r);
    long long connects = pbt_pool_counter(&env, "pguses", "connects") - connects0;
    print_message("max_uses 20: %ld ops, %ld errors (first: %s), %lld connects, at most %ld backends\n", r[0], r[1],
                  r[1] ? pb_strerror((int)r[2]) : "none", connects, most);
    assert_int_equal(r[1], 0);
    assert_true(most <= 2);
    /* Every connection served at most 20 leases: ops / 20 new ones, less
     * the (at most 2) the pool had, give or take the last ones. */
    assert_true(connects >= r[0] / 20 - 2);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest tests[] = {
        T(test_pg_shrinks_under_load),
        T(test_redis_shrinks_under_load),
        T(test_max_uses_under_waiters),
    };
    return cmocka_run_group_tests_name("shrink", tests, group_setup, group_teardown);
}
