/*
 * test_failover.c — following a failover with real replicas (issue #16).
 *
 * PostgreSQL: a primary and a pg_basebackup -R standby, synchronous
 * replication (so that a commit the primary acknowledged is on the standby
 * when the primary dies: PostgreSQL's guarantee, which the test relies on to
 * check the broker's).  Pool "rw" names both (host=127.0.0.1,127.0.0.1
 * port=P,S target_session_attrs=read-write), pool "ro" the same with
 * prefer-standby.  Four writers lease, INSERT (writer, n) RETURNING the
 * server's port, release, in a loop; a reader SELECTs through "ro".  The
 * primary is stopped with an immediate shutdown (pg_ctl -m immediate stop),
 * a second later the standby is promoted (pg_ctl promote).  Then:
 * writes resume on the new primary within 5 s of pg_ctl promote; every
 * INSERT a writer saw committed is on the new primary; once a write reached
 * the new primary no write gets 25006 (read-only transaction); no acquire or
 * command ran past its timeout; the reader on the standby never failed;
 * shmstat shows the new server and one failover.  Then the new primary is
 * made read-only (default_transaction_read_only) under a lease of pool
 * "rw1": the INSERT's 25006 drains the server, no later lease writes to it
 * (acquires fail fast), and once writable again it serves with no failover
 * counted.
 *
 * Redis: a master, a replica and three sentinels (quorum 2,
 * down-after-milliseconds 1000) that require a password.  Pool "fo" has
 * sentinels, sentinel_master and sentinel_password_file instead of
 * host/port; pool "rep" is sentinel_role = replica.  Four writers INCR a key each through "fo"; the master is killed
 * with SIGKILL; the sentinels promote the replica.  Then: INCRs resume
 * within 8 s of the switch (as a sentinel reports it); no INCR acknowledged
 * after the switch is lost (each writer's last acknowledged value is on the
 * new master, and the values acknowledged after the switch rise by one);
 * no call ran past its timeout; shmstat shows the new server and one
 * failover.
 *
 * Both print the gaps they measured.  Every wait is bounded.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

#define NWRITERS     4
#define MAXN         (1 << 18)      /* writes remembered per writer */
#define ACQ_MS       1000           /* acquire timeout of every lease */
#define CMD_MS       3000           /* the pools' command_timeout_ms */
#define SLACK_MS     1500           /* what a loaded machine may add to a timeout */

/* What the workers tell the test, in a shared mapping. */
typedef struct shared {
    _Atomic int stop;
    _Atomic long ok, ok_new;        /* writes acknowledged; ... by the new server */
    _Atomic long acq_fail, cmd_fail, other_err;
    _Atomic long ro_after;          /* 25006 after the first write to the new primary */
    _Atomic long readonly;          /* 25006 in all */
    _Atomic long late;              /* calls past their timeout */
    _Atomic double worst_acq_ms, worst_cmd_ms;
    _Atomic double first_new_ms;    /* pbt_now_ms of the first write to the new server; 0: none */
    _Atomic int new_port;           /* the server that takes over */
    _Atomic long reads_ok, reads_fail;
    uint8_t acked[NWRITERS][MAXN];  /* PostgreSQL: 1 = INSERT (w, n) acknowledged */
    long long last[NWRITERS];       /* Redis: the last INCR value acknowledged */
    _Atomic double last_ms[NWRITERS]; /* ... and when */
    long long after_first[NWRITERS]; /* Redis: first value acknowledged after the switch */
    long after_count[NWRITERS];     /* ... and how many after it */
    long non_monotonic[NWRITERS];   /* Redis: post-switch values that did not rise by one */
    _Atomic double switch_ms;       /* when the test saw the sentinels switch; 0: not yet */
} shared;

static shared *sh;

static void note_max(_Atomic double *worst, double v)
{
    double w = atomic_load(worst);
    while (v > w && !atomic_compare_exchange_weak(worst, &w, v))
        ;
}

/* One timed call: note its duration against its limit. */
static void timed(double t0, int limit_ms, _Atomic double *worst)
{
    double dt = pbt_now_ms() - t0;
    note_max(worst, dt);
    if (dt > limit_ms + SLACK_MS)
        atomic_fetch_add(&sh->late, 1);
}

static shared *shared_map(void)
{
    shared *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(s != MAP_FAILED);
    memset(s, 0, sizeof *s);
    return s;
}

