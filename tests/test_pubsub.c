/*
 * test_pubsub.c — Redis Pub/Sub through a lease (issue #18): after
 * SUBSCRIBE, PSUBSCRIBE or SSUBSCRIBE, pb_redis_get_message delivers
 * messages as they arrive, in order, including those that came while other
 * commands ran; it times out when none comes and says PB_EINVAL once
 * nothing is subscribed; the release unsubscribes, so the next holder of
 * the same connection hears nothing and is not in subscribed mode; the
 * broker counts replies right all along (no protocol error, no lost reply).
 *
 * One group: its own Redis and broker.  Pool "sub" has one connection (the
 * next lease is the same connection); pool "pub" publishes.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

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
    "[pool sub]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\nmin_size = 1\nmax_size = 1\n\n" \
    "[pool pub]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\nmax_size = 2\n"

static int group_setup(void **state)
{
    (void)state;
    return pbt_group_start(&env, 0, 1, POOLS);
}

static int group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&env);
}

/* Run a command on l and check the reply's type; returns the reply. */
static redisReply *cmd(pb_lease *l, int type, const char *fmt, const char *a, const char *b)
{
    redisReply *r = NULL;
    int rc = pb_redis_command(l, &r, fmt, a, b);
    if (rc != PB_OK)
        fail_msg("%s: %s", fmt, pb_strerror(rc));
    if (r->type != type)
        fail_msg("%s: reply type %d (%s), not %d", fmt, r->type, r->str ? r->str : "", type);
    return r;
}

static void publish(pb_client *c, const char *how, const char *channel, const char *msg)
{
    pb_lease *l = pbt_lease(c, "pub", 5000);
    char fmt[32];
    snprintf(fmt, sizeof fmt, "%s %%s %%s", how);
    freeReplyObject(cmd(l, REDIS_REPLY_INTEGER, fmt, channel, msg));
    assert_int_equal(pb_release(l), PB_OK);
}

/* The next message is [kind, (pattern,) channel, payload]. */
static void expect_message(pb_lease *l, int timeout_ms, const char *kind, const char *pattern, const char *channel,
                           const char *payload)
{
    redisReply *m = NULL;
    int rc = pb_redis_get_message(l, timeout_ms, &m);
    if (rc != PB_OK)
        fail_msg("pb_redis_get_message waiting for %s on %s: %s", payload, channel, pb_strerror(rc));
    size_t at = pattern ? 1 : 0;
    assert_int_equal(m->type, REDIS_REPLY_ARRAY);
    assert_int_equal(m->elements, 3 + at);
    assert_string_equal(m->element[0]->str, kind);
    if (pattern)
        assert_string_equal(m->element[1]->str, pattern);
    assert_string_equal(m->element[1 + at]->str, channel);
    assert_string_equal(m->element[2 + at]->str, payload);
    freeReplyObject(m);
}

/* SUBSCRIBE two channels; a message published before and one published
 * while we wait; none more: PB_ETIMEDOUT; PSUBSCRIBE and SSUBSCRIBE too. */
