/*
 * test_async.c — the non-blocking API (client/async.c) end to end, on a real
 * PostgreSQL, Redis and broker: one process, one thread, many logical
 * requests driven by a poll() loop on pb_client_fd.
 *
 * Every wait on the fd is bounded (30 s): a missed notification fails the
 * test instead of hanging it.  Wake-up counts are compared with the work
 * done (not with wall-clock times), to show the waiting does not spin.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "pb_shm.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define POOLS \
    "[pool main]\n" \
    "type = postgres\n" \
    "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbasync\n" \
    "min_size = 1\n" \
    "max_size = 4\n" \
    "acquire_timeout_ms = 20000\n" \
    "\n" \
    "[pool tiny]\n" \
    "type = postgres\n" \
    "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbasynctiny\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "\n" \
    "[pool cache]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 1\n" \
    "max_size = 2\n"

#define FD_WAIT_MS 30000

static int group_setup(void **state)
{
    (void)state;
    if (th_setup(&env, 1, 1) < 0)
        return -1;
    if (th_broker_start(&env, POOLS) < 0)
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

/* On a missed notification (PB_ASYNC_DIAG set): the slots' I/O words. */
static void diag_slots(void)
{
    int fd = shm_open(env.shm_name, O_RDONLY, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return;
    pb_shm_header *h = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (h == MAP_FAILED)
        return;
    pb_shm_slot *sl = (pb_shm_slot *)((char *)h + h->slot_off);
    pb_shm_client *cl = (pb_shm_client *)((char *)h + h->client_off);
    for (uint32_t i = 0; i < h->nslots; i++)
        fprintf(stderr, "slot %u word %016llx req_seq %u req_ack %u rep_head %llu rep_tail %llu done %llu owed %u "
                "futex %u sleeping %u paused %u io_error %d\n", i, (unsigned long long)atomic_load(&sl[i].word),
                atomic_load(&sl[i].req_seq), atomic_load(&sl[i].req_ack),
                (unsigned long long)atomic_load(&sl[i].rep_head), (unsigned long long)atomic_load(&sl[i].rep_tail),
                (unsigned long long)atomic_load(&sl[i].reply_done), atomic_load(&sl[i].rep_owed),
                atomic_load(&sl[i].rep_futex), atomic_load(&sl[i].rep_sleeping), atomic_load(&sl[i].rep_paused),
                atomic_load(&sl[i].io_error));
    for (uint32_t i = 0; i < h->max_clients; i++)
        if (atomic_load(&cl[i].id))
            fprintf(stderr, "client %u wait_word %016llx futex %u sleeping %u sq_tail %u sq_head %u\n",
                    atomic_load(&cl[i].id), (unsigned long long)atomic_load(&cl[i].wait_word),
                    atomic_load(&cl[i].wait_futex), atomic_load(&cl[i].wait_sleeping), atomic_load(&cl[i].sq_tail),
                    atomic_load(&cl[i].sq_head));
    munmap(h, (size_t)st.st_size);
}

static void diag_reqs(void);

/* Wait for the client's fd (bounded), then consume.  Returns what
 * pb_client_consume returned. */
static int wait_fd(pb_client *c)
{
    struct pollfd p = { .fd = pb_client_fd(c), .events = POLLIN };
    assert_true(p.fd >= 0);
    int r;
    do
        r = poll(&p, 1, FD_WAIT_MS);
    while (r < 0 && errno == EINTR);
    if (r != 1 && getenv("PB_ASYNC_DIAG")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "%s/shmstat -s %s >&2", getenv("PB_BUILD") ? getenv("PB_BUILD") : "build",
                 env.shm_name);
        if (system(cmd) != 0)
            fprintf(stderr, "shmstat failed\n");
        diag_slots();
        diag_reqs();
    }
    if (r != 1)
        fail_msg("pb_client_fd not readable within %d ms (a missed notification)", FD_WAIT_MS);
    int n = pb_client_consume(c);
    assert_true(n >= 0);
    return n;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------- many on few */

enum { R_START, R_ACQ, R_SEND, R_WAIT, R_WAIT2, R_DONE };

typedef struct req {
    int i;
    int state;
    pb_acquiring *op;
    pb_lease *l;
    int redis;
} req;

static int leased_now, leased_max;
static req *cur_rs;
static int cur_n;

static void diag_reqs(void)
{
    for (int i = 0; i < cur_n; i++)
        if (cur_rs[i].state != R_DONE)
            fprintf(stderr, "req %d state %d slot-pid %d busy-now %d\n", cur_rs[i].i, cur_rs[i].state,
                    cur_rs[i].l ? pb_lease_backend_pid(cur_rs[i].l) : -1,
                    cur_rs[i].l ? pb_is_busy(cur_rs[i].l) : -99);
}

static void got_lease(req *r)
{
    leased_now++;
    if (leased_now > leased_max)
        leased_max = leased_now;
    r->state = R_SEND;
}

/* Move one request as far as it goes without waiting. */
static void step(pb_client *c, req *r, const char *pool)
{
    int rc;
    for (;;) {
        switch (r->state) {
        case R_START:
            rc = pb_acquire_start(c, pool, &r->op, &r->l);
            if (rc == PB_EINPROGRESS) {
                r->state = R_ACQ;
                return;
            }
            if (rc != PB_OK)
                fail_msg("pb_acquire_start %d: %s", r->i, pb_strerror(rc));
            got_lease(r);
            break;
        case R_ACQ:
            rc = pb_acquire_poll(r->op, &r->l);
            if (rc == PB_EINPROGRESS)
                return;
            if (rc != PB_OK)
                fail_msg("pb_acquire_poll %d: %s", r->i, pb_strerror(rc));
            r->op = NULL;
            got_lease(r);
            break;
        case R_SEND:
            if (r->redis) {
                char key[32], val[32];
                snprintf(key, sizeof key, "async:%d", r->i);
                snprintf(val, sizeof val, "v%d", r->i * 3);
                const char *set[] = { "SET", key, val };
                const char *get[] = { "GET", key };
                assert_int_equal(pb_redis_send_argv(r->l, 3, set, NULL), PB_OK);
                assert_int_equal(pb_redis_send_argv(r->l, 2, get, NULL), PB_OK);
            } else {
                char sql[96];
                snprintf(sql, sizeof sql, "SELECT %d * 2 AS v, pg_sleep(0.002)", r->i);
                assert_int_equal(pb_pg_send_query(r->l, sql), PB_OK);
            }
            r->state = R_WAIT;
            break;
        case R_WAIT:
            if (r->redis) {
                redisReply *a = NULL;
                rc = pb_redis_poll_reply(r->l, &a);
                if (rc == PB_EINPROGRESS)
                    return;
                assert_int_equal(rc, PB_OK);
                assert_int_equal(a->type, REDIS_REPLY_STATUS);
                freeReplyObject(a);
                r->state = R_WAIT2;     /* the GET may not be in yet */
                break;
            }
            /* fall through */
        case R_WAIT2:
            if (r->redis) {
                redisReply *b = NULL;
                rc = pb_redis_poll_reply(r->l, &b);
                if (rc == PB_EINPROGRESS)
                    return;
                assert_int_equal(rc, PB_OK);
                char want[32];
                snprintf(want, sizeof want, "v%d", r->i * 3);
                assert_int_equal(b->type, REDIS_REPLY_STRING);
                assert_string_equal(b->str, want);
                freeReplyObject(b);
                assert_int_equal(pb_redis_poll_reply(r->l, &b), PB_EINVAL);     /* nothing outstanding */
            } else {
                rc = pb_is_busy(r->l);
                if (rc == 1)
                    return;
                if (rc != 0)
                    fail_msg("pb_is_busy %d: %s", r->i, pb_strerror(rc));
                pb_result *res = NULL;
                assert_int_equal(pb_pg_get_result(r->l, &res), PB_OK);
                assert_non_null(res);
                assert_int_equal(pb_result_status(res), PB_RES_TUPLES_OK);
                assert_int_equal(atoi(pb_getvalue(res, 0, 0)), r->i * 2);
                pb_result_free(res);
                assert_int_equal(pb_is_busy(r->l), 0);
                assert_int_equal(pb_pg_get_result(r->l, &res), PB_OK);
                assert_null(res);   /* the end, as PQgetResult's NULL */
            }
            assert_int_equal(pb_release(r->l), PB_OK);
            leased_now--;
            r->l = NULL;
            r->state = R_DONE;
            return;
        default:
            return;
        }
    }
}

/* Run n requests on pool concurrently; returns the poll wake-ups. */
static int run_many(pb_client *c, const char *pool, int n, int redis)
{
    req *rs = calloc((size_t)n, sizeof *rs);
    assert_non_null(rs);
    leased_now = leased_max = 0;
    cur_rs = rs;
    cur_n = n;
    for (int i = 0; i < n; i++) {
        rs[i].i = i + 1;
        rs[i].redis = redis;
    }
    int wakeups = 0;
    for (;;) {
        int done = 0;
        for (int i = 0; i < n; i++) {
            step(c, &rs[i], pool);
            done += rs[i].state == R_DONE;
        }
        if (done == n)
            break;
        wait_fd(c);
        wakeups++;
    }
    free(rs);
    return wakeups;
}

static void test_hundred_on_four(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    assert_int_equal(pb_client_fd_polls(c), 0);      /* io_uring FUTEX_WAIT on this kernel */
    int fd = pb_client_fd(c);
    assert_true(fd >= 0);
    assert_int_equal(pb_client_fd(c), fd);            /* the same fd every time */
    int wakeups = run_many(c, "main", 100, 0);
    /* A grant, an ack and a reply per request at most, with room for
     * replies published in pieces: a spinning loop would show thousands. */
    print_message("100 requests on a pool of 4: %d wake-ups, at most %d leases at once\n", wakeups, leased_max);
    assert_true(leased_max <= 4);
    assert_true(wakeups <= 400);
    /* Again on the same client: the queue and the ring are reusable. */
    run_many(c, "main", 30, 0);
    pb_disconnect(c);
}

static void test_redis_many(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    int wakeups = run_many(c, "cache", 60, 1);
    print_message("60 Redis requests on a pool of 2: %d wake-ups, at most %d leases at once\n", wakeups, leased_max);
    assert_true(leased_max <= 2);
    assert_true(wakeups <= 300);
    pb_disconnect(c);
}

/* The timerfd fallback gives the same results (it only wakes more). */
static void test_timer_fallback(void **state)
{
    (void)state;
    setenv("POOLBROKER_ASYNC_NOTIFY", "timer", 1);
    pb_client *c = pbt_connect(&env);
    assert_int_equal(pb_client_fd_polls(c), 1);
    unsetenv("POOLBROKER_ASYNC_NOTIFY");
    run_many(c, "main", 40, 0);
    run_many(c, "cache", 20, 1);
    pb_disconnect(c);
}

/* A slow statement: the wait for it costs a handful of wake-ups and almost
 * no CPU. */
static void test_idle_wait_does_not_spin(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    pb_acquiring *op = NULL;
    int rc = pb_acquire_start(c, "main", &op, &l);
    while (rc == PB_EINPROGRESS) {
        wait_fd(c);
        rc = pb_acquire_poll(op, &l);
    }
    assert_int_equal(rc, PB_OK);
    assert_int_equal(pb_pg_send_query(l, "SELECT pg_sleep(0.5), 42"), PB_OK);
    double cpu0 = cpu_seconds();
    int wakeups = 0, events = 0;
    while ((rc = pb_is_busy(l)) == 1) {
        events += wait_fd(c);
        wakeups++;
    }
    double cpu = cpu_seconds() - cpu0;
    assert_int_equal(rc, 0);
    pb_result *res = NULL;
    assert_int_equal(pb_pg_get_result(l, &res), PB_OK);
    assert_string_equal(pb_getvalue(res, 0, 1), "42");
    pb_result_free(res);
    print_message("pg_sleep(0.5): %d wake-ups, %d notifications, %.1f ms CPU\n", wakeups, events, cpu * 1000);
    assert_true(wakeups <= 4);
    assert_true(events <= 2 * wakeups + 1);
    assert_true(cpu < 0.05);        /* 50 ms of CPU over a 500 ms wait: a spinner uses ~500 */
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

/* Statements queued back to back come back in order; an SQL error is a
 * result, and the lease stays usable. */
static void test_pipeline_and_server_error(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    assert_int_equal(pb_pg_send_query(l, "SELECT 1"), PB_OK);
    assert_int_equal(pb_pg_send_query(l, "SELECT 1/0"), PB_OK);
    const char *v[] = { "3" };
    assert_int_equal(pb_pg_send_params(l, "SELECT $1::int + 1", 1, NULL, v, NULL, NULL, 0), PB_OK);
    const char *want[] = { "1", NULL, "4" };
    for (int i = 0; i < 3; i++) {
        int rc;
        while ((rc = pb_is_busy(l)) == 1)
            wait_fd(c);
        assert_int_equal(rc, 0);
        pb_result *r = NULL;
        assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
        assert_non_null(r);
        if (want[i]) {
            assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
            assert_string_equal(pb_getvalue(r, 0, 0), want[i]);
        } else {
            assert_int_equal(pb_result_status(r), PB_RES_ERROR);
            assert_string_equal(pb_error_field(r, 'C'), "22012");
        }
        pb_result_free(r);
    }
    assert_int_equal(pb_is_busy(l), 0);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    assert_null(r);
    /* Blocking calls work again on the same lease. */
    assert_int_equal(pb_pg_exec(l, "SELECT 'ok'", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "ok");
    pb_result_free(r);
    /* Wrong-type and argument errors. */
    const char *argv[] = { "PING" };
    assert_int_equal(pb_redis_send_argv(l, 1, argv, NULL), PB_ETYPE);
    assert_int_equal(pb_pg_send_query(l, NULL), PB_EINVAL);
    assert_int_equal(pb_is_busy(NULL), PB_EINVAL);
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_is_busy(l), PB_ESTALE);
    assert_int_equal(pb_pg_send_query(l, "SELECT 1"), PB_ESTALE);
    pb_lease *dummy = NULL;
    pb_acquiring *op = NULL;
    assert_int_equal(pb_acquire_start(c, "nosuchpool", &op, &dummy), PB_ENOPOOL);
    assert_null(op);
    assert_null(dummy);
    pb_disconnect(c);
}

/* The caller's timeout on an acquire: cancel it, and the next waiter (and
 * a blocking acquire) are served. */
static void test_acquire_cancel_and_timeout(void **state)
{
    (void)state;
    pb_client *holder = pbt_connect(&env);
    pb_client *c = pbt_connect(&env);
    pb_lease *held = NULL;
    assert_int_equal(pb_acquire(holder, "tiny", -1, &held), PB_OK);

    pb_acquiring *op1 = NULL, *op2 = NULL, *op3 = NULL;
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire_start(c, "tiny", &op1, &l), PB_EINPROGRESS);
    assert_int_equal(pb_acquire_start(c, "tiny", &op2, &l), PB_EINPROGRESS);
    assert_int_equal(pb_acquire_start(c, "tiny", &op3, &l), PB_EINPROGRESS);
    /* While ours queue with the broker, a blocking acquire on the same
     * client may not wait (the wait word is taken). */
    pb_lease *bl = NULL;
    assert_int_equal(pb_acquire(c, "tiny", 100, &bl), PB_EBUSY);

    /* Nothing comes within 200 ms (our own deadline): cancel the oldest.
     * Wake-ups meanwhile are spurious at most, never a grant. */
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        long ms = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms >= 200)
            break;
        struct pollfd p = { .fd = pb_client_fd(c), .events = POLLIN };
        if (poll(&p, 1, (int)(200 - ms)) == 1)
            pb_client_consume(c);
        assert_int_equal(pb_acquire_poll(op1, &l), PB_EINPROGRESS);
    }
    pb_acquire_cancel(op1);
    pb_acquire_cancel(op2);         /* queued here, never reached the broker */

    /* The holder lets go: op3 gets the connection. */
    assert_int_equal(pb_release(held), PB_OK);
    int rc;
    while ((rc = pb_acquire_poll(op3, &l)) == PB_EINPROGRESS)
        wait_fd(c);
    assert_int_equal(rc, PB_OK);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 7", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "7");
    pb_result_free(r);

    /* A cancel after the grant releases the slot. */
    assert_int_equal(pb_acquire_start(c, "tiny", &op1, &bl), PB_EINPROGRESS);
    assert_int_equal(pb_release(l), PB_OK);
    /* Let the broker hand it over, then cancel without polling. */
    wait_fd(c);
    pb_acquire_cancel(op1);
    assert_int_equal(pb_acquire(holder, "tiny", 5000, &held), PB_OK);
    assert_int_equal(pb_release(held), PB_OK);
    pb_acquire_cancel(NULL);
    pb_disconnect(c);
    pb_disconnect(holder);
}

