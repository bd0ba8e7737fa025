/*
 * test_limits.c — the edges users hit first (issue #18), against a real
 * broker, PostgreSQL and Redis:
 *   - acquire_timeout_ms at the top of its range (4294967295) waits instead
 *     of timing out at once, and at the bottom (0) fails at once;
 *   - a conninfo libpq would refuse (`bogus_option=1`) fails `poolbroker -t`
 *     naming file, line and key, and a SIGHUP with it is refused: the
 *     running pool keeps its configuration and its connection;
 *   - libpq parity: pb_escape_literal / pb_escape_identifier give exactly
 *     what libpq's PQescapeLiteral / PQescapeIdentifier give (and what they
 *     refuse), pb_transaction_status follows BEGIN / error / ROLLBACK, and
 *     pb_result_verbose_error_message matches PQresultVerboseErrorMessage
 *     for every verbosity and context setting;
 *   - a refused attach says why through pb_connect_err: uid/gid not
 *     allowed, max_clients reached, the socket's permissions, no broker;
 *   - log lines: a reclaim names the dead worker (worker=PID), a lease held
 *     past leak_threshold_ms its holder (by worker=PID), a connection's
 *     lines its backend (backend=PID), and a multi-host connect failure
 *     (libpq's message has newlines) is one line, logged at the first
 *     failure, with every host's reason, and so is the pool's last_error.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define PG "type = postgres\nconninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres " \
           "sslmode=disable application_name=pblimits\n"
#define RD "type = redis\nhost = 127.0.0.1\nport = @REDISPORT@\n"

static int group_setup(void **state)
{
    (void)state;
    return th_setup(&env, 1, 1);
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

/* Each test starts its own broker; stop whatever one left behind. */
static int stop_broker(void **state)
{
    (void)state;
    if (env.broker_pid)
        th_broker_stop(&env, SIGTERM);
    return 0;
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* A pool of one connection, held by us; a child asks for it with the pool's
 * acquire_timeout_ms (timeout -1) and reports what it got through a pipe.
 * Returns the child's result; *waited_ms is how long it took. */
static int contended_acquire(const char *pool, int release_after_ms, uint64_t *waited_ms)
{
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, pool, 5000, &l), PB_OK);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        pb_client *cc = NULL;
        int out[2] = { PB_EBROKER, 0 };
        if (pb_connect(env.sock_path, &cc) == PB_OK) {
            pb_lease *ll = NULL;
            uint64_t t0 = mono_ms();
            out[0] = pb_acquire(cc, pool, -1, &ll);
            out[1] = (int)(mono_ms() - t0);
            pb_release(ll);
            pb_disconnect(cc);
        }
        (void)!write(fds[1], out, sizeof out);
        _exit(0);
    }
    close(fds[1]);
    if (release_after_ms >= 0) {
        usleep((useconds_t)release_after_ms * 1000);
        assert_int_equal(pb_release(l), PB_OK);
        l = NULL;
    }
    int got[2] = { 1, 0 };
    assert_int_equal(read(fds[0], got, sizeof got), (ssize_t)sizeof got);
    close(fds[0]);
    int st;
    waitpid(pid, &st, 0);
    if (l)
        pb_release(l);
    pb_disconnect(c);
    *waited_ms = (uint64_t)got[1];
    return got[0];
}

/* acquire_timeout_ms = 4294967295 (the top of the documented range): a
 * waiter waits (until we release, 300 ms later) instead of timing out at
 * once; 0 (the bottom) times out at once; and 2^31 + 1, past an int, waits
 * too.  Both pool types share the client code; one is enough. */
static void test_acquire_timeout_range(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool top]\n" RD "max_size = 1\nacquire_timeout_ms = 4294967295\n"
                                           "[pool past_int]\n" RD "max_size = 1\nacquire_timeout_ms = 2147483649\n"
                                           "[pool bottom]\n" RD "max_size = 1\nacquire_timeout_ms = 0\n"),
                     0);
    uint64_t waited;
    assert_int_equal(contended_acquire("top", 300, &waited), PB_OK);
    assert_true(waited >= 200);
    assert_int_equal(contended_acquire("past_int", 300, &waited), PB_OK);
    assert_true(waited >= 200);
    assert_int_equal(contended_acquire("bottom", -1, &waited), PB_ETIMEDOUT);
}

