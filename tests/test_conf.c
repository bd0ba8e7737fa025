/*
 * test_conf.c — unit tests for broker/conf.c: every key parses to the right
 * value, the defaults, each class of error names its line and key, size
 * suffixes and rounding, password files (read when private, refused when
 * not, never echoed), and the world-readable-config rule of conf_load.
 * Files live in a mkdtemp directory that the group teardown removes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"

#define PG_POOL "[pool main]\ntype = postgres\nconninfo = dbname=app\n"
#define SECRET  "s3cr3t-Pa55word"

static char tmpdir[64];

/* ------------------------------------------------------------ helpers */

/* Write dir/name with the given mode (whatever the umask); returns the path
 * in a static buffer. */
static const char *write_file(const char *name, const char *text, mode_t mode)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    size_t len = strlen(text);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    assert_int_equal(fchmod(fd, mode), 0);
    close(fd);
    return path;
}

static conf *parse(const char *text, char *err)
{
    return conf_parse("t.conf", text, err, CONF_ERR_MAX);
}

/* text must fail to parse with an error holding both where ("t.conf:3:") and what. */
static void expect_error(const char *text, const char *where, const char *what)
{
    char err[CONF_ERR_MAX] = "";
    conf *c = parse(text, err);
    if (c != NULL) {
        conf_free(c);
        fail_msg("parsed, but expected an error with '%s' and '%s'", where, what);
    }
    if (strstr(err, where) == NULL || strstr(err, what) == NULL)
        fail_msg("error \"%s\" lacks '%s' or '%s'", err, where, what);
    if (strstr(err, SECRET) != NULL)
        fail_msg("error \"%s\" holds the secret", err);
}

static conf *expect_ok(const char *text)
{
    char err[CONF_ERR_MAX] = "";
    conf *c = parse(text, err);
    if (c == NULL)
        fail_msg("unexpected error: %s", err);
    return c;
}

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/pbconf.XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    if (getenv("PB_KEEP_TMP"))
        return 0;
    return nftw(tmpdir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
}

/* ------------------------------------------------------------ good configs */

static void test_full_config(void **state)
{
    (void)state;
    const char *pw = write_file("full.pass", SECRET "\n", 0600);
    char text[4096];
    snprintf(text, sizeof text,
             "[broker]\n"
             "socket = /tmp/pb.sock\n"
             "socket_mode = 0666\n"
             "shm_name = /pbtest\n"
             "shm_mode = 0640\n"
             "allowed_uids = 33, 0\n"
             "allowed_gids = 0,44\n"
             "log_level = debug\n"
             "log_target = syslog\n"
             "shutdown_timeout_ms = 1500\n"
             "metrics_listen = 127.0.0.1:9187\n"
             "io_backend = epoll\n"
             "max_clients = 77\n"
             "\n"
             "[pool main]\n"
             "type = postgres\n"
             "conninfo = host=/var/run/postgresql dbname=app user=app\n"
             "min_size = 2\n"
             "max_size = 20\n"
             "acquire_timeout_ms = 5001\n"
             "command_timeout_ms = 30000\n"
             "max_lifetime_s = 3601\n"
             "idle_timeout_s = 301\n"
             "max_uses = 50000\n"
             "validate_after_idle_ms = 30001\n"
             "reset = discard_all\n"
             "leak_threshold_ms = 10001\n"
             "max_lease_ms = 60000\n"
             "request_buffer = 128k\n"
             "reply_buffer = 1m\n"
             "\n"
             "[pool cache]\n"
             "type = redis\n"
             "host = redis.local\n"
             "port = 6380\n"
             "password_file = %s\n"
             "user = app\n"
             "db = 3\n"
             "min_size = 1\n"
             "max_size = 8\n",
             pw);
    conf *c = expect_ok(text);

    assert_string_equal(c->path, "t.conf");
    assert_string_equal(c->socket, "/tmp/pb.sock");
    assert_int_equal(c->socket_mode, 0666);
    assert_string_equal(c->shm_name, "/pbtest");
    assert_int_equal(c->shm_mode, 0640);
    assert_int_equal(c->n_allowed_uids, 2);
    assert_int_equal(c->allowed_uids[0], 33);
    assert_int_equal(c->allowed_uids[1], 0);
    assert_int_equal(c->n_allowed_gids, 2);
    assert_int_equal(c->allowed_gids[0], 0);
    assert_int_equal(c->allowed_gids[1], 44);
    assert_int_equal(c->log_level, LOG_LVL_DEBUG);
    assert_string_equal(c->log_target, "syslog");
    assert_int_equal(c->shutdown_timeout_ms, 1500);
    assert_string_equal(c->metrics_listen, "127.0.0.1:9187");
    assert_string_equal(c->io_backend, "epoll");
    assert_int_equal(c->max_clients, 77);
    assert_int_equal(c->npools, 2);

    conf_pool *m = conf_find_pool(c, "main");
    assert_non_null(m);
    assert_int_equal(m->type, PB_POOL_POSTGRES);
    assert_string_equal(m->conninfo, "host=/var/run/postgresql dbname=app user=app");
    assert_null(m->host);
    assert_int_equal(m->min_size, 2);
    assert_int_equal(m->max_size, 20);
    assert_int_equal(m->acquire_timeout_ms, 5001);
    assert_int_equal(m->command_timeout_ms, 30000);
    assert_int_equal(m->max_lifetime_s, 3601);
    assert_int_equal(m->idle_timeout_s, 301);
    assert_int_equal(m->max_uses, 50000);
    assert_int_equal(m->validate_after_idle_ms, 30001);
    assert_int_equal(m->reset_policy, PB_RESET_DISCARD_ALL);
    assert_null(m->reset_sql);
    assert_int_equal(m->leak_threshold_ms, 10001);
    assert_int_equal(m->max_lease_ms, 60000);
    assert_int_equal(m->request_buffer, 128 * 1024);
    assert_int_equal(m->reply_buffer, 1024 * 1024);
    assert_int_equal(m->line, 15);

    conf_pool *r = conf_find_pool(c, "cache");
    assert_non_null(r);
    assert_int_equal(r->type, PB_POOL_REDIS);
    assert_null(r->conninfo);
    assert_string_equal(r->host, "redis.local");
    assert_int_equal(r->port, 6380);
    assert_null(r->unix_socket);
    assert_string_equal(r->password_file, pw);
    assert_string_equal(r->password, SECRET);
    assert_string_equal(r->user, "app");
    assert_int_equal(r->db, 3);
    assert_int_equal(r->min_size, 1);
    assert_int_equal(r->max_size, 8);

    assert_null(conf_find_pool(c, "nope"));
    conf_free(c);
}

static void test_defaults(void **state)
{
    (void)state;
    conf *c = expect_ok(PG_POOL "[pool r]\ntype = redis\n");
    assert_string_equal(c->socket, "/run/poolbroker/poolbroker.sock");
    assert_int_equal(c->socket_mode, 0660);
    assert_string_equal(c->shm_name, "/poolbroker");
    assert_int_equal(c->shm_mode, 0600);
    assert_int_equal(c->n_allowed_uids, 0);
    assert_int_equal(c->n_allowed_gids, 0);
    assert_int_equal(c->log_level, LOG_LVL_INFO);
    assert_string_equal(c->log_target, "stderr");
    assert_int_equal(c->shutdown_timeout_ms, 30000);
    assert_null(c->metrics_listen);
    assert_string_equal(c->io_backend, "auto");
    assert_int_equal(c->max_clients, 1024);

    conf_pool *m = &c->pools[0];
    assert_int_equal(m->min_size, 0);
    assert_int_equal(m->max_size, 10);
    assert_int_equal(m->acquire_timeout_ms, 5000);
    assert_int_equal(m->command_timeout_ms, 0);
    assert_int_equal(m->max_lifetime_s, 3600);
    assert_int_equal(m->idle_timeout_s, 300);
    assert_int_equal(m->max_uses, 0);
    assert_int_equal(m->validate_after_idle_ms, 30000);
    assert_int_equal(m->reset_policy, PB_RESET_AUTO);
    assert_null(m->reset_sql);
    assert_int_equal(m->leak_threshold_ms, 10000);
    assert_int_equal(m->max_lease_ms, 0);
    assert_int_equal(m->request_buffer, 64 * 1024);
    assert_int_equal(m->reply_buffer, 256 * 1024);

    conf_pool *r = &c->pools[1];
    assert_string_equal(r->name, "r");
    assert_string_equal(r->host, "127.0.0.1");
    assert_int_equal(r->port, 6379);
    assert_int_equal(r->db, 0);
    assert_null(r->unix_socket);
    assert_null(r->password);
    assert_null(r->user);
    conf_free(c);
}

