/*
 * test_max_lease.c — max_lease_ms: a stopped worker's lease is taken back;
 * when it resumes, its next call says PB_ESTALE, on a real PostgreSQL (the fixture is death_fixture.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "death_fixture.h"

/* max_lease_ms: a stopped worker's lease is taken back; when it resumes,
 * its next call says PB_ESTALE. */
struct overstay_shared {
    int rc_exec, rc_release;
    int done;
};

static int overstay_child(void *p)
{
    struct overstay_shared *sh = p;
    pb_client *c;
    pb_lease *l;
    if (pb_connect(env.sock_path, &c) != PB_OK)
        return 10;
    if (pb_acquire(c, "leasy", 10000, &l) != PB_OK)
        return 11;
    if (c_exec(l, "BEGIN", NULL, 0) ||
        c_exec(l, "INSERT INTO dlog (worker, acct, note) VALUES (-8, 0, 'overstay')", NULL, 0))
        return 12;
    raise(SIGSTOP);
    pb_result *r = NULL;
    sh->rc_exec = pb_pg_exec(l, "SELECT 1", &r);
    pb_result_free(r);
    sh->rc_release = pb_release(l);
    sh->done = 1;
    pb_disconnect(c);
    return 0;
}

static void test_max_lease_taken_back(void **state)
{
    (void)state;
    connect_parent();
    struct overstay_shared *sh = shared_alloc(sizeof *sh);
    pid_t pid = spawn(overstay_child, sh);
    int st;
    assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
    if (!WIFSTOPPED(st)) {
        kid_untrack(pid);
        fail_msg("worker did not reach SIGSTOP (status %d)", st);
    }
    double t0 = now_ms();
    pb_lease *l = NULL;
    int rc = pb_acquire(pc, "leasy", 5000, &l);
    double t1 = now_ms();
    long leak_warnings = th_count_lines(env.broker_log, "lease held for");
    int rolled_back = -1;
    if (rc == PB_OK) {
        rolled_back = exec_ll(l, "SELECT count(*) FROM dlog WHERE note = 'overstay'") == 0;
        assert_not_in_txn(l);
        assert_int_equal(pb_release(l), PB_OK);
    }
    kill(pid, SIGCONT);
    assert_int_equal(wait_kid(pid, &st, 10000), 1);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    print_message("max_lease_ms = 1000, worker SIGSTOPped holding a lease: parent acquire %s after %.0f ms; "
                  "resumed worker: exec %s, release %s; leak warnings in the log: %ld\n",
                  pb_strerror(rc), t1 - t0, pb_strerror(sh->rc_exec), pb_strerror(sh->rc_release), leak_warnings);
    if (rc != PB_OK)
        fail_msg("max_lease_ms is not enforced: the overstaying lease was not taken back within 5 s "
                 "(the resumed worker could still use it: exec %s)",
                 pb_strerror(sh->rc_exec));
    assert_int_equal(rolled_back, 1);
    assert_int_equal(sh->rc_exec, PB_ESTALE);
    assert_int_equal(sh->rc_release, PB_ESTALE);
    assert_true(t1 - t0 < 5000);
    munmap(sh, sizeof *sh);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_max_lease_taken_back, test_setup, test_teardown),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("max_lease", tests, group_setup, group_teardown);
}