/* Read a whole small file into buf (NUL-terminated). */
static void slurp(const char *path, char *buf, size_t n)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t got = fread(buf, 1, n - 1, f);
    buf[got] = 0;
    fclose(f);
}

static void put_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fchmod(fileno(f), 0600);
    fputs(text, f);
    fclose(f);
}

/* The line number of the first line of text holding needle (1-based). */
static int line_of(const char *text, const char *needle)
{
    const char *at = strstr(text, needle);
    assert_non_null(at);
    int line = 1;
    for (const char *s = text; s < at; s++)
        line += *s == '\n';
    return line;
}

static void test_conninfo_checked_by_t_and_reload(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PG "min_size = 1\nmax_size = 2\n"), 0);
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    int pid_before = pb_lease_backend_pid(l);
    assert_true(pid_before > 0);
    assert_int_equal(pb_release(l), PB_OK);

    /* The same file with a key libpq does not know. */
    char text[8192], bad[8400], out[2048];
    slurp(env.conf_path, text, sizeof text);
    char *at = strstr(text, "application_name=pblimits");
    assert_non_null(at);
    snprintf(bad, sizeof bad, "%.*sbogus_option=1 %s", (int)(at - text), text, at);
    char check[400];
    snprintf(check, sizeof check, "%s/check.conf", env.dir);
    put_file(check, bad);
    const char *broker = getenv("PB_BROKER") ? getenv("PB_BROKER") : "build/poolbroker";
    char cmd[1024], expect[512];
    snprintf(cmd, sizeof cmd, "%s -t -c %s 2>&1", broker, check);
    FILE *pp = popen(cmd, "r");
    assert_non_null(pp);
    size_t n = fread(out, 1, sizeof out - 1, pp);
    out[n] = 0;
    int st = pclose(pp);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 1);
    snprintf(expect, sizeof expect, "%s:%d: key 'conninfo': invalid connection option \"bogus_option\"", check,
             line_of(bad, "conninfo"));
    if (!strstr(out, expect))
        fail_msg("-t said \"%s\", not \"%s\"", out, expect);

    /* The reload with it is refused; the pool keeps working on the same
     * connection. */
    put_file(env.conf_path, bad);
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "keeping the current configuration", 1, 10000), 0);
    assert_true(th_count_lines(env.broker_log, "invalid connection option \"bogus_option\"") >= 1);
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    pb_result_free(r);
    assert_int_equal(pb_lease_backend_pid(l), pid_before);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
    put_file(env.conf_path, text);
}

static PGconn *libpq_conn(void)
{
    char ci[512];
    snprintf(ci, sizeof ci, "host=%s port=%d user=postgres dbname=postgres sslmode=disable", env.pg_host,
             env.pg_port);
    PGconn *pq = PQconnectdb(ci);
    if (PQstatus(pq) != CONNECTION_OK)
        fail_msg("libpq: %s", PQerrorMessage(pq));
    return pq;
}

