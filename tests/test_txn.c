/*
 * test_txn.c — transaction pooling (pool_mode = transaction, issue #14):
 * a lease holds a backend connection only while a transaction runs.
 *
 * One group (its own temp dir, PostgreSQL, Redis and broker), pools of one
 * or two backends so that every case below is decided by who gets the
 * connection:
 *   - an idle lease holds no connection (A queries and keeps its lease; B
 *     leases and queries meanwhile without waiting);
 *   - a transaction stays on one backend while other processes hammer the
 *     pool, and so does session state the server reports (SET, LISTEN, a
 *     temporary table), which never reaches a later lease;
 *   - 16 workers on one connection: exact totals;
 *   - a worker killed mid-transaction (its transaction rolls back, the
 *     connection serves the next lease) and mid-queue (its queued statement
 *     never runs, nothing is left behind);
 *   - Redis: plain commands share one connection, MULTI…EXEC pins it;
 *     plain commands of many processes are pipelined on one connection and
 *     each gets exactly its own replies, also while a MULTI pins; a
 *     connection lost with N commands in flight fails all N (PB_EBACKEND);
 *     a reply still in flight when its lease ends (release, death) is
 *     dropped, never delivered to the handle's next holder; a
 *     command_timeout_ms fails the oldest command with PB_ETIMEDOUT and the
 *     rest on that connection with PB_EBACKEND.  CLIENT PAUSE
 *     WRITE (from redis-cli) holds written commands in flight on demand.
 *   - PostgreSQL statements share a backend once the server has shown
 *     their text to leave nothing behind (broker/pgshare.h): on one
 *     backend, 8 processes (simple queries, and parameterized ones with one
 *     text between them) each get their own row back, never inside
 *     another lease's transaction, never with another lease's setting,
 *     while one process sets application_name and one runs transactions;
 *     a text that changes what it does after it was shared (a function
 *     redefined to set a reported setting) is never shared again, and its
 *     backend is reset before anyone else gets it; a worker with a
 *     transaction open never has a statement sent behind another lease's
 *     statement that waits for that transaction's lock;
 *   - shmstat (text and --json) shows the backends behind the handles: one
 *     bound to a lease in a transaction (its worker's pid, its backend pid),
 *     the handles in use and a statement queued for it; then idle.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env;

#define PGPOOL(name, size) \
    "[pool " name "]\n" \
    "type = postgres\n" \
    "pool_mode = transaction\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=" name "\n" \
    "min_size = 1\n" \
    "max_size = " size "\n" \
    "acquire_timeout_ms = 20000\n" \
    "\n"

#define POOLS \
    PGPOOL("tx1", "1") \
    PGPOOL("tx2", "2") \
    PGPOOL("txs", "1") \
    PGPOOL("txsh", "1") \
    "[pool txlk]\n" \
    "type = postgres\n" \
    "pool_mode = transaction\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=txlk\n" \
    "min_size = 3\n" \
    "max_size = 3\n" \
    "acquire_timeout_ms = 20000\n" \
    "command_timeout_ms = 3000\n" \
    "\n" \
    "[pool txq]\n" \
    "type = postgres\n" \
    "pool_mode = transaction\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable application_name=txq\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 400\n" \
    "\n" \
    "[pool rtx]\n" \
    "type = redis\n" \
    "pool_mode = transaction\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 400\n" \
    "\n" \
    RPOOL("rpx", "") \
    RPOOL("rp1", "slots = 1\n") \
    RPOOL("rpt", "command_timeout_ms = 300\n")

/* A Redis pool of one connection in transaction mode; extra: more keys. */
#define RPOOL(name, extra) \
    "[pool " name "]\n" \
    "type = redis\n" \
    "pool_mode = transaction\n" \
    "host = 127.0.0.1\n" \
    "port = @REDISPORT@\n" \
    "min_size = 1\n" \
    "max_size = 1\n" \
    "acquire_timeout_ms = 20000\n" \
    extra \
    "\n"

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

static void exec_ok(pb_lease *l, const char *sql)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    if (rc != PB_OK || (pb_result_status(r) != PB_RES_COMMAND_OK && pb_result_status(r) != PB_RES_TUPLES_OK))
        fail_msg("%s: rc %d status %d: %s", sql, rc, r ? (int)pb_result_status(r) : -1,
                 r ? pb_error_message(r) : "");
    pb_result_free(r);
}

/* An idle lease holds no connection: with one backend, A runs a query and
 * keeps its lease; B leases and queries at once, on the same backend. */
static void test_idle_lease_holds_nothing(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *a = pbt_lease(c, "tx1", 5000);
    long long pa = pbt_pg_int(a, "SELECT pg_backend_pid()");
    pb_lease *b = pbt_lease(c, "tx1", 5000);
    double t0 = pbt_now_ms();
    long long pb = pbt_pg_int(b, "SELECT pg_backend_pid()");
    assert_int_equal(pa, pb);           /* one backend, shared by two leases */
    assert_int_equal(pbt_pg_int(a, "SELECT 41 + 1"), 42);
    print_message("      two leases on one backend: B's first query after %.1f ms\n", pbt_now_ms() - t0);
    assert_int_equal(pb_release(b), PB_OK);
    assert_int_equal(pb_release(a), PB_OK);
    pbt_cli_done(c);
}

/* A transaction keeps its backend while 8 processes hammer a pool of 2,
 * and while it is open the other backend serves everyone else. */
