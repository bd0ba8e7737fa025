/*
 * test_redis_session.c — what one lease leaves on a Redis connection never
 * reaches the next holder (#18), and commands the broker refuses by policy
 * get an error reply naming them, in order, with the lease still usable.
 *
 * The pool has max_size = 1, so the next lease is the same backend (checked
 * with CLIENT ID); each state is looked at from that next lease.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define POOLS \
    "[pool one]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 10000\n"

static int group_setup(void **state)
{
    (void)state;
    char out[256];
    if (th_setup(&env, 0, 1) < 0)
        return -1;
    if (th_redis_cli(&env, "ACL SETUSER other on >other-pass ~* &* +@all", out, sizeof out) != 0 ||
        strstr(out, "OK") == NULL)
        return -1;
    return th_broker_start(&env, POOLS) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

/* Run a command given as argv words separated by spaces (no %-formatting). */
static redisReply *run(pb_lease *l, const char *line)
{
    redisReply *r = NULL;
    int rc = pb_redis_command(l, &r, line);
    if (rc != PB_OK)
        fail_msg("%s: %s", line, pb_strerror(rc));
    return r;
}

static long long client_id(pb_lease *l)
{
    redisReply *r = run(l, "CLIENT ID");
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    long long id = r->integer;
    freeReplyObject(r);
    return id;
}

/* The value of field in this connection's CLIENT INFO ("flags", "db", ...). */
static void info_field(pb_lease *l, const char *field, char *val, size_t n)
{
    redisReply *r = run(l, "CLIENT INFO");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    char key[64];
    snprintf(key, sizeof key, " %s=", field);
    const char *p = strstr(r->str, key);
    if (!p)
        fail_msg("CLIENT INFO has no %s: %s", field, r->str);
    p += strlen(key);
    size_t k = strcspn(p, " \r\n");
    snprintf(val, n, "%.*s", (int)(k < n ? k : n - 1), p);
    freeReplyObject(r);
}

static long long reset_calls(void)
{
    char out[8192];
    if (th_redis_cli(&env, "INFO commandstats", out, sizeof out) != 0)
        return -1;
    const char *p = strstr(out, "cmdstat_reset:calls=");
    return p ? atoll(p + strlen("cmdstat_reset:calls=")) : 0;
}

/* One lease runs the commands in setup (separated by ';'), the next lease of
 * the same connection checks CLIENT INFO's field. */
static void leaves_nothing(const char *setup, const char *field, const char *want)
{
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "one", 10000);
    long long id = client_id(l);
    char buf[512], val[256];
    snprintf(buf, sizeof buf, "%s", setup);
    for (char *save = NULL, *s = strtok_r(buf, ";", &save); s; s = strtok_r(NULL, ";", &save))
        freeReplyObject(run(l, s));
    assert_int_equal(pb_release(l), PB_OK);
    l = pbt_lease(c, "one", 10000);
    assert_int_equal(client_id(l), id);
    info_field(l, field, val, sizeof val);
    if (strcmp(val, want) != 0)
        fail_msg("after '%s': %s=%s, want %s", setup, field, val, want);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

static void test_no_evict(void **state)
{
    (void)state;
    long long before = reset_calls();
    leaves_nothing("CLIENT NO-EVICT on", "flags", "N");
    assert_int_equal(reset_calls(), before);    /* undone by CLIENT NO-EVICT off alone */
}

static void test_select(void **state)
{
    (void)state;
    leaves_nothing("SELECT 5", "db", "0");
}

static void test_setname(void **state)
{
    (void)state;
    leaves_nothing("CLIENT SETNAME mine", "name", "poolbroker:one");
    leaves_nothing("HELLO 2 SETNAME mine2", "name", "poolbroker:one");
}

static void test_multi_left_open(void **state)
{
    (void)state;
    leaves_nothing("MULTI;SET k v", "multi", "-1");
}

static void test_subscribe(void **state)
{
    (void)state;
    leaves_nothing("SUBSCRIBE ch1", "sub", "0");
    leaves_nothing("PSUBSCRIBE p*", "psub", "0");
}

