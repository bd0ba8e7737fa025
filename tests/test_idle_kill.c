/*
 * test_idle_kill.c — pooled connections the backend kills while idle, on
 * real servers.
 *
 * PostgreSQL (pg_terminate_backend) and Redis (CLIENT KILL) close idle
 * pooled connections; the broker must replace them so that the next leases'
 * FIRST command works (200 ms later), and a lease taken at once costs at
 * most one failed first command per killed connection.
 *
 * An idle connection that receives an asynchronous message (a NOTIFY for
 * a channel it listens on) is kept: the broker absorbs it.
 *
 * Two groups, each with its own temp dir, server and broker:
 *   idle_kill_pg     PostgreSQL pools "kill", "admin" and "listen"
 *   idle_kill_redis  Redis pool "rkill"
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env_pg;
static th_env env_redis;

#define PG_POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool admin]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pbadmin\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "\n" \
    "[pool kill]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblife\n" \
    "min_size = 2\n" \
    "max_size = 2\n" \
    "validate_after_idle_ms = 0\n" \
    "acquire_timeout_ms = 5000\n" \
    "\n" \
    "[pool listen]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=pblisten\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "validate_after_idle_ms = 0\n" \
    "reset = LISTEN pbidle\n"

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

/* 1. Idle connections killed by the server are replaced before anyone leases
 * them: 200 ms after pg_terminate_backend, each lease's FIRST command works. */
static void test_pg_idle_kill_then_lease_200ms(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    assert_true(pbt_wait_pg_count(e, "pblife", 2, 10000) >= 0);
    pbt_sleep_ms(300);          /* let the idle watch be armed on both */
    long long connects0 = pbt_pool_counter(e, "kill", "connects");
    for (int round = 0; round < 2; round++) {
        char old[256];
        pbt_pg_pids(e, "pblife", old, sizeof old);
        long killed = pbt_psql_int(e, "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = 'pblife') s");
        double t_kill = pbt_now_ms();
        assert_int_equal(killed, 2);
        pbt_sleep_ms(200);
        pb_client *c = pbt_cli(e);
        pb_lease *l[2];
        int pids[2], failed = 0;
        double t_acq = pbt_now_ms();
        for (int i = 0; i < 2; i++) {
            l[i] = pbt_lease(c, "kill", 5000);
            char how[256];
            pids[i] = pbt_pg_first_command(l[i], how, sizeof how);
            if (pids[i] == 0 || pbt_in_list(old, pids[i])) {
                failed++;
                print_message("round %d lease %d: first command: %s (killed pids %s)\n", round, i, how, old);
            }
        }
        double acq_ms = pbt_now_ms() - t_acq;
        for (int i = 0; i < 2; i++)
            assert_int_equal(pb_release(l[i]), PB_OK);
        pbt_cli_done(c);
        double refill = pbt_wait_pg_count(e, "pblife", 2, 10000);
        print_message("pg idle kill round %d: killed %s; 200 ms later 2 leases + first commands took %.1f ms, "
                      "new pids %d,%d, %d failed; pool back to 2 connections %.0f ms after the kill\n",
                      round, old, acq_ms, pids[0], pids[1], failed, refill < 0 ? -1.0 : pbt_now_ms() - t_kill);
        assert_int_equal(failed, 0);
        assert_true(refill >= 0);
        pbt_sleep_ms(300);
    }
    long long connects1 = pbt_pool_counter(e, "kill", "connects");
    print_message("pg idle kill: pool 'kill' made %lld new connections for 4 killed\n", connects1 - connects0);
}

/* 1b. The same with no delay at all: kill through a lease of the admin
 * pool, lease at once.  Reported; the assertion is only that a
 * failure is a clean error and costs one lease per killed connection at
 * most. */