static void test_comments_and_whitespace(void **state)
{
    (void)state;
    /* '#' right after a digit is not a comment start, so the value is bad. */
    expect_error(PG_POOL "min_size = 3# no space before the hash\n", "t.conf:4:", "key 'min_size'");

    conf *c = expect_ok("\xEF\xBB\xBF; leading comment after a byte order mark\r\n"
                        "# another\r\n"
                        "\r\n"
                        "   [ pool  main ]   ; header comment\r\n"
                        "\ttype=postgres\r\n"
                        "  conninfo   =  dbname=app password=a;b#c   # trailing\r\n"
                        "max_size = 20   ; comment\r\n"
                        "min_size = 3\t# tab then comment\n"
                        "\n");
    conf_pool *m = conf_find_pool(c, "main");
    assert_non_null(m);
    assert_string_equal(m->conninfo, "dbname=app password=a;b#c");
    assert_int_equal(m->max_size, 20);
    assert_int_equal(m->min_size, 3);
    conf_free(c);
}

static void test_value_keeps_equals_and_spaces(void **state)
{
    (void)state;
    conf *c = expect_ok("[pool main]\ntype = postgres\n"
                        "conninfo = host=/tmp  port=5432 options='-c x=y'\n"
                        "reset = SET search_path = public\n");
    assert_string_equal(c->pools[0].conninfo, "host=/tmp  port=5432 options='-c x=y'");
    assert_int_equal(c->pools[0].reset_policy, PB_RESET_CUSTOM);
    assert_string_equal(c->pools[0].reset_sql, "SET search_path = public");
    conf_free(c);
}

/* A value in double quotes keeps comment characters after spaces, and the
 * spaces at its ends; \" and \\ are a quote and a backslash. */
static void test_quoted_values(void **state)
{
    (void)state;
    conf *c = expect_ok(PG_POOL "reset = \"RESET ALL ; SELECT pg_advisory_unlock_all() # keep\"   ; a comment\n");
    assert_string_equal(c->pools[0].reset_sql, "RESET ALL ; SELECT pg_advisory_unlock_all() # keep");
    conf_free(c);
    c = expect_ok("[pool main]\ntype = postgres\nconninfo = \" dbname=app password='a\\\"b\\\\c ; d'\"\n"
                  "reset = SET x = \"y\"\n");
    assert_string_equal(c->pools[0].conninfo, " dbname=app password='a\"b\\c ; d'");
    /* Only a value that starts with a quote is quoted. */
    assert_string_equal(c->pools[0].reset_sql, "SET x = \"y\"");
    conf_free(c);
    expect_error(PG_POOL "reset = \"RESET ALL ; SELECT 1\n", "t.conf:4:", "key 'reset': unterminated quote");
    expect_error(PG_POOL "reset = \"RESET ALL\";SELECT 1\n", "t.conf:4:", "key 'reset': text after the closing quote");
    expect_error(PG_POOL "reset = \"\"\n", "t.conf:4:", "key 'reset': empty value");
    /* An error in a quoted secret does not echo it. */
    expect_error("[pool main]\ntype = postgres\nconninfo = \"password=" SECRET "\n", "t.conf:3:",
                 "key 'conninfo': unterminated quote");
}

static void test_reset_values(void **state)
{
    (void)state;
    conf *c = expect_ok(PG_POOL "reset = rollback\n");
    assert_int_equal(c->pools[0].reset_policy, PB_RESET_ROLLBACK);
    assert_null(c->pools[0].reset_sql);
    conf_free(c);
    c = expect_ok(PG_POOL "reset = auto\n");
    assert_int_equal(c->pools[0].reset_policy, PB_RESET_AUTO);
    assert_null(c->pools[0].reset_sql);
    conf_free(c);
    expect_error("[pool r]\ntype = redis\nreset = rollback\n", "t.conf:3:", "key 'reset'");
}

static void test_size_suffixes(void **state)
{
    (void)state;
    conf *c = expect_ok(PG_POOL "request_buffer = 2K\nreply_buffer = 4M\n"
                        "[pool b]\ntype = postgres\nconninfo = dbname=y\nrequest_buffer = 1024\nreply_buffer = 64m\n");
    assert_int_equal(c->pools[0].request_buffer, 2048);
    assert_int_equal(c->pools[0].reply_buffer, 4u << 20);
    assert_int_equal(c->pools[1].request_buffer, 1024);
    assert_int_equal(c->pools[1].reply_buffer, 64u << 20);
    conf_free(c);
    expect_error(PG_POOL "request_buffer = 1g\n", "t.conf:4:", "key 'request_buffer': '1g' is out of range (1k..64m)");
    expect_error(PG_POOL "request_buffer = 1t\n", "t.conf:4:", "key 'request_buffer': '1t' is not a size");
    expect_error(PG_POOL "max_request_size = 1gb\n", "t.conf:4:", "key 'max_request_size': '1gb' is not a size");
    expect_error(PG_POOL "request_buffer = k\n", "t.conf:4:", "not a size");
    expect_error(PG_POOL "request_buffer = 1kk\n", "t.conf:4:", "not a size");
}

static void test_size_limits(void **state)
{
    (void)state;
    expect_error(PG_POOL "request_buffer = 1023\n", "t.conf:4:", "key 'request_buffer': '1023' is out of range (1k..64m)");
    expect_error(PG_POOL "request_buffer = 65m\n", "t.conf:4:", "out of range");
    expect_error(PG_POOL "reply_buffer = 3k\n", "t.conf:4:", "key 'reply_buffer': '3k' is out of range (4k..256m)");
    expect_error(PG_POOL "reply_buffer = 257m\n", "t.conf:4:", "out of range");
    expect_error(PG_POOL "reply_buffer = 99999999999999999999999k\n", "t.conf:4:", "key 'reply_buffer'");
    conf *c = expect_ok(PG_POOL "request_buffer = 64m\nreply_buffer = 256M\n");
    assert_int_equal(c->pools[0].request_buffer, 64u << 20);
    assert_int_equal(c->pools[0].reply_buffer, 256u << 20);
    conf_free(c);
}

/* max_request_size (#18): per pool, defaults from the server's own limit,
 * the g suffix, and its range (not tied to request_buffer: a request larger
 * than the buffer streams through it). */
