/*
 * test_not_ready.c — a connection is ready only when the server says so
 * (issue #19: after a Redis restart with a large dataset, commands got
 * "-LOADING Redis is loading the dataset in memory").
 *
 * A real redis-server of this test's own (so that it can be restarted with
 * a slowed-down load): 20,000 keys saved to an RDB, then killed with SIGKILL
 * under load and started again with key-load-delay, so that it spends a few
 * seconds answering -LOADING (AUTH, SELECT and CLIENT work meanwhile, PING
 * does not).  Workers lease and INCR all along: they may see PB_EBACKEND
 * (fail fast) or wait, but never a -LOADING reply, and they are served again
 * once the load is done.
 *
 * PostgreSQL: a real standby (pg_basebackup of the test's server) started
 * with hot_standby = off refuses every connection with 57P03 ("the database
 * system is not accepting connections"), as a server starting up does:
 * acquires fail fast, nothing is handed out, the broker says once why; once
 * promoted it serves.  test_drv_ready.c covers the other 57P03 messages.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;
static int rport;
static pid_t redis_pid;
static char rdir[400];

#define NKEYS "20000"

/* Start our redis-server (not daemonized: we are its parent), sleeping
 * `delay` microseconds after each key it loads. */
static pid_t redis_run(const char *delay)
{
    char port[16], logf[450];
    snprintf(port, sizeof port, "%d", rport);
    snprintf(logf, sizeof logf, "%s/redis.log", rdir);
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open("/dev/null", O_RDWR);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
        }
        execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--dir", rdir, "--save", "",
               "--appendonly", "no", "--dbfilename", "dump.rdb", "--enable-debug-command", "yes",
               "--loading-process-events-interval-bytes", "1024", "--logfile", logf, "--key-load-delay",
               delay, (char *)NULL);
        _exit(127);
    }
    if (pid > 0)
        pbt_track_child(pid);
    return pid;
}

/* One command on a fresh connection of our own; the reply or NULL. */
static redisReply *direct(const char *cmd)
{
    struct timeval tv = { 1, 0 };
    redisContext *rc = redisConnectWithTimeout("127.0.0.1", rport, tv);
    if (!rc || rc->err) {
        if (rc)
            redisFree(rc);
        return NULL;
    }
    redisSetTimeout(rc, tv);
    redisReply *r = redisCommand(rc, cmd);
    redisFree(rc);
    return r;
}

/* Wait until PING answers PONG; ms waited or -1. */
static double wait_pong(int timeout_ms)
{
    double t0 = pbt_now_ms();
    while (pbt_now_ms() - t0 < timeout_ms) {
        redisReply *r = direct("PING");
        int ok = r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
        if (r)
            freeReplyObject(r);
        if (ok)
            return pbt_now_ms() - t0;
        pbt_sleep_ms(20);
    }
    return -1;
}

static int group_setup(void **state)
{
    (void)state;
    if (th_setup(&env, 0, 0) != 0)
        return -1;
    rport = th_free_port();
    snprintf(rdir, sizeof rdir, "%s/redis-loading", env.dir);
    if (rport <= 0 || mkdir(rdir, 0700) != 0)
        return -1;
    redis_pid = redis_run("0");
    if (redis_pid <= 0 || wait_pong(10000) < 0) {
        fprintf(stderr, "test_not_ready: redis-server on port %d did not start\n", rport);
        return -1;
    }
    redisReply *r = direct("DEBUG POPULATE " NKEYS);
    if (r)
        freeReplyObject(r);
    r = direct("SAVE");
    int saved = r && r->type == REDIS_REPLY_STATUS;
    if (r)
        freeReplyObject(r);
    if (!saved)
        return -1;
    char pools[1024];
    snprintf(pools, sizeof pools,
             "[pool loading]\n"
             "type = redis\n"
             "host = 127.0.0.1\n"
             "port = %d\n"
             "min_size = 2\n"
             "max_size = 4\n"
             "acquire_timeout_ms = 1000\n",
             rport);
    return th_broker_start(&env, pools);
}

static int group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&env);
}

#define NWORKERS 6