static void test_pg_idle_kill_then_lease_0ms(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = pbt_cli(e);
    pb_lease *admin = pbt_lease(c, "admin", 10000);
    int rounds = 5, first_failed = 0;
    for (int round = 0; round < rounds; round++) {
        if (pbt_wait_pg_count(e, "pblife", 2, 10000) < 0)
            fail_msg("pool 'kill' did not get back to 2 connections");
        pbt_sleep_ms(300);
        int killed = pbt_pg_lease_terminate(admin, "pblife");
        double t0 = pbt_now_ms();
        pb_lease *l = NULL;
        int rc = pb_acquire(c, "kill", 5000, &l);
        char how[256];
        int pid = 0;
        if (rc == PB_OK)
            pid = pbt_pg_first_command(l, how, sizeof how);
        else
            snprintf(how, sizeof how, "pb_acquire -> %s", pb_strerror(rc));
        double dt = pbt_now_ms() - t0;
        if (pid == 0)
            first_failed++;
        print_message("pg idle kill, lease at once (round %d, %d killed): first command %s after %.2f ms\n", round,
                      killed, how, dt);
        if (l != NULL)
            pb_release(l);
        /* Whatever went wrong, each killed connection costs at most one
         * failed first command: the next leases (one per other killed
         * connection, which the broker may not have seen close yet, plus one)
         * reach a working connection. */
        for (int retry = 1; pid == 0; retry++) {
            l = pbt_lease(c, "kill", 5000);
            pid = pbt_pg_first_command(l, how, sizeof how);
            pb_release(l);
            if (pid == 0 && retry >= killed)
                fail_msg("%d leases after a failed first command failed too: %s", retry, how);
        }
    }
    assert_int_equal(pb_release(admin), PB_OK);
    pbt_cli_done(c);
    print_message("pg idle kill, lease at once: first command failed in %d of %d rounds\n", first_failed, rounds);
}

/* 2. Asynchronous messages on an idle pooled connection are legal
 * ("Asynchronous Operations" in the protocol docs) and absorbed, not taken
 * for a dead connection.  The pool "listen" resets each connection with
 * LISTEN pbidle, so its idle connection listens; a NOTIFY then sends it a
 * NotificationResponse nobody asked for.  The connection survives (same
 * backend pid on the next lease), nothing is closed.  (PostgreSQL 15 sends
 * a ParameterStatus for a setting changed by pg_reload_conf() with the
 * session's next command, not to an idle session: the broker absorbs it
 * there the same way.) */