static void test_max_request_size(void **state)
{
    (void)state;
    conf *c = expect_ok(PG_POOL "[pool r]\ntype = redis\n");
    assert_int_equal(c->pools[0].max_request_size, 1u << 30);      /* postgres: 1g */
    assert_int_equal(c->pools[1].max_request_size, 512u << 20);    /* redis: 512m */
    conf_free(c);
    c = expect_ok(PG_POOL "max_request_size = 1m\n[pool r]\ntype = redis\nmax_request_size = 2G\n"
                  "request_buffer = 64k\n[pool s]\ntype = redis\nmax_request_size = 1k\n");
    assert_int_equal(c->pools[0].max_request_size, 1u << 20);
    assert_int_equal(c->pools[1].max_request_size, 2u << 30);
    assert_int_equal(c->pools[2].max_request_size, 1024);          /* under request_buffer: allowed */
    conf_free(c);
    expect_error(PG_POOL "max_request_size = 1023\n", "t.conf:4:",
                 "key 'max_request_size': '1023' is out of range (1k..2g)");
    expect_error(PG_POOL "max_request_size = 3g\n", "t.conf:4:", "key 'max_request_size': '3g' is out of range (1k..2g)");
    expect_error(PG_POOL "max_request_size = 2049m\n", "t.conf:4:", "out of range (1k..2g)");
    expect_error(PG_POOL "max_request_size = -1\n", "t.conf:4:", "key 'max_request_size'");
    expect_error(PG_POOL "max_request_size = 99999999999999999999g\n", "t.conf:4:", "key 'max_request_size'");
}

static void test_reply_buffer_rounding(void **state)
{
    (void)state;
    static const struct { const char *in; uint32_t out; } cases[] = {
        { "4k", 4096 }, { "5000", 8192 }, { "300k", 512 * 1024 }, { "4097", 8192 },
        { "255m", 256u << 20 }, { "1m", 1u << 20 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, PG_POOL "reply_buffer = %s\nrequest_buffer = 1500\n", cases[i].in);
        conf *c = expect_ok(text);
        assert_int_equal(c->pools[0].reply_buffer, cases[i].out);
        assert_int_equal(c->pools[0].request_buffer, 1500);   /* not rounded */
        conf_free(c);
    }
}

/* ------------------------------------------------------------ structural errors */

static void test_unknown_key(void **state)
{
    (void)state;
    expect_error(PG_POOL "max_sise = 3\n", "t.conf:4:", "key 'max_sise': unknown key");
    expect_error("[broker]\nsockets = /x\n" PG_POOL, "t.conf:2:", "key 'sockets': unknown key in [broker]");
    expect_error("[broker]\nmax_size = 3\n" PG_POOL, "t.conf:2:", "key 'max_size'");   /* pool key in broker */
    expect_error(PG_POOL "socket = /x\n", "t.conf:4:", "key 'socket'");               /* broker key in pool */
}

static void test_unknown_section(void **state)
{
    (void)state;
    expect_error(PG_POOL "\n[pools x]\n", "t.conf:5:", "section [pools x]: unknown section");
    expect_error("[database]\n" PG_POOL, "t.conf:1:", "section [database]");
    expect_error("[broker\n" PG_POOL, "t.conf:1:", "malformed section header");
}

static void test_duplicate_key(void **state)
{
    (void)state;
    expect_error(PG_POOL "max_size = 3\nmax_size = 4\n", "t.conf:5:", "key 'max_size': duplicate key (first set on line 4)");
    expect_error("[broker]\nlog_level = info\n\nlog_level = debug\n" PG_POOL, "t.conf:4:", "key 'log_level': duplicate");
    /* The same key in two pools is fine. */
    conf *c = expect_ok(PG_POOL "max_size = 3\n[pool b]\ntype = postgres\nconninfo = dbname=b\nmax_size = 3\n");
    conf_free(c);
}

static void test_duplicate_sections(void **state)
{
    (void)state;
    expect_error(PG_POOL "[pool other]\ntype = redis\n[pool main]\ntype = redis\n", "t.conf:6:",
                 "section [pool main]: duplicate pool name (first defined on line 1)");
    expect_error("[broker]\n[broker]\n" PG_POOL, "t.conf:2:", "section [broker]: duplicate section");
}

static void test_key_outside_section(void **state)
{
    (void)state;
    expect_error("log_level = info\n" PG_POOL, "t.conf:1:", "key 'log_level': outside any section");
}

static void test_syntax_errors(void **state)
{
    (void)state;
    expect_error(PG_POOL "max_size\n", "t.conf:4:", "expected 'key = value'");
    expect_error(PG_POOL " = 3\n", "t.conf:4:", "missing key");
    expect_error(PG_POOL "max_size =   ; nothing\n", "t.conf:4:", "key 'max_size': empty value");
}

static void test_bad_numbers(void **state)
{
    (void)state;
    expect_error(PG_POOL "max_size = ten\n", "t.conf:4:", "key 'max_size': 'ten' is not a non-negative integer");
    expect_error(PG_POOL "max_uses = -1\n", "t.conf:4:", "key 'max_uses': '-1' is negative");
    expect_error(PG_POOL "max_uses = 99999999999999999999\n", "t.conf:4:", "key 'max_uses': '99999999999999999999' is too large");
    expect_error(PG_POOL "acquire_timeout_ms = 4294967296\n", "t.conf:4:", "key 'acquire_timeout_ms': 4294967296 is out of range");
    expect_error(PG_POOL "min_size = +1\n", "t.conf:4:", "key 'min_size'");
    expect_error(PG_POOL "min_size = 0x10\n", "t.conf:4:", "key 'min_size'");
    expect_error(PG_POOL "min_size = 1 2\n", "t.conf:4:", "key 'min_size'");
    conf *c = expect_ok(PG_POOL "max_uses = 18446744073709551615\nacquire_timeout_ms = 4294967295\n");
    assert_true(c->pools[0].max_uses == UINT64_MAX);
    assert_int_equal(c->pools[0].acquire_timeout_ms, UINT32_MAX);
    conf_free(c);
}

static void test_duration_with_unit(void **state)
{
    (void)state;
    expect_error(PG_POOL "idle_timeout_s = 5s\n", "t.conf:4:", "key 'idle_timeout_s': '5s' is not a plain number; the unit is in the key name (seconds)");
    expect_error(PG_POOL "acquire_timeout_ms = 5s\n", "t.conf:4:", "unit is in the key name (milliseconds)");
    expect_error("[broker]\nshutdown_timeout_ms = 30 s\n" PG_POOL, "t.conf:2:", "key 'shutdown_timeout_ms'");
}

static void test_missing_required(void **state)
{
    (void)state;
    expect_error("[pool main]\ntype = postgres\nmax_size = 3\n", "t.conf:1:", "section [pool main]: a postgres pool requires 'conninfo'");
    expect_error("[pool a]\ntype = redis\n\n[pool b]\nmax_size = 3\n", "t.conf:4:", "section [pool b]: missing required key 'type'");
    expect_error(PG_POOL "[pool x]\ntype = mysql\n", "t.conf:5:", "key 'type': unknown pool type 'mysql'");
}

static void test_key_wrong_for_type(void **state)
{
    (void)state;
    expect_error("[pool r]\ntype = redis\nport = 6379\nconninfo = password=" SECRET "\n", "t.conf:4:",
                 "key 'conninfo': does not apply to a redis pool");
    /* type comes after the offending key: the error still points at the key. */
    expect_error("[pool m]\nhost = db.local\nconninfo = dbname=x\ntype = postgres\n", "t.conf:2:",
                 "key 'host': does not apply to a postgres pool");
    expect_error(PG_POOL "db = 1\n", "t.conf:4:", "key 'db'");
    expect_error(PG_POOL "unix_socket = /tmp/r.sock\n", "t.conf:4:", "key 'unix_socket'");
}