static void test_transaction_stays_on_one_backend(void **state)
{
    (void)state;
    pid_t kids[8];
    int stopp[2];
    assert_int_equal(pipe(stopp), 0);
    fflush(NULL);
    for (int i = 0; i < 8; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            close(stopp[1]);
            pb_client *k = NULL;
            if (pb_connect(env.sock_path, &k) != PB_OK)
                _exit(2);
            for (;;) {
                struct pollfd p = { .fd = stopp[0], .events = POLLIN };
                if (poll(&p, 1, 0) != 0)
                    break;
                pb_lease *l = NULL;
                if (pb_acquire(k, "tx2", 20000, &l) != PB_OK)
                    _exit(3);
                pb_result *r = NULL;
                int rc = pb_pg_exec(l, "SELECT 1", &r);
                pb_result_free(r);
                if (rc != PB_OK || pb_release(l) != PB_OK)
                    _exit(4);
            }
            pb_disconnect(k);
            _exit(0);
        }
        pbt_track_child(kids[i]);
    }
    close(stopp[0]);

    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "tx2", 5000);
    exec_ok(l, "BEGIN");
    long long pid = pbt_pg_int(l, "SELECT pg_backend_pid()");
    long long xid = pbt_pg_int(l, "SELECT txid_current()");
    for (int i = 0; i < 200; i++) {
        assert_int_equal(pbt_pg_int(l, "SELECT pg_backend_pid()"), pid);
        assert_int_equal(pbt_pg_int(l, "SELECT txid_current()"), xid);
    }
    exec_ok(l, "COMMIT");
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);

    close(stopp[1]);
    for (int i = 0; i < 8; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        pbt_untrack_child(kids[i]);
        assert_true(WIFEXITED(st));
        assert_int_equal(WEXITSTATUS(st), 0);
    }
}

/* Session state the server reports pins the lease for the rest of it and
 * never reaches the next lease of the same backend. */
static void test_session_state_pins_and_resets(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);

    /* txq opens its one connection at its first statement and gives a
     * queued statement only 400 ms: on a loaded machine the connect alone
     * can take longer, so wait for it here, not in the first SET. */
    pb_lease *a = pbt_lease(c, "txq", 5000);
    int rc = PB_ETIMEDOUT;
    for (int i = 0; i < 50 && rc == PB_ETIMEDOUT; i++) {
        pb_result *w = NULL;
        rc = pb_pg_exec(a, "SELECT 1", &w);
        pb_result_free(w);
    }
    assert_int_equal(rc, PB_OK);
    exec_ok(a, "SET application_name = 'pinned_by_set'");
    exec_ok(a, "CREATE TEMP TABLE t_pin(x int)");
    exec_ok(a, "INSERT INTO t_pin VALUES (7)");
    exec_ok(a, "LISTEN txchan");
    long long pa = pbt_pg_int(a, "SELECT pg_backend_pid()");
    /* Another lease now waits: the only backend is pinned to A. */
    pb_lease *b = pbt_lease(c, "txq", 5000);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(b, "SELECT 1", &r), PB_ETIMEDOUT);
    pb_result_free(r);
    assert_int_equal(pb_release(b), PB_OK);
    /* A still has all of it. */
    assert_int_equal(pbt_pg_int(a, "SELECT x FROM t_pin"), 7);
    exec_ok(a, "NOTIFY txchan, 'hello'");
    pb_notify *n = NULL;
    assert_int_equal(pb_pg_wait_notify(a, 2000, &n), PB_OK);
    assert_non_null(n);
    assert_string_equal(pb_notify_channel(n), "txchan");
    pb_notify_free(n);
    assert_int_equal(pb_release(a), PB_OK);

    /* The next lease of that backend sees none of it. */
    pb_lease *d = pbt_lease(c, "txq", 5000);
    assert_int_equal(pbt_pg_int(d, "SELECT pg_backend_pid()"), pa);
    assert_int_equal(pbt_pg_int(d, "SELECT count(*) FROM pg_listening_channels()"), 0);
    assert_int_equal(pbt_pg_int(d, "SELECT (current_setting('application_name') = 'txq')::int"), 1);
    assert_int_equal(pbt_pg_int(d, "SELECT count(*) FROM pg_class WHERE relname = 't_pin' "
                                   "AND relpersistence = 't'"), 0);
    assert_int_equal(pb_release(d), PB_OK);
    pbt_cli_done(c);
}

/* 16 workers on one connection: every increment lands exactly once, in
 * autocommit statements and in explicit transactions alike. */
#define NW 16
#define PER 60
static void test_exact_totals_16_on_1(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "tx1", 5000);
    exec_ok(l, "DROP TABLE IF EXISTS tx_total");
    exec_ok(l, "CREATE TABLE tx_total(n bigint)");
    exec_ok(l, "INSERT INTO tx_total VALUES (0)");
    assert_int_equal(pb_release(l), PB_OK);

    pid_t kids[NW];
    fflush(NULL);
    for (int i = 0; i < NW; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            pb_client *k = NULL;
            if (pb_connect(env.sock_path, &k) != PB_OK)
                _exit(2);
            pb_lease *m = NULL;
            if (pb_acquire(k, "tx1", 20000, &m) != PB_OK)
                _exit(3);
            for (int j = 0; j < PER; j++) {
                pb_result *r = NULL;
                const char *sql = j % 2 ? "UPDATE tx_total SET n = n + 1"
                                        : "BEGIN; UPDATE tx_total SET n = n + 1; COMMIT";
                if (pb_pg_exec(m, sql, &r) != PB_OK || pb_result_status(r) != PB_RES_COMMAND_OK)
                    _exit(4);
                pb_result_free(r);
            }
            pb_release(m);
            pb_disconnect(k);
            _exit(0);
        }
        pbt_track_child(kids[i]);
    }
    for (int i = 0; i < NW; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        pbt_untrack_child(kids[i]);
        assert_true(WIFEXITED(st));
        assert_int_equal(WEXITSTATUS(st), 0);
    }
    l = pbt_lease(c, "tx1", 5000);
    assert_int_equal(pbt_pg_int(l, "SELECT n FROM tx_total"), NW * PER);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
}

/* A worker killed with a transaction open: it rolls back, the backend
 * serves the next lease, idle.  A worker killed while its statement waits
 * in the queue: the statement never runs. */