static void test_tracking(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "one", 10000);
    char line[96];
    snprintf(line, sizeof line, "CLIENT TRACKING on REDIRECT %lld BCAST", client_id(l));
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
    leaves_nothing(line, "flags", "N");
}

static void test_auth_user(void **state)
{
    (void)state;
    leaves_nothing("AUTH other other-pass", "user", "default");
}

static void test_everything_at_once(void **state)
{
    (void)state;
    leaves_nothing("SELECT 2;CLIENT NO-EVICT on;CLIENT SETNAME x;SUBSCRIBE a", "flags", "N");
}

/* WATCH: the next holder's transaction must not fail for a key it never watched. */
static void test_watch(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "one", 10000);
    long long id = client_id(l);
    freeReplyObject(run(l, "WATCH watched"));
    assert_int_equal(pb_release(l), PB_OK);
    char out[64];
    assert_int_equal(th_redis_cli(&env, "SET watched changed", out, sizeof out), 0);
    l = pbt_lease(c, "one", 10000);
    assert_int_equal(client_id(l), id);
    freeReplyObject(run(l, "MULTI"));
    freeReplyObject(run(l, "SET other 1"));
    redisReply *r = run(l, "EXEC");
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);  /* nil if the WATCH survived */
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

/* CLIENT NO-TOUCH (7.2+) is undone explicitly; on 7.0 both it and its undo
 * are error replies, which must not cost the connection. */
static void test_no_touch(void **state)
{
    (void)state;
    leaves_nothing("CLIENT NO-TOUCH on", "flags", "N");
}

/* CLIENT SETINFO (7.2+): RESET keeps lib-name/lib-ver, so the connection is
 * retired: the next lease gets a new one. */
static void test_setinfo_retires(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "one", 10000);
    long long id = client_id(l);
    freeReplyObject(run(l, "CLIENT SETINFO lib-name mylib"));
    assert_int_equal(pb_release(l), PB_OK);
    l = pbt_lease(c, "one", 10000);
    assert_true(client_id(l) != id);
    char val[64];
    info_field(l, "name", val, sizeof val);
    assert_string_equal(val, "poolbroker:one");
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

/* Clean leases cost no RESET; the NO-EVICT undo alone is no RESET either. */
static void test_clean_is_free(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    long long before = reset_calls();
    for (int i = 0; i < 5; i++) {
        pb_lease *l = pbt_lease(c, "one", 10000);
        freeReplyObject(run(l, "SET clean 1"));
        freeReplyObject(run(l, "CLIENT INFO"));
        freeReplyObject(run(l, "GET clean"));
        assert_int_equal(pb_release(l), PB_OK);
    }
    assert_int_equal(reset_calls(), before);
    pbt_cli_done(c);
}

/* segment_repairs from shmstat --json (the broker-wide counter). */
static long long repairs(void)
{
    static char json[1 << 20];
    if (pbt_shmstat_json(&env, json, sizeof json) != 0)
        return -1;
    const char *p = strstr(json, "\"segment_repairs\": ");
    return p ? atoll(p + strlen("\"segment_repairs\": ")) : -1;
}

/* Commands the broker refuses by policy, each between two valid commands of
 * one pipeline: the valid ones are answered, the refused one gets an error
 * reply naming it, the lease goes on, and nothing is logged as malformed. */