typedef struct shared {
    _Atomic int stop;
    _Atomic int ready;            /* set once the server answers PONG again */
    _Atomic long ok, ok_after, loading, other_err, cmd_fail, acq_fail, acq_backend;
    char loading_text[128];
} shared;

static void worker(shared *sh)
{
    pb_client *c = NULL;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        _exit(2);
    while (!atomic_load(&sh->stop)) {
        pb_lease *l = NULL;
        int rc = pb_acquire(c, "loading", 1000, &l);
        if (rc != PB_OK) {
            atomic_fetch_add(&sh->acq_fail, 1);
            if (rc == PB_EBACKEND)
                atomic_fetch_add(&sh->acq_backend, 1);
            pbt_sleep_ms(10);       /* failing fast: do not spin */
            continue;
        }
        int ready = atomic_load(&sh->ready);
        redisReply *r = NULL;
        rc = pb_redis_command(l, &r, "INCR notready:ctr");
        if (rc != PB_OK) {
            atomic_fetch_add(&sh->cmd_fail, 1);
        } else if (r->type == REDIS_REPLY_ERROR) {
            if (strncmp(r->str, "LOADING", 7) == 0) {
                if (atomic_fetch_add(&sh->loading, 1) == 0)
                    snprintf(sh->loading_text, sizeof sh->loading_text, "%s", r->str);
            } else {
                atomic_fetch_add(&sh->other_err, 1);
            }
        } else {
            atomic_fetch_add(&sh->ok, 1);
            if (ready)
                atomic_fetch_add(&sh->ok_after, 1);
        }
        if (r)
            freeReplyObject(r);
        pb_release(l);
    }
    pb_disconnect(c);
    _exit(0);
}

static void test_redis_loading_not_handed_out(void **state)
{
    (void)state;
    shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);
    memset(sh, 0, sizeof *sh);
    pid_t kids[NWORKERS];
    fflush(NULL);
    for (int i = 0; i < NWORKERS; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0)
            worker(sh);
        pbt_track_child(kids[i]);
    }
    double t0 = pbt_now_ms();
    while (atomic_load(&sh->ok) < 100 && pbt_now_ms() - t0 < 10000)
        pbt_sleep_ms(20);
    assert_true(atomic_load(&sh->ok) >= 100);

    /* Kill it under load, start it again slowed down: a few seconds of
     * LOADING with the port open. */
    kill(redis_pid, SIGKILL);
    waitpid(redis_pid, NULL, 0);
    pbt_untrack_child(redis_pid);
    redis_pid = redis_run("10");
    assert_true(redis_pid > 0);
    int saw_loading = 0;
    double t_load = pbt_now_ms();
    for (;;) {
        redisReply *r = direct("INFO persistence");
        if (r && r->type == REDIS_REPLY_STRING && r->str)
            saw_loading |= strstr(r->str, "loading:1") != NULL;
        if (r)
            freeReplyObject(r);
        r = direct("PING");
        int pong = r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
        if (r)
            freeReplyObject(r);
        if (pong)
            break;
        assert_true(pbt_now_ms() - t_load < 60000);
        pbt_sleep_ms(50);
    }
    double loading_ms = pbt_now_ms() - t_load;
    atomic_store(&sh->ready, 1);
    /* Served again once loaded. */
    t0 = pbt_now_ms();
    while (atomic_load(&sh->ok_after) < 100 && pbt_now_ms() - t0 < 10000)
        pbt_sleep_ms(20);
    atomic_store(&sh->stop, 1);
    for (int i = 0; i < NWORKERS; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        pbt_untrack_child(kids[i]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    print_message("loading for %.0f ms (seen loading:1: %s): %ld ok (%ld after), %ld -LOADING replies%s%s, "
                  "%ld other error replies, %ld commands failed, %ld acquires failed (%ld PB_EBACKEND)\n",
                  loading_ms, saw_loading ? "yes" : "no", atomic_load(&sh->ok), atomic_load(&sh->ok_after),
                  atomic_load(&sh->loading), sh->loading_text[0] ? ": " : "", sh->loading_text,
                  atomic_load(&sh->other_err), atomic_load(&sh->cmd_fail), atomic_load(&sh->acq_fail),
                  atomic_load(&sh->acq_backend));
    assert_true(saw_loading);               /* the test did test something */
    assert_int_equal(atomic_load(&sh->loading), 0);
    assert_int_equal(atomic_load(&sh->other_err), 0);
    assert_true(atomic_load(&sh->ok_after) >= 100);
    /* Said once why, not a failure every 20 tries. */
    assert_int_equal(th_wait_log(&env, "server not ready yet", 1, 1000), 0);
    assert_true(th_count_lines(env.broker_log, "server not ready yet") <= 2);
    assert_int_equal(th_wait_log(&env, "server ready", 1, 5000), 0);
    munmap(sh, sizeof *sh);
}

/* ------------------------------------------------------------ PostgreSQL */

static th_env penv;
static int sport;                   /* the standby's port */

static int pg_group_setup(void **state)
{
    (void)state;
    if (th_setup(&penv, 1, 0) != 0)
        return -1;
    sport = th_free_port();
    if (sport <= 0)
        return -1;
    char pools[1024];
    snprintf(pools, sizeof pools,
             "[pool standby]\n"
             "type = postgres\n"
             "conninfo = host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable\n"
             "min_size = 1\n"
             "max_size = 2\n"
             "acquire_timeout_ms = 500\n",
             sport);
    return th_broker_start(&penv, pools);
}

static int pg_group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&penv);   /* stops the standby too */
}