static void test_death_mid_transaction_and_mid_queue(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "tx1", 5000);
    exec_ok(l, "DROP TABLE IF EXISTS tx_dead");
    exec_ok(l, "CREATE TABLE tx_dead(who text)");
    assert_int_equal(pb_release(l), PB_OK);

    int ready[2];
    assert_int_equal(pipe(ready), 0);
    fflush(NULL);
    pid_t k = fork();
    assert_true(k >= 0);
    if (k == 0) {
        pb_client *kc = NULL;
        pb_lease *kl = NULL;
        pb_result *r = NULL;
        if (pb_connect(env.sock_path, &kc) != PB_OK || pb_acquire(kc, "tx1", 5000, &kl) != PB_OK ||
            pb_pg_exec(kl, "BEGIN; INSERT INTO tx_dead VALUES ('mid-transaction')", &r) != PB_OK)
            _exit(2);
        (void)!write(ready[1], "x", 1);
        pause();
        _exit(0);
    }
    pbt_track_child(k);
    char x;
    assert_int_equal(read(ready[0], &x, 1), 1);
    /* The only backend is in k's transaction: a third process's statement
     * queues behind it, and dies there. */
    pid_t q = fork();
    assert_true(q >= 0);
    if (q == 0) {
        pb_client *kc = NULL;
        pb_lease *kl = NULL;
        pb_result *r = NULL;
        if (pb_connect(env.sock_path, &kc) != PB_OK || pb_acquire(kc, "tx1", 5000, &kl) != PB_OK)
            _exit(2);
        (void)!write(ready[1], "y", 1);
        pb_pg_exec(kl, "INSERT INTO tx_dead VALUES ('mid-queue')", &r);
        _exit(0);
    }
    pbt_track_child(q);
    assert_int_equal(read(ready[0], &x, 1), 1);
    pbt_sleep_ms(200);                  /* its statement is queued by now */
    kill(q, SIGKILL);
    waitpid(q, NULL, 0);
    pbt_untrack_child(q);
    kill(k, SIGKILL);
    waitpid(k, NULL, 0);
    pbt_untrack_child(k);

    l = pbt_lease(c, "tx1", 10000);
    assert_int_equal(pbt_pg_int(l, "SELECT count(*) FROM tx_dead"), 0);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_transaction_status(l), PB_TRANS_IDLE);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_sleep_ms(300);
    l = pbt_lease(c, "tx1", 10000);
    assert_int_equal(pbt_pg_int(l, "SELECT count(*) FROM tx_dead"), 0);
    assert_int_equal(pb_release(l), PB_OK);
    close(ready[0]);
    close(ready[1]);
    pbt_cli_done(c);
}

/* The object of pool's backend number in shmstat's JSON "backends" array
 * (a copy, up to its closing brace), or fail. */
static void backend_json(const char *json, const char *pool, int number, char *out, size_t n)
{
    const char *arr = strstr(json, "\"backends\": [");
    assert_non_null(arr);
    char key[96];
    snprintf(key, sizeof key, "{\"pool\": \"%s\", \"number\": %d,", pool, number);
    const char *o = strstr(arr, key);
    if (!o)
        fail_msg("no backend %d of %s in %s", number, pool, arr);
    const char *end = strchr(o, '}');
    assert_non_null(end);
    snprintf(out, n, "%.*s", (int)(end - o + 1), o);
}

/* The pool's shmstat figures behind the handles, as --json gives them. */
static void assert_pool_backends(const char *json, int leased, int backends, int bound, int idle, int queued)
{
    char mode[32];
    assert_int_equal(pbt_json_pool_str(json, "txs", "pool_mode", mode, sizeof mode), 0);
    assert_string_equal(mode, "transaction");
    assert_int_equal(pbt_json_pool_num(json, "txs", "leased"), leased);
    assert_int_equal(pbt_json_pool_num(json, "txs", "backends"), backends);
    assert_int_equal(pbt_json_pool_num(json, "txs", "backends_bound"), bound);
    assert_int_equal(pbt_json_pool_num(json, "txs", "backends_idle"), idle);
    assert_int_equal(pbt_json_pool_num(json, "txs", "queued"), queued);
}

/* shmstat in transaction mode: A's transaction holds the pool's one
 * backend, B holds an idle handle, a third process's statement waits in the
 * queue.  shmstat says so, per pool and per backend, in text and JSON. */
static void test_shmstat_shows_backends(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *a = pbt_lease(c, "txs", 5000);
    exec_ok(a, "BEGIN");
    long long pa = pbt_pg_int(a, "SELECT pg_backend_pid()");
    pb_lease *b = pbt_lease(c, "txs", 5000);
    int ready[2];
    assert_int_equal(pipe(ready), 0);
    fflush(NULL);
    pid_t q = fork();
    assert_true(q >= 0);
    if (q == 0) {
        pb_client *kc = NULL;
        pb_lease *kl = NULL;
        pb_result *r = NULL;
        if (pb_connect(env.sock_path, &kc) != PB_OK || pb_acquire(kc, "txs", 5000, &kl) != PB_OK)
            _exit(2);
        (void)!write(ready[1], "y", 1);
        _exit(pb_pg_exec(kl, "SELECT 1", &r) == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK ? 0 : 3);
    }
    pbt_track_child(q);
    char x;
    assert_int_equal(read(ready[0], &x, 1), 1);
    pbt_sleep_ms(400);                  /* queued, and the janitor published it (every 100 ms) */

    /* Every pool's slots come first in the JSON: room for all of them. */
    static char json[1 << 20], row[512], text[65536], want[256];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    assert_pool_backends(json, 3, 1, 1, 0, 1);
    backend_json(json, "txs", 0, row, sizeof row);
    snprintf(want, sizeof want, "\"state\": \"bound\", \"handle\": ");
    if (!strstr(row, want))
        fail_msg("not bound: %s", row);
    snprintf(want, sizeof want, "\"worker_pid\": %d, \"backend_pid\": %lld,", (int)getpid(), pa);
    if (!strstr(row, want))
        fail_msg("not %s: %s", want, row);

    char bin[512];
    pbt_shmstat_path(&env, bin, sizeof bin);
    char *argv[] = { bin, (char *)"-s", env.shm_name, (char *)"-p", (char *)"txs", NULL };
    assert_int_equal(th_run(argv, text, sizeof text, 10000), 0);
    if (!strstr(text, "txs transaction mode: 3 handles in use, 1 backend (1 bound, 0 idle), 1 statement queued"))
        fail_msg("no transaction-mode line:\n%s", text);
    const char *hdr = strstr(text, "BACKEND STATE");
    assert_non_null(hdr);
    snprintf(want, sizeof want, "%d", (int)getpid());
    char pid_a[32];
    snprintf(pid_a, sizeof pid_a, "%lld", pa);
    if (!strstr(hdr, "bound") || !strstr(hdr, want) || !strstr(hdr, pid_a))
        fail_msg("no bound backend row with worker %s and pid %s:\n%s", want, pid_a, hdr);
    print_message("      shmstat -p txs, backends:\n%s\n", hdr);
    /* The Prometheus form says the same. */
    char *pargv[] = { bin, (char *)"-s", env.shm_name, (char *)"-p", (char *)"txs", (char *)"--prometheus", NULL };
    assert_int_equal(th_run(pargv, text, sizeof text, 10000), 0);
    if (!strstr(text, "poolbroker_pool_backends{pool=\"txs\",state=\"bound\"} 1\n") ||
        !strstr(text, "poolbroker_pool_statements_queued{pool=\"txs\"} 1\n"))
        fail_msg("no backend gauges:\n%s", text);

    /* A commits: the backend serves the queued statement, then is idle. */
    exec_ok(a, "COMMIT");
    int st;
    assert_int_equal(waitpid(q, &st, 0), q);
    pbt_untrack_child(q);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(b), PB_OK);
    pbt_sleep_ms(400);
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    assert_pool_backends(json, 0, 1, 0, 1, 0);
    backend_json(json, "txs", 0, row, sizeof row);
    snprintf(want, sizeof want, "\"state\": \"idle\", \"handle\": null, \"worker_pid\": 0, \"backend_pid\": %lld,",
             pa);
    if (!strstr(row, want))
        fail_msg("not %s: %s", want, row);
    close(ready[0]);
    close(ready[1]);
    pbt_cli_done(c);
}