static void test_escape_like_libpq(void **state)
{
    (void)state;
    PGconn *pq = libpq_conn();
    assert_string_equal(PQparameterStatus(pq, "client_encoding"), "UTF8");
    assert_string_equal(PQparameterStatus(pq, "standard_conforming_strings"), "on");
    static const struct { const char *s; size_t len; } cases[] = {
        { "", 0 }, { "plain", 5 }, { "it's", 4 }, { "''", 2 }, { "back\\slash", 10 }, { "\\'\\'", 4 },
        { "say \"hi\"", 8 }, { "tab\there\nnewline", 16 }, { "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14 },
        { "stops\0here", 10 }, { "shorter than the string", 7 }, { "E'x'; DROP TABLE t; --", 22 },
        /* not UTF-8: a stray continuation byte, a cut-off character, an overlong '/', a surrogate, > U+10FFFF */
        { "bad\x80", 4 }, { "cut\xe2\x82", 5 }, { "\xc0\xaf", 2 }, { "\xed\xa0\x80", 3 }, { "\xf4\x90\x80\x80", 4 },
        { "len cuts \xe2\x82\xac", 11 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int ident = 0; ident < 2; ident++) {
            const char *s = cases[i].s;
            size_t n = cases[i].len;
            char *want = ident ? PQescapeIdentifier(pq, s, n) : PQescapeLiteral(pq, s, n);
            int err = 12345;
            char *got = ident ? pb_escape_identifier(s, n, &err) : pb_escape_literal(s, n, &err);
            if ((want == NULL) != (got == NULL) || (want && strcmp(want, got) != 0))
                fail_msg("case %zu (%s): libpq %s, pb %s", i, ident ? "identifier" : "literal", want ? want : "NULL",
                         got ? got : "NULL");
            assert_int_equal(err, got ? PB_OK : PB_EINVAL);
            PQfreemem(want);
            pb_freemem(got);
        }
    }
    int err = 0;
    assert_null(pb_escape_literal(NULL, 3, &err));
    assert_int_equal(err, PB_EINVAL);
    assert_null(pb_escape_identifier("\xff", 1, NULL));  /* err may be NULL */
    PQfinish(pq);

    /* What the server reads back is the original string. */
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PG "max_size = 1\n"), 0);
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    const char *orig = "a'b\\c\"d caf\xc3\xa9";
    char *lit = pb_escape_literal(orig, strlen(orig), NULL), *id = pb_escape_identifier(orig, strlen(orig), NULL);
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT %s AS %s", lit, id);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, sql, &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), orig);
    assert_string_equal(pb_fname(r, 0), orig);
    pb_result_free(r);
    pb_freemem(lit);
    pb_freemem(id);
    pb_release(l);
    pb_disconnect(c);
}