static void test_messages_arrive(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "sub", 5000);
    redisReply *m = NULL;
    assert_int_equal(pb_redis_get_message(l, 0, &m), PB_EINVAL);     /* nothing subscribed */
    redisReply *r = cmd(l, REDIS_REPLY_ARRAY, "SUBSCRIBE %s %s", "news", "sport");
    assert_string_equal(r->element[0]->str, "subscribe");
    assert_int_equal(r->element[2]->integer, 1);
    freeReplyObject(r);
    assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);             /* one reply per channel */
    assert_int_equal(r->element[2]->integer, 2);
    freeReplyObject(r);
    assert_int_equal(pb_redis_get_message(l, 0, &m), PB_ETIMEDOUT);

    publish(c, "PUBLISH", "news", "first");
    expect_message(l, 5000, "message", NULL, "news", "first");
    /* A message published while we wait (from a child, 200 ms on). */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        usleep(200000);
        pb_client *cc = NULL;
        int ok = pb_connect(env.sock_path, &cc) == PB_OK;
        pb_lease *pl = NULL;
        redisReply *pr = NULL;
        ok = ok && pb_acquire(cc, "pub", 5000, &pl) == PB_OK &&
             pb_redis_command(pl, &pr, "PUBLISH sport %s", "later") == PB_OK && pr->integer == 1;
        _exit(ok ? 0 : 1);
    }
    pbt_track_child(pid);
    expect_message(l, 10000, "message", NULL, "sport", "later");
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    pbt_untrack_child(pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    assert_int_equal(pb_redis_get_message(l, 100, &m), PB_ETIMEDOUT);

    /* Patterns and shard channels. */
    freeReplyObject(cmd(l, REDIS_REPLY_ARRAY, "PSUBSCRIBE %s", "ev.*", NULL));
    freeReplyObject(cmd(l, REDIS_REPLY_ARRAY, "SSUBSCRIBE %s", "shard1", NULL));
    publish(c, "PUBLISH", "ev.login", "alice");
    publish(c, "SPUBLISH", "shard1", "s-payload");
    expect_message(l, 5000, "pmessage", "ev.*", "ev.login", "alice");
    expect_message(l, 5000, "smessage", NULL, "shard1", "s-payload");
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

/* Messages that arrive while other commands run are kept, in order, and
 * the commands get their own replies; after the last UNSUBSCRIBE the lease
 * is an ordinary one again. */
static void test_messages_during_commands(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "sub", 5000);
    freeReplyObject(cmd(l, REDIS_REPLY_ARRAY, "SUBSCRIBE %s", "q", NULL));
    char payload[32];
    for (int i = 0; i < 500; i++) {
        snprintf(payload, sizeof payload, "m%d", i);
        publish(c, "PUBLISH", "q", payload);
    }
    /* Commands a subscribed connection may run, with messages queued ahead
     * of their replies. */
    redisReply *r = cmd(l, REDIS_REPLY_ARRAY, "PING", NULL, NULL);
    assert_string_equal(r->element[0]->str, "pong");
    freeReplyObject(r);
    r = cmd(l, REDIS_REPLY_ARRAY, "SUBSCRIBE %s", "other", NULL);
    assert_string_equal(r->element[0]->str, "subscribe");
    assert_int_equal(r->element[2]->integer, 2);
    freeReplyObject(r);
    for (int i = 0; i < 500; i++) {
        snprintf(payload, sizeof payload, "m%d", i);
        expect_message(l, 5000, "message", NULL, "q", payload);
    }
    /* Unsubscribed from everything: nothing will come, commands work. */
    r = cmd(l, REDIS_REPLY_ARRAY, "UNSUBSCRIBE %s %s", "q", "other");
    freeReplyObject(r);
    assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
    assert_int_equal(r->element[2]->integer, 0);
    freeReplyObject(r);
    redisReply *m = NULL;
    assert_int_equal(pb_redis_get_message(l, 0, &m), PB_EINVAL);
    /* A list shaped like a message is a reply now. */
    freeReplyObject(cmd(l, REDIS_REPLY_INTEGER, "RPUSH looks-like %s %s", "message", "x"));
    freeReplyObject(cmd(l, REDIS_REPLY_INTEGER, "RPUSH looks-like %s", "y", NULL));
    r = cmd(l, REDIS_REPLY_ARRAY, "LRANGE looks-like 0 -1", NULL, NULL);
    assert_int_equal(r->elements, 3);
    freeReplyObject(r);
    freeReplyObject(cmd(l, REDIS_REPLY_INTEGER, "DEL looks-like", NULL, NULL));
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

/* Released while subscribed, with messages still being published: the next
 * holder (the same connection: max_size 1) is not subscribed and hears
 * nothing; the server counts no subscriber. */
static void test_release_unsubscribes(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "sub", 5000);
    int pid1 = pb_lease_backend_pid(l);
    freeReplyObject(cmd(l, REDIS_REPLY_ARRAY, "SUBSCRIBE %s", "gone", NULL));
    freeReplyObject(cmd(l, REDIS_REPLY_ARRAY, "PSUBSCRIBE %s", "go*", NULL));
    for (int i = 0; i < 50; i++)
        publish(c, "PUBLISH", "gone", "unread");
    assert_int_equal(pb_release(l), PB_OK);
    for (int i = 0; i < 50; i++)
        publish(c, "PUBLISH", "gone", "after");

    l = pbt_lease(c, "sub", 5000);
    assert_int_equal(pb_lease_backend_pid(l), pid1);
    redisReply *r = cmd(l, REDIS_REPLY_STATUS, "PING", NULL, NULL);          /* not a subscribed "pong" */
    assert_string_equal(r->str, "PONG");
    freeReplyObject(r);
    r = cmd(l, REDIS_REPLY_STRING, "CLIENT INFO", NULL, NULL);
    if (!strstr(r->str, " sub=0 ") || !strstr(r->str, " psub=0 "))
        fail_msg("still subscribed: %s", r->str);
    freeReplyObject(r);
    redisReply *m = NULL;
    assert_int_equal(pb_redis_get_message(l, 0, &m), PB_EINVAL);
    assert_int_equal(pb_release(l), PB_OK);

    pb_lease *p = pbt_lease(c, "pub", 5000);
    r = cmd(p, REDIS_REPLY_ARRAY, "PUBSUB NUMSUB %s", "gone", NULL);
    assert_int_equal(r->element[1]->integer, 0);
    freeReplyObject(r);
    assert_int_equal(pb_release(p), PB_OK);
    /* No protocol error or broken connection on the broker's side. */
    assert_int_equal(th_count_lines(env.broker_log, "protocol error"), 0);
    pbt_cli_done(c);
}

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_messages_arrive, pbt_cleanup),
        cmocka_unit_test_teardown(test_messages_during_commands, pbt_cleanup),
        cmocka_unit_test_teardown(test_release_unsubscribes, pbt_cleanup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