/* Redis: two leases share the one connection command by command; MULTI
 * pins it until EXEC. */
static void test_redis_binds_per_command(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *a = pbt_lease(c, "rtx", 5000);
    pb_lease *b = pbt_lease(c, "rtx", 5000);
    redisReply *r = NULL;
    assert_int_equal(pb_redis_command(a, &r, "SET txk a"), PB_OK);
    freeReplyObject(r);
    assert_int_equal(pb_redis_command(b, &r, "GET txk"), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, "a");
    freeReplyObject(r);
    assert_int_equal(pb_redis_command(a, &r, "MULTI"), PB_OK);
    freeReplyObject(r);
    assert_int_equal(pb_redis_command(a, &r, "INCR txn:c"), PB_OK);
    freeReplyObject(r);
    /* B's command waits for a's EXEC: it would land inside the MULTI. */
    r = NULL;
    assert_int_equal(pb_redis_command(b, &r, "SET txk b"), PB_ETIMEDOUT);
    if (r)
        freeReplyObject(r);
    assert_int_equal(pb_redis_command(a, &r, "EXEC"), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    freeReplyObject(r);
    assert_int_equal(pb_release(b), PB_OK);
    b = pbt_lease(c, "rtx", 5000);
    assert_int_equal(pb_redis_command(b, &r, "GET txk"), PB_OK);
    assert_string_equal(r->str, "a");
    freeReplyObject(r);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(b), PB_OK);
    pbt_cli_done(c);
}


/* ------------------------------------------------ Redis pipelining */

#define RNW  12                         /* processes */
#define RPER 400                        /* INCR + GET pairs each */

/* A child of the pipelining tests: RPER times INCR its own key and GET it
 * (every third pair in one pipelined request); exits 0 when every reply
 * was its own, else the number of the check that failed. */
static void incr_get_child(int i)
{
    pb_client *k = NULL;
    pb_lease *m = NULL;
    char key[32];
    snprintf(key, sizeof key, "px:%d", i);
    if (pb_connect(env.sock_path, &k) != PB_OK || pb_acquire(k, "rpx", 20000, &m) != PB_OK)
        _exit(2);
    for (long long j = 1; j <= RPER; j++) {
        redisReply *a = NULL, *b = NULL;
        if (j % 3 == 0) {
            if (pb_redis_append_command(m, "INCR %s", key) != PB_OK ||
                pb_redis_append_command(m, "GET %s", key) != PB_OK || pb_redis_get_reply(m, &a) != PB_OK ||
                pb_redis_get_reply(m, &b) != PB_OK)
                _exit(3);
        } else if (pb_redis_command(m, &a, "INCR %s", key) != PB_OK ||
                   pb_redis_command(m, &b, "GET %s", key) != PB_OK) {
            _exit(4);
        }
        if (a->type != REDIS_REPLY_INTEGER || a->integer != j)
            _exit(5);
        if (b->type != REDIS_REPLY_STRING || strtoll(b->str, NULL, 10) != j)
            _exit(6);
        freeReplyObject(a);
        freeReplyObject(b);
    }
    pb_release(m);
    pb_disconnect(k);
    _exit(0);
}

static void wait_kids(pid_t *kids, int n)
{
    for (int i = 0; i < n; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        pbt_untrack_child(kids[i]);
        assert_true(WIFEXITED(st));
        assert_int_equal(WEXITSTATUS(st), 0);
    }
}

static void redis_cli_ok(const char *args)
{
    char out[4096];
    assert_int_equal(th_redis_cli(&env, args, out, sizeof out), 0);
    if (strstr(out, "ERR"))
        fail_msg("redis-cli %s: %s", args, out);
}

/* 12 processes x 400 INCR/GET pairs on one connection, pipelined among
 * them: each gets exactly its own replies, and the totals are exact. */
static void test_redis_pipeline_own_replies(void **state)
{
    (void)state;
    redis_cli_ok("DEL px:0 px:1 px:2 px:3 px:4 px:5 px:6 px:7 px:8 px:9 px:10 px:11");
    pid_t kids[RNW];
    fflush(NULL);
    for (int i = 0; i < RNW; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0)
            incr_get_child(i);
        pbt_track_child(kids[i]);
    }
    wait_kids(kids, RNW);
    char out[64];
    assert_int_equal(th_redis_cli(&env, "GET px:7", out, sizeof out), 0);
    assert_int_equal(atoi(out), RPER);
}

/* A MULTI pins the one connection while 12 processes pipeline on it: it
 * waits for their commands in flight, holds the connection alone until
 * EXEC (nobody's command lands inside it), and everyone's replies are
 * their own. */
