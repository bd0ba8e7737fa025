/*
 * test_bigreq.c — requests larger than the request buffer (issue #18): they
 * stream through it in parts (include/pb_shm.h, "Streamed requests") and
 * the broker sends them whole; only the pool's max_request_size refuses.
 *
 *   - Redis: SET of 8 MiB through the default 64k buffer (formatted and
 *     argv), read back with GET; a pipeline with a big command between
 *     small ones; 2 MiB through the non-blocking pb_redis_send_argv; a
 *     request whose last part is a whole command of its own (GET) still
 *     runs as the SET it is (in transaction mode, where plain commands
 *     share a backend).
 *   - PostgreSQL: INSERT with a 5 MiB text and a 3 MiB bytea parameter
 *     (pb_pg_exec_params), a prepared statement with a big parameter, a
 *     pipelined batch holding a 2 MiB statement, a 200 KiB SQL string
 *     through pb_pg_exec; each read back and compared.
 *   - Over max_request_size = 1m: a 2 MiB request gets PB_ETOOBIG,
 *     pb_lease_error names the size and the cap, the lease goes on.  A cap
 *     under the request buffer (4k): a pipeline of small commands goes in
 *     groups within it.
 *   - A worker stopped (SIGSTOP) in the middle of streaming a 64 MiB request
 *     through a 1k buffer, then SIGKILLed: the server never sees any of it
 *     (the next command on the pool's one connection works, the key or row
 *     does not exist), the broker frees the parts (its resident size falls
 *     back), the lease is taken back and shmstat counts no lease held.  In
 *     transaction mode, while the worker is stopped, the pool's only backend
 *     serves another lease (the parts wait on the handle, nothing is bound).
 *
 * Runs in both pool modes (TXN_TESTS) and on both io backends.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define PG_CONN "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable"
#define POOLS \
    "[pool pg]\ntype = postgres\n" PG_CONN " application_name=bigpg\nmin_size = 1\nmax_size = 2\n" \
    "acquire_timeout_ms = 20000\n\n" \
    "[pool pgcap]\ntype = postgres\n" PG_CONN "\nmax_size = 1\nmax_request_size = 1m\n" \
    "acquire_timeout_ms = 20000\n\n" \
    "[pool pgslow]\ntype = postgres\n" PG_CONN " application_name=bigslow\nmin_size = 1\nmax_size = 1\n" \
    "request_buffer = 1k\nacquire_timeout_ms = 20000\n\n" \
    "[pool r]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\nmin_size = 1\nmax_size = 2\n" \
    "acquire_timeout_ms = 20000\n\n" \
    "[pool rcap]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\nmax_size = 1\nmax_request_size = 1m\n" \
    "acquire_timeout_ms = 20000\n\n" \
    "[pool rslow]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\nmin_size = 1\nmax_size = 1\n" \
    "request_buffer = 1k\nacquire_timeout_ms = 20000\n\n" \
    "[pool rtiny]\ntype = redis\nhost = 127.0.0.1\nport = @REDISPORT@\nmax_size = 1\nmax_request_size = 4k\n" \
    "acquire_timeout_ms = 20000\n"

static int group_setup(void **state)
{
    (void)state;
    if (th_setup(&env, 1, 1) < 0)
        return -1;
    if (th_psql(&env, "CREATE TABLE big (id int, t text, b bytea)", NULL, 0) != 0)
        return -1;
    return th_broker_start(&env, POOLS);
}

static int group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&env);
}

/* n bytes of a pattern that no shift of itself matches (a part sent twice
 * or out of order shows), with every byte value in it. */
static char *pattern(size_t n, unsigned seed)
{
    char *p = malloc(n + 1);
    assert_non_null(p);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        p[i] = (char)(x >> 24);
    }
    p[n] = 0;
    return p;
}

/* As pattern, printable (a text parameter: no NUL, valid UTF-8). */
static char *text_pattern(size_t n, unsigned seed)
{
    char *p = pattern(n, seed);
    for (size_t i = 0; i < n; i++)
        p[i] = (char)('a' + (unsigned char)p[i] % 26);
    return p;
}

