/*
 * test_reload.c — reloads under load never take a working pool down
 * (issue #18):
 *   - new connection settings that parse but cannot connect (a closed port,
 *     a role that does not exist, a wrong Redis password) are tried on a
 *     connection of their own: the pool keeps serving on its old
 *     connections (the same backends), the broker says why in one whole
 *     line, and a later reload with settings that work switches the pool
 *     over; a conninfo libpq rejects (bogus_option) is refused outright;
 *   - a pool started with max_size = 2 and no `slots` grows to 5 on a
 *     reload (the default headroom), as the server and shmstat count;
 *   - pool_mode session -> transaction -> session under load: leases held
 *     across each switch (an open transaction in session mode; a pinned and
 *     an unpinned transaction-mode lease) keep their backend and mode until
 *     released, new leases get the new mode (a blocking and a non-blocking
 *     acquire queued in the old pool when it goes end in the new one), the
 *     load sees no error, and shmstat shows one serving pool with the old
 *     ones' connections gone;
 *     a switch whose new settings cannot connect keeps the old pool serving
 *     (same backends) until a reload takes the mode back; one that needs
 *     more spare slots than are left is refused, saying so.
 *
 * One group (its own temp dir, PostgreSQL, Redis); each test starts its own
 * broker.  Worker processes lease and run a command in a loop the whole time
 * and report every error.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
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
static int closed_port;          /* a port nothing listens on */

#define PGCI(app) "type = postgres\nconninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres " \
                  "sslmode=disable application_name=" app "\n"
#define RD "type = redis\nhost = 127.0.0.1\nport = @REDISPORT@\n"