static void test_redis_multi_while_pipelining(void **state)
{
    (void)state;
    redis_cli_ok("DEL px:0 px:1 px:2 px:3 px:4 px:5 px:6 px:7 px:8 px:9 px:10 px:11 px:m");
    pid_t kids[RNW];
    fflush(NULL);
    for (int i = 0; i < RNW; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0)
            incr_get_child(i);
        pbt_track_child(kids[i]);
    }
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "rpx", 20000);
    redisReply *r = NULL;
    for (int round = 0; round < 20; round++) {
        assert_int_equal(pb_redis_command(l, &r, "MULTI"), PB_OK);
        freeReplyObject(r);
        assert_int_equal(pb_redis_command(l, &r, "INCR px:m"), PB_OK);
        assert_int_equal(r->type, REDIS_REPLY_STATUS);      /* QUEUED: inside our MULTI */
        freeReplyObject(r);
        assert_int_equal(pb_redis_command(l, &r, "INCR px:m"), PB_OK);
        freeReplyObject(r);
        pbt_sleep_ms(5);                /* the others' commands wait meanwhile */
        assert_int_equal(pb_redis_command(l, &r, "EXEC"), PB_OK);
        assert_int_equal(r->type, REDIS_REPLY_ARRAY);
        assert_int_equal(r->elements, 2);
        assert_int_equal(r->element[1]->integer, 2 * round + 2);
        freeReplyObject(r);
    }
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
    wait_kids(kids, RNW);
}

/* The id of the broker's connection of pool name (CLIENT LIST), or -1. */
static long long broker_client_id(const char *name)
{
    static char out[65536];
    char want[64];
    if (th_redis_cli(&env, "CLIENT LIST", out, sizeof out) != 0)
        return -1;
    snprintf(want, sizeof want, " name=poolbroker:%s ", name);
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n"))
        if (strstr(line, want) && strncmp(line, "id=", 3) == 0)
            return atoll(line + 3);
    return -1;
}

/* The shared connection is lost with 6 processes' commands in flight on it
 * (held by CLIENT PAUSE WRITE): all 6 fail with PB_EBACKEND, and the pool
 * serves the next commands on a new connection. */
static void test_redis_pipeline_backend_lost(void **state)
{
    (void)state;
    enum { N = 6 };
    int ready[2];
    assert_int_equal(pipe(ready), 0);
    redis_cli_ok("DEL px:lost");
    redis_cli_ok("CLIENT PAUSE 5000 WRITE");
    pid_t kids[N];
    fflush(NULL);
    for (int i = 0; i < N; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            pb_client *k = NULL;
            pb_lease *m = NULL;
            redisReply *r = NULL;
            if (pb_connect(env.sock_path, &k) != PB_OK || pb_acquire(k, "rpx", 20000, &m) != PB_OK)
                _exit(2);
            (void)!write(ready[1], "x", 1);
            int rc = pb_redis_command(m, &r, "INCR px:lost");
            _exit(rc == PB_EBACKEND ? 0 : 10 + (rc < 0 ? -rc : rc) % 100);
        }
        pbt_track_child(kids[i]);
    }
    char x;
    for (int i = 0; i < N; i++)
        assert_int_equal(read(ready[0], &x, 1), 1);
    pbt_sleep_ms(300);                  /* their INCRs are in flight, held by the pause */
    long long id = broker_client_id("rpx");
    assert_true(id > 0);
    char cmd[64];
    snprintf(cmd, sizeof cmd, "CLIENT KILL ID %lld", id);
    redis_cli_ok(cmd);
    wait_kids(kids, N);
    redis_cli_ok("CLIENT UNPAUSE");
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "rpx", 20000);
    redisReply *r = NULL;
    assert_int_equal(pb_redis_command(l, &r, "GET px:lost"), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_NIL);     /* none of the INCRs ran */
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
    close(ready[0]);
    close(ready[1]);
}

/* command_timeout_ms on a shared connection with 4 processes' commands in
 * flight (held by CLIENT PAUSE WRITE): the connection is closed; the
 * oldest command fails with PB_ETIMEDOUT, the other 3 with PB_EBACKEND. */
static void test_redis_pipeline_timeout(void **state)
{
    (void)state;
    enum { N = 4 };
    int ready[2], res[2];
    assert_int_equal(pipe(ready), 0);
    assert_int_equal(pipe(res), 0);
    redis_cli_ok("CLIENT PAUSE 3000 WRITE");
    pid_t kids[N];
    fflush(NULL);
    for (int i = 0; i < N; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            pb_client *k = NULL;
            pb_lease *m = NULL;
            redisReply *r = NULL;
            if (pb_connect(env.sock_path, &k) != PB_OK || pb_acquire(k, "rpt", 20000, &m) != PB_OK)
                _exit(2);
            (void)!write(ready[1], "x", 1);
            int rc = pb_redis_command(m, &r, "INCR px:timeout");
            char t = rc == PB_ETIMEDOUT ? 't' : rc == PB_EBACKEND ? 'b' : '?';
            (void)!write(res[1], &t, 1);
            _exit(0);
        }
        pbt_track_child(kids[i]);
    }
    char x;
    for (int i = 0; i < N; i++)
        assert_int_equal(read(ready[0], &x, 1), 1);
    int timedout = 0, lost = 0;
    for (int i = 0; i < N; i++) {
        assert_int_equal(read(res[0], &x, 1), 1);
        timedout += x == 't';
        lost += x == 'b';
    }
    wait_kids(kids, N);
    redis_cli_ok("CLIENT UNPAUSE");
    assert_int_equal(timedout, 1);
    assert_int_equal(lost, N - 1);
    close(ready[0]);
    close(ready[1]);
    close(res[0]);
    close(res[1]);
}

/* A GET of the handle's next holder, answered right after an INCR of the
 * previous one that was still in flight: the next holder gets its GET's
 * reply, never the INCR's. */
static void get_after_stale(pb_client *c, const char *what)
{
    pb_lease *l = pbt_lease(c, "rp1", 20000);   /* pool rp1 has one handle: the same one */
    redisReply *r = NULL;
    const char *get[] = { "GET", "px:mine" };
    assert_int_equal(pb_redis_send_argv(l, 2, get, NULL), PB_OK);
    pbt_sleep_ms(100);                  /* queued behind the stale INCR, both held */
    redis_cli_ok("CLIENT UNPAUSE");
    assert_int_equal(pb_redis_get_reply(l, &r), PB_OK);
    if (r->type != REDIS_REPLY_STRING || strcmp(r->str, "mine") != 0)
        fail_msg("%s: the next holder got type %d, not its own GET's reply", what, r->type);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
}

