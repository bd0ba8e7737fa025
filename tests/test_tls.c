/*
 * test_tls.c — PostgreSQL over TLS through the broker: the test makes a
 * self-signed certificate, turns ssl on in its own server, and leases from
 * pools with sslmode=require and sslmode=verify-full.  After libpq's
 * handshake every byte goes through the broker's TLS path (broker/tls.c).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"

static th_env env;

static int group_setup(void **state)
{
    (void)state;
    char out[4096], crt[600], key[600], sql[2048], pgdata[300];
    if (th_setup(&env, 1, 0) < 0)
        return -1;
    snprintf(pgdata, sizeof pgdata, "%s/pgdata", env.dir);
    snprintf(crt, sizeof crt, "%s/server.crt", pgdata);
    snprintf(key, sizeof key, "%s/server.key", pgdata);
    /* An EC key, made first: quick, and `req -newkey` would print its
     * progress on the test's stderr. */
    char *keygen[] = { "openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key, NULL };
    char *req[] = { "openssl", "req", "-new", "-x509", "-days", "2", "-subj", "/CN=localhost", "-key", key,
                    "-out", crt, NULL };
    if (th_run(keygen, out, sizeof out, 60000) != 0 || th_run(req, out, sizeof out, 60000) != 0)
        return -1;
    /* The server reads them as its own user, and wants the key private. */
    struct stat st;
    if (stat(pgdata, &st) < 0 || chown(crt, st.st_uid, st.st_gid) < 0 || chown(key, st.st_uid, st.st_gid) < 0 ||
        chmod(key, 0600) < 0)
        return -1;
    if (th_psql(&env, "ALTER SYSTEM SET ssl = on", out, sizeof out) != 0)
        return -1;
    snprintf(sql, sizeof sql, "ALTER SYSTEM SET ssl_cert_file = '%s'", crt);
    if (th_psql(&env, sql, out, sizeof out) != 0)
        return -1;
    snprintf(sql, sizeof sql, "ALTER SYSTEM SET ssl_key_file = '%s'", key);
    if (th_psql(&env, sql, out, sizeof out) != 0 || th_psql(&env, "SELECT pg_reload_conf()", out, sizeof out) != 0)
        return -1;
    usleep(300000);
    char pools[2048];
    snprintf(pools, sizeof pools,
             "[pool tls]\ntype = postgres\n"
             "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=require\n"
             "min_size = 1\nmax_size = 2\nreply_buffer = 64k\n\n"
             "[pool verified]\ntype = postgres\n"
             "conninfo = host=localhost port=@PGPORT@ user=postgres dbname=postgres sslmode=verify-full "
             "sslrootcert=%s\n"
             "min_size = 1\nmax_size = 1\n",
             crt);
    return th_broker_start(&env, pools) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

static void lease_and_check(const char *pool)
{
    pb_client *c;
    pb_lease *l;
    pb_result *r = NULL;
    assert_int_equal(pb_connect(env.sock_path, &c), PB_OK);
    assert_int_equal(pb_acquire(c, pool, 10000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &r), PB_OK);
    assert_int_equal(pb_ntuples(r), 1);
    assert_string_equal(pb_getvalue(r, 0, 0), "t");
    print_message("pool %s: TLS %s\n", pool, pb_getvalue(r, 0, 1));
    pb_result_free(r);

    /* An error, a transaction left open and rolled back on release. */
    assert_int_equal(pb_pg_exec(l, "SELECT 1/0", &r), PB_OK);
    assert_string_equal(pb_error_field(r, 'C'), "22012");
    pb_result_free(r);
    assert_int_equal(pb_pg_exec(l, "BEGIN; CREATE TEMP TABLE x (i int)", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, pool, 10000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT to_regclass('pg_temp.x') IS NULL", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "t");
    pb_result_free(r);

    /* ~20 MB through a 64 KiB ring: decrypted data waiting in OpenSSL
     * (SSL_pending) while the ring is full must not stall. */
    assert_int_equal(pb_pg_exec(l, "SELECT g, repeat('t', 2000) FROM generate_series(1, 10000) g", &r), PB_OK);
    assert_int_equal(pb_ntuples(r), 10000);
    assert_int_equal(pb_getlength(r, 9999, 1), 2000);
    pb_result_free(r);

    /* Pipelined statements and COPY over TLS. */
    for (int i = 0; i < 500; i++)
        assert_int_equal(pb_pg_send_params(l, "SELECT 1", 0, NULL, NULL, NULL, NULL, 0), PB_OK);
    int n = 0;
    while (pb_pg_get_result(l, &r) == PB_OK && r) {
        n++;
        pb_result_free(r);
    }
    assert_int_equal(n, 500);
    assert_int_equal(pb_pg_copy_out_begin(l, "COPY (SELECT generate_series(1, 1000)) TO STDOUT"), PB_OK);
    char *row;
    int rows = 0, len;
    while ((len = pb_pg_get_copy_data(l, &row)) > 0) {
        rows++;
        pb_freemem(row);
    }
    assert_int_equal(len, 0);
    assert_int_equal(rows, 1000);
    assert_int_equal(pb_pg_get_result(l, &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

static void test_sslmode_require(void **state)
{
    (void)state;
    lease_and_check("tls");
}

static void test_sslmode_verify_full(void **state)
{
    (void)state;
    lease_and_check("verified");
}

static void test_tls_many_workers(void **state)
{
    (void)state;
    /* Several processes through two TLS connections. */
    for (int w = 0; w < 8; w++) {
        fflush(NULL);
        if (fork() == 0) {
            pb_client *c;
            if (pb_connect(env.sock_path, &c) != PB_OK)
                _exit(1);
            for (int i = 0; i < 100; i++) {
                pb_lease *l;
                pb_result *r;
                if (pb_acquire(c, "tls", 20000, &l) != PB_OK)
                    _exit(2);
                if (pb_pg_exec(l, "SELECT 42", &r) != PB_OK || strcmp(pb_getvalue(r, 0, 0), "42") != 0)
                    _exit(3);
                pb_result_free(r);
                pb_release(l);
            }
            pb_disconnect(c);
            _exit(0);
        }
    }
    int bad = 0, st;
    for (int w = 0; w < 8; w++) {
        wait(&st);
        bad += !WIFEXITED(st) || WEXITSTATUS(st) != 0;
    }
    assert_int_equal(bad, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sslmode_require),
        cmocka_unit_test(test_sslmode_verify_full),
        cmocka_unit_test(test_tls_many_workers),
    };
    return cmocka_run_group_tests_name("tls", tests, group_setup, group_teardown);
}