static int group_setup(void **state)
{
    (void)state;
    char out[256];
    if (th_setup(&env, 1, 1) < 0)
        return -1;
    /* A Redis user with a password, for the wrong-password reload. */
    if (th_redis_cli(&env, "ACL SETUSER pbuser on >right-pass ~* &* +@all", out, sizeof out) != 0 ||
        !strstr(out, "OK"))
        return -1;
    /* Its password, and a wrong one, in files the broker reads. */
    const char *files[2][2] = { { "right.pass", "right-pass\n" }, { "wrong.pass", "wrong-pass\n" } };
    for (int i = 0; i < 2; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", env.dir, files[i][0]);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        ssize_t len = (ssize_t)strlen(files[i][1]);
        if (fd < 0 || write(fd, files[i][1], (size_t)len) != len)
            return -1;
        close(fd);
    }
    closed_port = th_free_port();
    return closed_port > 0 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

static int stop_broker(void **state)
{
    pbt_cleanup(state);
    if (env.broker_pid)
        th_broker_stop(&env, SIGTERM);
    return 0;
}

/* ------------------------------------------------------------------ load */

#define NLOAD 4

typedef struct load {
    pid_t kids[NLOAD];
    int stop_w, res_r;
} load;

/* One worker: lease pool, one command (SELECT 1 / INCR), release, until
 * the stop pipe closes; then report {ops, errors, first error}. */
static void load_worker(const char *pool, int redis, int stop_fd, int res_fd)
{
    long msg[3] = { 0, 0, 0 };
    pb_client *c = NULL;
    int rc = pb_connect(env.sock_path, &c);
    struct pollfd p = { .fd = stop_fd, .events = POLLIN };
    while (rc == PB_OK && poll(&p, 1, 0) == 0) {
        pb_lease *l = NULL;
        int err = pb_acquire(c, pool, 10000, &l);
        if (err == PB_OK && redis) {
            redisReply *r = NULL;
            err = pb_redis_command(l, &r, "INCR reload:load");
            if (err == PB_OK && (!r || r->type != REDIS_REPLY_INTEGER))
                err = PB_EPROTO;
            freeReplyObject(r);
        } else if (err == PB_OK) {
            pb_result *r = NULL;
            err = pb_pg_exec(l, "SELECT 1", &r);
            if (err == PB_OK && pb_result_status(r) != PB_RES_TUPLES_OK)
                err = PB_EPROTO;
            pb_result_free(r);
        }
        if (l && pb_release(l) != PB_OK && err == PB_OK)
            err = PB_ESTALE;
        msg[0]++;
        if (err != PB_OK && msg[1]++ == 0)
            msg[2] = err;
        usleep(2000);
    }
    if (rc != PB_OK) {
        msg[1] = 1;
        msg[2] = rc;
    }
    pb_disconnect(c);
    _exit(write(res_fd, msg, sizeof msg) == sizeof msg ? 0 : 3);
}

static void load_start(load *ld, const char *pool, int redis)
{
    int stopp[2], resp[2];
    assert_int_equal(pipe(stopp), 0);
    assert_int_equal(pipe(resp), 0);
    fflush(NULL);
    for (int i = 0; i < NLOAD; i++) {
        ld->kids[i] = fork();
        assert_true(ld->kids[i] >= 0);
        if (ld->kids[i] == 0) {
            close(stopp[1]);
            close(resp[0]);
            load_worker(pool, redis, stopp[0], resp[1]);
        }
        pbt_track_child(ld->kids[i]);
    }
    close(stopp[0]);
    close(resp[1]);
    ld->stop_w = stopp[1];
    ld->res_r = resp[0];
}

/* Stop the workers: every one ran commands, and none failed. */
static void load_stop_clean(load *ld)
{
    close(ld->stop_w);
    for (int i = 0; i < NLOAD; i++) {
        struct pollfd p = { .fd = ld->res_r, .events = POLLIN };
        assert_true(poll(&p, 1, 30000) == 1);
        long msg[3];
        assert_int_equal(read(ld->res_r, msg, sizeof msg), (ssize_t)sizeof msg);
        if (msg[1] || msg[0] == 0)
            fail_msg("a load worker: %ld commands, %ld errors, the first %s", msg[0], msg[1],
                     pb_strerror((int)msg[2]));
    }
    close(ld->res_r);
    for (int i = 0; i < NLOAD; i++) {
        int st;
        assert_int_equal(waitpid(ld->kids[i], &st, 0), ld->kids[i]);
        pbt_untrack_child(ld->kids[i]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
}

/* --------------------------------------------------------------- reloads */

/* Replace the pool sections of the broker's config with pools (placeholders
 * @PGHOST@ @PGPORT@ @REDISPORT@ @DIR@ @CLOSED@), SIGHUP the broker and wait for
 * the reload's verdict: "applied", or (expect_refused) "keeping the current
 * configuration". */
static void reload_pools(const char *pools, int expect_refused)
{
    static char text[16384], out[16384];
    FILE *f = fopen(env.conf_path, "r");
    assert_non_null(f);
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char *sec = strstr(text, "[pool ");
    assert_non_null(sec);
    *sec = 0;
    size_t o = (size_t)snprintf(out, sizeof out, "%s", text);
    for (const char *s = pools; *s && o < sizeof out - 300;) {
        char val[300];
        const char *key = NULL;
        if (!strncmp(s, "@PGHOST@", 8))
            key = "@PGHOST@", snprintf(val, sizeof val, "%s", env.pg_host);
        else if (!strncmp(s, "@PGPORT@", 8))
            key = "@PGPORT@", snprintf(val, sizeof val, "%d", env.pg_port);
        else if (!strncmp(s, "@REDISPORT@", 11))
            key = "@REDISPORT@", snprintf(val, sizeof val, "%d", env.redis_port);
        else if (!strncmp(s, "@DIR@", 5))
            key = "@DIR@", snprintf(val, sizeof val, "%s", env.dir);
        else if (!strncmp(s, "@CLOSED@", 8))
            key = "@CLOSED@", snprintf(val, sizeof val, "%d", closed_port);
        if (key) {
            o += (size_t)snprintf(out + o, sizeof out - o, "%s", val);
            s += strlen(key);
        } else {
            out[o++] = *s++;
        }
    }
    out[o] = 0;
    int fd = open(env.conf_path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, out, o), (ssize_t)o);
    close(fd);
    const char *verdict = expect_refused ? "keeping the current configuration" : " applied (";
    long before = th_count_lines(env.broker_log, verdict);
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, verdict, before + 1, 10000), 0);
}

/* The log line holding needle (the last one) is whole: it says why and ends
 * with the broker's (file:line). */
static void assert_whole_line(const char *needle, const char *why)
{
    static char text[1 << 20];
    FILE *f = fopen(env.broker_log, "r");
    assert_non_null(f);
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    const char *at = NULL;
    for (const char *s = text; (s = strstr(s, needle)); s++)
        at = s;
    assert_non_null(at);
    const char *eol = strchr(at, '\n');
    assert_non_null(eol);
    if (!memmem(at, (size_t)(eol - at), why, strlen(why)) || !memmem(at, (size_t)(eol - at), "(broker/", 8) ||
        eol[-1] != ')')
        fail_msg("not one whole line saying \"%s\": %.*s", why, (int)(eol - at), at);
}

