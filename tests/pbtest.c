/*
 * pbtest.c — helpers shared by the integration tests (see pbtest.h), linked
 * into every integration test binary with harness.c.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "harness.h"
#include "poolbroker.h"
#include "pbtest.h"

void pbt_apply_test_filter(void)
{
    const char *filter = getenv("PB_TEST_FILTER");
    if (filter && *filter)
        cmocka_set_test_filter(filter);
}

double pbt_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

void pbt_sleep_ms(double ms)
{
    long long ns = (long long)(ms * 1e6);
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000), .tv_nsec = (long)(ns % 1000000000) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Clients and children of the running test: cleaned up by pbt_cleanup even
 * when an assertion jumps out, so no lease is left held at teardown (the
 * broker drains leases on SIGTERM) and no worker outlives its test. */
#define MAX_TRACKED 32
static pb_client *tracked_clients[MAX_TRACKED];
static pid_t tracked_children[MAX_TRACKED];

pb_client *pbt_cli(th_env *e)
{
    pb_client *c = NULL;
    int rc = pb_connect(e->sock_path, &c);
    if (rc != PB_OK)
        fail_msg("pb_connect: %s", pb_strerror(rc));
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_clients[i] == NULL) {
            tracked_clients[i] = c;
            break;
        }
    return c;
}

void pbt_cli_done(pb_client *c)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_clients[i] == c)
            tracked_clients[i] = NULL;
    pb_disconnect(c);   /* releases any lease still held */
}

void pbt_track_child(pid_t p)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_children[i] == 0) {
            tracked_children[i] = p;
            return;
        }
}

void pbt_untrack_child(pid_t p)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked_children[i] == p)
            tracked_children[i] = 0;
}

int pbt_cleanup(void **state)
{
    (void)state;
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked_children[i] > 0) {
            kill(tracked_children[i], SIGKILL);
            waitpid(tracked_children[i], NULL, 0);
            tracked_children[i] = 0;
        }
    }
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked_clients[i] != NULL) {
            pb_disconnect(tracked_clients[i]);
            tracked_clients[i] = NULL;
        }
    }
    return 0;
}

int pbt_txn_mode(void)
{
    const char *m = getenv("PB_POOL_MODE");
    return m && strcmp(m, "transaction") == 0;
}

int pbt_group_start(th_env *e, int want_pg, int want_redis, const char *pools_ini)
{
    if (th_setup(e, want_pg, want_redis) < 0)
        return -1;
    if (th_broker_start(e, pools_ini) < 0)
        return -1;
    return 0;
}

int pbt_group_stop(th_env *e)
{
    pbt_cleanup(NULL);
    return th_teardown(e);
}

pb_lease *pbt_lease(pb_client *c, const char *pool, int timeout_ms)
{
    pb_lease *l = NULL;
    int rc = pb_acquire(c, pool, timeout_ms, &l);
    if (rc != PB_OK)
        fail_msg("pb_acquire %s: %s", pool, pb_strerror(rc));
    return l;
}

/* Run sql expecting rows; the first value as an integer. */
long long pbt_pg_int(pb_lease *l, const char *sql)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    if (rc != PB_OK)
        fail_msg("%s: %s", sql, pb_strerror(rc));
    if (pb_result_status(r) != PB_RES_TUPLES_OK || pb_ntuples(r) < 1) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", pb_error_message(r));
        pb_result_free(r);
        fail_msg("%s: not a row (%s)", sql, msg);
    }
    long long v = atoll(pb_getvalue(r, 0, 0));
    pb_result_free(r);
    return v;
}

/* psql a query whose answer is one integer; -1 on failure. */
long pbt_psql_int(th_env *e, const char *sql)
{
    char out[256];
    if (th_psql(e, sql, out, sizeof out) != 0)
        return -1;
    return atol(out);
}

long pbt_pg_count(th_env *e, const char *app)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE application_name = '%s'", app);
    return pbt_psql_int(e, sql);
}

/* Wait until the backend has `want` connections of app; ms waited or -1. */
double pbt_wait_pg_count(th_env *e, const char *app, long want, int timeout_ms)
{
    double t0 = pbt_now_ms();
    for (;;) {
        if (pbt_pg_count(e, app) == want)
            return pbt_now_ms() - t0;
        if (pbt_now_ms() - t0 > timeout_ms)
            return -1;
        pbt_sleep_ms(50);
    }
}

/* Backend pids of app, comma separated, in out. */
void pbt_pg_pids(th_env *e, const char *app, char *out, size_t n)
{
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM pg_stat_activity "
             "WHERE application_name = '%s'", app);
    if (th_psql(e, sql, out, n) != 0)
        fail_msg("psql: %s", sql);
}

int pbt_in_list(const char *list, int pid)
{
    char buf[512];
    snprintf(buf, sizeof buf, ",%s,", list);
    char needle[32];
    snprintf(needle, sizeof needle, ",%d,", pid);
    return strstr(buf, needle) != NULL;
}

/* Kills that must land right before a lease go through a lease of the
 * "admin" pool: a shared-memory round trip, no process spawn.  Returns how
 * many backends of app were signalled, -1 on failure. */
int pbt_pg_lease_terminate(pb_lease *admin, const char *app)
{
    const char *vals[1] = { app };
    pb_result *r = NULL;
    int rc = pb_pg_exec_params(admin,
                               "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = $1) s",
                               1, NULL, vals, NULL, NULL, 0, &r);
    int n = rc == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK ? atoi(pb_getvalue(r, 0, 0)) : -1;
    pb_result_free(r);
    return n;
}