static void test_pg_idle_notification(void **state)
{
    (void)state;
    th_env *e = &env_pg;
    pb_client *c = pbt_cli(e);
    pb_lease *l = pbt_lease(c, "listen", 10000);
    int pid = (int)pbt_pg_int(l, "SELECT pg_backend_pid()");
    assert_int_equal(pb_release(l), PB_OK);     /* the reset: LISTEN pbidle */
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE pid = %d AND state = 'idle'", pid);
    for (int i = 0; i < 100 && pbt_psql_int(e, sql) != 1; i++)
        pbt_sleep_ms(50);               /* the reset is through */
    pbt_sleep_ms(200);                  /* the idle watch is armed */
    long closed = th_count_lines(e->broker_log, "on an idle connection (message type");
    long absorbed = th_count_lines(e->broker_log, "absorbed on an idle connection");
    for (int i = 0; i < 3; i++)
        assert_int_equal(th_psql(e, "NOTIFY pbidle, 'hello'", NULL, 0), 0);
    assert_int_equal(th_wait_log(e, "absorbed on an idle connection", absorbed + 1, 5000), 0);
    pbt_sleep_ms(300);
    assert_int_equal(th_count_lines(e->broker_log, "on an idle connection (message type"), closed);
    l = pbt_lease(c, "listen", 10000);
    assert_int_equal(pbt_pg_int(l, "SELECT pg_backend_pid()"), pid);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

#define REDIS_POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "\n" \
    "[pool rkill]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 2\n" \
    "max_size = 2\n" \
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

/* 1 (Redis). CLIENT KILL of idle pooled connections: 200 ms later, the
 * first command of each lease works. */
static void test_redis_idle_kill_then_lease_200ms(void **state)
{
    (void)state;
    th_env *e = &env_redis;
    static const char *const how_kill[2] = { "CLIENT KILL TYPE normal", "CLIENT KILL ID (each)" };
    for (int round = 0; round < 2; round++) {
        assert_true(pbt_wait_redis_count(e, "rkill", 2, 10000) >= 0);
        pbt_sleep_ms(300);
        long long ids[16];
        int n = pbt_redis_ids(e, "rkill", ids, 16);
        assert_int_equal(n, 2);
        char out[256];
        if (round == 0) {
            assert_int_equal(th_redis_cli(e, "CLIENT KILL TYPE normal", out, sizeof out), 0);
            assert_true(atoi(out) >= 2);
        } else {
            for (int i = 0; i < n; i++) {
                char cmd[64];
                snprintf(cmd, sizeof cmd, "CLIENT KILL ID %lld", ids[i]);
                assert_int_equal(th_redis_cli(e, cmd, out, sizeof out), 0);
                assert_string_equal(out, "1");
            }
        }
        double t_kill = pbt_now_ms();
        pbt_sleep_ms(200);
        pb_client *c = pbt_cli(e);
        pb_lease *l[2];
        int failed = 0;
        long long newid[2];
        for (int i = 0; i < 2; i++) {
            l[i] = pbt_lease(c, "rkill", 5000);
            newid[i] = pb_lease_backend_pid(l[i]);
            char how[256];
            if (!pbt_redis_first_command(l[i], how, sizeof how) || newid[i] == ids[0] || newid[i] == ids[1]) {
                failed++;
                print_message("redis %s: lease %d (client id %lld): first command %s\n", how_kill[round], i,
                              newid[i], how);
            }
        }
        for (int i = 0; i < 2; i++)
            assert_int_equal(pb_release(l[i]), PB_OK);
        pbt_cli_done(c);
        double refill = pbt_wait_redis_count(e, "rkill", 2, 10000);
        print_message("redis %s: killed ids %lld,%lld; 200 ms later leases on ids %lld,%lld, %d failed first "
                      "commands; 2 connections again %.0f ms after the kill\n",
                      how_kill[round], ids[0], ids[1], newid[0], newid[1], failed,
                      refill < 0 ? -1.0 : pbt_now_ms() - t_kill);
        assert_int_equal(failed, 0);
    }
}

/* 1b (Redis). Kill and lease at once (hiredis, no process spawn): reported. */
static void test_redis_idle_kill_then_lease_0ms(void **state)
{
    (void)state;
    th_env *e = &env_redis;
    redisContext *admin = redisConnect("127.0.0.1", e->redis_port);
    if (admin == NULL || admin->err)
        fail_msg("hiredis connect: %s", admin ? admin->errstr : "oom");
    pb_client *c = pbt_cli(e);
    int rounds = 5, failed = 0;
    for (int round = 0; round < rounds; round++) {
        if (pbt_wait_redis_count(e, "rkill", 2, 10000) < 0) {
            redisFree(admin);
            fail_msg("pool 'rkill' did not get back to 2 connections");
        }
        pbt_sleep_ms(300);
        redisReply *lst = redisCommand(admin, "CLIENT LIST");
        long long ids[16];
        int n = lst && lst->type == REDIS_REPLY_STRING ? pbt_redis_ids_in(lst->str, "rkill", ids, 16) : 0;
        if (lst)
            freeReplyObject(lst);
        int killed = 0;
        for (int i = 0; i < n; i++) {
            redisReply *k = redisCommand(admin, "CLIENT KILL ID %lld", ids[i]);
            if (k && k->type == REDIS_REPLY_INTEGER)
                killed += (int)k->integer;
            if (k)
                freeReplyObject(k);
        }
        double t0 = pbt_now_ms();
        pb_lease *l = NULL;
        int rc = pb_acquire(c, "rkill", 5000, &l);
        char how[256];
        int ok = 0;
        if (rc == PB_OK)
            ok = pbt_redis_first_command(l, how, sizeof how);
        else
            snprintf(how, sizeof how, "pb_acquire -> %s", pb_strerror(rc));
        double dt = pbt_now_ms() - t0;
        if (l)
            pb_release(l);
        if (!ok) {
            failed++;
            /* As for PostgreSQL: at most one failed first command per killed
             * connection. */
            for (int retry = 1, ok2 = 0; !ok2; retry++) {
                l = pbt_lease(c, "rkill", 5000);
                char how2[256];
                ok2 = pbt_redis_first_command(l, how2, sizeof how2);
                pb_release(l);
                if (!ok2 && retry >= killed) {
                    redisFree(admin);
                    fail_msg("%d leases after a failed first command failed too: %s", retry, how2);
                }
            }
        }
        print_message("redis idle kill, lease at once (round %d, %d killed): first command %s after %.2f ms\n",
                      round, killed, how, dt);
    }
    redisFree(admin);
    pbt_cli_done(c);
    print_message("redis idle kill, lease at once: first command failed in %d of %d rounds\n", failed, rounds);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_idle_kill_then_lease_200ms),
        T(test_pg_idle_kill_then_lease_0ms),
        T(test_pg_idle_notification),
    };
    const struct CMUnitTest redis_tests[] = {
        T(test_redis_idle_kill_then_lease_200ms),
        T(test_redis_idle_kill_then_lease_0ms),
    };
    int failed = cmocka_run_group_tests_name("idle_kill_pg", pg_tests, pg_group_setup, pg_group_teardown);
    failed += cmocka_run_group_tests_name("idle_kill_redis", redis_tests, redis_group_setup, redis_group_teardown);
    return failed;
}