/* The pool's health as shmstat says it. */
static void assert_healthy(const char *pool)
{
    static char json[1 << 20];
    char health[32];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    assert_int_equal(pbt_json_pool_str(json, pool, "health", health, sizeof health), 0);
    assert_string_equal(health, "healthy");
}

/* Settings that cannot connect, one after the other, then ones that can:
 * the pool's backends stay the same until the good ones, and the load never
 * sees an error. */
static void test_pg_bad_settings_keep_the_pool(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PGCI("pbreload") "min_size = 2\nmax_size = 2\n"), 0);
    assert_true(pbt_wait_pg_count(&env, "pbreload", 2, 10000) >= 0);
    char before[256], now[256];
    pbt_pg_pids(&env, "pbreload", before, sizeof before);
    load ld;
    load_start(&ld, "main", 0);

    reload_pools("[pool main]\ntype = postgres\nconninfo = host=127.0.0.1 port=@CLOSED@ user=postgres "
                 "dbname=postgres sslmode=disable application_name=pbreload2\nmin_size = 2\nmax_size = 2\n", 0);
    assert_int_equal(th_wait_log(&env, "pool main: the new connection settings do not connect (1 in a row)", 1,
                                 15000), 0);
    assert_whole_line("pool main: the new connection settings do not connect", "Connection refused");
    /* A few retries later, still the same backends, still healthy. */
    pbt_sleep_ms(1500);
    pbt_pg_pids(&env, "pbreload", now, sizeof now);
    assert_string_equal(now, before);
    assert_healthy("main");
    assert_int_equal(pbt_pg_count(&env, "pbreload2"), 0);

    reload_pools("[pool main]\n" PGCI("pbreload2 user=nosuchrole") "min_size = 2\nmax_size = 2\n", 0);
    assert_int_equal(th_wait_log(&env, "pool main: the new connection settings do not connect (1 in a row)", 2,
                                 15000), 0);
    assert_whole_line("pool main: the new connection settings do not connect", "\"nosuchrole\" does not exist");
    reload_pools("[pool main]\n" PGCI("pbreload2 bogus_option=1") "min_size = 2\nmax_size = 2\n", 1);
    pbt_sleep_ms(500);
    pbt_pg_pids(&env, "pbreload", now, sizeof now);
    assert_string_equal(now, before);
    assert_healthy("main");

    /* Settings that work: the pool moves over, the old backends go. */
    reload_pools("[pool main]\n" PGCI("pbreload2") "min_size = 2\nmax_size = 2\n", 0);
    assert_int_equal(th_wait_log(&env, "a connection with the new connection settings succeeded", 1, 15000), 0);
    assert_true(pbt_wait_pg_count(&env, "pbreload", 0, 15000) >= 0);
    assert_true(pbt_wait_pg_count(&env, "pbreload2", 2, 15000) >= 0);
    assert_healthy("main");
    load_stop_clean(&ld);
}