static void test_refusals_in_pipeline(void **state)
{
    (void)state;
    static const char *const refused[][4] = {
        { "MONITOR", NULL, NULL, "MONITOR" },
        { "SYNC", NULL, NULL, "SYNC" },
        { "PSYNC", "?", "-1", "PSYNC" },
        { "SHUTDOWN", "NOSAVE", NULL, "SHUTDOWN" },
        { "shutdown", NULL, NULL, "SHUTDOWN" },
        { "QUIT", NULL, NULL, "QUIT" },
        { "CLIENT", "PAUSE", "100000", "CLIENT PAUSE" },
        { "HELLO", "3", NULL, "HELLO" },
        { "UNSUBSCRIBE", NULL, NULL, "UNSUBSCRIBE" },
        { "PUNSUBSCRIBE", NULL, NULL, "PUNSUBSCRIBE" },
        { "SUNSUBSCRIBE", NULL, NULL, "SUNSUBSCRIBE" },
    };
    long long rep0 = repairs();
    long malformed0 = th_count_lines(env.broker_log, "malformed");
    assert_true(rep0 >= 0);
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "one", 10000);
    long long id = client_id(l);
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        int argc = refused[i][1] ? (refused[i][2] ? 3 : 2) : 1;
        assert_int_equal(pb_redis_append_command(l, "SET before %d", (int)i), PB_OK);
        assert_int_equal(pb_redis_append_command_argv(l, argc, (const char **)refused[i], NULL), PB_OK);
        assert_int_equal(pb_redis_append_command(l, "GET before"), PB_OK);
        redisReply *r = NULL;
        assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
        assert_int_equal(r->type, REDIS_REPLY_STATUS);
        freeReplyObject(r);
        assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
        assert_int_equal(r->type, REDIS_REPLY_ERROR);
        char want[64];
        snprintf(want, sizeof want, "poolbroker: %s", refused[i][3]);
        if (!strstr(r->str, want) || !strstr(r->str, "not allowed"))
            fail_msg("%s: error reply '%s' does not name it", refused[i][0], r->str);
        freeReplyObject(r);
        assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
        assert_int_equal(r->type, REDIS_REPLY_STRING);
        assert_int_equal(atoi(r->str), (int)i);
        freeReplyObject(r);
    }
    /* A lone refusal through pb_redis_command, and the lease goes on. */
    redisReply *r = run(l, "MONITOR");
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "MONITOR"));
    freeReplyObject(r);
    r = run(l, "PING");
    assert_string_equal(r->str, "PONG");
    freeReplyObject(r);
    assert_int_equal(client_id(l), id);
    assert_int_equal(pb_release(l), PB_OK);
    /* The server is up and unpaused, the connection was kept. */
    l = pbt_lease(c, "one", 10000);
    assert_int_equal(client_id(l), id);
    assert_int_equal(pb_release(l), PB_OK);
    char out[64];
    assert_int_equal(th_redis_cli(&env, "PING", out, sizeof out), 0);
    assert_non_null(strstr(out, "PONG"));
    assert_int_equal(repairs(), rep0);
    assert_int_equal(th_count_lines(env.broker_log, "malformed"), malformed0);
    assert_true(th_count_lines(env.broker_log, "refused by policy") > 0);
    pbt_cli_done(c);
}

/* Inside MULTI a refusal aborts the transaction, as Redis's own refusals do. */
static void test_refusal_in_multi(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "one", 10000);
    freeReplyObject(run(l, "MULTI"));
    freeReplyObject(run(l, "SET inmulti 1"));
    redisReply *r = run(l, "MONITOR");
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "poolbroker: MONITOR"));
    freeReplyObject(r);
    r = run(l, "EXEC");
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "EXECABORT"));
    freeReplyObject(r);
    r = run(l, "PING");
    assert_string_equal(r->str, "PONG");
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_no_evict, pbt_cleanup),
        cmocka_unit_test_teardown(test_select, pbt_cleanup),
        cmocka_unit_test_teardown(test_setname, pbt_cleanup),
        cmocka_unit_test_teardown(test_multi_left_open, pbt_cleanup),
        cmocka_unit_test_teardown(test_subscribe, pbt_cleanup),
        cmocka_unit_test_teardown(test_tracking, pbt_cleanup),
        cmocka_unit_test_teardown(test_auth_user, pbt_cleanup),
        cmocka_unit_test_teardown(test_everything_at_once, pbt_cleanup),
        cmocka_unit_test_teardown(test_watch, pbt_cleanup),
        cmocka_unit_test_teardown(test_no_touch, pbt_cleanup),
        cmocka_unit_test_teardown(test_setinfo_retires, pbt_cleanup),
        cmocka_unit_test_teardown(test_clean_is_free, pbt_cleanup),
        cmocka_unit_test_teardown(test_refusals_in_pipeline, pbt_cleanup),
        cmocka_unit_test_teardown(test_refusal_in_multi, pbt_cleanup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