static void test_redis_stale_reply_dropped(void **state)
{
    (void)state;
    redis_cli_ok("SET px:mine mine");
    /* Released with its INCR in flight. */
    pb_client *c = pbt_cli(&env);
    redis_cli_ok("CLIENT PAUSE 5000 WRITE");
    pb_lease *l = pbt_lease(c, "rp1", 20000);
    const char *argv[] = { "INCR", "px:stale" };
    assert_int_equal(pb_redis_send_argv(l, 2, argv, NULL), PB_OK);
    pbt_sleep_ms(50);
    assert_int_equal(pb_release(l), PB_OK);
    get_after_stale(c, "release");

    /* Killed with its INCR in flight. */
    int ready[2];
    assert_int_equal(pipe(ready), 0);
    redis_cli_ok("CLIENT PAUSE 5000 WRITE");
    fflush(NULL);
    pid_t k = fork();
    assert_true(k >= 0);
    if (k == 0) {
        pb_client *kc = NULL;
        pb_lease *kl = NULL;
        if (pb_connect(env.sock_path, &kc) != PB_OK || pb_acquire(kc, "rp1", 5000, &kl) != PB_OK ||
            pb_redis_send_argv(kl, 2, argv, NULL) != PB_OK)
            _exit(2);
        (void)!write(ready[1], "x", 1);
        pause();
        _exit(0);
    }
    pbt_track_child(k);
    char x;
    assert_int_equal(read(ready[0], &x, 1), 1);
    pbt_sleep_ms(50);
    kill(k, SIGKILL);
    waitpid(k, NULL, 0);
    pbt_untrack_child(k);
    get_after_stale(c, "death");
    close(ready[0]);
    close(ready[1]);
    pbt_cli_done(c);
}

/* ----------------------------------------------- PostgreSQL statements shared */

#define SH_READERS 8
#define SH_ROUNDS  400

/* Set by the parent once it has seen the backend shared (a shared
 * mapping): the readers go on until then, 20 s at most, so that a slow
 * machine cannot make the parent miss the window. */