/* Redis: a closed port, then a wrong password (WRONGPASS), then db 5. */
static void test_redis_bad_settings_keep_the_pool(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool cache]\n" RD "min_size = 2\nmax_size = 2\n"), 0);
    assert_true(pbt_wait_redis_count(&env, "cache", 2, 10000) >= 0);
    long long ids[8], ids_now[8];
    assert_int_equal(pbt_redis_ids(&env, "cache", ids, 8), 2);
    load ld;
    load_start(&ld, "cache", 1);

    reload_pools("[pool cache]\ntype = redis\nhost = 127.0.0.1\nport = @CLOSED@\nmin_size = 2\nmax_size = 2\n", 0);
    assert_int_equal(th_wait_log(&env, "pool cache: the new connection settings do not connect (1 in a row)", 1,
                                 15000), 0);
    assert_whole_line("pool cache: the new connection settings do not connect", "Connection refused");
    reload_pools("[pool cache]\n" RD "user = pbuser\npassword_file = @DIR@/wrong.pass\nmin_size = 2\nmax_size = 2\n", 0);
    assert_int_equal(th_wait_log(&env, "pool cache: the new connection settings do not connect (1 in a row)", 2,
                                 15000), 0);
    assert_whole_line("pool cache: the new connection settings do not connect", "WRONGPASS");
    pbt_sleep_ms(1500);
    assert_int_equal(pbt_redis_ids(&env, "cache", ids_now, 8), 2);
    assert_true((ids_now[0] == ids[0] && ids_now[1] == ids[1]) || (ids_now[0] == ids[1] && ids_now[1] == ids[0]));
    assert_healthy("cache");

    reload_pools("[pool cache]\n" RD "user = pbuser\npassword_file = @DIR@/right.pass\ndb = 5\nmin_size = 2\nmax_size = 2\n", 0);
    assert_int_equal(th_wait_log(&env, "a connection with the new connection settings succeeded", 1, 15000), 0);
    /* Both old connections replaced. */
    for (int i = 0; i < 150; i++) {
        int n = pbt_redis_ids(&env, "cache", ids_now, 8);
        int old = 0;
        for (int k = 0; k < n; k++)
            old += ids_now[k] == ids[0] || ids_now[k] == ids[1];
        if (n == 2 && !old)
            break;
        pbt_sleep_ms(100);
    }
    assert_int_equal(pbt_redis_ids(&env, "cache", ids_now, 8), 2);
    assert_true(ids_now[0] != ids[0] && ids_now[0] != ids[1] && ids_now[1] != ids[0] && ids_now[1] != ids[1]);
    pb_client *c = pbt_cli(&env);
    pb_lease *l = pbt_lease(c, "cache", 5000);
    redisReply *r = NULL;
    assert_int_equal(pb_redis_command(l, &r, "CLIENT INFO"), PB_OK);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    if (!strstr(r->str, " db=5 ") || !strstr(r->str, " user=pbuser "))
        fail_msg("not the new settings: %s", r->str);
    freeReplyObject(r);
    assert_int_equal(pb_release(l), PB_OK);
    pbt_cli_done(c);
    load_stop_clean(&ld);
}

/* max_size 2 -> 5 by reload, with no `slots` at start: the server and
 * shmstat count 5 once five leases are held, while the load goes on. */
static void test_max_size_grows_without_slots(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "[pool main]\n" PGCI("pbgrow") "min_size = 1\nmax_size = 2\n"), 0);
    load ld;
    load_start(&ld, "main", 0);
    reload_pools("[pool main]\n" PGCI("pbgrow") "min_size = 1\nmax_size = 5\n", 0);
    pb_client *c = pbt_cli(&env);
    pb_lease *l[5];
    for (int i = 0; i < 5; i++) {
        l[i] = pbt_lease(c, "main", 10000);
        assert_int_equal(pbt_pg_int(l[i], "SELECT 1"), 1);
    }
    assert_int_equal(pbt_pg_count(&env, "pbgrow"), 5);
    static char json[1 << 20];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    assert_int_equal(pbt_json_pool_num(json, "main", "max_size"), 5);
    assert_int_equal(pbt_json_pool_num(json, "main", "size"), 5);
    for (int i = 0; i < 5; i++)
        assert_int_equal(pb_release(l[i]), PB_OK);
    pbt_cli_done(c);
    load_stop_clean(&ld);
}

/* ---------------------------------------------------------- pool_mode */

#define MODE_POOL(mode, app) "[pool main]\n" PGCI(app) "min_size = 1\nmax_size = 2\nslots = 8\npool_mode = " mode "\n"

/* The serving entry of pool name in shmstat's JSON: the one whose health is
 * not "removed" or "pending" (a pool_mode switch leaves the old entry in the
 * table).  Returns its object's text start, or NULL. */
static const char *serving_entry(const char *json, const char *name)
{
    char key[96];
    snprintf(key, sizeof key, "{\"name\": \"%s\"", name);
    const char *found = NULL;
    int serving = 0;
    for (const char *s = json; (s = strstr(s, key)); s++) {
        char health[32];
        assert_int_equal(pbt_json_pool_str(s, name, "health", health, sizeof health), 0);
        if (strcmp(health, "removed") != 0 && strcmp(health, "pending") != 0) {
            found = s;
            serving++;
        }
    }
    assert_int_equal(serving, 1);
    return found;
}

/* The application_name of the backend running the lease's statement. */
static void assert_app(pb_lease *l, const char *app)
{
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT current_setting('application_name')", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), app);
    pb_result_free(r);
}

static void exec_ok(pb_lease *l, const char *sql)
{
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, sql, &r), PB_OK);
    if (pb_result_status(r) != PB_RES_COMMAND_OK && pb_result_status(r) != PB_RES_TUPLES_OK)
        fail_msg("%s: %s", sql, pb_error_message(r));
    pb_result_free(r);
}