static void test_unix_socket_vs_host(void **state)
{
    (void)state;
    conf *c = expect_ok("[pool r]\ntype = redis\nunix_socket = /run/redis/redis.sock\n");
    assert_string_equal(c->pools[0].unix_socket, "/run/redis/redis.sock");
    conf_free(c);
    expect_error("[pool r]\ntype = redis\nhost = h\nunix_socket = /tmp/r.sock\n", "t.conf:4:",
                 "key 'unix_socket': cannot be combined with 'host'");
    char text[512];
    snprintf(text, sizeof text, "[pool r]\ntype = redis\nunix_socket = /%0120d\n", 0);
    expect_error(text, "t.conf:3:", "key 'unix_socket': path longer than");
}

static void test_redis_ranges(void **state)
{
    (void)state;
    expect_error("[pool r]\ntype = redis\nport = 0\n", "t.conf:3:", "key 'port': 0 is out of range (1..65535)");
    expect_error("[pool r]\ntype = redis\nport = 65536\n", "t.conf:3:", "key 'port'");
    expect_error("[pool r]\ntype = redis\ndb = 1001\n", "t.conf:3:", "key 'db'");
    conf *c = expect_ok("[pool r]\ntype = redis\ndb = 1000\nport = 65535\n");
    assert_int_equal(c->pools[0].db, 1000);
    assert_int_equal(c->pools[0].port, 65535);
    conf_free(c);
}

static void test_pool_sizes(void **state)
{
    (void)state;
    expect_error(PG_POOL "max_size = 0\n", "t.conf:4:", "key 'max_size': 0 is out of range (1..4096)");
    expect_error(PG_POOL "max_size = 4097\n", "t.conf:4:", "key 'max_size'");
    expect_error(PG_POOL "min_size = 4097\n", "t.conf:4:", "key 'min_size'");
    expect_error(PG_POOL "min_size = 30\nmax_size = 20\n", "t.conf:5:", "key 'max_size': 20 is less than min_size 30");
    expect_error(PG_POOL "max_size = 20\nmin_size = 30\n", "t.conf:5:", "key 'min_size': 30 is greater than max_size 20");
    expect_error(PG_POOL "min_size = 11\n", "t.conf:4:", "key 'min_size': 11 is greater than max_size 10 (the default)");
    conf *c = expect_ok(PG_POOL "min_size = 4096\nmax_size = 4096\n");
    assert_int_equal(c->pools[0].max_size, PB_MAX_POOL_SLOTS);
    assert_int_equal(conf_pool_slots(&c->pools[0]), PB_MAX_POOL_SLOTS);
    conf_free(c);
    /* slots: room reserved for max_size to grow into by reload. */
    expect_error(PG_POOL "max_size = 8\nslots = 4\n", "t.conf:5:", "key 'slots': 4 is less than max_size 8");
    expect_error(PG_POOL "slots = 4\n", "t.conf:4:", "key 'slots': 4 is less than max_size 10");
    expect_error(PG_POOL "slots = 4097\n", "t.conf:4:", "key 'slots'");
    c = expect_ok(PG_POOL "max_size = 2\nslots = 16\n");
    assert_int_equal(conf_pool_slots(&c->pools[0]), 16);
    conf_free(c);
    /* Without slots: 4 x max_size, at least 64, at most 4096. */
    c = expect_ok(PG_POOL "max_size = 3\n");
    assert_int_equal(conf_pool_slots(&c->pools[0]), 64);
    conf_free(c);
    c = expect_ok(PG_POOL "max_size = 100\n");
    assert_int_equal(conf_pool_slots(&c->pools[0]), 400);
    conf_free(c);
    c = expect_ok(PG_POOL "max_size = 2000\n");
    assert_int_equal(conf_pool_slots(&c->pools[0]), PB_MAX_POOL_SLOTS);
    conf_free(c);
}

static void test_pool_count(void **state)
{
    (void)state;
    expect_error("[broker]\nlog_level = info\n", "t.conf: ", "at least one pool");
    expect_error("", "t.conf: ", "at least one pool");

    size_t cap = 100 * 80;
    char *text = malloc(cap);
    assert_non_null(text);
    size_t len = 0;
    for (int i = 0; i < PB_MAX_POOLS; i++)
        len += (size_t)snprintf(text + len, cap - len, "[pool p%d]\ntype = redis\n", i);
    conf *c = expect_ok(text);
    assert_int_equal(c->npools, PB_MAX_POOLS);
    assert_string_equal(c->pools[PB_MAX_POOLS - 1].name, "p63");
    conf_free(c);
    snprintf(text + len, cap - len, "[pool one_too_many]\ntype = redis\n");
    expect_error(text, "t.conf:129:", "section [pool one_too_many]: too many pools (at most 64)");
    free(text);
}

static void test_pool_names(void **state)
{
    (void)state;
    conf *c = expect_ok("[pool A-z_0.9]\ntype = redis\n[pool 0123456789012345678901234567890]\ntype = redis\n");
    assert_non_null(conf_find_pool(c, "A-z_0.9"));
    assert_non_null(conf_find_pool(c, "0123456789012345678901234567890"));
    conf_free(c);
    expect_error("[pool]\ntype = redis\n", "t.conf:1:", "missing pool name");
    expect_error("[pool a b]\ntype = redis\n", "t.conf:1:", "may contain only letters");
    expect_error("[pool a/b]\ntype = redis\n", "t.conf:1:", "section [pool a/b]");
    expect_error("[pool 01234567890123456789012345678901]\ntype = redis\n", "t.conf:1:", "longer than 31 characters");
}

/* ------------------------------------------------------------ broker keys */

static void test_shm_name(void **state)
{
    (void)state;
    expect_error("[broker]\nshm_name = poolbroker\n" PG_POOL, "t.conf:2:", "key 'shm_name': must start with '/'");
    expect_error("[broker]\nshm_name = /a/b\n" PG_POOL, "t.conf:2:", "key 'shm_name'");
    expect_error("[broker]\nshm_name = /\n" PG_POOL, "t.conf:2:", "key 'shm_name'");
    char name[64];
    memset(name, 'x', sizeof name);
    name[0] = '/';
    char text[256];
    name[61] = '\0';
    snprintf(text, sizeof text, "[broker]\nshm_name = %s\n" PG_POOL, name);
    expect_error(text, "t.conf:2:", "key 'shm_name': longer than 60");
    name[60] = '\0';
    snprintf(text, sizeof text, "[broker]\nshm_name = %s\n" PG_POOL, name);
    conf *c = expect_ok(text);
    assert_string_equal(c->shm_name, name);
    conf_free(c);
}

static void test_modes(void **state)
{
    (void)state;
    conf *c = expect_ok("[broker]\nsocket_mode = 660\nshm_mode = 0000\n" PG_POOL);
    assert_int_equal(c->socket_mode, 0660);
    assert_int_equal(c->shm_mode, 0);
    conf_free(c);
    expect_error("[broker]\nsocket_mode = 0668\n" PG_POOL, "t.conf:2:", "key 'socket_mode': '0668' is not an octal mode");
    expect_error("[broker]\nshm_mode = 01777\n" PG_POOL, "t.conf:2:", "key 'shm_mode': '01777' is out of range");
    expect_error("[broker]\nshm_mode = rw-rw----\n" PG_POOL, "t.conf:2:", "key 'shm_mode'");
}