static redisReply *rcmd(pb_lease *l, int type, const char *fmt, const char *a, size_t alen)
{
    redisReply *r = NULL;
    int rc = alen ? pb_redis_command(l, &r, fmt, a, alen) : pb_redis_command(l, &r, fmt, a);
    if (rc != PB_OK)
        fail_msg("%s: %s", fmt, pb_strerror(rc));
    if (r->type != type)
        fail_msg("%s: reply type %d (%s), not %d", fmt, r->type, r->str ? r->str : "", type);
    return r;
}

static pb_result *pg_ok(pb_lease *l, const char *sql)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    if (rc != PB_OK)
        fail_msg("%.60s: %s", sql, pb_strerror(rc));
    if (pb_result_status(r) == PB_RES_ERROR)
        fail_msg("%.60s: %s", sql, pb_error_message(r));
    return r;
}

/* ------------------------------------------------------------------ Redis */

/* A streamed request whose last part is, byte for byte, a whole command of
 * its own ("GET tail"): the broker must send the request it gathered, not
 * the part it saw last.  In transaction mode plain commands share a backend
 * (pipelining), and that path once judged the request buffer alone.  Pool
 * rslow streams in parts of its 1 KiB request buffer. */
static void test_redis_stream_tail_is_a_command(void **state)
{
    (void)state;
    static const char tail[] = "*2\r\n$3\r\nGET\r\n$4\r\ntail\r\n";
    const size_t tlen = sizeof tail - 1, part = 1024;
    /* SET tail <value>: find a value length that puts the last part on
     * exactly the bytes of tail (the request's own "\r\n" ends it). */
    size_t n = 4000, total = 0;
    for (;; n++) {
        char hdr[64];
        int h = snprintf(hdr, sizeof hdr, "*3\r\n$3\r\nSET\r\n$4\r\ntail\r\n$%zu\r\n", n);
        total = (size_t)h + n + 2;
        if ((total - tlen) % part == 0)
            break;
    }
    char *v = text_pattern(n, 7);
    memcpy(v + n - (tlen - 2), tail, tlen - 2);
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "rslow", 20000);
    const char *argv[3] = { "SET", "tail", v };
    size_t lens[3] = { 3, 4, n };
    redisReply *r = NULL;
    assert_int_equal(pb_redis_command_argv(l, 3, argv, lens, &r), PB_OK);
    if (r->type != REDIS_REPLY_STATUS)
        fail_msg("SET of %zu bytes (request %zu) answered type %d, not +OK: the last part went alone", n, total,
                 r->type);
    freeReplyObject(r);
    r = rcmd(l, REDIS_REPLY_STRING, "GET tail", NULL, 0);
    assert_int_equal(r->len, n);
    assert_memory_equal(r->str, v, n);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    free(v);
    pbt_cli_done(c);
}

static void test_redis_set_get_8mib(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "r", 20000);
    size_t n = 8u << 20;
    char *v = pattern(n, 1);
    redisReply *r = rcmd(l, REDIS_REPLY_STATUS, "SET big %b", v, n);
    assert_string_equal(r->str, "OK");
    freeReplyObject(r);
    r = rcmd(l, REDIS_REPLY_STRING, "GET big", NULL, 0);
    assert_int_equal(r->len, n);
    assert_memory_equal(r->str, v, n);
    freeReplyObject(r);

    /* The argv form, the case the issue names. */
    char *w = pattern(n, 2);
    const char *argv[3] = { "SET", "big", w };
    size_t lens[3] = { 3, 3, n };
    r = NULL;
    assert_int_equal(pb_redis_command_argv(l, 3, argv, lens, &r), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    r = rcmd(l, REDIS_REPLY_STRING, "GET big", NULL, 0);
    assert_int_equal(r->len, n);
    assert_memory_equal(r->str, w, n);
    freeReplyObject(r);

    /* A pipeline: small, big, small; the replies in order. */
    assert_int_equal(pb_redis_append_command(l, "SET small1 a"), PB_OK);
    assert_int_equal(pb_redis_append_command(l, "SET big2 %b", v, (size_t)(1u << 20)), PB_OK);
    assert_int_equal(pb_redis_append_command(l, "STRLEN big2"), PB_OK);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
        if (i < 2)
            assert_int_equal(r->type, REDIS_REPLY_STATUS);
        else
            assert_int_equal(r->integer, 1 << 20);
        freeReplyObject(r);
    }
    /* The non-blocking API: pb_redis_send_argv of 2 MiB, then poll. */
    const char *av[3] = { "SET", "nb", v };
    size_t al[3] = { 3, 2, 2u << 20 };
    assert_int_equal(pb_redis_send_argv(l, 3, av, al), PB_OK);
    int rc;
    while ((rc = pb_redis_poll_reply(l, &r)) == PB_EINPROGRESS) {
        struct pollfd pfd = { pb_client_fd(c), POLLIN, 0 };
        poll(&pfd, 1, 100);
        pb_client_consume(c);
    }
    assert_int_equal(rc, PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    r = rcmd(l, REDIS_REPLY_INTEGER, "STRLEN nb", NULL, 0);
    assert_int_equal(r->integer, 2 << 20);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    /* A later lease (any connection of the pool) sees the value whole. */
    l = pbt_lease(c, "r", 20000);
    r = rcmd(l, REDIS_REPLY_STRING, "GET big", NULL, 0);
    assert_memory_equal(r->str, w, n);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    free(v);
    free(w);
    pbt_cli_done(c);
}