static _Atomic int *seen_shared;

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A shared flag for the readers (seen_shared), 0 when wait, else 1. */
static void seen_shared_init(int wait)
{
    if (!seen_shared) {
        seen_shared = mmap(NULL, sizeof *seen_shared, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        assert_true(seen_shared != MAP_FAILED);
    }
    atomic_store(seen_shared, !wait);
}

/* Poll shmstat until backend 0 of txsh is seen shared (20 s at most), then
 * let the readers stop. */
static int txsh_shared(void);
static int wait_shared(void)
{
    int shared = 0;
    for (int t = 0; t < 800 && !shared; t++) {
        pbt_sleep_ms(25);
        shared = txsh_shared();
    }
    atomic_store(seen_shared, 1);
    return shared;
}

/* One reader: its own number, in its own text or as the parameter of a
 * text the odd readers share, SH_ROUNDS times on one lease; each answer
 * must be its own number, outside any transaction
 * (now() is the statement's own start, no transaction id assigned) and
 * with the pool's application_name, not the one another lease sets
 * (check_setting).  Exit status: 0, or which check failed. */
static void shared_reader(int i, int check_setting)
{
    pb_client *k = NULL;
    pb_lease *m = NULL;
    if (pb_connect(env.sock_path, &k) != PB_OK || pb_acquire(k, "txsh", 20000, &m) != PB_OK)
        _exit(2);
    /* Even readers: a text of their own (simple Query); odd ones: one text
     * for all of them, their number a parameter (Parse/Bind/.../Sync). */
    char sql[256], val[16];
    const char *vals[1] = { val };
    snprintf(val, sizeof val, "%d", 1000 + i);
    snprintf(sql, sizeof sql,
             "SELECT %s, now() = statement_timestamp(), pg_current_xact_id_if_assigned() IS NULL, "
             "current_setting('application_name')", i % 2 ? "$1::int" : val);
    double until = mono_s() + 20;
    for (int j = 0; j < SH_ROUNDS || (!atomic_load(seen_shared) && mono_s() < until); j++) {
        pb_result *r = NULL;
        int rc = i % 2 ? pb_pg_exec_params(m, sql, 1, NULL, vals, NULL, NULL, 0, &r) : pb_pg_exec(m, sql, &r);
        if (rc != PB_OK || pb_result_status(r) != PB_RES_TUPLES_OK)
            _exit(3);
        if (atoi(pb_getvalue(r, 0, 0)) != 1000 + i)
            _exit(4);                   /* someone else's reply */
        /* Inside another lease's transaction: it has a transaction id
         * (shared_other assigns one), and, for a simple Query, now() is
         * the transaction's start, not this statement's (the extended
         * protocol stamps each message, so there they differ anyway). */
        if ((i % 2 == 0 && strcmp(pb_getvalue(r, 0, 1), "t")) || strcmp(pb_getvalue(r, 0, 2), "t"))
            _exit(5);
        if (check_setting && strcmp(pb_getvalue(r, 0, 3), "txsh"))
            _exit(6);                   /* another lease's setting */
        pb_result_free(r);
    }
    pb_release(m);
    pb_disconnect(k);
    _exit(0);
}

/* The others: which == 0 sets application_name (reported: it pins, and is
 * reset at release); 1 runs a transaction that takes a transaction id; 2 a
 * statement shared but not quick (5 ms: quick ones do not queue behind it). */
static void shared_other(int which)
{
    pb_client *k = NULL;
    if (pb_connect(env.sock_path, &k) != PB_OK)
        _exit(2);
    for (int j = 0; j < 60; j++) {
        pb_lease *m = NULL;
        if (pb_acquire(k, "txsh", 20000, &m) != PB_OK)
            _exit(3);
        static const char *const set[] = { "SELECT set_config('application_name', 'leak', false)", "SELECT 1" };
        static const char *const txn[] = { "BEGIN", "SELECT pg_current_xact_id()", "SELECT pg_sleep(0.002)",
                                           "COMMIT" };
        static const char *const slow[] = { "SELECT pg_sleep(0.005), 'slow'", "SELECT pg_sleep(0.005), 'slow'" };
        const char *const *q = which == 0 ? set : which == 1 ? txn : slow;
        int n = which == 0 ? 2 : which == 1 ? 4 : 2;
        for (int t = 0; t < n; t++) {
            pb_result *r = NULL;
            if (pb_pg_exec(m, q[t], &r) != PB_OK || pb_result_status(r) == PB_RES_ERROR)
                _exit(4);
            pb_result_free(r);
        }
        pb_release(m);
    }
    pb_disconnect(k);
    _exit(0);
}

/* Is backend 0 of txsh shared right now (shmstat --json)?  Not while it
 * is not listed yet (still connecting, in a run of this test alone). */
static int txsh_shared(void)
{
    static char json[1 << 20];
    char one[1024];
    if (pbt_shmstat_json(&env, json, sizeof json) != 0)
        fail_msg("shmstat --json failed");
    if (!strstr(json, "{\"pool\": \"txsh\", \"number\": 0,"))
        return 0;
    backend_json(json, "txsh", 0, one, sizeof one);
    return strstr(one, "\"state\": \"shared\"") != NULL;
}

static void wait_ok(pid_t *kids, int n)
{
    for (int i = 0; i < n; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        pbt_untrack_child(kids[i]);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            fail_msg("process %d: %s %d", i, WIFEXITED(st) ? "exit status" : "signal",
                     WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    }
}

/* 8 readers, each with its own statement, on a pool of one backend, beside
 * a process that sets a reported setting, one that runs transactions and
 * one whose statement is shared but slow.
 * The readers' statements are shared (several in flight on the backend at
 * once: shmstat says "shared"), the other two processes' never are: no
 * reader gets another's row, runs inside the transaction or sees the
 * setting. */
static void test_pg_shared_statements(void **state)
{
    (void)state;
    pid_t kids[SH_READERS + 3];
    seen_shared_init(1);
    fflush(NULL);
    for (int i = 0; i < SH_READERS + 3; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            if (i < SH_READERS)
                shared_reader(i, 1);
            shared_other(i - SH_READERS);
        }
        pbt_track_child(kids[i]);
    }
    int shared = wait_shared();
    wait_ok(kids, SH_READERS + 3);
    assert_true(shared);
}

#define PREP_SQL "SELECT $1::int4 + 0, pg_current_xact_id_if_assigned() IS NULL"

/* One reader of a statement prepared with pb_pg_prepare (a library-named
 * statement, which the broker's statement record may run without its
 * Parse): its own number back, at least SH_ROUNDS times and until the
 * parent has seen sharing, outside any transaction.  Exit status: 0, or
 * which check failed. */
static void prepared_reader(int i)
{
    pb_client *k = NULL;
    pb_lease *m = NULL;
    if (pb_connect(env.sock_path, &k) != PB_OK || pb_acquire(k, "txsh", 20000, &m) != PB_OK)
        _exit(2);
    unsigned types[1] = { 23 };
    pb_result *r = NULL;
    if (pb_pg_prepare(m, "rd", PREP_SQL, 1, types, &r) != PB_OK || pb_result_status(r) == PB_RES_ERROR)
        _exit(3);
    pb_result_free(r);
    char val[16];
    const char *vals[1] = { val };
    snprintf(val, sizeof val, "%d", 2000 + i);
    double until = mono_s() + 20;
    for (int j = 0; j < SH_ROUNDS || (!atomic_load(seen_shared) && mono_s() < until); j++) {
        r = NULL;
        if (pb_pg_exec_prepared(m, "rd", 1, vals, NULL, NULL, 0, &r) != PB_OK ||
            pb_result_status(r) != PB_RES_TUPLES_OK)
            _exit(4);
        if (atoi(pb_getvalue(r, 0, 0)) != 2000 + i)
            _exit(5);                   /* someone else's reply */
        if (strcmp(pb_getvalue(r, 0, 1), "t"))
            _exit(6);                   /* inside another lease's transaction */
        pb_result_free(r);
    }
    pb_release(m);
    pb_disconnect(k);
    _exit(0);
}

/* Statements prepared with pb_pg_prepare share too (pgshare.c keys them
 * on the Parse's text, taken before the broker drops a Parse the backend
 * has): 6 readers of one prepared statement on a pool of one backend,
 * beside a process running transactions; the backend is seen shared, and
 * every reader gets its own number, never inside the transaction.  On the
 * shared backend the broker still drops the Parse the backend has: the
 * server's log (log_min_duration_statement = 0 logs each Parse and each
 * Execute) shows far fewer Parses of the statement than executions. */
static void test_pg_shared_prepared(void **state)
{
    (void)state;
    enum { READERS = 6 };
    pid_t kids[READERS + 1];
    seen_shared_init(1);
    char log[400], out[64];
    snprintf(log, sizeof log, "%s/pg.log", env.dir);
    assert_int_equal(th_psql(&env, "ALTER SYSTEM SET log_min_duration_statement = 0", out, sizeof out), 0);
    assert_int_equal(th_psql(&env, "SELECT pg_reload_conf()", out, sizeof out), 0);
    pbt_sleep_ms(200);
    long parses0 = th_count_lines(log, "parse pb_"), execs0 = th_count_lines(log, "execute pb_");
    fflush(NULL);
    for (int i = 0; i < READERS + 1; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            if (i < READERS)
                prepared_reader(i);
            shared_other(1);
        }
        pbt_track_child(kids[i]);
    }
    int shared = wait_shared();
    wait_ok(kids, READERS + 1);
    th_psql(&env, "ALTER SYSTEM RESET log_min_duration_statement", out, sizeof out);
    th_psql(&env, "SELECT pg_reload_conf()", out, sizeof out);
    assert_true(shared);
    long parses = th_count_lines(log, "parse pb_") - parses0, execs = th_count_lines(log, "execute pb_") - execs0;
    print_message("prepared statement: %ld executions, %ld Parses sent\n", execs, parses);
    assert_true(execs >= READERS * SH_ROUNDS);
    if (parses * 4 > execs)
        fail_msg("%ld Parses for %ld executions: the broker did not drop the Parse the backend had", parses, execs);
}

/* A text shared, then changed behind the broker's back: a function first
 * returns 1, and once its SELECT is shared it is redefined to set
 * application_name.  The next run, shared, reports the setting: the text is
 * never shared again, the backend takes no more shared statements and is
 * reset when those in flight are answered, and no later lease sees the
 * setting. */
