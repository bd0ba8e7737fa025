/*
 * pbtest.h — small cmocka helpers shared by the integration tests
 * (tests/pbtest.c, linked into every integration test binary).
 * Include after <cmocka.h>, "harness.h" and "poolbroker.h".
 *
 * Helpers that end in a failed assertion say so; the others return a value
 * the test asserts on.  Clients made with pbt_cli and children registered
 * with pbt_track_child are cleaned up by pbt_cleanup (a cmocka teardown),
 * even when an assertion jumped out of the test: no lease is left held and
 * no worker outlives its test.
 */
#ifndef PB_TEST_PBTEST_H
#define PB_TEST_PBTEST_H

#include <stddef.h>
#include <sys/types.h>

/* Attach to the test broker of e, or fail the test saying why. */
static inline pb_client *pbt_connect(th_env *e)
{
    pb_client *c = NULL;
    int rc = pb_connect(e->sock_path, &c);
    if (rc != PB_OK)
        fail_msg("pb_connect: %s", pb_strerror(rc));
    return c;
}

/* The run has every pool in transaction mode (PB_POOL_MODE=transaction,
 * tests/harness.c).  A case that asserts session-mode semantics (an acquire
 * waits for a connection; a lease's backend is fixed from the acquire on)
 * calls PBT_SESSION_MODE_ONLY() first and is skipped there. */
int pbt_txn_mode(void);
#define PBT_SESSION_MODE_ONLY() do { if (pbt_txn_mode()) { skip(); return; } } while (0)

/* PB_TEST_FILTER, if set (e.g. "test_kill_storm", "test_rogue*"): run only
 * the tests matching this cmocka filter.  Call before running the groups. */
void pbt_apply_test_filter(void);

/* ---- time */
double pbt_now_ms(void);            /* CLOCK_MONOTONIC, ms */
void pbt_sleep_ms(double ms);

/* ---- tracked clients and children (cleaned up by pbt_cleanup) */
pb_client *pbt_cli(th_env *e);      /* pb_connect or fail; tracked */
void pbt_cli_done(pb_client *c);    /* untrack and pb_disconnect */
void pbt_track_child(pid_t p);
void pbt_untrack_child(pid_t p);
int pbt_cleanup(void **state);      /* SIGKILL+reap children, disconnect clients */

/* ---- a test group's servers and broker (cmocka group setup / teardown) */
/* th_setup(e, want_pg, want_redis), then th_broker_start(e, pools_ini); 0 or -1. */
int pbt_group_start(th_env *e, int want_pg, int want_redis, const char *pools_ini);
/* pbt_cleanup, then th_teardown(e); its result. */
int pbt_group_stop(th_env *e);

/* ---- leases and PostgreSQL */
pb_lease *pbt_lease(pb_client *c, const char *pool, int timeout_ms);  /* or fail */
long long pbt_pg_int(pb_lease *l, const char *sql);  /* first value as an integer, or fail */
long pbt_psql_int(th_env *e, const char *sql);       /* psql, one integer; -1 on failure */
long pbt_pg_count(th_env *e, const char *app);       /* backends of application_name app */
/* Wait until the server has `want` backends of app; ms waited or -1. */
double pbt_wait_pg_count(th_env *e, const char *app, long want, int timeout_ms);
void pbt_pg_pids(th_env *e, const char *app, char *out, size_t n);  /* "pid,pid,..." or fail */
int pbt_in_list(const char *list, int pid);          /* pid in "pid,pid,..." */
/* pg_terminate_backend of every backend of app, through a lease of an admin
 * pool (no process spawn); how many were signalled, -1 on failure. */
int pbt_pg_lease_terminate(pb_lease *admin, const char *app);
/* The first command of a lease: SELECT pg_backend_pid().  The pid, or 0 if
 * it failed, with what happened in how. */
int pbt_pg_first_command(pb_lease *l, char *how, size_t n);

/* ---- Redis */
/* Client ids of the pool's connections (name=poolbroker:<pool>) in CLIENT
 * LIST text; how many. */
int pbt_redis_ids_in(const char *list, const char *pool, long long *ids, int max);
int pbt_redis_ids(th_env *e, const char *pool, long long *ids, int max);  /* -1 on failure */
double pbt_wait_redis_count(th_env *e, const char *pool, int want, int timeout_ms);
/* The first command of a Redis lease: PING; 1 if PONG, what happened in how. */
int pbt_redis_first_command(pb_lease *l, char *how, size_t n);

/* ---- shmstat */
void pbt_shmstat_path(th_env *e, char *buf, size_t n);   /* $PB_BUILD/shmstat */
int pbt_shmstat_json(th_env *e, char *out, size_t n);     /* shmstat --json; 0 or -1 */
/* The pool object of `pool` in shmstat's JSON, or NULL. */
const char *pbt_json_pool(const char *json, const char *pool);
/* A string / numeric field of the pool's object: 0 or -1 / the number or -1. */
int pbt_json_pool_str(const char *json, const char *pool, const char *field, char *val, size_t n);
long long pbt_json_pool_num(const char *json, const char *pool, const char *field);
long long pbt_pool_counter(th_env *e, const char *pool, const char *field);  /* -1 on failure */

#endif /* PB_TEST_PBTEST_H */
