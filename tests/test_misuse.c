/*
 * test_misuse.c — a lease misused: released twice, used after release, and
 * used by a forked child that inherited it (stale for every call there; the
 * child that re-attaches and dies, disconnects or exits holding its own
 * slot has it taken back), while the parent's lease stays its own, on the
 * same connection, on a real PostgreSQL (the fixture is death_fixture.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "death_fixture.h"

/* ================================================================= 3. misuse */

struct misuse_shared {
    int rc_exec, rc_release, rc_exec2, rc_pid, rc_acq, rc_own;
    int done;
};

static pb_lease *inherited;
static struct misuse_shared *ms;

static int misuse_child_kill(void *p)
{
    (void)p;
    pb_result *r = NULL;
    ms->rc_exec = pb_pg_exec(inherited, "SELECT 1", &r);
    ms->rc_pid = pb_lease_backend_pid(inherited);
    ms->rc_release = pb_release(inherited);
    ms->rc_exec2 = pb_pg_exec(inherited, "SELECT 1", &r);
    /* The inherited client re-attaches as this process and leases the other
     * slot; then this process dies holding it. */
    pb_lease *mine;
    ms->rc_acq = pb_acquire(pc, "misuse", 5000, &mine);
    if (ms->rc_acq == PB_OK)
        ms->rc_own = c_exec(mine, "BEGIN; INSERT INTO dlog (worker, acct, note) VALUES (-7, 0, 'child')", NULL, 0);
    ms->done = 1;
    raise(SIGKILL);
    return 99;
}

static int misuse_child_disconnect(void *p)
{
    (void)p;
    pb_disconnect(pc);          /* the inherited client and its lease: ours to drop, not the parent's */
    return 0;
}

static int misuse_child_exit(void *p)
{
    (void)p;
    return 0;                   /* just go */
}

static void test_misuse(void **state)
{
    (void)state;
    connect_parent();
    pb_lease *a, *b;
    pb_result *r = NULL;
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &a), PB_OK);
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &b), PB_OK);
    int apid = pb_lease_backend_pid(a);

    /* Double release, use after release. */
    assert_int_equal(pb_release(b), PB_OK);
    assert_int_equal(pb_release(b), PB_ESTALE);
    assert_int_equal(pb_pg_exec(b, "SELECT 1", &r), PB_ESTALE);
    assert_null(r);
    const char *v[1] = { "1" };
    assert_int_equal(pb_pg_exec_params(b, "SELECT $1::int", 1, NULL, v, NULL, NULL, 0, &r), PB_ESTALE);
    assert_int_equal(pb_lease_backend_pid(b), -1);
    assert_int_equal(pb_release(b), PB_ESTALE);
    /* The other lease is untouched. */
    assert_int_equal(pb_lease_backend_pid(a), apid);
    assert_int_equal(exec_ll(a, "SELECT pg_backend_pid()"), apid);

    /* In a forked child the parent's lease is stale for every call, and the
     * child's own death (holding a lease of its own) does not touch it. */
    pb_result_free(exec_ok(a, "BEGIN"));
    pb_result_free(exec_ok(a, "INSERT INTO dlog (worker, acct, note) VALUES (-7, 0, 'parent')"));
    ms = shared_alloc(sizeof *ms);
    inherited = a;
    pid_t pid = spawn(misuse_child_kill, NULL);
    int st;
    assert_int_equal(wait_kid(pid, &st, 10000), 1);
    assert_true(ms->done);
    print_message("forked child on the parent's lease: exec %s, backend_pid %d, release %s, exec after %s; "
                  "own acquire %s\n",
                  pb_strerror(ms->rc_exec), ms->rc_pid, pb_strerror(ms->rc_release), pb_strerror(ms->rc_exec2),
                  pb_strerror(ms->rc_acq));
    assert_int_equal(ms->rc_exec, PB_ESTALE);
    assert_int_equal(ms->rc_pid, -1);
    assert_int_equal(ms->rc_release, PB_ESTALE);
    assert_int_equal(ms->rc_exec2, PB_ESTALE);
    assert_int_equal(ms->rc_acq, PB_OK);
    assert_int_equal(ms->rc_own, 0);

    pid = spawn(misuse_child_disconnect, NULL);
    assert_int_equal(wait_kid(pid, &st, 10000), 1);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    pid = spawn(misuse_child_exit, NULL);
    assert_int_equal(wait_kid(pid, &st, 10000), 1);

    /* Still ours, same connection, transaction still open. */
    assert_int_equal(pb_lease_backend_pid(a), apid);
    assert_int_equal(exec_ll(a, "SELECT count(*) FROM dlog WHERE note = 'parent'"), 1);
    pb_result_free(exec_ok(a, "COMMIT"));
    assert_int_equal(exec_ll(a, "SELECT count(*) FROM dlog WHERE note = 'child'"), 0);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(a), PB_ESTALE);

    /* The child's slot was taken back: both slots can be had again. */
    double t0 = now_ms();
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &a), PB_OK);
    assert_int_equal(pb_acquire(pc, "misuse", 5000, &b), PB_OK);
    print_message("both misuse slots leased again after %.1f ms\n", now_ms() - t0);
    assert_not_in_txn(a);
    assert_not_in_txn(b);
    assert_int_equal(pb_release(a), PB_OK);
    assert_int_equal(pb_release(b), PB_OK);
    assert_int_equal(psql_ll("DELETE FROM dlog WHERE worker = -7"), 0);
    munmap(ms, sizeof *ms);
    ms = NULL;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_misuse, test_setup, test_teardown),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("misuse", tests, group_setup, group_teardown);
}