static void test_pg_shared_text_that_changes(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "txsh", 5000);
    exec_ok(l, "CREATE OR REPLACE FUNCTION tx_shf() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'");
    assert_int_equal(pb_release(l), PB_OK);
    pb_lease *u = pbt_lease(c, "txsh", 5000);
    for (int i = 0; i < 4; i++)
        assert_int_equal(pbt_pg_int(u, "SELECT tx_shf()"), 1);
    /* Proven; with readers pipelining on the one backend, u's next run of it
     * is shared.  The readers do not check the setting: a statement already
     * sent behind the one that changed may see it (docs/pooling.md). */
    pid_t kids[4];
    seen_shared_init(0);                /* the readers do their SH_ROUNDS, no more */
    fflush(NULL);
    for (int i = 0; i < 4; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0)
            shared_reader(i, 0);
        pbt_track_child(kids[i]);
    }
    l = pbt_lease(c, "txsh", 5000);
    exec_ok(l, "CREATE OR REPLACE FUNCTION tx_shf() RETURNS int LANGUAGE plpgsql AS "
               "'BEGIN PERFORM set_config(''application_name'', ''leak2'', false); RETURN 2; END'");
    assert_int_equal(pb_release(l), PB_OK);     /* reset (the CREATE tag) */
    pbt_sleep_ms(300);
    static char json[1 << 20];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    long long resets0 = pbt_json_pool_num(json, "txsh", "resets");
    /* Shared: u is bound to nothing, so nothing of u's resets the backend;
     * only the broker's reset of the tainted backend (mux_settle) does,
     * while u still holds its lease.  (Bound, u would be pinned by the
     * setting and reset at its release.) */
    assert_int_equal(pbt_pg_int(u, "SELECT tx_shf()"), 2);
    wait_ok(kids, 4);
    pbt_sleep_ms(300);
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    assert_true(pbt_json_pool_num(json, "txsh", "resets") > resets0);
    assert_int_equal(pb_release(u), PB_OK);
    /* Every later lease of the one backend: the pool's name. */
    for (int i = 0; i < 5; i++) {
        l = pbt_lease(c, "txsh", 5000);
        pb_result *r = NULL;
        assert_int_equal(pb_pg_exec(l, "SHOW application_name", &r), PB_OK);
        assert_string_equal(pb_getvalue(r, 0, 0), "txsh");
        pb_result_free(r);
        assert_int_equal(pb_release(l), PB_OK);
    }
    pbt_cli_done(c);
}

/* A worker with a transaction open must not have its next statement sent
 * behind another lease's shared statement that waits for that
 * transaction's lock: it would wait for ever, and so would the
 * transaction (a deadlock the server cannot see).  Pool of 3 with
 * command_timeout_ms 3000: A (this process) updates a row in a
 * transaction; C (another process) runs a proven UPDATE of the same row,
 * shared, which waits; then B (this process) runs a proven SELECT.  B must
 * answer at once, from a backend of its own, not time out behind C. */
static void test_pg_shared_not_behind_own_lock(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&env);
    pb_lease *a = pbt_lease(c, "txlk", 5000);
    exec_ok(a, "DROP TABLE IF EXISTS tx_lk");
    exec_ok(a, "CREATE TABLE tx_lk(id int PRIMARY KEY, n int)");
    exec_ok(a, "INSERT INTO tx_lk VALUES (1, 0)");
    assert_int_equal(pb_release(a), PB_OK);
    pb_lease *b = pbt_lease(c, "txlk", 5000);
    for (int i = 0; i < 3; i++) {       /* proven, both */
        exec_ok(b, "UPDATE tx_lk SET n = n + 1 WHERE id = 1");
        assert_int_equal(pbt_pg_int(b, "SELECT 41 + 1"), 42);
    }
    a = pbt_lease(c, "txlk", 5000);
    exec_ok(a, "BEGIN");
    exec_ok(a, "UPDATE tx_lk SET n = n + 100 WHERE id = 1");
    fflush(NULL);
    pid_t k = fork();
    assert_true(k >= 0);
    if (k == 0) {
        pb_client *kc = NULL;
        pb_lease *kl = NULL;
        pb_result *r = NULL;
        if (pb_connect(env.sock_path, &kc) != PB_OK || pb_acquire(kc, "txlk", 5000, &kl) != PB_OK)
            _exit(2);
        _exit(pb_pg_exec(kl, "UPDATE tx_lk SET n = n + 1 WHERE id = 1", &r) == PB_OK &&
                      pb_result_status(r) == PB_RES_COMMAND_OK ? 0 : 3);
    }
    pbt_track_child(k);
    pbt_sleep_ms(300);                  /* C waits for A's row lock */
    double t0 = pbt_now_ms();
    assert_int_equal(pbt_pg_int(b, "SELECT 41 + 1"), 42);
    assert_true(pbt_now_ms() - t0 < 2500);
    exec_ok(a, "COMMIT");
    wait_ok(&k, 1);
    assert_int_equal(pbt_pg_int(b, "SELECT n FROM tx_lk WHERE id = 1"), 3 + 100 + 1);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(b), PB_OK);
    pbt_cli_done(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_idle_lease_holds_nothing, pbt_cleanup),
        cmocka_unit_test_teardown(test_transaction_stays_on_one_backend, pbt_cleanup),
        cmocka_unit_test_teardown(test_session_state_pins_and_resets, pbt_cleanup),
        cmocka_unit_test_teardown(test_exact_totals_16_on_1, pbt_cleanup),
        cmocka_unit_test_teardown(test_death_mid_transaction_and_mid_queue, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_binds_per_command, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_pipeline_own_replies, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_multi_while_pipelining, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_pipeline_backend_lost, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_stale_reply_dropped, pbt_cleanup),
        cmocka_unit_test_teardown(test_redis_pipeline_timeout, pbt_cleanup),
        cmocka_unit_test_teardown(test_shmstat_shows_backends, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_shared_statements, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_shared_prepared, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_shared_text_that_changes, pbt_cleanup),
        cmocka_unit_test_teardown(test_pg_shared_not_behind_own_lock, pbt_cleanup),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