static void test_allowed_ids(void **state)
{
    (void)state;
    conf *c = expect_ok("[broker]\nallowed_uids = root , 1000,2\nallowed_gids = root\n" PG_POOL);
    assert_int_equal(c->n_allowed_uids, 3);
    assert_int_equal(c->allowed_uids[0], 0);
    assert_int_equal(c->allowed_uids[1], 1000);
    assert_int_equal(c->allowed_uids[2], 2);
    assert_int_equal(c->n_allowed_gids, 1);
    assert_int_equal(c->allowed_gids[0], 0);
    conf_free(c);
    expect_error("[broker]\nallowed_uids = no_such_user_pbx\n" PG_POOL, "t.conf:2:", "key 'allowed_uids': no such user 'no_such_user_pbx'");
    expect_error("[broker]\nallowed_gids = no_such_group_pbx\n" PG_POOL, "t.conf:2:", "key 'allowed_gids': no such group");
    expect_error("[broker]\nallowed_uids = 1,,2\n" PG_POOL, "t.conf:2:", "key 'allowed_uids': empty entry");
    expect_error("[broker]\nallowed_uids = 4294967295\n" PG_POOL, "t.conf:2:", "key 'allowed_uids'");
    expect_error("[broker]\nallowed_gids = 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17\n" PG_POOL, "t.conf:2:",
                 "key 'allowed_gids': more than 16 entries");
}

static void test_log_keys(void **state)
{
    (void)state;
    static const char *const names[] = { "debug", "info", "warn", "error" };
    for (int i = 0; i < 4; i++) {
        char text[256];
        snprintf(text, sizeof text, "[broker]\nlog_level = %s\n" PG_POOL, names[i]);
        conf *c = expect_ok(text);
        assert_int_equal(c->log_level, i);
        conf_free(c);
    }
    /* PostgreSQL's spelling, and any case (issue #18). */
    static const char *const synonyms[][2] = { { "warning", "2" }, { "WARNING", "2" }, { "Warn", "2" },
                                               { "ERROR", "3" }, { "Debug", "0" } };
    for (size_t i = 0; i < sizeof synonyms / sizeof synonyms[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, "[broker]\nlog_level = %s\n" PG_POOL, synonyms[i][0]);
        conf *c = expect_ok(text);
        assert_int_equal(c->log_level, atoi(synonyms[i][1]));
        conf_free(c);
    }
    expect_error("[broker]\nlog_level = warnings\n" PG_POOL, "t.conf:2:", "key 'log_level': unknown level 'warnings'");
    expect_error("[broker]\nlog_level = verbose\n" PG_POOL, "t.conf:2:", "key 'log_level': unknown level 'verbose'");
    expect_error("[broker]\nlog_target = file\n" PG_POOL, "t.conf:2:", "key 'log_target': unknown value 'file'");
}

static void test_io_backend_and_max_clients(void **state)
{
    (void)state;
    conf *c = expect_ok("[broker]\nio_backend = io_uring\nmax_clients = 4095\n" PG_POOL);
    assert_string_equal(c->io_backend, "io_uring");
    assert_int_equal(c->max_clients, PB_MAX_CLIENTS);
    conf_free(c);
    expect_error("[broker]\nio_backend = kqueue\n" PG_POOL, "t.conf:2:", "key 'io_backend': unknown value 'kqueue'");
    expect_error("[broker]\nmax_clients = 0\n" PG_POOL, "t.conf:2:", "key 'max_clients': 0 is out of range (1..4095)");
    expect_error("[broker]\nmax_clients = 4096\n" PG_POOL, "t.conf:2:", "key 'max_clients'");
}

static void test_metrics_listen(void **state)
{
    (void)state;
    conf *c = expect_ok("[broker]\nmetrics_listen = [::1]:9187\n" PG_POOL);
    assert_string_equal(c->metrics_listen, "[::1]:9187");
    conf_free(c);
    c = expect_ok("[broker]\nmetrics_listen = localhost:65535\n" PG_POOL);
    conf_free(c);
    expect_error("[broker]\nmetrics_listen = 127.0.0.1\n" PG_POOL, "t.conf:2:", "key 'metrics_listen': '127.0.0.1' is not host:port");
    expect_error("[broker]\nmetrics_listen = 127.0.0.1:0\n" PG_POOL, "t.conf:2:", "key 'metrics_listen': port '0'");
    expect_error("[broker]\nmetrics_listen = 127.0.0.1:65536\n" PG_POOL, "t.conf:2:", "port '65536'");
    expect_error("[broker]\nmetrics_listen = 127.0.0.1:http\n" PG_POOL, "t.conf:2:", "port 'http'");
    expect_error("[broker]\nmetrics_listen = :9187\n" PG_POOL, "t.conf:2:", "no host");
    expect_error("[broker]\nmetrics_listen = ::1:9187\n" PG_POOL, "t.conf:2:", "brackets");
}

/* ------------------------------------------------------------ secrets */

static void test_password_file_private(void **state)
{
    (void)state;
    const char *pw = write_file("ok.pass", SECRET "\r\nsecond line ignored\n", 0600);
    char text[512];
    snprintf(text, sizeof text, "[pool r]\ntype = redis\npassword_file = %s\n", pw);
    conf *c = expect_ok(text);
    assert_string_equal(c->pools[0].password, SECRET);
    conf_free(c);

    pw = write_file("nonl.pass", SECRET, 0400);   /* no trailing newline, read-only */
    snprintf(text, sizeof text, "[pool r]\ntype = redis\npassword_file = %s\n", pw);
    c = expect_ok(text);
    assert_string_equal(c->pools[0].password, SECRET);
    conf_free(c);

    pw = write_file("empty.pass", "\n", 0600);
    snprintf(text, sizeof text, "[pool r]\ntype = redis\npassword_file = %s\n", pw);
    expect_error(text, "t.conf:3:", "empty password");
}

static void test_password_file_shared_refused(void **state)
{
    (void)state;
    static const mode_t modes[] = { 0644, 0640, 0604, 0620 };
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        const char *pw = write_file("shared.pass", SECRET "\n", modes[i]);
        char text[512];
        snprintf(text, sizeof text, "[pool r]\ntype = redis\n\npassword_file = %s\n", pw);
        expect_error(text, "t.conf:4:", "key 'password_file'");
        expect_error(text, "t.conf:4:", pw);
        expect_error(text, "t.conf:4:", (modes[i] & 044) ? "secrets file readable by group or others"
                                                          : "secrets file accessible by group or others");
    }
}

static void test_password_file_not_regular_or_missing(void **state)
{
    (void)state;
    char text[512];
    snprintf(text, sizeof text, "[pool r]\ntype = redis\npassword_file = %s\n", tmpdir);
    expect_error(text, "t.conf:3:", "is not a regular file");
    snprintf(text, sizeof text, "[pool r]\ntype = redis\npassword_file = %s/absent.pass\n", tmpdir);
    expect_error(text, "t.conf:3:", "key 'password_file': cannot open");
    expect_error(text, "t.conf:3:", "absent.pass");
    /* Not a redis key. */
    const char *pw = write_file("pg.pass", SECRET "\n", 0600);
    snprintf(text, sizeof text, PG_POOL "password_file = %s\n", pw);
    expect_error(text, "t.conf:4:", "key 'password_file': does not apply to a postgres pool");
}

static void test_password_never_in_errors(void **state)
{
    (void)state;
    const char *pw = write_file("leak.pass", SECRET "\n", 0600);
    char text[512];
    /* A good password file followed by errors later in the same pool and file. */
    snprintf(text, sizeof text, "[pool r]\ntype = redis\npassword_file = %s\nport = x\n", pw);
    expect_error(text, "t.conf:4:", "key 'port'");
    snprintf(text, sizeof text, "[pool r]\ntype = redis\npassword_file = %s\n[pool r]\n", pw);
    expect_error(text, "t.conf:4:", "duplicate pool name");
    /* A password-bearing conninfo is never echoed either. */
    expect_error("[pool m]\ntype = redis\nconninfo = user=a password=" SECRET "\n", "t.conf:3:", "key 'conninfo'");
    expect_error("[pool m]\ntype = postgres\nconninfo = password=" SECRET "\nconninfo = password=" SECRET "\n",
                 "t.conf:4:", "duplicate key");
}