static void start_children(pid_t *kids, int n, void (*fn)(th_env *, int), th_env *e)
{
    fflush(NULL);
    for (int i = 0; i < n; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            fn(e, i);
            _exit(0);
        }
        pbt_track_child(kids[i]);
    }
}

static void reap_children(pid_t *kids, int n)
{
    atomic_store(&sh->stop, 1);
    for (int i = 0; i < n; i++) {
        int st;
        waitpid(kids[i], &st, 0);
        pbt_untrack_child(kids[i]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
}

/* ------------------------------------------------------------ PostgreSQL */

static th_env penv;

static int pg_setup(void **state)
{
    (void)state;
    if (th_setup(&penv, 1, 0) != 0 || th_pg_standby_start(&penv, 0, NULL) != 0)
        return -1;
    /* Synchronous replication once the standby streams: an acknowledged
     * commit is on both servers. */
    long n = -1;
    for (double t0 = pbt_now_ms(); pbt_now_ms() - t0 < 30000 && n < 1; pbt_sleep_ms(50))
        n = pbt_psql_int(&penv, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'");
    if (n < 1 || th_psql(&penv, "ALTER SYSTEM SET synchronous_standby_names = '*'", NULL, 0) != 0 ||
        th_psql(&penv, "SELECT pg_reload_conf()", NULL, 0) != 0)
        return -1;
    n = -1;
    for (double t0 = pbt_now_ms(); pbt_now_ms() - t0 < 30000 && n < 1; pbt_sleep_ms(50))
        n = pbt_psql_int(&penv, "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'");
    if (n < 1 || th_psql(&penv, "CREATE TABLE fo (w int, n int, PRIMARY KEY (w, n))", NULL, 0) != 0)
        return -1;
    char pools[2048];
    char ci[512];
    snprintf(ci, sizeof ci, "host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=postgres sslmode=disable "
             "connect_timeout=2", penv.pg_port, penv.standby_port);
    snprintf(pools, sizeof pools,
             "[pool rw]\n"
             "type = postgres\n"
             "conninfo = %s target_session_attrs=read-write application_name=pbfo_rw\n"
             "min_size = 4\nmax_size = 4\nacquire_timeout_ms = %d\ncommand_timeout_ms = %d\n"
             "\n"
             "[pool ro]\n"
             "type = postgres\n"
             "conninfo = %s target_session_attrs=prefer-standby application_name=pbfo_ro\n"
             "min_size = 1\nmax_size = 2\nacquire_timeout_ms = %d\ncommand_timeout_ms = %d\n"
             "\n"
             "[pool rw1]\n"
             "type = postgres\n"
             "conninfo = %s target_session_attrs=read-write application_name=pbfo_rw1\n"
             "min_size = 1\nmax_size = 1\nacquire_timeout_ms = %d\n",
             ci, ACQ_MS, CMD_MS, ci, ACQ_MS, CMD_MS, ci, ACQ_MS);
    return th_broker_start(&penv, pools);
}

static int pg_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&penv);
}

static void pg_writer(th_env *e, int w)
{
    pb_client *c = NULL;
    if (pb_connect(e->sock_path, &c) != PB_OK)
        _exit(2);
    for (int n = 0; n < MAXN && !atomic_load(&sh->stop); n++) {
        pb_lease *l = NULL;
        double t0 = pbt_now_ms();
        int rc = pb_acquire(c, "rw", ACQ_MS, &l);
        timed(t0, ACQ_MS, &sh->worst_acq_ms);
        if (rc != PB_OK) {
            atomic_fetch_add(&sh->acq_fail, 1);
            pbt_sleep_ms(10);       /* failing fast: do not spin */
            continue;
        }
        char sql[128];
        snprintf(sql, sizeof sql, "INSERT INTO fo VALUES (%d, %d) RETURNING inet_server_port()", w, n);
        pb_result *r = NULL;
        t0 = pbt_now_ms();
        rc = pb_pg_exec(l, sql, &r);
        timed(t0, CMD_MS, &sh->worst_cmd_ms);
        if (rc != PB_OK) {
            atomic_fetch_add(&sh->cmd_fail, 1);
        } else if (pb_result_status(r) == PB_RES_TUPLES_OK) {
            int port = atoi(pb_getvalue(r, 0, 0));
            sh->acked[w][n] = 1;
            atomic_fetch_add(&sh->ok, 1);
            if (port == atomic_load(&sh->new_port)) {
                double zero = 0;
                atomic_compare_exchange_strong(&sh->first_new_ms, &zero, pbt_now_ms());
                atomic_fetch_add(&sh->ok_new, 1);
            }
        } else {
            const char *code = pb_error_field(r, 'C');
            if (code && strcmp(code, "25006") == 0) {
                atomic_fetch_add(&sh->readonly, 1);
                if (atomic_load(&sh->first_new_ms) > 0)
                    atomic_fetch_add(&sh->ro_after, 1);
            } else {
                atomic_fetch_add(&sh->other_err, 1);
            }
        }
        pb_result_free(r);
        pb_release(l);
    }
    pb_disconnect(c);
}

static void pg_reader(th_env *e, int i)
{
    (void)i;
    pb_client *c = NULL;
    if (pb_connect(e->sock_path, &c) != PB_OK)
        _exit(2);
    while (!atomic_load(&sh->stop)) {
        pb_lease *l = NULL;
        pb_result *r = NULL;
        if (pb_acquire(c, "ro", ACQ_MS, &l) == PB_OK && pb_pg_exec(l, "SELECT count(*) FROM fo", &r) == PB_OK &&
            pb_result_status(r) == PB_RES_TUPLES_OK)
            atomic_fetch_add(&sh->reads_ok, 1);
        else
            atomic_fetch_add(&sh->reads_fail, 1);
        pb_result_free(r);
        if (l)
            pb_release(l);
        pbt_sleep_ms(5);
    }
    pb_disconnect(c);
}

static void test_pg_promotion(void **state)
{
    (void)state;
    sh = shared_map();
    atomic_store(&sh->new_port, penv.standby_port);
    pid_t kids[NWRITERS + 1];
    start_children(kids, NWRITERS, pg_writer, &penv);
    start_children(kids + NWRITERS, 1, pg_reader, &penv);
    double t0 = pbt_now_ms();
    while (atomic_load(&sh->ok) < 200 && pbt_now_ms() - t0 < 20000)
        pbt_sleep_ms(20);
    assert_true(atomic_load(&sh->ok) >= 200);
    assert_int_equal(atomic_load(&sh->reads_fail), 0);

    /* The primary dies; a second later the standby is promoted. */
    double t_stop = pbt_now_ms();
    long before = atomic_load(&sh->ok);
    assert_int_equal(th_pg_stop(&penv), 0);
    pbt_sleep_ms(1000);
    long reads_gap = atomic_load(&sh->reads_ok);
    double t_promote = pbt_now_ms();    /* pg_ctl promote -w returns once it sees the promotion done */
    assert_int_equal(th_pg_promote(&penv, 20000), 0);
    double t_promoted = pbt_now_ms();
    reads_gap = atomic_load(&sh->reads_ok) - reads_gap;
    while (atomic_load(&sh->ok_new) < 200 && pbt_now_ms() - t_promote < 20000)
        pbt_sleep_ms(20);
    reap_children(kids, NWRITERS + 1);

    double first = atomic_load(&sh->first_new_ms);
    double gap = first > 0 ? first - t_promote : -1;
    /* Every acknowledged INSERT is on the new primary. */
    pb_client *c = pbt_cli(&penv);
    pb_lease *l = pbt_lease(c, "rw", 5000);
    pb_result *r = NULL;
    assert_int_equal(pb_pg_exec(l, "SELECT w, n, inet_server_port() FROM fo", &r), PB_OK);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    static uint8_t there[NWRITERS][MAXN];
    memset(there, 0, sizeof there);
    int rows = pb_ntuples(r), server = atoi(pb_getvalue(r, 0, 2));
    for (int i = 0; i < rows; i++) {
        int w = atoi(pb_getvalue(r, i, 0)), n = atoi(pb_getvalue(r, i, 1));
        if (w >= 0 && w < NWRITERS && n >= 0 && n < MAXN)
            there[w][n] = 1;
    }
    pb_result_free(r);
    pb_release(l);
    long acked = 0, missing = 0;
    for (int w = 0; w < NWRITERS; w++)
        for (int n = 0; n < MAXN; n++)
            if (sh->acked[w][n]) {
                acked++;
                missing += !there[w][n];
            }
    static char json[1 << 20];
    char srv[64] = "", want[64];
    assert_int_equal(pbt_shmstat_json(&penv, json, sizeof json), 0);
    pbt_json_pool_str(json, "rw", "server", srv, sizeof srv);
    long long failovers = pbt_json_pool_num(json, "rw", "failovers");
    snprintf(want, sizeof want, "127.0.0.1:%d", penv.standby_port);
    print_message("PostgreSQL failover: %ld writes before the stop, %ld acknowledged in all (%ld on the new "
                  "primary, %d rows there), %ld missing; primary stopped, pg_ctl promote %.0f ms later (it "
                  "took %.0f ms); first write to the new primary %.0f ms after pg_ctl promote began (%.0f ms "
                  "after the stop); %ld x 25006 (%ld "
                  "after that first write); acquires failed %ld, commands failed %ld, other errors %ld; slowest "
                  "acquire %.0f ms (limit %d), slowest command %.0f ms (limit %d), %ld past the limit; reads on "
                  "the standby during the outage: %ld ok, %ld failed in all; shmstat: server %s, %lld failover(s)\n",
                  before, acked, atomic_load(&sh->ok_new), rows, missing, t_promote - t_stop,
                  t_promoted - t_promote, gap, first - t_stop,
                  atomic_load(&sh->readonly), atomic_load(&sh->ro_after), atomic_load(&sh->acq_fail),
                  atomic_load(&sh->cmd_fail), atomic_load(&sh->other_err), atomic_load(&sh->worst_acq_ms), ACQ_MS,
                  atomic_load(&sh->worst_cmd_ms), CMD_MS, atomic_load(&sh->late), reads_gap,
                  atomic_load(&sh->reads_fail), srv, failovers);
    assert_int_equal(server, penv.standby_port);
    assert_true(first > 0);
    assert_true(gap <= 5000);
    assert_int_equal(missing, 0);
    assert_int_equal(atomic_load(&sh->ro_after), 0);
    assert_int_equal(atomic_load(&sh->other_err), 0);
    assert_int_equal(atomic_load(&sh->late), 0);
    assert_true(reads_gap > 0);                 /* the standby kept serving reads */
    assert_int_equal(atomic_load(&sh->reads_fail), 0);
    assert_string_equal(srv, want);
    assert_int_equal(failovers, 1);
    assert_int_equal(th_wait_log(&penv, "failover: now connected to", 1, 1000), 0);
    munmap(sh, sizeof *sh);
}

/* Run sql on a connection of the test's own to the promoted server; 0 or -1. */
static int on_new_primary(const char *sql)
{
    char ci[256];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable "
             "options='-c default_transaction_read_only=off'", penv.standby_port);
    PGconn *pg = PQconnectdb(ci);
    int ok = PQstatus(pg) == CONNECTION_OK;
    PGresult *r = ok ? PQexec(pg, sql) : NULL;
    ok = ok && (PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK);
    if (!ok)
        fprintf(stderr, "test_failover: %s: %s\n", sql, PQerrorMessage(pg));
    PQclear(r);
    PQfinish(pg);
    return ok ? 0 : -1;
}