/* ------------------------------------------------------------- PostgreSQL */

static void test_pg_big_params(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "pg", 20000);
    size_t nt = 5u << 20, nb = 3u << 20;
    char *t = text_pattern(nt, 3);
    char *b = pattern(nb, 4);
    const char *values[3] = { "1", t, b };
    int lengths[3] = { 0, (int)nt, (int)nb };
    int formats[3] = { 0, 0, 1 };
    unsigned types[3] = { 23, 25, 17 };       /* int4, text, bytea */
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec_params(l, "INSERT INTO big (id, t, b) VALUES ($1, $2, $3)", 3, types, values,
                                       lengths, formats, 0, &r), PB_OK);
    if (pb_result_status(r) != PB_RES_COMMAND_OK)
        fail_msg("INSERT: %s", pb_error_message(r));
    pb_result_free(r);
    /* Read back in binary: the text's bytes and the bytea's, as sent. */
    const char *id = "1";
    assert_int_equal(pb_pg_exec_params(l, "SELECT t, b FROM big WHERE id = $1", 1, NULL, &id, NULL, NULL, 1, &r),
                     PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_ntuples(r), 1);
    assert_int_equal(pb_getlength(r, 0, 0), (int)nt);
    assert_memory_equal(pb_getvalue(r, 0, 0), t, nt);
    assert_int_equal(pb_getlength(r, 0, 1), (int)nb);
    assert_memory_equal(pb_getvalue(r, 0, 1), b, nb);
    pb_result_free(r);

    /* A prepared statement with a big parameter. */
    assert_int_equal(pb_pg_prepare(l, "ins", "INSERT INTO big (id, t) VALUES ($1, $2)", 2, NULL, &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    pb_result_free(r);
    const char *pv[2] = { "2", t };
    assert_int_equal(pb_pg_exec_prepared(l, "ins", 2, pv, NULL, NULL, 0, &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    pb_result_free(r);
    r = pg_ok(l, "SELECT length(t), md5(t) = md5((SELECT t FROM big WHERE id = 1)) FROM big WHERE id = 2");
    assert_int_equal(atoll(pb_getvalue(r, 0, 0)), (long long)nt);
    assert_string_equal(pb_getvalue(r, 0, 1), "t");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    free(t);
    free(b);
    pbt_cli_done(c);
}

/* A pipelined batch: small, 2 MiB, small; results in order. */
static void test_pg_pipeline_big(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "pg", 20000);
    size_t n = 2u << 20;
    char *t = text_pattern(n, 5);
    const char *v1[2] = { "10", "small" }, *v2[2] = { "11", t }, *v3 = "11";
    assert_int_equal(pb_pg_send_params(l, "INSERT INTO big (id, t) VALUES ($1, $2)", 2, NULL, v1, NULL, NULL, 0),
                     PB_OK);
    assert_int_equal(pb_pg_send_params(l, "INSERT INTO big (id, t) VALUES ($1, $2)", 2, NULL, v2, NULL, NULL, 0),
                     PB_OK);
    assert_int_equal(pb_pg_send_params(l, "SELECT length(t) FROM big WHERE id = $1", 1, NULL, &v3, NULL, NULL, 0),
                     PB_OK);
    pb_result *r = NULL;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
        assert_non_null(r);
        if (pb_result_status(r) == PB_RES_ERROR)
            fail_msg("statement %d: %s", i, pb_error_message(r));
        if (i == 2)
            assert_int_equal(atoll(pb_getvalue(r, 0, 0)), (long long)n);
        pb_result_free(r);
    }
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    assert_null(r);
    /* The same through the non-blocking API: pb_pg_send_query of 300 KiB. */
    size_t q = 300u << 10;
    char *sql = malloc(q + 64);
    assert_non_null(sql);
    int k = snprintf(sql, 64, "SELECT length('");
    memcpy(sql + k, t, q);
    strcpy(sql + k + q, "')");
    assert_int_equal(pb_pg_send_query(l, sql), PB_OK);
    int busy;
    while ((busy = pb_is_busy(l)) == 1) {
        struct pollfd pfd = { pb_client_fd(c), POLLIN, 0 };
        poll(&pfd, 1, 100);
        pb_client_consume(c);
    }
    assert_int_equal(busy, 0);
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    assert_int_equal(atoll(pb_getvalue(r, 0, 0)), (long long)q);
    pb_result_free(r);
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    assert_null(r);
    assert_int_equal(pb_release(l), PB_OK);
    free(sql);
    free(t);
    pbt_cli_done(c);
}

/* pb_pg_exec of a 200 KiB SQL text (over the 64k buffer). */
static void test_pg_long_query(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "pg", 20000);
    size_t n = 200u << 10;
    char *t = text_pattern(n, 6);
    char *sql = malloc(n + 64);
    assert_non_null(sql);
    int k = snprintf(sql, 64, "SELECT md5('");
    memcpy(sql + k, t, n);
    strcpy(sql + k + n, "'), length('x')");
    pb_result *r = pg_ok(l, sql);
    assert_int_equal(strlen(pb_getvalue(r, 0, 0)), 32);
    pb_result_free(r);
    /* The server hashed exactly our text: compare with a hash of it sent
     * as a parameter (a different path: Bind, not Query). */
    const char *v = t;
    assert_int_equal(pb_pg_exec_params(l, "SELECT md5($1)", 1, NULL, &v, NULL, NULL, 0, &r), PB_OK);
    pb_result *r2 = pg_ok(l, sql);
    assert_string_equal(pb_getvalue(r, 0, 0), pb_getvalue(r2, 0, 0));
    pb_result_free(r);
    pb_result_free(r2);
    assert_int_equal(pb_release(l), PB_OK);
    free(sql);
    free(t);
    pbt_cli_done(c);
}