static void test_pg_not_accepting_connections(void **state)
{
    (void)state;
    /* A standby (pg_basebackup -R) on the port the pool names. */
    const char *opts[] = { "-c", "hot_standby=off", NULL };
    assert_int_equal(th_pg_standby_start(&penv, sport, opts), 0);
    /* Up and refusing with 57P03: said once, and nothing handed out. */
    assert_int_equal(th_wait_log(&penv, "server not ready yet", 1, 20000), 0);
    pb_client *c = pbt_cli(&penv);
    int got_ok = 0, backend = 0, other = 0;
    double t0 = pbt_now_ms();
    while (pbt_now_ms() - t0 < 1500) {
        pb_lease *l = NULL;
        int rc = pb_acquire(c, "standby", 200, &l);
        if (rc == PB_OK) {
            got_ok++;
            pb_release(l);
        } else if (rc == PB_EBACKEND) {
            backend++;
        } else if (rc != PB_ETIMEDOUT) {
            other++;
        }
        pbt_sleep_ms(20);
    }
    long said = th_count_lines(penv.broker_log, "server not ready yet");
    /* Promoted, it serves.  A standby still in its startup (57P03 "starting
     * up" already, but not yet in archive recovery) refuses the promote:
     * "server is not in standby mode"; on a loaded machine that lasts a
     * while: th_pg_promote tries again for up to 20 s. */
    assert_int_equal(th_pg_promote(&penv, 20000), 0);
    pb_lease *l = NULL;
    int rc = PB_ETIMEDOUT;
    t0 = pbt_now_ms();
    while ((rc = pb_acquire(c, "standby", 500, &l)) != PB_OK && pbt_now_ms() - t0 < 20000)
        pbt_sleep_ms(50);
    print_message("standby, hot_standby off: %d leases granted, %d PB_EBACKEND, %d other errors; "
                  "'server not ready yet' logged %ld time(s); after promotion: %s\n",
                  got_ok, backend, other, said, pb_strerror(rc));
    assert_int_equal(got_ok, 0);
    assert_int_equal(other, 0);
    assert_true(backend > 0);
    assert_int_equal(said, 1);
    assert_int_equal(rc, PB_OK);
    assert_true(pbt_pg_int(l, "SELECT 1") == 1);
    pb_release(l);
    assert_int_equal(th_wait_log(&penv, "server ready", 1, 5000), 0);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest tests[] = {
        T(test_redis_loading_not_handed_out),
    };
    int failed = cmocka_run_group_tests_name("not_ready_redis", tests, group_setup, group_teardown);
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_not_accepting_connections),
    };
    failed += cmocka_run_group_tests_name("not_ready_pg", pg_tests, pg_group_setup, pg_group_teardown);
    return failed;
}