/* After the promotion: the new primary turns read-only under a lease
 * (default_transaction_read_only, reloaded).  The lease's INSERT gets
 * SQLSTATE 25006, which the broker reads in the reply stream: it drains
 * the server (the lease's connection closes at release) and hands no
 * connection to it while it stays read-only (acquires fail fast); made
 * writable again, it serves, and that is no failover. */
static void test_pg_turns_read_only(void **state)
{
    (void)state;
    pb_client *c = pbt_cli(&penv);
    pb_lease *l = NULL;
    int rc = PB_ETIMEDOUT;
    for (double t0 = pbt_now_ms(); (rc = pb_acquire(c, "rw1", ACQ_MS, &l)) != PB_OK && pbt_now_ms() - t0 < 20000;)
        pbt_sleep_ms(50);
    assert_int_equal(rc, PB_OK);
    assert_int_equal(pbt_pg_int(l, "SELECT inet_server_port()"), penv.standby_port);
    long long failovers = pbt_pool_counter(&penv, "rw1", "failovers");
    assert_int_equal(on_new_primary("ALTER SYSTEM SET default_transaction_read_only = on"), 0);
    assert_int_equal(on_new_primary("SELECT pg_reload_conf()"), 0);
    /* The backend applies the reload between commands. */
    pb_result *r = NULL;
    const char *code = NULL;
    for (double t0 = pbt_now_ms(); pbt_now_ms() - t0 < 10000; pbt_sleep_ms(50)) {
        pb_result_free(r);
        r = NULL;
        assert_int_equal(pb_pg_exec(l, "INSERT INTO fo VALUES (99, 0) ON CONFLICT DO NOTHING", &r), PB_OK);
        if (pb_result_status(r) == PB_RES_ERROR && (code = pb_error_field(r, 'C')) != NULL)
            break;
    }
    assert_non_null(code);
    assert_string_equal(code, "25006");
    pb_result_free(r);
    assert_int_equal(th_wait_log(&penv, "failed (SQLSTATE 25006 (read-only transaction))", 1, 5000), 0);
    pb_release(l);
    /* Known read-only: no write reaches it; acquires fail fast meanwhile. */
    int ro = 0, backend = 0, other = 0;
    for (double t0 = pbt_now_ms(); pbt_now_ms() - t0 < 1500; pbt_sleep_ms(20)) {
        double t1 = pbt_now_ms();
        rc = pb_acquire(c, "rw1", ACQ_MS, &l);
        assert_true(pbt_now_ms() - t1 < ACQ_MS + SLACK_MS);
        if (rc == PB_EBACKEND) {
            backend++;
            continue;
        }
        if (rc != PB_OK) {
            other++;
            continue;
        }
        r = NULL;
        if (pb_pg_exec(l, "INSERT INTO fo VALUES (99, 1) ON CONFLICT DO NOTHING", &r) == PB_OK &&
            pb_result_status(r) == PB_RES_ERROR && pb_error_field(r, 'C') &&
            strcmp(pb_error_field(r, 'C'), "25006") == 0)
            ro++;
        pb_result_free(r);
        pb_release(l);
    }
    /* Writable again: served, on the same server, and no failover. */
    assert_int_equal(on_new_primary("ALTER SYSTEM RESET default_transaction_read_only"), 0);
    assert_int_equal(on_new_primary("SELECT pg_reload_conf()"), 0);
    double t_back = pbt_now_ms();
    rc = PB_ETIMEDOUT;
    while ((rc = pb_acquire(c, "rw1", ACQ_MS, &l)) != PB_OK && pbt_now_ms() - t_back < 20000)
        pbt_sleep_ms(20);
    double back_ms = pbt_now_ms() - t_back;
    assert_int_equal(rc, PB_OK);
    r = NULL;
    assert_int_equal(pb_pg_exec(l, "INSERT INTO fo VALUES (99, 2) ON CONFLICT DO NOTHING", &r), PB_OK);
    int status = pb_result_status(r);
    pb_result_free(r);
    pb_release(l);
    long long after = pbt_pool_counter(&penv, "rw1", "failovers");
    print_message("new primary made read-only under a lease: 25006 seen once, then %d x 25006, %d PB_EBACKEND, %d "
                  "other errors while read-only; writable again: served after %.0f ms; failovers %lld -> %lld\n",
                  ro, backend, other, back_ms, failovers, after);
    assert_int_equal(ro, 0);
    assert_true(backend > 0);
    assert_int_equal(other, 0);
    assert_int_equal(status, PB_RES_COMMAND_OK);
    assert_int_equal(after, failovers);
    assert_int_equal(th_wait_log(&penv, "serves again after SQLSTATE 25006", 1, 5000), 0);
}