static void test_transaction_status(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PG "max_size = 1\n[pool cache]\n" RD "max_size = 1\n"), 0);
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL, *rl = NULL;
    pb_result *r = NULL;
    assert_int_equal(pb_transaction_status(NULL), PB_TRANS_UNKNOWN);
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    assert_int_equal(pb_transaction_status(l), PB_TRANS_IDLE);
    assert_int_equal(pb_pg_exec(l, "BEGIN", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_transaction_status(l), PB_TRANS_INTRANS);
    assert_int_equal(pb_pg_exec(l, "SELECT 1/0", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    pb_result_free(r);
    assert_int_equal(pb_transaction_status(l), PB_TRANS_INERROR);
    assert_int_equal(pb_pg_exec(l, "ROLLBACK", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_transaction_status(l), PB_TRANS_IDLE);
    /* A statement queued and not yet read: ACTIVE, as libpq while busy. */
    assert_int_equal(pb_pg_send_params(l, "SELECT pg_sleep(0.05)", 0, NULL, NULL, NULL, NULL, 0), PB_OK);
    assert_int_equal(pb_transaction_status(l), PB_TRANS_ACTIVE);
    while (pb_pg_get_result(l, &r) == PB_OK && r)
        pb_result_free(r);
    assert_int_equal(pb_transaction_status(l), PB_TRANS_IDLE);
    assert_int_equal(pb_release(l), PB_OK);
    /* A handle no longer valid, a Redis lease: UNKNOWN. */
    assert_int_equal(pb_transaction_status(l), PB_TRANS_UNKNOWN);
    assert_int_equal(pb_acquire(c, "cache", 5000, &rl), PB_OK);
    assert_int_equal(pb_transaction_status(rl), PB_TRANS_UNKNOWN);
    pb_release(rl);
    pb_disconnect(c);
}

static void test_verbose_error_like_libpq(void **state)
{
    (void)state;
    char out[256];
    assert_int_equal(th_psql(&env, "CREATE TABLE IF NOT EXISTS lim_u (id int CONSTRAINT lim_u_pk PRIMARY KEY); "
                                   "INSERT INTO lim_u VALUES (1) ON CONFLICT DO NOTHING",
                             out, sizeof out),
                     0);
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PG "max_size = 1\n"), 0);
    PGconn *pq = libpq_conn();
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    static const char *const stmts[] = {
        "DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the detail', HINT = 'the hint', ERRCODE = '22023'; END $$",
        "INSERT INTO lim_u VALUES (1)",
        "SELECT 1/0",
    };
    for (size_t i = 0; i < sizeof stmts / sizeof stmts[0]; i++) {
        PGresult *want = PQexec(pq, stmts[i]);
        assert_int_equal(PQresultStatus(want), PGRES_FATAL_ERROR);
        pb_result *got = NULL;
        assert_int_equal(pb_pg_exec(l, stmts[i], &got), PB_OK);
        assert_int_equal(pb_result_status(got), PB_RES_ERROR);
        for (int v = PB_ERRORS_TERSE; v <= PB_ERRORS_SQLSTATE; v++)
            for (int ctx = PB_SHOW_CONTEXT_NEVER; ctx <= PB_SHOW_CONTEXT_ALWAYS; ctx++) {
                char *w = PQresultVerboseErrorMessage(want, (PGVerbosity)v, (PGContextVisibility)ctx);
                char *g = pb_result_verbose_error_message(got, v, ctx);
                assert_non_null(g);
                if (strcmp(w, g) != 0)
                    fail_msg("statement %zu, verbosity %d, context %d:\nlibpq:\n%spb:\n%s", i, v, ctx, w, g);
                PQfreemem(w);
                pb_freemem(g);
            }
        if (i == 0) {
            char *g = pb_result_verbose_error_message(got, PB_ERRORS_DEFAULT, PB_SHOW_CONTEXT_NEVER);
            assert_string_equal(g, "ERROR:  boom\nDETAIL:  the detail\nHINT:  the hint\n");
            pb_freemem(g);
        }
        PQclear(want);
        pb_result_free(got);
    }
    pb_result *ok = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &ok), PB_OK);
    char *g = pb_result_verbose_error_message(ok, PB_ERRORS_DEFAULT, PB_SHOW_CONTEXT_ERRORS);
    assert_string_equal(g, "PGresult is not an error result\n");
    pb_freemem(g);
    pb_result_free(ok);
    pb_release(l);
    pb_disconnect(c);
    PQfinish(pq);
}

static void expect_refusal(const char *path, int code, const char *needle)
{
    char why[512] = "untouched";
    pb_client *c = (pb_client *)1;
    int rc = pb_connect_err(path, &c, why, sizeof why);
    if (rc != code || c != NULL || !strstr(why, needle))
        fail_msg("pb_connect_err(%s) = %s, \"%s\"; expected %s with \"%s\"", path, pb_strerror(rc), why,
                 pb_strerror(code), needle);
}