/* Transaction mode: three leases at once, each with a statement done, on a
 * pool of max_size 2 (session mode cannot: each would own a connection). */
static void assert_more_leases_than_backends(pb_client *c, const char *app)
{
    pb_lease *l[3];
    for (int i = 0; i < 3; i++) {
        l[i] = pbt_lease(c, "main", 10000);
        assert_app(l[i], app);
    }
    for (int i = 0; i < 3; i++)
        assert_int_equal(pb_release(l[i]), PB_OK);
}

static void test_pool_mode_switch_under_load(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, MODE_POOL("session", "pbmode1")), 0);
    pb_client *c = pbt_cli(&env);
    /* A session-mode lease in a transaction across the switch. */
    pb_lease *held = pbt_lease(c, "main", 10000);
    int held_pid = (int)pbt_pg_int(held, "SELECT pg_backend_pid()");
    exec_ok(held, "BEGIN");
    exec_ok(held, "CREATE TEMP TABLE across (v int)");
    /* Both connections held: the load's acquires wait in the old pool's
     * queue when the switch removes it, and must end up in the new pool. */
    pb_lease *held2 = pbt_lease(c, "main", 10000);
    assert_int_equal(pbt_pg_int(held2, "SELECT 1"), 1);
    load ld;
    load_start(&ld, "main", 0);
    /* A non-blocking acquire queued in the old pool too. */
    pb_acquiring *op = NULL;
    pb_lease *nb = NULL;
    assert_int_equal(pb_acquire_start(c, "main", &op, &nb), PB_EINPROGRESS);
    pbt_sleep_ms(300);

    long switched = th_count_lines(env.broker_log, "pool main: pool_mode is");
    reload_pools(MODE_POOL("transaction", "pbmode2"), 0);
    assert_int_equal(th_wait_log(&env, "pool main: pool_mode is transaction now", switched + 1, 15000), 0);
    assert_int_equal(pb_release(held2), PB_OK);
    /* The non-blocking acquire ends in the new pool. */
    int rc = PB_EINPROGRESS;
    struct pollfd pfd = { .fd = pb_client_fd(c), .events = POLLIN };
    for (int i = 0; i < 1000 && rc == PB_EINPROGRESS; i++) {
        poll(&pfd, 1, 10);
        pb_client_consume(c);
        rc = pb_acquire_poll(op, &nb);
    }
    if (rc != PB_OK)
        fail_msg("the non-blocking acquire across the switch: %s", pb_strerror(rc));
    assert_app(nb, "pbmode2");
    assert_int_equal(pb_release(nb), PB_OK);
    /* The held lease: same backend, same transaction, old settings. */
    assert_int_equal(pbt_pg_int(held, "SELECT pg_backend_pid()"), held_pid);
    exec_ok(held, "INSERT INTO across VALUES (7)");
    assert_int_equal(pbt_pg_int(held, "SELECT sum(v) FROM across"), 7);
    assert_app(held, "pbmode1");
    exec_ok(held, "COMMIT");
    assert_int_equal(pb_release(held), PB_OK);
    /* New leases: transaction mode, the new settings. */
    assert_more_leases_than_backends(c, "pbmode2");

    /* Transaction-mode leases across the switch back: one pinned by an
     * open transaction, one idle (no backend bound). */
    pb_lease *pinned = pbt_lease(c, "main", 10000);
    exec_ok(pinned, "BEGIN");
    int pinned_pid = (int)pbt_pg_int(pinned, "SELECT pg_backend_pid()");
    pb_lease *idle = pbt_lease(c, "main", 10000);
    assert_app(idle, "pbmode2");

    reload_pools(MODE_POOL("session", "pbmode3"), 0);
    assert_int_equal(th_wait_log(&env, "pool main: pool_mode is", switched + 2, 15000), 0);
    assert_int_equal(th_count_lines(env.broker_log, "pool main: pool_mode is session now"), 1);
    assert_int_equal(pbt_pg_int(pinned, "SELECT pg_backend_pid()"), pinned_pid);
    assert_int_equal(pbt_pg_int(pinned, "SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() "
                                        "AND xact_start IS NOT NULL"), 1);
    exec_ok(pinned, "COMMIT");
    assert_app(idle, "pbmode2");      /* a statement of a held lease still finds a backend */
    assert_int_equal(pb_release(pinned), PB_OK);
    assert_int_equal(pb_release(idle), PB_OK);
    /* Session mode again: two leases take both connections, a third waits. */
    pb_lease *a = pbt_lease(c, "main", 10000), *b = pbt_lease(c, "main", 10000), *x = NULL;
    assert_app(a, "pbmode3");
    assert_app(b, "pbmode3");
    assert_int_equal(pb_acquire(c, "main", 200, &x), PB_ETIMEDOUT);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(b), PB_OK);
    load_stop_clean(&ld);

    /* The old pools' connections are gone; shmstat shows one serving pool. */
    assert_true(pbt_wait_pg_count(&env, "pbmode1", 0, 15000) >= 0);
    assert_true(pbt_wait_pg_count(&env, "pbmode2", 0, 15000) >= 0);
    static char json[1 << 20];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    const char *e = serving_entry(json, "main");
    char health[32];
    assert_int_equal(pbt_json_pool_str(e, "main", "health", health, sizeof health), 0);
    assert_string_equal(health, "healthy");
    assert_int_equal(pbt_json_pool_num(e, "main", "max_size"), 2);
    long long size = pbt_json_pool_num(e, "main", "size");
    assert_true(size >= 1 && size <= 2);
    assert_int_equal(pbt_pg_count(&env, "pbmode3"), (int)size);
    /* Retired handles and connections are nothing the janitor repairs. */
    pbt_sleep_ms(300);
    assert_int_equal(th_count_lines(env.broker_log, "is impossible"), 0);
    pbt_cli_done(c);
}