void pbt_shmstat_path(th_env *e, char *buf, size_t n)
{
    const char *b = getenv("PB_BUILD");
    if (b != NULL && b[0] != '\0')
        snprintf(buf, n, "%s/shmstat", b);
    else
        snprintf(buf, n, "%s/build/shmstat", e->srcdir);
}

/* shmstat --json into out; 0 or -1 (also when it filled out: a cut
 * document would make later lookups fail for the wrong reason). */
int pbt_shmstat_json(th_env *e, char *out, size_t n)
{
    char bin[512];
    pbt_shmstat_path(e, bin, sizeof bin);
    char *argv[] = { bin, (char *)"-s", e->shm_name, (char *)"--json", NULL };
    if (th_run(argv, out, n, 10000) != 0)
        return -1;
    if (strlen(out) + 1 >= n) {
        fprintf(stderr, "pbt_shmstat_json: output does not fit in %zu bytes\n", n);
        return -1;
    }
    return 0;
}

/* The pool object of `pool` in shmstat's JSON, or NULL. */
const char *pbt_json_pool(const char *json, const char *pool)
{
    char key[96];
    snprintf(key, sizeof key, "{\"name\": \"%s\"", pool);
    return strstr(json, key);
}

/* A string field of the pool's object; 0 or -1. */
int pbt_json_pool_str(const char *json, const char *pool, const char *field, char *val, size_t n)
{
    const char *p = pbt_json_pool(json, pool);
    val[0] = '\0';
    if (p == NULL)
        return -1;
    char key[64];
    snprintf(key, sizeof key, "\"%s\": \"", field);
    const char *end = strchr(p + 1, '{');   /* the next object: not ours */
    const char *f = strstr(p, key);
    if (f == NULL || (end != NULL && f > end))
        return -1;
    f += strlen(key);
    size_t k = 0;
    while (*f != '\0' && *f != '"') {
        if (*f == '\\' && f[1] != '\0')
            f++;
        if (k + 1 < n)
            val[k++] = *f;
        f++;
    }
    val[k] = '\0';
    return 0;
}

long long pbt_json_pool_num(const char *json, const char *pool, const char *field)
{
    const char *p = pbt_json_pool(json, pool);
    if (p == NULL)
        return -1;
    char key[64];
    snprintf(key, sizeof key, "\"%s\": ", field);
    const char *end = strchr(p + 1, '{');
    const char *f = strstr(p, key);
    if (f == NULL || (end != NULL && f > end))
        return -1;
    return atoll(f + strlen(key));
}

long long pbt_pool_counter(th_env *e, const char *pool, const char *field)
{
    static char json[1 << 20];
    if (pbt_shmstat_json(e, json, sizeof json) != 0)
        return -1;
    return pbt_json_pool_num(json, pool, field);
}

/* The first command of a lease: SELECT pg_backend_pid().  Returns the pid,
 * or 0 if it failed, with what happened in how. */
int pbt_pg_first_command(pb_lease *l, char *how, size_t n)
{
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, "SELECT pg_backend_pid()", &r);
    if (rc != PB_OK) {
        snprintf(how, n, "pb_pg_exec -> %s", pb_strerror(rc));
        return 0;
    }
    if (pb_result_status(r) != PB_RES_TUPLES_OK) {
        const char *st = pb_error_field(r, 'C');
        snprintf(how, n, "error result SQLSTATE %s: %s", st ? st : "?", pb_error_message(r));
        pb_result_free(r);
        return 0;
    }
    int pid = atoi(pb_getvalue(r, 0, 0));
    pb_result_free(r);
    snprintf(how, n, "ok (pid %d)", pid);
    return pid;
}


/* Client ids of the pool's connections (name=poolbroker:<pool>), from
 * CLIENT LIST text; returns how many. */
int pbt_redis_ids_in(const char *list, const char *pool, long long *ids, int max)
{
    char name[96];
    snprintf(name, sizeof name, " name=poolbroker:%s ", pool);
    int n = 0;
    const char *line = list;
    while (line && *line) {
        const char *eol = strchr(line, '\n');
        size_t len = eol ? (size_t)(eol - line) : strlen(line);
        char buf[2048];
        if (len >= sizeof buf)
            len = sizeof buf - 1;
        memcpy(buf, line, len);
        buf[len] = '\0';
        if (strstr(buf, name) && strncmp(buf, "id=", 3) == 0 && n < max)
            ids[n++] = atoll(buf + 3);
        line = eol ? eol + 1 : NULL;
    }
    return n;
}

int pbt_redis_ids(th_env *e, const char *pool, long long *ids, int max)
{
    static char out[65536];
    if (th_redis_cli(e, "CLIENT LIST", out, sizeof out) != 0)
        return -1;
    return pbt_redis_ids_in(out, pool, ids, max);
}

double pbt_wait_redis_count(th_env *e, const char *pool, int want, int timeout_ms)
{
    double t0 = pbt_now_ms();
    long long ids[16];
    for (;;) {
        if (pbt_redis_ids(e, pool, ids, 16) == want)
            return pbt_now_ms() - t0;
        if (pbt_now_ms() - t0 > timeout_ms)
            return -1;
        pbt_sleep_ms(50);
    }
}

/* The first command of a Redis lease: PING; 1 if PONG. */
int pbt_redis_first_command(pb_lease *l, char *how, size_t n)
{
    redisReply *r = NULL;
    int rc = pb_redis_command(l, &r, "PING");
    if (rc != PB_OK) {
        snprintf(how, n, "pb_redis_command -> %s", pb_strerror(rc));
        return 0;
    }
    int good = r->type == REDIS_REPLY_STATUS && r->str && strcmp(r->str, "PONG") == 0;
    snprintf(how, n, "%s reply type %d '%s'", good ? "ok:" : "bad:", r->type, r->str ? r->str : "");
    freeReplyObject(r);
    return good;
}