/* ---------------------------------------------------------------- the cap */

static void test_over_cap(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    size_t n = 2u << 20;
    char *t = text_pattern(n, 7);
    /* PostgreSQL */
    pb_lease *l = pbt_lease(c, "pgcap", 20000);
    assert_string_equal(pb_lease_error(l), "");
    const char *v = t;
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec_params(l, "SELECT length($1)", 1, NULL, &v, NULL, NULL, 0, &r), PB_ETOOBIG);
    assert_null(r);
    const char *why = pb_lease_error(l);
    print_message("PB_ETOOBIG: %s\n", why);
    if (!strstr(why, "max_request_size") || !strstr(why, "of 1048576 bytes") || !strstr(why, "request of 2097"))
        fail_msg("pb_lease_error does not name the size and the cap: %s", why);
    /* Just under the cap passes (1 MiB less the protocol's bytes). */
    char *u = text_pattern((1u << 20) - 200, 8);
    v = u;
    assert_int_equal(pb_pg_exec_params(l, "SELECT length($1)", 1, NULL, &v, NULL, NULL, 0, &r), PB_OK);
    assert_int_equal(atoll(pb_getvalue(r, 0, 0)), (1 << 20) - 200);
    pb_result_free(r);
    assert_int_equal(pbt_pg_int(l, "SELECT 42"), 42);
    assert_int_equal(pb_release(l), PB_OK);
    /* Redis */
    l = pbt_lease(c, "rcap", 20000);
    r = NULL;
    redisReply *rr = NULL;
    assert_int_equal(pb_redis_command(l, &rr, "SET capped %b", t, n), PB_ETOOBIG);
    assert_null(rr);
    if (!strstr(pb_lease_error(l), "of 1048576 bytes"))
        fail_msg("pb_lease_error: %s", pb_lease_error(l));
    rr = rcmd(l, REDIS_REPLY_STATUS, "PING", NULL, 0);
    assert_string_equal(rr->str, "PONG");
    freeReplyObject(rr);
    rr = rcmd(l, REDIS_REPLY_INTEGER, "EXISTS capped", NULL, 0);
    assert_int_equal(rr->integer, 0);
    freeReplyObject(rr);
    assert_int_equal(pb_release(l), PB_OK);
    /* A cap under the request buffer (4k, 64k): a pipeline of 200 small
     * commands (12 KiB in all) is sent in groups within the cap, one
     * command over it is refused. */
    l = pbt_lease(c, "rtiny", 20000);
    for (int i = 0; i < 200; i++)
        assert_int_equal(pb_redis_append_command(l, "SET tiny%d %b", i, t, (size_t)40), PB_OK);
    for (int i = 0; i < 200; i++) {
        assert_int_equal(pb_redis_get_reply(l, &rr), PB_OK);
        assert_int_equal(rr->type, REDIS_REPLY_STATUS);
        freeReplyObject(rr);
    }
    assert_int_equal(pb_redis_command(l, &rr, "SET tiny %b", t, (size_t)5000), PB_ETOOBIG);
    rr = rcmd(l, REDIS_REPLY_STRING, "GET tiny199", NULL, 0);
    assert_int_equal(rr->len, 40);
    freeReplyObject(rr);
    assert_int_equal(pb_release(l), PB_OK);
    free(t);
    free(u);
    /* Refused by the library: the broker saw nothing to complain about. */
    assert_int_equal(th_count_lines(env.broker_log, "malformed request"), 0);
    pbt_cli_done(c);
}