/* A switch that needs more spare slots than are left is refused with the
 * reason.  A switch whose new settings cannot connect: the old pool keeps
 * serving on its own backends; a reload back to its mode drops the pending
 * one. */
static void test_pool_mode_switch_that_cannot_connect(void **state)
{
    (void)state;
    assert_int_equal(th_broker_start(&env, "spare_slots = 12\n" MODE_POOL("session", "pbmodef")), 0);
    assert_true(pbt_wait_pg_count(&env, "pbmodef", 1, 10000) >= 0);
    reload_pools("[pool main]\n" PGCI("pbmodef") "min_size = 1\nmax_size = 2\nslots = 16\npool_mode = transaction\n",
                 1);
    assert_whole_line("new pools (added, or switching pool_mode) need 16 slots, 12 spare left (spare_slots)",
                      "keeping the current configuration");
    char before[256], now[256];
    pbt_pg_pids(&env, "pbmodef", before, sizeof before);
    load ld;
    load_start(&ld, "main", 0);
    long failed = th_count_lines(env.broker_log, "pool main: connect failed (1 in a row)");
    long switched = th_count_lines(env.broker_log, "pool_mode is transaction now");
    reload_pools("[pool main]\ntype = postgres\nconninfo = host=127.0.0.1 port=@CLOSED@ user=postgres "
                 "dbname=postgres sslmode=disable\nmin_size = 1\nmax_size = 2\nslots = 8\n"
                 "pool_mode = transaction\n", 0);
    assert_int_equal(th_wait_log(&env, "pool main: connect failed (1 in a row)", failed + 1, 15000), 0);
    pbt_sleep_ms(1500);
    assert_int_equal(th_count_lines(env.broker_log, "pool_mode is transaction now"), switched);
    static char json[1 << 20];
    assert_int_equal(pbt_shmstat_json(&env, json, sizeof json), 0);
    char health[32];
    assert_int_equal(pbt_json_pool_str(serving_entry(json, "main"), "main", "health", health, sizeof health), 0);
    assert_string_equal(health, "healthy");
    reload_pools(MODE_POOL("session", "pbmodef"), 0);
    assert_int_equal(th_count_lines(env.broker_log, "pool main: pool_mode back to session: the pending "
                                                    "transaction-mode pool is dropped"), 1);
    load_stop_clean(&ld);
    pbt_pg_pids(&env, "pbmodef", now, sizeof now);
    /* The backends serving from the start are still there (the load may
     * have grown the pool to max_size meanwhile). */
    for (char *tok = strtok(before, ","); tok; tok = strtok(NULL, ","))
        assert_true(pbt_in_list(now, atoi(tok)));
}

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_pg_bad_settings_keep_the_pool, stop_broker),
        cmocka_unit_test_teardown(test_redis_bad_settings_keep_the_pool, stop_broker),
        cmocka_unit_test_teardown(test_max_size_grows_without_slots, stop_broker),
        cmocka_unit_test_teardown(test_pool_mode_switch_under_load, stop_broker),
        cmocka_unit_test_teardown(test_pool_mode_switch_that_cannot_connect, stop_broker),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