/* ------------------------------------------------------------------ Redis */

#define MASTER_NAME "pbmaster"
#define SENTINEL_PASSWORD "s3ntinel-pw"

static th_env renv;

static int redis_setup(void **state)
{
    (void)state;
    if (th_setup(&renv, 0, 1) != 0 || th_redis_replica_start(&renv) != 0 ||
        th_sentinels_start(&renv, 3, MASTER_NAME, 2, 1000, SENTINEL_PASSWORD) != 0)
        return -1;
    /* The sentinels want a password: the broker reads it from a file. */
    char pwfile[400];
    snprintf(pwfile, sizeof pwfile, "%s/sentinel.pw", renv.dir);
    FILE *f = fopen(pwfile, "w");
    if (!f || fprintf(f, "%s\n", SENTINEL_PASSWORD) < 0 || fclose(f) != 0 || chmod(pwfile, 0600) != 0)
        return -1;
    char pools[2048], sentinels[128];
    snprintf(sentinels, sizeof sentinels, "127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d", renv.sentinel_ports[0],
             renv.sentinel_ports[1], renv.sentinel_ports[2]);
    snprintf(pools, sizeof pools,
             "[pool fo]\n"
             "type = redis\n"
             "sentinels = %s\n"
             "sentinel_master = " MASTER_NAME "\n"
             "sentinel_password_file = %s\n"
             "min_size = 4\nmax_size = 4\nacquire_timeout_ms = %d\ncommand_timeout_ms = %d\n"
             "\n"
             "[pool rep]\n"
             "type = redis\n"
             "sentinels = %s\n"
             "sentinel_master = " MASTER_NAME "\n"
             "sentinel_role = replica\n"
             "sentinel_password_file = %s\n"
             "min_size = 1\nmax_size = 1\n",
             sentinels, pwfile, ACQ_MS, CMD_MS, sentinels, pwfile);
    return th_broker_start(&renv, pools);
}

