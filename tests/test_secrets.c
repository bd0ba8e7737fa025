/*
 * test_secrets.c — backend passwords (docs/architecture.md, trust model): a conninfo password and
 * a Redis password_file are in neither the shared segment nor the broker
 * log, even after a failed connect wrote the pool's last_error into the
 * segment; a password_file readable by others (at start or on reload), or a
 * world-readable config whose conninfo holds a password, stops the broker
 * with a message naming the file.  Needs root (the fixture is security_fixture.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "security_fixture.h"

/* Lease main (SELECT 1) and cache (PING: AUTH worked) a few times, then the
 * unreachable pool (fails).  0, or the step that failed. */
static int child_use_every_pool(void *arg)
{
    (void)arg;
    pb_client *c = NULL;
    int rc = pb_connect(env.sock_path, &c);
    if (rc != PB_OK) {
        fprintf(stderr, "  pb_connect: %s\n", pb_strerror(rc));
        return 1;
    }
    for (int i = 0; i < 5; i++) {
        pb_lease *l;
        if ((rc = pb_acquire(c, "main", 5000, &l)) != PB_OK) {
            fprintf(stderr, "  acquire main: %s\n", pb_strerror(rc));
            return 2;
        }
        pb_result *r = NULL;
        rc = pb_pg_exec(l, "SELECT 1", &r);
        if (rc != PB_OK || pb_result_status(r) != PB_RES_TUPLES_OK || strcmp(pb_getvalue(r, 0, 0), "1") != 0) {
            fprintf(stderr, "  SELECT 1: %s\n", rc ? pb_strerror(rc) : pb_error_message(r));
            return 3;
        }
        pb_result_free(r);
        pb_release(l);
        if ((rc = pb_acquire(c, "cache", 5000, &l)) != PB_OK) {
            fprintf(stderr, "  acquire cache: %s\n", pb_strerror(rc));
            return 4;
        }
        redisReply *rr = NULL;
        rc = pb_redis_command(l, &rr, "PING");
        if (rc != PB_OK || !rr || rr->type != REDIS_REPLY_STATUS) {      /* AUTH worked */
            fprintf(stderr, "  PING: %s\n", rc ? pb_strerror(rc) : rr && rr->str ? rr->str : "?");
            return 5;
        }
        freeReplyObject(rr);
        pb_release(l);
    }
    pb_lease *l = NULL;
    rc = pb_acquire(c, "unreachable", 500, &l);
    fprintf(stderr, "  acquire on the unreachable pool: %s\n", rc ? pb_strerror(rc) : "ok?!");
    if (rc == PB_OK)
        pb_release(l);
    pb_disconnect(c);
    return 0;
}

/* No backend password in the segment or the log. */
static void test_no_password_in_segment_or_log(void **state)
{
    (void)state;
    NEED_ROOT();
    char out[512];
    /* Redis with a password, the broker reading it from a 0600 file. */
    assert_int_equal(th_redis_cli(&env, "CONFIG SET requirepass " REDIS_SECRET, out, sizeof out), 0);
    char pwpath[300];
    snprintf(pwpath, sizeof pwpath, "%s/redis.pw", env.dir);
    FILE *f = fopen(pwpath, "w");
    assert_non_null(f);
    fputs(REDIS_SECRET "\n", f);
    fclose(f);
    assert_int_equal(chmod(pwpath, 0600), 0);
    int closed_port = th_free_port();
    char conf[4096];
    snprintf(conf, sizeof conf,
             BROKER_SECTION("")
             "[pool main]\n"
             "type = postgres\n"
             "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable "
             "password=" PG_SECRET "\n"
             "min_size = 2\nmax_size = 3\n\n"
             "[pool unreachable]\n"
             "type = postgres\n"
             "conninfo = host=127.0.0.1 port=%d user=postgres password=" PG_SECRET " connect_timeout=2\n"
             "min_size = 1\nmax_size = 1\nacquire_timeout_ms = 500\n\n"
             "[pool cache]\n"
             "type = redis\n"
             "host = 127.0.0.1\nport = @REDISPORT@\n"
             "password_file = @DIR@/redis.pw\n"
             "min_size = 1\nmax_size = 2\n",
             closed_port);
    assert_int_equal(start_broker(conf), 0);

    /* Use every pool, so whatever the broker writes per lease is there
     * (in a child: a call that never returns must not hang the test). */
    assert_int_equal(run_child(0, child_use_every_pool, NULL, 60000), 0);
    assert_int_equal(th_wait_log(&env, "connect failed", 1, 10000), 0);

    /* The whole segment, as root. */
    char path[96];
    seg_path(path, sizeof path);
    size_t n = 0;
    char *seg = read_from(path, 0, &n);
    fprintf(stderr, "  segment %s: %zu bytes\n", path, n);
    assert_true(n > sizeof(pb_shm_header));
    size_t pg_hits = count_in(seg, n, PG_SECRET), redis_hits = count_in(seg, n, REDIS_SECRET);
    /* The unreachable pool's last_error is in there (proves we looked at
     * text the broker writes from connection errors). */
    size_t err_hits = count_in(seg, n, "127.0.0.1");
    fprintf(stderr, "  in the segment: %zu x conninfo password, %zu x redis password, %zu x \"127.0.0.1\" "
                    "(last_error)\n", pg_hits, redis_hits, err_hits);
    free(seg);
    char *log = read_from(env.broker_log, 0, &n);
    size_t log_pg = count_in(log, n, PG_SECRET), log_redis = count_in(log, n, REDIS_SECRET);
    fprintf(stderr, "  in the broker log (%zu bytes): %zu x conninfo password, %zu x redis password\n", n, log_pg,
            log_redis);
    free(log);

    /* shmstat shows the segment to anyone allowed to read it. */
    static char json[1 << 20];
    int src = pbt_shmstat_json(&env, json, sizeof json);
    size_t json_hits = count_in(json, strlen(json), PG_SECRET) + count_in(json, strlen(json), REDIS_SECRET);
    fprintf(stderr, "  shmstat --json: %s, %zu x a password\n", src == 0 ? "ok" : "failed", json_hits);

    stop_broker();
    assert_int_equal(pg_hits, 0);
    assert_int_equal(redis_hits, 0);
    assert_int_equal(log_pg, 0);
    assert_int_equal(log_redis, 0);
    assert_int_equal(json_hits, 0);
    assert_true(err_hits > 0);
}