/* ------------------------------------------------ a worker killed mid-stream */

#define KILL_SIZE (64u << 20)

struct stream_arg {
    int wfd;
    int redis;
};

/* Lease the 1k-buffer pool and send a 64 MiB request, after saying 's'. */
static int stream_child(void *p)
{
    struct stream_arg *a = p;
    pb_client *c;
    pb_lease *l;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    if (pb_acquire(c, a->redis ? "rslow" : "pgslow", 20000, &l) != PB_OK)
        return 11;
    char *v = malloc(KILL_SIZE + 1);
    if (!v)
        return 12;
    memset(v, 'k', KILL_SIZE);
    v[KILL_SIZE] = 0;
    if (write(a->wfd, "s", 1) != 1)
        return 13;
    if (a->redis) {
        redisReply *r = NULL;
        pb_redis_command(l, &r, "SET killbig %b", v, (size_t)KILL_SIZE);
    } else {
        pb_result *r = NULL;
        const char *vals[2] = { "99", v };
        pb_pg_exec_params(l, "INSERT INTO big (id, t) VALUES ($1, $2)", 2, NULL, vals, NULL, NULL, 0, &r);
    }
    if (write(a->wfd, "d", 1) != 1)     /* finished before it was stopped: the parent fails */
        return 14;
    for (;;)
        pause();
}

static pid_t spawn_stream(struct stream_arg *a)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(stream_child(a));
    pbt_track_child(pid);
    return pid;
}