static int redis_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&renv);
}

static void redis_writer(th_env *e, int w)
{
    pb_client *c = NULL;
    if (pb_connect(e->sock_path, &c) != PB_OK)
        _exit(2);
    while (!atomic_load(&sh->stop)) {
        pb_lease *l = NULL;
        double t0 = pbt_now_ms();
        int rc = pb_acquire(c, "fo", ACQ_MS, &l);
        timed(t0, ACQ_MS, &sh->worst_acq_ms);
        if (rc != PB_OK) {
            atomic_fetch_add(&sh->acq_fail, 1);
            pbt_sleep_ms(10);
            continue;
        }
        redisReply *r = NULL;
        t0 = pbt_now_ms();
        rc = pb_redis_command(l, &r, "INCR fo:%d", w);
        timed(t0, CMD_MS, &sh->worst_cmd_ms);
        if (rc != PB_OK) {
            atomic_fetch_add(&sh->cmd_fail, 1);
        } else if (r->type == REDIS_REPLY_INTEGER) {
            /* Acknowledged after the switch: the old master is dead, so it
             * can only be the new one's. */
            double sw = atomic_load(&sh->switch_ms);
            if (sw > 0 && t0 >= sw) {
                if (sh->after_count[w]++ == 0) {
                    sh->after_first[w] = r->integer;
                    double zero = 0;
                    atomic_compare_exchange_strong(&sh->first_new_ms, &zero, pbt_now_ms());
                } else if (r->integer != sh->last[w] + 1) {
                    sh->non_monotonic[w]++;
                }
                atomic_fetch_add(&sh->ok_new, 1);
            }
            sh->last[w] = r->integer;
            atomic_store(&sh->last_ms[w], pbt_now_ms());
            atomic_fetch_add(&sh->ok, 1);
        } else if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "READONLY", 8) == 0) {
            atomic_fetch_add(&sh->readonly, 1);
        } else {
            atomic_fetch_add(&sh->other_err, 1);
        }
        if (r)
            freeReplyObject(r);
        pb_release(l);
    }
    pb_disconnect(c);
}