/* ------------------------------------------------------------ conf_load */

static void test_load_world_readable(void **state)
{
    (void)state;
    char err[CONF_ERR_MAX];
    const char *text = "[pool main]\ntype = postgres\nconninfo = dbname=app password=" SECRET "\n";
    char path[256];

    snprintf(path, sizeof path, "%s", write_file("secret.conf", text, 0644));
    assert_null(conf_load(path, err, sizeof err));
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "readable by others"));
    assert_null(strstr(err, SECRET));

    snprintf(path, sizeof path, "%s", write_file("secret.conf", text, 0640));
    conf *c = conf_load(path, err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_string_equal(c->path, path);
    conf_free(c);

    /* URI form, and "password = x" with spaces, count as secrets too. */
    snprintf(path, sizeof path, "%s",
             write_file("uri.conf", "[pool m]\ntype = postgres\nconninfo = postgresql://app:" SECRET "@db/app\n", 0604));
    assert_null(conf_load(path, err, sizeof err));
    assert_non_null(strstr(err, "readable by others"));
    snprintf(path, sizeof path, "%s",
             write_file("sp.conf", "[pool m]\ntype = postgres\nconninfo = host=x password = " SECRET "\n", 0644));
    assert_null(conf_load(path, err, sizeof err));

    /* No secret: a world-readable config is fine (passfile is not a password). */
    snprintf(path, sizeof path, "%s",
             write_file("plain.conf", "[pool m]\ntype = postgres\nconninfo = host=x passfile=/p user=a\n", 0644));
    c = conf_load(path, err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    conf_free(c);
}

static void test_load_relative_password_file(void **state)
{
    (void)state;
    write_file("rel.pass", SECRET "\n", 0600);
    char path[256];
    snprintf(path, sizeof path, "%s", write_file("rel.conf", "[pool r]\ntype = redis\npassword_file = rel.pass\n", 0644));
    char err[CONF_ERR_MAX];
    conf *c = conf_load(path, err, sizeof err);   /* cwd is not tmpdir */
    if (c == NULL)
        fail_msg("%s", err);
    assert_string_equal(c->pools[0].password, SECRET);
    char want[300];
    snprintf(want, sizeof want, "%s/rel.pass", tmpdir);
    assert_string_equal(c->pools[0].password_file, want);
    conf_free(c);
}

static void test_load_errors_name_file(void **state)
{
    (void)state;
    char err[CONF_ERR_MAX];
    char path[256];
    snprintf(path, sizeof path, "%s/missing.conf", tmpdir);
    assert_null(conf_load(path, err, sizeof err));
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "cannot open"));

    assert_null(conf_load(tmpdir, err, sizeof err));
    assert_non_null(strstr(err, "not a regular file"));

    snprintf(path, sizeof path, "%s", write_file("bad.conf", PG_POOL "\nmax_size = many\n", 0600));
    assert_null(conf_load(path, err, sizeof err));
    char want[300];
    snprintf(want, sizeof want, "%s:5: key 'max_size'", path);
    assert_non_null(strstr(err, want));
}

/* ------------------------------------------------------------ API edges */

static void test_api_edges(void **state)
{
    (void)state;
    conf_free(NULL);
    assert_null(conf_find_pool(NULL, "x"));
    /* No error buffer, or a tiny one: no crash, no overflow. */
    assert_null(conf_parse("t.conf", "[nope]\n", NULL, 0));
    char small[12];
    memset(small, 'Z', sizeof small);
    assert_null(conf_parse("t.conf", "[nope]\n", small, 8));
    assert_int_equal(strlen(small), 7);
    assert_int_equal(small[8], 'Z');
    /* A success clears the buffer. */
    char err[CONF_ERR_MAX] = "stale";
    conf *c = conf_parse("t.conf", PG_POOL, err, sizeof err);
    assert_non_null(c);
    assert_string_equal(err, "");
    conf_free(c);
}

/* conninfo is checked as libpq and the server will read it (issue #18):
 * unknown keys, bad syntax and values libpq would only refuse at connect
 * time are errors naming the file, the line and the key; never the password. */