/* The caller's timeout on a command: releasing the lease abandons it (the
 * broker cancels the statement), and the pool serves the next one. */
static void test_command_abandoned(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, "tiny", -1, &l), PB_OK);
    assert_int_equal(pb_pg_send_query(l, "SELECT pg_sleep(30)"), PB_OK);
    struct pollfd p = { .fd = pb_client_fd(c), .events = POLLIN };
    assert_int_equal(pb_is_busy(l), 1);
    while (poll(&p, 1, 150) == 1) {
        pb_client_consume(c);
        assert_int_equal(pb_is_busy(l), 1);
    }
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "tiny", 10000, &l), PB_OK);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 'next'", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "next");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

/* The broker dies (SIGKILL) with an acquire queued and a statement in
 * flight: the fd wakes, and both answer PB_EBROKER. */
static void test_broker_death(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_client *holder = pbt_connect(&env);
    pb_lease *held = NULL, *l = NULL, *got = NULL;
    assert_int_equal(pb_acquire(holder, "tiny", -1, &held), PB_OK);
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    pb_acquiring *op = NULL;
    assert_int_equal(pb_acquire_start(c, "tiny", &op, &got), PB_EINPROGRESS);
    assert_int_equal(pb_pg_send_query(l, "SELECT pg_sleep(30)"), PB_OK);
    assert_int_equal(pb_is_busy(l), 1);

    kill(env.broker_pid, SIGKILL);
    int rc;
    while ((rc = pb_acquire_poll(op, &got)) == PB_EINPROGRESS)
        wait_fd(c);
    assert_int_equal(rc, PB_EBROKER);
    assert_int_equal(pb_is_busy(l), PB_EBROKER);
    th_broker_stop(&env, SIGKILL);  /* reap it */

    /* A new broker: the same client attaches again on its next acquire. */
    assert_int_equal(th_broker_restart(&env), 0);
    pb_release(l);
    pb_release(held);
    pb_lease *l2 = NULL;
    rc = pb_acquire_start(c, "main", &op, &l2);
    while (rc == PB_EINPROGRESS) {
        wait_fd(c);
        rc = pb_acquire_poll(op, &l2);
    }
    assert_int_equal(rc, PB_OK);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l2, "SELECT 'again'", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "again");
    pb_result_free(r);
    assert_int_equal(pb_release(l2), PB_OK);
    pb_disconnect(holder);
    pb_disconnect(c);
}