/* The master's port as sentinel i says, or -1. */
static int sentinel_master_port(int i)
{
    char out[256];
    if (th_sentinel_cli(&renv, i, "SENTINEL get-master-addr-by-name " MASTER_NAME, out, sizeof out) != 0)
        return -1;
    const char *nl = strchr(out, '\n');
    return nl ? atoi(nl + 1) : -1;
}

static void test_redis_sentinel_switch(void **state)
{
    (void)state;
    sh = shared_map();
    /* The replica pool serves from the replica. */
    pb_client *c = pbt_cli(&renv);
    pb_lease *l = pbt_lease(c, "rep", 5000);
    redisReply *r = NULL;
    assert_int_equal(pb_redis_command(l, &r, "ROLE"), PB_OK);
    assert_true(r->type == REDIS_REPLY_ARRAY && r->elements > 0 && strcmp(r->element[0]->str, "slave") == 0);
    freeReplyObject(r);
    pb_release(l);

    pid_t kids[NWRITERS];
    start_children(kids, NWRITERS, redis_writer, &renv);
    double t0 = pbt_now_ms();
    while (atomic_load(&sh->ok) < 200 && pbt_now_ms() - t0 < 20000)
        pbt_sleep_ms(20);
    assert_true(atomic_load(&sh->ok) >= 200);

    double t_kill = pbt_now_ms();
    assert_int_equal(th_redis_kill(&renv, ""), 0);
    /* The switch, as the sentinels report it. */
    int port = -1;
    while (pbt_now_ms() - t_kill < 30000 && (port = sentinel_master_port(0)) != renv.replica_port)
        pbt_sleep_ms(20);
    assert_int_equal(port, renv.replica_port);
    double t_switch = pbt_now_ms();
    atomic_store(&sh->switch_ms, t_switch);
    while (atomic_load(&sh->ok_new) < 200 && pbt_now_ms() - t_switch < 20000)
        pbt_sleep_ms(20);
    reap_children(kids, NWRITERS);

    double first = atomic_load(&sh->first_new_ms);
    double gap = first > 0 ? first - t_switch : -1;
    long lost = 0, nonmono = 0;
    for (int w = 0; w < NWRITERS; w++) {
        char cmd[32], out[64];
        snprintf(cmd, sizeof cmd, "GET fo:%d", w);
        assert_int_equal(th_redis_cli_port(renv.replica_port, cmd, out, sizeof out), 0);
        long long final = atoll(out);
        /* Every value acknowledged after the switch is there: the last one
         * is, and they rose by one. */
        if (sh->after_count[w] && final < sh->last[w])
            lost += sh->last[w] - final;
        nonmono += sh->non_monotonic[w];
    }
    static char json[1 << 20];
    char srv[64] = "", want[64];
    assert_int_equal(pbt_shmstat_json(&renv, json, sizeof json), 0);
    pbt_json_pool_str(json, "fo", "server", srv, sizeof srv);
    long long failovers = pbt_json_pool_num(json, "fo", "failovers");
    snprintf(want, sizeof want, "127.0.0.1:%d", renv.replica_port);
    print_message("Redis Sentinel failover: master killed, sentinels switched %.0f ms later; first INCR on the "
                  "new master %.0f ms after the switch (%.0f ms after the kill); %ld INCRs acknowledged (%ld after "
                  "the switch), %ld lost after the switch, %ld out of step; acquires failed %ld, commands failed "
                  "%ld, -READONLY %ld, other errors %ld; slowest acquire %.0f ms (limit %d), slowest command "
                  "%.0f ms (limit %d), %ld past the limit; shmstat: server %s, %lld failover(s)\n",
                  t_switch - t_kill, gap, first - t_kill, atomic_load(&sh->ok), atomic_load(&sh->ok_new), lost,
                  nonmono, atomic_load(&sh->acq_fail), atomic_load(&sh->cmd_fail), atomic_load(&sh->readonly),
                  atomic_load(&sh->other_err), atomic_load(&sh->worst_acq_ms), ACQ_MS,
                  atomic_load(&sh->worst_cmd_ms), CMD_MS, atomic_load(&sh->late), srv, failovers);
    assert_true(first > 0);
    assert_true(gap <= 8000);
    assert_int_equal(lost, 0);
    assert_int_equal(nonmono, 0);
    assert_int_equal(atomic_load(&sh->late), 0);
    assert_int_equal(atomic_load(&sh->other_err), 0);
    assert_string_equal(srv, want);
    assert_int_equal(failovers, 1);
    assert_int_equal(th_wait_log(&renv, "Sentinel: master '" MASTER_NAME "' is at", 2, 1000), 0);
    assert_int_equal(th_wait_log(&renv, "failover: now connected to", 1, 1000), 0);
    munmap(sh, sizeof *sh);
}

#define T(f) cmocka_unit_test_teardown(f, pbt_cleanup)

int main(void)
{
    pbt_apply_test_filter();
    const struct CMUnitTest pg_tests[] = {
        T(test_pg_promotion),
        T(test_pg_turns_read_only),
    };
    int failed = cmocka_run_group_tests_name("failover_pg", pg_tests, pg_setup, pg_teardown);
    const struct CMUnitTest redis_tests[] = {
        T(test_redis_sentinel_switch),
    };
    failed += cmocka_run_group_tests_name("failover_redis", redis_tests, redis_setup, redis_teardown);
    return failed;
}