static void test_conninfo_checked(void **state)
{
    (void)state;
#define CI(v) "[pool p]\ntype = postgres\nconninfo = " v "\n"
    static const char *const good[] = {
        "host=/tmp port=5432 dbname=app user=app sslmode=disable application_name=x",
        "host=a,b,c port=5432",
        "host=a,b port=5432,5433 target_session_attrs=read-write connect_timeout=5",
        "hostaddr=127.0.0.1,::1 host=a,b port=,5433",
        "options='-c statement_timeout=5s --search_path=app -cwork_mem=4MB' keepalives=1",
        "postgresql://app@db.example:5432/app?sslmode=require&application_name=web",
        "replication=false dbname=app",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        char text[512];
        snprintf(text, sizeof text, CI("%s"), good[i]);
        conf *c = expect_ok(text);
        assert_string_equal(c->pools[0].conninfo, good[i]);
        conf_free(c);
    }
    static const char *const bad[][2] = {
        { "dbname=app bogus_option=1", "invalid connection option \"bogus_option\"" },
        { "postgresql://h/app?bogus=1", "invalid URI query parameter: \"(not shown" },
        { "dbname=app bogus=1", "invalid connection option \"bogus\"" },
        { "dbname", "missing \"=\"" },
        { "dbname='app", "unterminated quoted string" },
        { "host=h port=0", "port '0' is not a number in 1..65535" },
        { "host=h port=65536", "port '65536' is not a number in 1..65535" },
        { "host=h port=pg", "a port is not a number (value not shown" },
        { "host=a,b port=1,2,3", "3 port numbers for 2 hosts" },
        { "host=a,b hostaddr=127.0.0.1", "2 host names but 1 hostaddr values" },
        { "hostaddr=db.example", "hostaddr 'db.example' is not a numeric" },
        { "dbname=app sslmode=maybe", "sslmode=maybe: not one of disable,allow,prefer,require,verify-ca,verify-full" },
        { "dbname=app gssencmode=yes", "gssencmode=yes: not one of" },
        { "dbname=app target_session_attrs=master", "target_session_attrs=master: not one of" },
        { "dbname=app connect_timeout=5s", "connect_timeout=5s: not an integer" },
        { "dbname=app keepalives_idle=x", "keepalives_idle=x: not an integer" },
        { "dbname=app options=-e", "options: '-e' is not a -c name=value setting" },
        { "dbname=app options='-c'", "options: -c needs name=value" },
        { "dbname=app replication=database", "cannot be replication connections" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[512];
        snprintf(text, sizeof text, CI("%s"), bad[i][0]);
        expect_error(text, "t.conf:3: key 'conninfo': ", bad[i][1]);
    }
    /* libpq's message could quote a password: what it quotes is shown only
     * when it has the shape of a key or a word. */
    expect_error(CI("dbname=app password=" SECRET " bogus=1"), "t.conf:3:", "invalid connection option \"(not shown");
    /* An unquoted password with a space: libpq quotes its second word. */
    expect_error(CI("dbname=app password=two " SECRET), "t.conf:3:", "missing \"=\" after \"(not shown");
    expect_error(CI("postgresql://u:" SECRET "%zz@h/app"), "t.conf:3: key 'conninfo'", "\"(not shown");
    expect_error(CI("dbname=app password='" SECRET), "t.conf:3: key 'conninfo'", "unterminated quoted string");
    expect_error(CI("x://u:" SECRET "@h=1"), "t.conf:3: key 'conninfo'", "invalid connection option \"(not shown");
    expect_error(CI("dbname=a x://u:" SECRET "@h"), "t.conf:3: key 'conninfo'", "missing \"=\" after \"(not shown");
    /* A value of another key that could hold a password is not echoed
     * (quoted "password=...", or the "user:secret" shape of a URI). */
    expect_error(CI("sslmode='x password=" SECRET "'"), "t.conf:3: key 'conninfo'", "sslmode=(not shown)");
    expect_error(CI("host=x://u sslmode=u:" SECRET), "t.conf:3: key 'conninfo'", "sslmode=(not shown)");
    expect_error(CI("options='password=" SECRET "'"), "t.conf:3: key 'conninfo'", "options: '(not shown)'");
    expect_error(CI("host=h port=u:" SECRET), "t.conf:3: key 'conninfo'", "a port is not a number (value not shown");
    /* A URI without '@': libpq reads "user:password" as host:port, so the
     * port holds the password (found by fuzz_conf; a word-like password
     * passed shown()). */
    expect_error(CI("postgresql://app:" SECRET), "t.conf:3: key 'conninfo'", "a port is not a number (value not shown");
    expect_error(CI("postgresql://app:wordlikepassword"), "t.conf:3: key 'conninfo'", "value not shown");
    /* libpq quotes the bad key, and the key holds a quote (found by
     * fuzz_conf): nothing of it is shown. */
    expect_error(CI("post\\\"esql://app:" SECRET "@db:5432/a?sslmode=disable"), "t.conf:3: key 'conninfo'",
                 "(not shown");
#undef CI
}

/* ------------------------------------------------------------ ranges */

/* One numeric key and its documented range (man/poolbroker.conf.5): the
 * bottom and the top parse to exactly that value; one below the bottom and
 * one above the top are errors naming the line and the key (issue #18). */
typedef struct range_case {
    const char *key;
    int broker;                     /* 1: [broker] key; 0: pool key */
    const char *pool;               /* pool section head, the key's line last */
    uint64_t lo, hi;                /* documented range */
    const char *lo_text, *hi_text;  /* how they are written ("1k", "0777"), NULL: decimal */
    const char *below, *above;      /* out of range, NULL: none (lo == 0, hi == 2^64-1) */
    size_t off;                     /* field offset */
    int width;                      /* 4 or 8 bytes (int fields are 4) */
} range_case;

#define REDIS_HEAD "[pool r]\ntype = redis\n"
#define PG_HEAD    "[pool p]\ntype = postgres\nconninfo = dbname=app\n"
#define BOFF(f) offsetof(conf, f)
#define POFF(f) offsetof(conf_pool, f)

static const range_case ranges[] = {
    { "socket_mode", 1, NULL, 0, 0777, "0", "0777", NULL, "01000", BOFF(socket_mode), 4 },
    { "shm_mode", 1, NULL, 0, 0777, "0", "0777", NULL, "01000", BOFF(shm_mode), 4 },
    { "shutdown_timeout_ms", 1, NULL, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296", BOFF(shutdown_timeout_ms), 4 },
    { "max_clients", 1, NULL, 1, 4095, NULL, NULL, "0", "4096", BOFF(max_clients), 4 },
    { "spare_slots", 1, NULL, 0, 4096, NULL, NULL, NULL, "4097", BOFF(spare_slots), 4 },
    { "port", 0, REDIS_HEAD, 1, 65535, NULL, NULL, "0", "65536", POFF(port), 4 },
    { "db", 0, REDIS_HEAD, 0, 1000, NULL, NULL, NULL, "1001", POFF(db), 4 },
    { "min_size", 0, PG_HEAD "max_size = 4096\n", 0, 4096, NULL, NULL, NULL, "4097", POFF(min_size), 4 },
    { "max_size", 0, PG_HEAD, 1, 4096, NULL, NULL, "0", "4097", POFF(max_size), 4 },
    { "slots", 0, PG_HEAD "max_size = 1\n", 1, 4096, NULL, NULL, "0", "4097", POFF(slots), 4 },
    { "acquire_timeout_ms", 0, PG_HEAD, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296", POFF(acquire_timeout_ms), 4 },
    { "command_timeout_ms", 0, PG_HEAD, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296", POFF(command_timeout_ms), 4 },
    { "max_lifetime_s", 0, PG_HEAD, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296", POFF(max_lifetime_s), 4 },
    { "idle_timeout_s", 0, PG_HEAD, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296", POFF(idle_timeout_s), 4 },
    { "max_uses", 0, PG_HEAD, 0, UINT64_MAX, NULL, NULL, NULL, "18446744073709551616", POFF(max_uses), 8 },
    { "validate_after_idle_ms", 0, PG_HEAD, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296",
      POFF(validate_after_idle_ms), 4 },
    { "leak_threshold_ms", 0, PG_HEAD, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296", POFF(leak_threshold_ms), 4 },
    { "max_lease_ms", 0, PG_HEAD, 0, UINT32_MAX, NULL, NULL, NULL, "4294967296", POFF(max_lease_ms), 4 },
    { "request_buffer", 0, PG_HEAD, 1024, 64u << 20, "1k", "64m", "1023", "67108865", POFF(request_buffer), 4 },
    { "request_buffer", 0, PG_HEAD, 1024, 64u << 20, "1024", "67108864", "0k", "65537k", POFF(request_buffer), 4 },
    { "reply_buffer", 0, PG_HEAD, 4096, 256u << 20, "4k", "256m", "4095", "257m", POFF(reply_buffer), 4 },
    { "max_request_size", 0, PG_HEAD, 1024, 2u << 30, "1k", "2g", "1023", "2147483649", POFF(max_request_size), 4 },
    { "max_request_size", 0, REDIS_HEAD, 1024, 2u << 30, "1024", "2147483648", "0g", "2097153k", POFF(max_request_size), 4 },
    { "reply_buffer", 0, PG_HEAD, 4096, 256u << 20, "4096", "268435456", "3k", "268435457", POFF(reply_buffer), 4 },
};

static uint64_t field_value(const void *obj, const range_case *rc)
{
    const char *f = (const char *)obj + rc->off;
    if (rc->width == 8)
        return *(const uint64_t *)f;
    return *(const uint32_t *)f;
}

/* Build the text with key = val on a line of its own; *line gets its number. */
static void range_text(const range_case *rc, const char *val, char *buf, size_t n, int *line)
{
    const char *head = rc->broker ? "[broker]\n" : rc->pool;
    int lines = 0;
    for (const char *s = head; *s; s++)
        lines += *s == '\n';
    *line = lines + 1;
    snprintf(buf, n, "%s%s = %s\n%s", head, rc->key, val, rc->broker ? PG_POOL : "");
}

/* Redis Sentinel keys, and the failover mode a pool gets (issue #16). */
static void test_sentinel_keys(void **state)
{
    (void)state;
    const char *pw = write_file("sentinel.pass", SECRET "\n", 0600);
    char text[768];
    snprintf(text, sizeof text,
             "[pool r]\ntype = redis\nsentinels = 10.0.0.1:26379, sentinel-b:26380,[::1]:26381\n"
             "sentinel_master = mymaster\nsentinel_password_file = %s\nsentinel_role = replica\n", pw);
    conf *c = expect_ok(text);
    conf_pool *cp = &c->pools[0];
    assert_string_equal(cp->sentinels, "10.0.0.1:26379, sentinel-b:26380,[::1]:26381");
    assert_string_equal(cp->sentinel_master, "mymaster");
    assert_string_equal(cp->sentinel_password, SECRET);
    assert_int_equal(cp->sentinel_replica, 1);
    assert_int_equal(cp->follow, PB_FOLLOW_HOSTS);
    assert_null(cp->host);
    conf_free(c);
    c = expect_ok("[pool r]\ntype = redis\nsentinels = s:26379\nsentinel_master = m\n");
    assert_int_equal(c->pools[0].follow, PB_FOLLOW_PRIMARY);
    assert_int_equal(c->pools[0].sentinel_replica, 0);
    conf_free(c);
    c = expect_ok("[pool r]\ntype = redis\nhost = h\n");
    assert_int_equal(c->pools[0].follow, PB_FOLLOW_NONE);
    conf_free(c);

    expect_error("[pool r]\ntype = redis\nsentinels = s:26379\n", "t.conf:3:",
                 "key 'sentinels': needs 'sentinel_master'");
    expect_error("[pool r]\ntype = redis\nsentinels = s:26379\nsentinel_master = m\nport = 6380\n", "t.conf:5:",
                 "key 'port': cannot be combined with 'sentinels' (line 3)");
    expect_error("[pool r]\ntype = redis\nunix_socket = /tmp/r.sock\nsentinels = s:1\nsentinel_master = m\n",
                 "t.conf:3:", "key 'unix_socket': cannot be combined with 'sentinels'");
    expect_error("[pool r]\ntype = redis\nsentinel_master = m\n", "t.conf:3:",
                 "key 'sentinel_master': applies only with 'sentinels'");
    expect_error("[pool r]\ntype = redis\nsentinel_role = replica\n", "t.conf:3:",
                 "key 'sentinel_role': applies only with 'sentinels'");
    expect_error("[pool r]\ntype = redis\nsentinels = s:26379\nsentinel_master = m\nsentinel_role = slave\n",
                 "t.conf:5:", "key 'sentinel_role': unknown value 'slave' (expected one of: master, replica)");
    expect_error("[pool r]\ntype = redis\nsentinels = s:26379,,t:1\n", "t.conf:3:",
                 "key 'sentinels': entry 2 is empty");
    expect_error("[pool r]\ntype = redis\nsentinels = s\n", "t.conf:3:",
                 "key 'sentinels': entry 's' is not host:port");
    expect_error("[pool r]\ntype = redis\nsentinels = s:0\n", "t.conf:3:", "is not host:port with a port in 1..65535");
    expect_error("[pool r]\ntype = redis\nsentinels = :26379\n", "t.conf:3:", "is not host:port");
    expect_error("[pool p]\ntype = postgres\nconninfo = dbname=app\nsentinels = s:1\n", "t.conf:4:",
                 "key 'sentinels': does not apply to a postgres pool");
    pw = write_file("shared.pass", SECRET "\n", 0644);
    snprintf(text, sizeof text,
             "[pool r]\ntype = redis\nsentinels = s:1\nsentinel_master = m\nsentinel_password_file = %s\n", pw);
    expect_error(text, "t.conf:5:", "key 'sentinel_password_file':");
    char many[1024] = "[pool r]\ntype = redis\nsentinel_master = m\nsentinels = ";
    for (int i = 0; i < 17; i++)
        snprintf(many + strlen(many), sizeof many - strlen(many), "%ss%d:1", i ? "," : "", i);
    strcat(many, "\n");
    expect_error(many, "t.conf:4:", "more than 16 sentinels");
}

/* A PostgreSQL pool follows failovers when its conninfo names several
 * hosts, or asks for the primary (issue #16). */
static void test_conninfo_follow(void **state)
{
    (void)state;
    static const struct {
        const char *ci;
        int follow;
    } cases[] = {
        { "host=a dbname=app", PB_FOLLOW_NONE },
        { "host=a,b port=1,2 dbname=app", PB_FOLLOW_HOSTS },
        { "hostaddr=10.0.0.1,10.0.0.2 dbname=app", PB_FOLLOW_HOSTS },
        { "host=a,b target_session_attrs=prefer-standby", PB_FOLLOW_HOSTS },
        { "host=a,b target_session_attrs=read-write", PB_FOLLOW_PRIMARY },
        { "host=a target_session_attrs=primary", PB_FOLLOW_PRIMARY },
        { "postgresql://a:1,b:2/app?target_session_attrs=read-write", PB_FOLLOW_PRIMARY },
        { "postgresql://a:1,b:2/app", PB_FOLLOW_HOSTS },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[512];
        snprintf(text, sizeof text, "[pool p]\ntype = postgres\nconninfo = %s\n", cases[i].ci);
        conf *c = expect_ok(text);
        assert_int_equal(c->pools[0].follow, cases[i].follow);
        conf_free(c);
    }
}

static void test_range_edges(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        const range_case *rc = &ranges[i];
        char text[512], num[32], where[32], err[CONF_ERR_MAX];
        int line;
        for (int top = 0; top < 2; top++) {
            uint64_t want = top ? rc->hi : rc->lo;
            const char *lit = top ? rc->hi_text : rc->lo_text;
            snprintf(num, sizeof num, "%llu", (unsigned long long)want);
            range_text(rc, lit ? lit : num, text, sizeof text, &line);
            conf *c = parse(text, err);
            if (!c)
                fail_msg("%s = %s: %s", rc->key, lit ? lit : num, err);
            const void *obj = rc->broker ? (const void *)c : (const void *)&c->pools[0];
            if (field_value(obj, rc) != want)
                fail_msg("%s = %s parsed as %llu", rc->key, lit ? lit : num,
                         (unsigned long long)field_value(obj, rc));
            conf_free(c);
            const char *bad = top ? rc->above : rc->below;
            if (!bad)
                continue;
            range_text(rc, bad, text, sizeof text, &line);
            char key[64];
            snprintf(where, sizeof where, "t.conf:%d:", line);
            snprintf(key, sizeof key, "key '%s'", rc->key);
            expect_error(text, where, key);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_config),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_comments_and_whitespace),
        cmocka_unit_test(test_value_keeps_equals_and_spaces),
        cmocka_unit_test(test_quoted_values),
        cmocka_unit_test(test_reset_values),
        cmocka_unit_test(test_size_suffixes),
        cmocka_unit_test(test_size_limits),
        cmocka_unit_test(test_max_request_size),
        cmocka_unit_test(test_reply_buffer_rounding),
        cmocka_unit_test(test_unknown_key),
        cmocka_unit_test(test_unknown_section),
        cmocka_unit_test(test_duplicate_key),
        cmocka_unit_test(test_duplicate_sections),
        cmocka_unit_test(test_key_outside_section),
        cmocka_unit_test(test_syntax_errors),
        cmocka_unit_test(test_bad_numbers),
        cmocka_unit_test(test_duration_with_unit),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_key_wrong_for_type),
        cmocka_unit_test(test_unix_socket_vs_host),
        cmocka_unit_test(test_redis_ranges),
        cmocka_unit_test(test_pool_sizes),
        cmocka_unit_test(test_pool_count),
        cmocka_unit_test(test_pool_names),
        cmocka_unit_test(test_shm_name),
        cmocka_unit_test(test_modes),
        cmocka_unit_test(test_allowed_ids),
        cmocka_unit_test(test_log_keys),
        cmocka_unit_test(test_io_backend_and_max_clients),
        cmocka_unit_test(test_metrics_listen),
        cmocka_unit_test(test_password_file_private),
        cmocka_unit_test(test_password_file_shared_refused),
        cmocka_unit_test(test_password_file_not_regular_or_missing),
        cmocka_unit_test(test_password_never_in_errors),
        cmocka_unit_test(test_load_world_readable),
        cmocka_unit_test(test_load_relative_password_file),
        cmocka_unit_test(test_load_errors_name_file),
        cmocka_unit_test(test_api_edges),
        cmocka_unit_test(test_range_edges),
        cmocka_unit_test(test_conninfo_checked),
        cmocka_unit_test(test_sentinel_keys),
        cmocka_unit_test(test_conninfo_follow),
    };
    return cmocka_run_group_tests_name("conf", tests, group_setup, group_teardown);
}