/* LISTEN/NOTIFY and Pub/Sub polled (pb_pg_poll_notify, pb_redis_poll_message):
 * "none yet" arms the fd, a NOTIFY / PUBLISH from another client wakes it,
 * and a poll while results are owed is PB_EBUSY. */
static void test_notify_and_message_polled(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_client *other = pbt_connect(&env);
    pb_lease *l = NULL, *o = NULL;
    pb_result *res = NULL;
    assert_int_equal(pb_acquire(c, "main", -1, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "LISTEN pb_async_ch", &res), PB_OK);
    pb_result_free(res);
    pb_notify *n = NULL;
    assert_int_equal(pb_pg_poll_notify(l, &n), PB_EINPROGRESS);
    assert_null(n);
    assert_int_equal(pb_pg_send_query(l, "SELECT 1"), PB_OK);
    assert_int_equal(pb_pg_poll_notify(l, &n), PB_EBUSY);      /* the SELECT's result is owed */
    int rc;
    while ((rc = pb_is_busy(l)) == 1)
        wait_fd(c);
    assert_int_equal(rc, 0);
    assert_int_equal(pb_pg_get_result(l, &res), PB_OK);
    pb_result_free(res);
    assert_int_equal(pb_pg_get_result(l, &res), PB_OK);
    assert_null(res);
    assert_int_equal(pb_acquire(other, "main", -1, &o), PB_OK);
    assert_int_equal(pb_pg_exec(o, "NOTIFY pb_async_ch, 'hello'", &res), PB_OK);
    pb_result_free(res);
    int wakeups = 0;
    while ((rc = pb_pg_poll_notify(l, &n)) == PB_EINPROGRESS) {
        wait_fd(c);
        wakeups++;
    }
    assert_int_equal(rc, PB_OK);
    assert_string_equal(pb_notify_channel(n), "pb_async_ch");
    assert_string_equal(pb_notify_payload(n), "hello");
    assert_int_equal(pb_notify_be_pid(n), pb_lease_backend_pid(o));
    pb_notify_free(n);
    assert_true(wakeups <= 4);
    assert_int_equal(pb_pg_poll_notify(l, NULL), PB_EINVAL);
    assert_int_equal(pb_release(o), PB_OK);
    assert_int_equal(pb_release(l), PB_OK);

    redisReply *rep = NULL;
    assert_int_equal(pb_acquire(c, "cache", -1, &l), PB_OK);
    assert_int_equal(pb_redis_poll_message(l, &rep), PB_EINVAL);       /* nothing subscribed */
    assert_int_equal(pb_redis_command(l, &rep, "SUBSCRIBE pb_async_ch"), PB_OK);
    freeReplyObject(rep);
    assert_int_equal(pb_redis_poll_message(l, &rep), PB_EINPROGRESS);
    assert_int_equal(pb_acquire(other, "cache", -1, &o), PB_OK);
    assert_int_equal(pb_redis_command(o, &rep, "PUBLISH pb_async_ch %s", "hi"), PB_OK);
    assert_int_equal(rep->integer, 1);
    freeReplyObject(rep);
    wakeups = 0;
    while ((rc = pb_redis_poll_message(l, &rep)) == PB_EINPROGRESS) {
        wait_fd(c);
        wakeups++;
    }
    assert_int_equal(rc, PB_OK);
    assert_int_equal(rep->type, REDIS_REPLY_ARRAY);
    assert_int_equal(rep->elements, 3);
    assert_string_equal(rep->element[0]->str, "message");
    assert_string_equal(rep->element[2]->str, "hi");
    freeReplyObject(rep);
    assert_true(wakeups <= 4);
    assert_int_equal(pb_release(o), PB_OK);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(other);
    pb_disconnect(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hundred_on_four),
        cmocka_unit_test(test_redis_many),
        cmocka_unit_test(test_timer_fallback),
        cmocka_unit_test(test_idle_wait_does_not_spin),
        cmocka_unit_test(test_pipeline_and_server_error),
        cmocka_unit_test(test_acquire_cancel_and_timeout),
        cmocka_unit_test(test_command_abandoned),
        cmocka_unit_test(test_broker_death),
        cmocka_unit_test(test_notify_and_message_polled),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