/* The broker's resident set, in KiB (VmRSS), or -1. */
static long broker_rss_kb(void)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)env.broker_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static void kill_mid_stream(int redis)
{
    const char *pool = redis ? "rslow" : "pgslow";
    pb_client *c = pbt_cli(&env);
    long reclaims0 = (long)pbt_pool_counter(&env, pool, "reclaims");
    long rss0 = broker_rss_kb();
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    struct stream_arg a = { fds[1], redis };
    pid_t pid = spawn_stream(&a);
    close(fds[1]);
    char ch = 0;
    if (read(fds[0], &ch, 1) != 1 || ch != 's') {
        int st = 0;
        waitpid(pid, &st, 0);
        pbt_untrack_child(pid);
        fail_msg("the worker did not start its request (exit status %d)", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    }
    /* Stop it once the broker holds 16 MiB of its parts (formatting 64 MiB
     * takes the worker a while first; all of it, in 1k parts, longer). */
    long rss1 = rss0;
    for (int i = 0; i < 3000 && rss1 - rss0 < 16384; i++) {
        pbt_sleep_ms(5);
        rss1 = broker_rss_kb();
    }
    assert_int_equal(kill(pid, SIGSTOP), 0);
    if (rss1 - rss0 < 16384)
        fail_msg("the broker's resident set grew %ld kB in 15 s: no parts taken", rss1 - rss0);
    pbt_sleep_ms(50);
    rss1 = broker_rss_kb();
    print_message("%s: broker VmRSS %ld kB before, %ld kB with the stopped worker's parts\n", pool, rss0, rss1);
    if (pbt_txn_mode()) {
        /* Transaction mode: the parts wait on the worker's handle, no
         * backend is bound, so the pool's only backend serves others. */
        pb_lease *o = pbt_lease(c, pool, 20000);
        if (redis) {
            redisReply *r = rcmd(o, REDIS_REPLY_STATUS, "PING", NULL, 0);
            freeReplyObject(r);
        } else {
            assert_int_equal(pbt_pg_int(o, "SELECT 8"), 8);
        }
        assert_int_equal(pb_release(o), PB_OK);
    }
    assert_int_equal(kill(pid, SIGKILL), 0);
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    pbt_untrack_child(pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    fd_set rs;
    FD_ZERO(&rs);
    FD_SET(fds[0], &rs);
    struct timeval tv = { 0, 0 };
    if (select(fds[0] + 1, &rs, NULL, NULL, &tv) == 1 && read(fds[0], &ch, 1) == 1 && ch == 'd')
        fail_msg("the worker finished its 64 MiB request before it was stopped: no mid-stream case");
    close(fds[0]);

    /* The pool's one connection serves the next lease, and the server never
     * saw a byte of the request (else this command would be read as the
     * rest of it, and never answered). */
    pb_lease *l = pbt_lease(c, pool, 20000);
    if (redis) {
        redisReply *r = rcmd(l, REDIS_REPLY_STATUS, "PING", NULL, 0);
        freeReplyObject(r);
        r = rcmd(l, REDIS_REPLY_INTEGER, "EXISTS killbig", NULL, 0);
        assert_int_equal(r->integer, 0);
        freeReplyObject(r);
        r = rcmd(l, REDIS_REPLY_STRING, "CLIENT INFO", NULL, 0);
        if (!strstr(r->str, " qbuf=0 ") && !strstr(r->str, " qbuf=26 "))   /* 26: CLIENT INFO itself */
            fail_msg("the server holds a partial request: %s", r->str);
        freeReplyObject(r);
    } else {
        assert_int_equal(pbt_pg_int(l, "SELECT count(*) FROM big WHERE id = 99"), 0);
        assert_int_equal(pbt_pg_int(l, "SELECT 7"), 7);
    }
    assert_int_equal(pb_release(l), PB_OK);
    /* The broker freed the parts: its resident set is back near where it
     * was.  (Not measurable under AddressSanitizer, whose quarantine keeps
     * freed memory; its leak check at the broker's exit stands in.) */
    long rss2 = broker_rss_kb();
    print_message("%s: broker VmRSS %ld kB after the reclaim\n", pool, rss2);
#if !defined(__SANITIZE_ADDRESS__)
    if (rss2 > rss1 - (rss1 - rss0) / 2)
        fail_msg("the parts were not freed: VmRSS %ld kB before, %ld with them, %ld after", rss0, rss1, rss2);
#endif
    assert_true(pbt_pool_counter(&env, pool, "reclaims") >= reclaims0 + 1);
    static char json[1 << 20];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    /* No slot left held.  (Not "leaks": that counts leases held past
     * leak_threshold_ms, and on a loaded machine the worker may well have
     * held its lease 10 s before it was stopped.) */
    assert_int_equal(pbt_json_pool_num(json, pool, "leased"), 0);
    pbt_cli_done(c);
}

static void test_redis_killed_mid_stream(void **state)
{
    (void)state;
    kill_mid_stream(1);
}

static void test_pg_killed_mid_stream(void **state)
{
    (void)state;
    kill_mid_stream(0);
}

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_redis_set_get_8mib, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_stream_tail_is_a_command, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_big_params, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_pipeline_big, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_long_query, pbt_cleanup),
        cmocka_unit_test_teardown(test_over_cap, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_killed_mid_stream, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_killed_mid_stream, pbt_cleanup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