/* Whatever happened, Redis must not keep the password for later tests. */
static int clear_redis_password(void **state)
{
    (void)state;
    if (not_root)
        return 0;
    char out[256];
    th_redis_cli(&env, "-a " REDIS_SECRET " --no-auth-warning CONFIG SET requirepass \"\"", out, sizeof out);
    return 0;
}

/* A password_file others may read: the broker refuses to start, naming it. */
/* <dir>/pw holding REFUSED_SECRET, with the given mode; its path in path. */
static void write_secret_file(char *path, size_t n, mode_t mode)
{
    snprintf(path, n, "%s/pw", env.dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(REFUSED_SECRET "\n", f);
    fclose(f);
    assert_int_equal(chmod(path, mode), 0);
}

static void test_password_file_readable_by_others_refused(void **state)
{
    (void)state;
    NEED_ROOT();
    char pwpath[300];
    write_secret_file(pwpath, sizeof pwpath, 0644);
    int rc = start_broker(BROKER_SECTION("")
                          "[pool cache]\n"
                          "type = redis\n"
                          "host = 127.0.0.1\nport = @REDISPORT@\n"
                          "password_file = @DIR@/pw\n");
    assert_int_equal(rc, -1);
    int st = env.broker_status;
    fprintf(stderr, "  broker: %s %d\n", WIFEXITED(st) ? "exit status" : "signal",
            WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) != 0);
    char *log = log_since_mark();
    const char *line = strstr(log, pwpath);
    fprintf(stderr, "  broker said: %.*s\n", line ? (int)strcspn(line, "\n") : 0, line ? line : "");
    assert_non_null(line);
    assert_non_null(strstr(log, "0644"));
    assert_null(strstr(log, REFUSED_SECRET));
    free(log);
}

/* A config file others may read whose conninfo holds a password. */
/* The same rule on reload: a password_file that became readable by others
 * is refused, naming the file, and the running configuration is kept. */
static void test_password_file_readable_by_others_refused_on_reload(void **state)
{
    (void)state;
    NEED_ROOT();
    char pwpath[300];
    write_secret_file(pwpath, sizeof pwpath, 0600);
    assert_int_equal(start_broker(BROKER_SECTION("")
                                  "[pool cache]\n"
                                  "type = redis\n"
                                  "host = 127.0.0.1\nport = @REDISPORT@\n"
                                  "password_file = @DIR@/pw\n"),
                     0);
    assert_int_equal(chmod(pwpath, 0640), 0);
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "keeping the current configuration", 1, 5000), 0);
    char *log = log_since_mark();
    const char *line = strstr(log, "keeping the current configuration");
    while (line > log && line[-1] != '\n')
        line--;
    fprintf(stderr, "  broker said: %.*s\n", (int)strcspn(line, "\n"), line);
    assert_non_null(strstr(line, pwpath));
    assert_non_null(strstr(line, "0640"));
    assert_null(strstr(log, REFUSED_SECRET));
    free(log);
    assert_true(broker_alive(NULL));
}

static void test_world_readable_conf_with_password_refused(void **state)
{
    (void)state;
    NEED_ROOT();
    assert_int_equal(start_broker(BROKER_SECTION("")
                                  "[pool main]\n"
                                  "type = postgres\n"
                                  "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres "
                                  "sslmode=disable password=" PG_SECRET "\n"
                                  "min_size = 1\nmax_size = 1\n"),
                     0);
    stop_broker();
    assert_int_equal(chmod(env.conf_path, 0644), 0);
    log_mark = file_size(env.broker_log);
    assert_int_equal(th_broker_restart(&env), -1);
    int st = env.broker_status;
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) != 0);
    char *log = log_since_mark();
    const char *line = strstr(log, "readable by others");
    fprintf(stderr, "  broker said: %.*s\n", line ? (int)strcspn(line, "\n") : 0, line ? line : "");
    assert_non_null(line);
    assert_non_null(strstr(log, env.conf_path));
    assert_null(strstr(log, PG_SECRET));
    free(log);
    chmod(env.conf_path, 0600);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_no_password_in_segment_or_log, clear_redis_password),
        cmocka_unit_test(test_password_file_readable_by_others_refused),
        cmocka_unit_test(test_password_file_readable_by_others_refused_on_reload),
        cmocka_unit_test(test_world_readable_conf_with_password_refused),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("secrets", tests, group_setup, group_teardown);
}
