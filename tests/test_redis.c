/*
 * test_redis.c — Redis pools through the broker, on a real redis-server
 * started by the harness (and a PostgreSQL, for the type checks).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define POOLS \
    "[pool cache]\n" \
    "type = redis\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 1\n" \
    "max_size = 4\n" \
    "acquire_timeout_ms = 20000\n" \
    "request_buffer = 2m\n" \
    "\n" \
    "[pool small]\n" \
    "type = redis\n" \
    "unix_socket = @REDISSOCK@\n" \
    "max_size = 1\n" \
    "request_buffer = 16k\n" \
    "reply_buffer = 64k\n" \
    "command_timeout_ms = 500\n" \
    "\n" \
    "[pool ring64k]\n" \
    "type = redis\n" \
    "unix_socket = @REDISSOCK@\n" \
    "max_size = 1\n" \
    "request_buffer = 16k\n" \
    "reply_buffer = 64k\n" \
    "\n" \
    "[pool db3]\n" \
    "type = redis\n" \
    "port = @REDISPORT@\n" \
    "db = 3\n" \
    "max_size = 1\n" \
    "\n" \
    "[pool authed]\n" \
    "type = redis\n" \
    "port = @REDISPORT@\n" \
    "user = pbuser\n" \
    "password_file = @DIR@/redis.pass\n" \
    "max_size = 1\n" \
    "\n" \
    "[pool pg]\n" \
    "type = postgres\n" \
    "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable\n" \
    "max_size = 1\n"

static int group_setup(void **state)
{
    (void)state;
    char out[256], path[512];
    if (th_setup(&env, 1, 1) < 0)
        return -1;
    /* An ACL user with a password, for the password_file pool. */
    if (th_redis_cli(&env, "ACL SETUSER pbuser on >s3cret-pass ~* &* +@all", out, sizeof out) != 0 ||
        strstr(out, "OK") == NULL)
        return -1;
    snprintf(path, sizeof path, "%s/redis.pass", env.dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, "s3cret-pass\n", 12) != 12)
        return -1;
    close(fd);
    return th_broker_start(&env, POOLS) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

static pb_lease *lease(pb_client *c, const char *pool)
{
    pb_lease *l = NULL;
    int rc = pb_acquire(c, pool, 10000, &l);
    if (rc != PB_OK)
        fail_msg("pb_acquire %s: %s", pool, pb_strerror(rc));
    return l;
}

/* Run a command, expect a status/string reply equal to want (or any if NULL). */
static redisReply *cmd_ok(pb_lease *l, const char *fmt, const char *arg)
{
    redisReply *r = NULL;
    int rc = arg ? pb_redis_command(l, &r, fmt, arg) : pb_redis_command(l, &r, fmt);
    if (rc != PB_OK)
        fail_msg("%s: %s", fmt, pb_strerror(rc));
    return r;
}