static void test_attach_refusals_say_why(void **state)
{
    (void)state;
    /* max_clients reached. */
    assert_int_equal(th_broker_start(&env, "max_clients = 1\n[pool cache]\n" RD "max_size = 1\n"), 0);
    char why[512] = "x";
    pb_client *a = NULL;
    assert_int_equal(pb_connect_err(env.sock_path, &a, why, sizeof why), PB_OK);
    assert_string_equal(why, "");
    expect_refusal(env.sock_path, PB_EPERM, "refused by the broker: max_clients (1) reached");
    pb_disconnect(a);
    th_broker_stop(&env, SIGTERM);

    /* uid/gid not allowed. */
    assert_int_equal(th_broker_start(&env, "allowed_uids = 65534\n[pool cache]\n" RD "max_size = 1\n"), 0);
    char want[128];
    snprintf(want, sizeof want, "refused by the broker: uid %u gid %u is not allowed", (unsigned)geteuid(),
             (unsigned)getegid());
    expect_refusal(env.sock_path, PB_EPERM, want);
    th_broker_stop(&env, SIGTERM);

    /* No broker there. */
    char none[400];
    snprintf(none, sizeof none, "%s/nobody-here.sock", env.dir);
    expect_refusal(none, PB_EBROKER, "no broker socket at");

    /* The socket's permissions keep another user out (needs root to be
     * that other user). */
    if (geteuid() != 0) {
        print_message("not root: socket-permission case skipped\n");
        return;
    }
    assert_int_equal(th_broker_start(&env, "socket_mode = 0600\n[pool cache]\n" RD "max_size = 1\n"), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char msg[512] = "";
        pb_client *c = NULL;
        if (setgid(65534) < 0 || setuid(65534) < 0)
            _exit(3);
        int rc = pb_connect_err(env.sock_path, &c, msg, sizeof msg);
        _exit(rc == PB_EPERM && strstr(msg, "permission denied connecting to") && strstr(msg, "mode 0600") &&
                      strstr(msg, "this process is uid 65534")
                  ? 0
                  : 1);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

static void test_log_lines(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PG "max_size = 1\nleak_threshold_ms = 100\n"
                                           "[pool nowhere]\ntype = postgres\nconninfo = host=127.0.0.1,127.0.0.1 "
                                           "port=1,2 user=postgres dbname=postgres sslmode=disable\nmin_size = 1\n"),
                     0);
    /* A worker that dies holding a lease: the reclaim names it. */
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        pb_client *c = NULL;
        pb_lease *l = NULL;
        char ok = pb_connect(env.sock_path, &c) == PB_OK && pb_acquire(c, "main", 5000, &l) == PB_OK;
        (void)!write(fds[1], &ok, 1);
        _exit(0);                   /* lease still held */
    }
    close(fds[1]);
    char ok = 0;
    assert_int_equal(read(fds[0], &ok, 1), 1);
    close(fds[0]);
    assert_true(ok);
    waitpid(pid, NULL, 0);
    char needle[96];
    snprintf(needle, sizeof needle, "reclaiming lease: worker=%d ", (int)pid);
    assert_int_equal(th_wait_log(&env, needle, 1, 10000), 0);
    assert_int_equal(th_wait_log(&env, "backend=", 1, 1000), 0);
    /* A lease held past leak_threshold_ms names its holder. */
    pb_client *c = pbt_connect(&env);
    pb_lease *l = NULL;
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    snprintf(needle, sizeof needle, "ms by worker=%d (leak_threshold_ms 100)", (int)getpid());
    assert_int_equal(th_wait_log(&env, needle, 1, 10000), 0);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
    /* The multi-host failure: the line with it is whole, and says why for
     * each host, at the first failure. */
    assert_int_equal(th_wait_log(&env, "pool nowhere: connect failed (1 in a row)", 1, 15000), 0);
    char text[65536];
    slurp(env.broker_log, text, sizeof text);
    const char *at = strstr(text, "pool nowhere: connect failed (1 in a row)");
    const char *eol = strchr(at, '\n');
    assert_non_null(eol);
    size_t len = (size_t)(eol - at);
    static const char host2[] = "; connection to server at \"127.0.0.1\", port 2 failed: Connection refused";
    if (!memmem(at, len, "port 1 failed: Connection refused", 33) || !memmem(at, len, host2, sizeof host2 - 1) ||
        memcmp(eol - 1, ")", 1) != 0 || !memmem(at, len, "(broker/", 8))
        fail_msg("not one whole line with both hosts' reasons: %.*s", (int)len, at);
    /* shmstat's last error has both too. */
    static char json[1 << 20];
    char err[600];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    assert_int_equal(pbt_json_pool_str(json, "nowhere", "last_error", err, sizeof err), 0);
    if (!strstr(err, "port 1 failed") || !strstr(err, "port 2 failed"))
        fail_msg("last_error: %s", err);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_acquire_timeout_range, stop_broker),
        cmocka_unit_test_teardown(test_conninfo_checked_by_t_and_reload, stop_broker),
        cmocka_unit_test_teardown(test_escape_like_libpq, stop_broker),
        cmocka_unit_test_teardown(test_transaction_status, stop_broker),
        cmocka_unit_test_teardown(test_verbose_error_like_libpq, stop_broker),
        cmocka_unit_test_teardown(test_attach_refusals_say_why, stop_broker),
        cmocka_unit_test_teardown(test_log_lines, stop_broker),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
