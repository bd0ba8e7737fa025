/*
 * test_access.c — who may attach (docs/architecture.md, trust model): a client of another uid is
 * refused by the socket's file mode (0660, the default), and — with
 * socket_mode = 0666 — by the broker's own SO_PEERCRED check, which logs who
 * it refused; allowed_uids lets that uid in (it needs no /dev/shm
 * permission: the segment fd is passed over the socket).  Needs root (the fixture is security_fixture.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "security_fixture.h"

/* ---------------------------------------------------------------- tests */

/* Default socket_mode 0660, owner root: nobody cannot even connect. */
static void test_other_uid_refused_by_socket_mode(void **state)
{
    (void)state;
    NEED_ROOT();
    assert_int_equal(start_broker(BROKER_SECTION("") PG_POOL("main", 1, 2)), 0);
    struct stat st;
    assert_int_equal(stat(env.sock_path, &st), 0);
    fprintf(stderr, "  socket %s mode %04o uid %d\n", env.sock_path, (unsigned)(st.st_mode & 07777), (int)st.st_uid);
    assert_int_equal(st.st_mode & 07777, 0660);
    int code = run_as_nobody(child_connect_only, NULL);
    if (code != EXIT_PB(PB_EPERM) && code != EXIT_PB(PB_EBROKER))
        fail_msg("nobody's pb_connect: exit code %d, expected PB_EPERM or PB_EBROKER", code);
    /* The kernel refused the connect: the broker never saw it. */
    char *log = log_since_mark();
    assert_null(strstr(log, "uid 65534"));
    free(log);
    /* ... while root (the broker's own uid) still gets in. */
    assert_int_equal(child_connect_only(NULL), 0);
}

/* socket_mode 0666: nobody reaches the broker, whose SO_PEERCRED check
 * refuses it (PB_EPERM) and says so in the log. */
static void test_other_uid_refused_by_peercred(void **state)
{
    (void)state;
    NEED_ROOT();
    assert_int_equal(start_broker(BROKER_SECTION("socket_mode = 0666") PG_POOL("main", 1, 2)), 0);
    struct stat st;
    assert_int_equal(stat(env.sock_path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0666);
    int code = run_as_nobody(child_connect_only, NULL);
    assert_int_equal(code, EXIT_PB(PB_EPERM));
    assert_int_equal(th_wait_log(&env, "refused", 1, 5000), 0);
    char *log = log_since_mark();
    const char *line = strstr(log, "refused");
    while (line && line > log && line[-1] != '\n')
        line--;
    fprintf(stderr, "  broker log: %.*s\n", line ? (int)strcspn(line, "\n") : 0, line ? line : "");
    assert_non_null(strstr(log, "uid 65534"));
    free(log);
    assert_int_equal(child_connect_only(NULL), 0);     /* root still allowed */
}

/* allowed_uids = 65534: nobody attaches (the segment fd comes over the
 * socket) and leases; the list is exhaustive, so root is now refused. */
static void test_allowed_uid_can_attach_and_lease(void **state)
{
    (void)state;
    NEED_ROOT();
    assert_int_equal(start_broker(BROKER_SECTION("socket_mode = 0666\nallowed_uids = 65534") PG_POOL("main", 1, 2)),
                     0);
    char path[96];
    seg_path(path, sizeof path);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    fprintf(stderr, "  segment %s mode %04o uid %d\n", path, (unsigned)(st.st_mode & 07777), (int)st.st_uid);
    assert_int_equal(st.st_mode & 077, 0);
    int code = run_as_nobody(child_attach_and_lease, NULL);
    if (code == 10)
        fail_msg("nobody could open the segment file directly");
    assert_int_equal(code, 0);
    pb_client *c = NULL;
    int rc = pb_connect(env.sock_path, &c);
    fprintf(stderr, "  [uid 0] pb_connect with allowed_uids = 65534: %s\n", rc ? pb_strerror(rc) : "ok");
    pb_disconnect(c);
    assert_int_equal(rc, PB_EPERM);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_other_uid_refused_by_socket_mode),
        cmocka_unit_test(test_other_uid_refused_by_peercred),
        cmocka_unit_test(test_allowed_uid_can_attach_and_lease),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("access", tests, group_setup, group_teardown);
}