static void expect_str(pb_lease *l, const char *cmd, const char *want)
{
    redisReply *r = cmd_ok(l, cmd, NULL);
    if (!r->str || strcmp(r->str, want) != 0)
        fail_msg("%s: got type %d '%s', want '%s'", cmd, r->type, r->str ? r->str : "", want);
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

static void test_basic_and_errors(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l = lease(c, "cache");
    expect_str(l, "PING", "PONG");
    redisReply *r = cmd_ok(l, "SET %s hello", "k1");
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    r = cmd_ok(l, "GET %s", "k1");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, "hello");
    freeReplyObject(r);
    r = cmd_ok(l, "GET %s", "missing-key");
    assert_int_equal(r->type, REDIS_REPLY_NIL);
    freeReplyObject(r);
    /* An error reply is a reply, and the lease stays usable. */
    r = cmd_ok(l, "INCR %s", "k1");
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "not an integer"));
    freeReplyObject(r);
    r = cmd_ok(l, "NOSUCHCOMMAND", NULL);
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    freeReplyObject(r);
    /* Arrays, binary-safe argv. */
    const char *argv[] = { "RPUSH", "list1", "a", "b\0c" };
    size_t lens[] = { 5, 5, 1, 3 };
    assert_int_equal(pb_redis_command_argv(l, 4, argv, lens, &r), PB_OK);
    assert_int_equal(r->integer, 2);
    freeReplyObject(r);
    r = cmd_ok(l, "LRANGE %s 0 -1", "list1");
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->elements, 2);
    assert_int_equal(r->element[1]->len, 3);
    assert_memory_equal(r->element[1]->str, "b\0c", 3);
    freeReplyObject(r);
    assert_true(pb_lease_backend_pid(l) > 0);   /* CLIENT ID */
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_type_mismatch(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l = lease(c, "cache");
    pb_result *res = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &res), PB_ETYPE);
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "pg");
    redisReply *r = NULL;
    assert_int_equal(pb_redis_command(l, &r, "PING"), PB_ETYPE);
    assert_int_equal(pb_redis_append_command(l, "PING"), PB_ETYPE);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_pipeline_10000(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l = lease(c, "small");        /* 16k request buffer, 64k ring */
    char key[32];
    for (int i = 0; i < 10000; i++) {
        snprintf(key, sizeof key, "p:%d", i);
        assert_int_equal(pb_redis_append_command(l, "SET %s %d", key, i), PB_OK);
    }
    for (int i = 0; i < 10000; i++) {
        redisReply *r = NULL;
        assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
        assert_int_equal(r->type, REDIS_REPLY_STATUS);
        freeReplyObject(r);
    }
    for (int i = 0; i < 10000; i++) {
        snprintf(key, sizeof key, "p:%d", i);
        assert_int_equal(pb_redis_append_command(l, "GET %s", key), PB_OK);
    }
    for (int i = 0; i < 10000; i++) {
        redisReply *r = NULL;
        assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
        assert_int_equal(atoi(r->str), i);
        freeReplyObject(r);
    }
    redisReply *r = NULL;
    assert_int_equal(pb_redis_get_reply(l, &r), PB_EINVAL);   /* nothing asked */
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_big_value_small_ring(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l = lease(c, "cache");
    size_t n = 16u << 20;
    char *big = malloc(n);
    for (size_t i = 0; i < n; i++)
        big[i] = (char)('a' + i % 26);
    redisReply *r = NULL;
    /* Written through the 16k request buffer of ring64k: 16 MB streams
     * through it in parts (#18).  (Pool ring64k has small buffers and no
     * command_timeout_ms: 256 ring refills, each waiting for this process to
     * drain, must not race a timer on a loaded machine.) */
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "ring64k");
    assert_int_equal(pb_redis_command(l, &r, "SET big %b", big, n), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    /* Read it back through the 64 KiB reply ring. */
    l = lease(c, "ring64k");
    assert_int_equal(pb_redis_command(l, &r, "GET big"), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_int_equal(r->len, n);
    assert_memory_equal(r->str, big, n);
    freeReplyObject(r);
    expect_str(l, "PING", "PONG");          /* still in step */
    assert_int_equal(pb_release(l), PB_OK);
    free(big);
    pb_disconnect(c);
}

static void test_no_state_leaks(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    pb_lease *l;
    redisReply *r;

    /* Clean leases cost no RESET. */
    long long before = reset_calls();
    for (int i = 0; i < 50; i++) {
        l = lease(c, "small");
        r = cmd_ok(l, "SET %s v", "clean");
        freeReplyObject(r);
        assert_int_equal(pb_release(l), PB_OK);
    }
    assert_int_equal(reset_calls(), before);

    /* SELECT */
    l = lease(c, "small");
    expect_str(l, "SELECT 5", "OK");
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(reset_calls(), before + 1);
    l = lease(c, "small");
    r = cmd_ok(l, "CLIENT INFO", NULL);
    assert_non_null(strstr(r->str, " db=0 "));
    assert_non_null(strstr(r->str, "name=poolbroker:small"));
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);

    /* MULTI without EXEC */
    l = lease(c, "small");
    expect_str(l, "MULTI", "OK");
    expect_str(l, "SET multi 1", "QUEUED");
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "small");
    expect_str(l, "SET multi 2", "OK");             /* not QUEUED */
    assert_int_equal(pb_release(l), PB_OK);

    /* WATCH */
    l = lease(c, "small");
    expect_str(l, "WATCH watched", "OK");
    assert_int_equal(pb_release(l), PB_OK);
    char out[256];
    th_redis_cli(&env, "SET watched changed", out, sizeof out);
    l = lease(c, "small");
    expect_str(l, "MULTI", "OK");
    expect_str(l, "SET watched mine", "QUEUED");
    r = cmd_ok(l, "EXEC", NULL);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);   /* not aborted (nil) */
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);

    /* SUBSCRIBE */
    l = lease(c, "small");
    r = cmd_ok(l, "SUBSCRIBE chan", NULL);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "small");
    expect_str(l, "PING", "PONG");                  /* a subscriber would get an array */
    assert_int_equal(pb_release(l), PB_OK);

    /* CLIENT TRACKING */
    l = lease(c, "small");
    expect_str(l, "CLIENT TRACKING on", "OK");
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "small");
    r = cmd_ok(l, "CLIENT INFO", NULL);
    const char *flags = strstr(r->str, " flags=");
    assert_non_null(flags);
    for (const char *f = flags + 7; *f && *f != ' '; f++)
        if (*f == 't')
            fail_msg("tracking left on: %s", r->str);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);

    /* CLIENT REPLY OFF: the broker knows no reply comes. */
    l = lease(c, "small");
    assert_int_equal(pb_redis_append_command(l, "CLIENT REPLY OFF"), PB_OK);
    assert_int_equal(pb_redis_append_command(l, "SET silent 1"), PB_OK);
    assert_int_equal(pb_redis_append_command(l, "CLIENT REPLY ON"), PB_OK);
    assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
    assert_string_equal(r->str, "OK");             /* ON's answer */
    freeReplyObject(r);
    assert_int_equal(pb_redis_append_command(l, "CLIENT REPLY OFF"), PB_OK);
    assert_int_equal(pb_release(l), PB_OK);         /* left OFF */
    l = lease(c, "small");
    expect_str(l, "PING", "PONG");
    r = cmd_ok(l, "GET silent", NULL);
    assert_string_equal(r->str, "1");
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);

    /* HELLO 3: this library's parser is RESP2, so the broker refuses it
     * with an error reply naming it (the lease goes on) — and the next
     * holder gets a RESP2 connection. */
    l = lease(c, "small");
    assert_int_equal(pb_redis_command(l, &r, "HELLO 3"), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "poolbroker: HELLO"));
    freeReplyObject(r);
    expect_str(l, "PING", "PONG");
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "small");
    expect_str(l, "PING", "PONG");
    assert_int_equal(pb_release(l), PB_OK);

    /* READONLY (an error outside a cluster, still reset) */
    l = lease(c, "small");
    r = cmd_ok(l, "READONLY", NULL);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "small");
    expect_str(l, "PING", "PONG");
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_db_and_password(void **state)
{
    (void)state;
    pb_client *c = pbt_connect(&env);
    char out[256];
    pb_lease *l = lease(c, "db3");
    expect_str(l, "SET in-db3 yes", "OK");
    expect_str(l, "SELECT 7", "OK");                /* dirty: reset restores db 3 */
    assert_int_equal(pb_release(l), PB_OK);
    l = lease(c, "db3");
    expect_str(l, "SET in-db3-after-reset yes", "OK");
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(th_redis_cli(&env, "-n 3 GET in-db3-after-reset", out, sizeof out), 0);
    assert_string_equal(out, "yes");

    l = lease(c, "authed");
    {
        redisReply *r = cmd_ok(l, "ACL WHOAMI", NULL);
        assert_string_equal(r->str, "pbuser");
        freeReplyObject(r);
    }
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_blocking_command_timeout(void **state)
{
    (void)state;
    PBT_SESSION_MODE_ONLY();        /* it compares the backend a lease has from its acquire on */
    pb_client *c = pbt_connect(&env);
    pb_lease *l = lease(c, "small");                /* command_timeout_ms = 500 */
    int pid1 = pb_lease_backend_pid(l);
    redisReply *r = NULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(pb_redis_command(l, &r, "BLPOP nothing-here 0"), PB_ETIMEDOUT);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    print_message("BLPOP with command_timeout_ms=500 answered PB_ETIMEDOUT after %.2f s\n", s);
    assert_true(s < 5.0);
    assert_int_equal(pb_release(l), PB_OK);
    /* The connection was replaced, never handed out with a reply pending. */
    l = lease(c, "small");
    assert_int_not_equal(pb_lease_backend_pid(l), pid1);
    expect_str(l, "PING", "PONG");
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

#define WORKERS 32
#define LEASES  500

static int incr_worker(void)
{
    pb_client *c;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 1;
    for (int i = 0; i < LEASES; i++) {
        pb_lease *l;
        redisReply *r;
        if (pb_acquire(c, "cache", 30000, &l) != PB_OK)
            return 2;
        if (pb_redis_command(l, &r, "INCR counter") != PB_OK || r->type != REDIS_REPLY_INTEGER)
            return 3;
        freeReplyObject(r);
        if (pb_release(l) != PB_OK)
            return 4;
    }
    pb_disconnect(c);
    return 0;
}

static int pooled_connections(void)
{
    char out[65536];
    if (th_redis_cli(&env, "CLIENT LIST", out, sizeof out) != 0)
        return -1;
    int n = 0;
    for (const char *p = out; (p = strstr(p, "name=poolbroker:cache ")); p++)
        n++;
    return n;
}

static void test_many_workers_incr(void **state)
{
    (void)state;
    char out[64];
    th_redis_cli(&env, "DEL counter", out, sizeof out);
    for (int w = 0; w < WORKERS; w++) {
        fflush(NULL);
        pid_t p = fork();
        assert_true(p >= 0);
        if (p == 0)
            _exit(incr_worker());
    }
    int running = WORKERS, bad = 0, max_seen = 0;
    while (running) {
        int n = pooled_connections();
        if (n > max_seen)
            max_seen = n;
        int st;
        pid_t p;
        while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
            running--;
            if (!WIFEXITED(st) || WEXITSTATUS(st))
                bad++;
        }
        usleep(50000);
    }
    assert_int_equal(bad, 0);
    assert_int_equal(th_redis_cli(&env, "GET counter", out, sizeof out), 0);
    assert_int_equal(atoi(out), WORKERS * LEASES);
    assert_true(max_seen <= 4);
    print_message("32 workers x 500 INCR leases: counter %s, at most %d pooled connections seen\n", out, max_seen);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic_and_errors),
        cmocka_unit_test(test_type_mismatch),
        cmocka_unit_test(test_pipeline_10000),
        cmocka_unit_test(test_big_value_small_ring),
        cmocka_unit_test(test_no_state_leaks),
        cmocka_unit_test(test_db_and_password),
        cmocka_unit_test(test_blocking_command_timeout),
        cmocka_unit_test(test_many_workers_incr),
    };
    return cmocka_run_group_tests_name("redis", tests, group_setup, group_teardown);
}
