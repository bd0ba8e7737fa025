/*
 * test_security.c — the trust model of docs/architecture.md, hostile shared
 * memory included, end to end on a real PostgreSQL, a real Redis and a real
 * broker:
 *
 *   - a client of another uid is refused: by the socket's file mode (0660,
 *     the default), and — with socket_mode = 0666 — by the broker's own
 *     SO_PEERCRED check, which logs who it refused; allowed_uids lets that
 *     uid in (it needs no /dev/shm permission: the segment fd is passed over
 *     the socket) and then only the listed uids;
 *   - backend passwords (a conninfo password, a Redis password_file) are in
 *     neither the shared segment nor the broker log, even after a failed
 *     connect wrote the pool's last_error into the segment;
 *   - a password_file readable by others, or a world-readable config whose
 *     conninfo holds a password, stops the broker at start with a message
 *     naming the file;
 *   - a rogue process with the segment mapped writes random bytes at random
 *     offsets while normal workers run: the broker must stay up, the workers
 *     must not crash, and once the rogue is gone every pool must serve again.
 *
 * Needs root (children setuid to nobody, 65534; the rogue maps the segment
 * itself); run as anyone else, every test is skipped with a message.  Each
 * test starts its own broker (the previous one is stopped) on the group's
 * servers.  Library calls that might never return run in child processes
 * with a time limit (a hung child's gdb backtrace, lease and slot are printed
 * when gdb is installed, with the broker's view of every slot: tests/gdb/);
 * a crashed worker's backtrace is printed with addr2line.
 *
 * Environment (besides the harness's):
 *   PB_ROGUE_SEED    seed of the rogue's PRNG for both rogue tests (defaults 12 and
 *                    0x6b044894047ee; "random": time-based; printed)
 *   PB_ROGUE_RATE    writes per second (default 10000, each 1..8 bytes)
 *   PB_ROGUE_MS      how long the rogue writes (default 2000)
 *   PB_TEST_FILTER   run only the tests matching this cmocka filter
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "pb_shm.h"
#include "poolbroker.h"

#define NOBODY         65534
#define PG_SECRET      "VerySecretPw123"
#define REDIS_SECRET   "RedisSecretPw456"
#define REFUSED_SECRET "RefusedSecret789"

static th_env env;
static off_t log_mark;              /* broker_log size when the current broker started */

/* ------------------------------------------------------------------ helpers */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static off_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : 0;
}

/* The broker log from offset `from` on (malloc'd, NUL-terminated). */
static char *read_from(const char *path, off_t from, size_t *lenp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return strdup("");
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < from)
        from = 0;
    size_t n = (size_t)(end - from);
    char *buf = malloc(n + 1);
    size_t got = 0;
    while (buf && got < n) {
        ssize_t r = pread(fd, buf + got, n - got, from + (off_t)got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    if (buf)
        buf[got] = 0;
    if (lenp)
        *lenp = got;
    return buf;
}

/* /dev/shm/<shm_name without its '/'> */
static void seg_path(char *buf, size_t n)
{
    snprintf(buf, n, "/dev/shm/%.63s", env.shm_name + 1);
}

static char *log_since_mark(void)
{
    return read_from(env.broker_log, log_mark, NULL);
}

/* Whether the broker (our child) is still running; reaps it if it is not. */
static int broker_alive(int *status)
{
    if (env.broker_pid <= 0)
        return 0;
    int st;
    pid_t w = waitpid(env.broker_pid, &st, WNOHANG);
    if (w == env.broker_pid) {
        env.broker_status = st;
        env.broker_pid = 0;
        if (status)
            *status = st;
        return 0;
    }
    return 1;
}

static void stop_broker(void)
{
    if (env.broker_pid > 0 && broker_alive(NULL))
        th_broker_stop(&env, SIGTERM);
}

/* Stop whatever broker runs, then start one on the whole config text
 * (placeholders as the harness's; io_backend from PB_IO_BACKEND added to the
 * [broker] section, which must come first and be named "[broker]\n"). */
static int start_broker(const char *conf_text)
{
    stop_broker();
    const char *io = getenv("PB_IO_BACKEND");
    char *text;
    if (io && *io && strncmp(conf_text, "[broker]\n", 9) == 0) {
        if (asprintf(&text, "[broker]\nio_backend = %s\n%s", io, conf_text + 9) < 0)
            return -1;
    } else {
        text = strdup(conf_text);
    }
    log_mark = file_size(env.broker_log);
    int rc = th_broker_start_raw(&env, text);
    free(text);
    return rc;
}

#define BROKER_SECTION(extra) \
    "[broker]\n" \
    "socket = @SOCK@\n" \
    "shm_name = @SHM@\n" \
    "log_level = debug\n" \
    extra "\n"

#define PG_POOL(name, min, max) \
    "[pool " name "]\n" \
    "type = postgres\n" \
    "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable\n" \
    "min_size = " #min "\n" \
    "max_size = " #max "\n" \
    "acquire_timeout_ms = 5000\n\n"

/* A forked child must not run the harness's cleanup handlers, nor cmocka's
 * crash handlers (which would longjmp into the test runner inside the child
 * and run the group teardown there, killing the broker). */
static void reset_child_signals(void)
{
    static const int sigs[] = { SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS };
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++)
        signal(sigs[i], SIG_DFL);
}

/* Where a hung process is stuck: gdb's backtrace, when gdb is installed. */
/* Attach gdb to pid and run tests/gdb/<script>: a stuck process's
 * backtrace and state, printed before the test kills it. */
static void gdb_report(pid_t pid, const char *script)
{
    if (access("/usr/bin/gdb", X_OK) != 0)
        return;
    char p[16], path[1024];
    snprintf(p, sizeof p, "%d", (int)pid);
    snprintf(path, sizeof path, "%s/tests/gdb/%s", getenv("PB_SRCDIR") ? getenv("PB_SRCDIR") : ".", script);
    char *argv[] = { (char *)"gdb", (char *)"-q", (char *)"-batch", (char *)"-p", p, (char *)"-x", path, NULL };
    static char out[65536];
    th_run(argv, out, sizeof out, 20000);
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n"))
        if (line[0] == '#' || line[0] == '$' || strncmp(line, "slot ", 5) == 0 ||
            strncmp(line, "client ", 7) == 0 || strncmp(line, "sq_seq ", 7) == 0)
            fprintf(stderr, "      %s\n", line);
}

static void print_backtrace(pid_t pid)
{
    gdb_report(pid, "worker-wait.gdb");
}

/* Run fn(arg) in a child process — as nobody (65534) when as_nobody — so
 * that a library call that never returns cannot hang the test: the child is
 * killed after timeout_ms.  Returns its exit status (0..255), or -1 if it
 * died of a signal or was killed. */
static int run_child(int as_nobody, int (*fn)(void *), void *arg, int timeout_ms)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        reset_child_signals();
        if (as_nobody) {
            if (setgroups(0, NULL) < 0 || setgid(NOBODY) < 0 || setuid(NOBODY) < 0) {
                perror("dropping to nobody");
                _exit(99);
            }
            if (getuid() != NOBODY || geteuid() != NOBODY || setuid(0) == 0) {
                fprintf(stderr, "still privileged after setuid\n");
                _exit(98);
            }
        }
        _exit(fn(arg) & 0xFF);
    }
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        int st;
        pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) {
            if (WIFEXITED(st))
                return WEXITSTATUS(st);
            fprintf(stderr, "  child (pid %d) died of signal %d\n", (int)pid, WTERMSIG(st));
            return -1;
        }
        if (now_ms() > deadline) {
            fprintf(stderr, "  child (pid %d) still busy after %d ms: a library call that never returns\n",
                    (int)pid, timeout_ms);
            print_backtrace(pid);
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return -1;
        }
        sleep_ms(10);
    }
}

static int run_as_nobody(int (*fn)(void *), void *arg)
{
    return run_child(1, fn, arg, 30000);
}

/* Child exit codes: 0 success; 100 + -PB_E* for a library error. */
#define EXIT_PB(rc) (100 - (rc))

static int child_connect_only(void *arg)
{
    (void)arg;
    pb_client *c = NULL;
    int rc = pb_connect(env.sock_path, &c);
    fprintf(stderr, "  [uid %d] pb_connect: %s\n", (int)getuid(), rc ? pb_strerror(rc) : "ok");
    if (rc != PB_OK)
        return EXIT_PB(rc);
    pb_disconnect(c);
    return 0;
}

static int child_attach_and_lease(void *arg)
{
    (void)arg;
    /* The segment itself stays out of nobody's reach (mode 0600, root). */
    char path[96];
    seg_path(path, sizeof path);
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        fprintf(stderr, "  [uid %d] could open %s directly\n", (int)getuid(), path);
        close(fd);
        return 10;
    }
    pb_client *c = NULL;
    int rc = pb_connect(env.sock_path, &c);
    if (rc != PB_OK) {
        fprintf(stderr, "  [uid %d] pb_connect: %s\n", (int)getuid(), pb_strerror(rc));
        return EXIT_PB(rc);
    }
    pb_lease *l = NULL;
    if ((rc = pb_acquire(c, "main", 5000, &l)) != PB_OK) {
        fprintf(stderr, "  [uid %d] pb_acquire: %s\n", (int)getuid(), pb_strerror(rc));
        pb_disconnect(c);
        return EXIT_PB(rc);
    }
    pb_result *r = NULL;
    rc = pb_pg_exec(l, "SELECT 1 AS one, current_user AS who", &r);
    int ok = rc == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK && strcmp(pb_getvalue(r, 0, 0), "1") == 0;
    fprintf(stderr, "  [uid %d] SELECT 1, current_user: %s%s%s\n", (int)getuid(), rc ? pb_strerror(rc) : "ok",
            ok ? ", backend user " : "", ok ? pb_getvalue(r, 0, 1) : "");
    pb_result_free(r);
    int rel = pb_release(l);
    pb_disconnect(c);
    if (rc != PB_OK)
        return EXIT_PB(rc);
    if (!ok)
        return 11;
    return rel == PB_OK ? 0 : EXIT_PB(rel);
}

static size_t count_in(const char *hay, size_t n, const char *needle)
{
    size_t k = 0, nl = strlen(needle);
    for (const char *p = hay; p && (size_t)(p - hay) + nl <= n;) {
        p = memmem(p, n - (size_t)(p - hay), needle, nl);
        if (!p)
            break;
        k++;
        p++;
    }
    return k;
}

/* ------------------------------------------------------------- group setup */

static int not_root;                /* every test skips: they setuid to nobody */

#define NEED_ROOT()         \
    do {                    \
        if (not_root)       \
            skip();         \
    } while (0)

static int group_setup(void **state)
{
    (void)state;
    if (geteuid() != 0) {
        fprintf(stderr, "test_security: SKIPPED: needs root (children setuid to nobody, the rogue maps the "
                        "segment directly)\n");
        not_root = 1;
        return 0;
    }
    if (th_setup(&env, 1, 1) < 0)
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    /* th_teardown stops the broker and fails on a non-zero exit or a
     * sanitizer report in the log; a test that already diagnosed a dead
     * broker has reaped it. */
    return th_teardown(&env);
}

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
    const char *build = getenv("PB_BUILD") ? getenv("PB_BUILD") : "build";
    char shmstat[512];
    snprintf(shmstat, sizeof shmstat, "%s/shmstat", build);
    char *argv[] = { shmstat, (char *)"-s", env.shm_name, (char *)"--json", NULL };
    static char json[65536];
    int src = th_run(argv, json, sizeof json, 5000);
    size_t json_hits = count_in(json, strlen(json), PG_SECRET) + count_in(json, strlen(json), REDIS_SECRET);
    fprintf(stderr, "  shmstat --json: exit %d, %zu x a password\n", src, json_hits);

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

/* ------------------------------------------------------------ the rogue */

#define NWORKERS 4
#define NCODES   16              /* -PB_E* codes 0..15 */

enum { PH_IDLE, PH_CONNECT, PH_ACQUIRE, PH_EXEC, PH_RELEASE, PH_REDIS, PH_DISCONNECT, PH_DONE };
static const char *const phase_names[] = { "idle", "pb_connect", "pb_acquire", "pb_pg_exec", "pb_release",
                                           "pb_redis_command", "pb_disconnect", "done" };

#define BT_MAX 24

typedef struct wstats {
    uint64_t iters, ok, redis_ok;
    int crash_sig;                  /* set by the worker's crash handler */
    uintptr_t crash_addr;           /* si_addr */
    int nbt;
    uintptr_t bt[BT_MAX];           /* return addresses, as offsets in the test binary */
    uint64_t wrong_answer;          /* answered, but not what SELECT 1 / PING answer */
    uint64_t sql_error;             /* SELECT 1 answered with an error result */
    uint64_t err[NCODES];           /* by -code, any call */
    _Atomic int phase;
} wstats;

typedef struct shared {
    _Atomic int stop;
    wstats w[NWORKERS];
} shared;

static void count_err(wstats *w, int rc)
{
    int k = -rc;
    w->err[k >= 0 && k < NCODES ? k : 0]++;
}

static wstats *crash_slot;
static uintptr_t exe_base;

static void on_crash(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    wstats *w = crash_slot;
    if (w) {
        void *bt[BT_MAX];
        int n = backtrace(bt, BT_MAX);
        w->nbt = n;
        for (int i = 0; i < n; i++)
            w->bt[i] = (uintptr_t)bt[i] - exe_base;
        w->crash_addr = (uintptr_t)si->si_addr;
        w->crash_sig = sig;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Record where a worker crashed (read back with addr2line by the parent). */
static void install_crash_handler(wstats *w)
{
    Dl_info info;
    if (dladdr((void *)install_crash_handler, &info) && info.dli_fbase)
        exe_base = (uintptr_t)info.dli_fbase;
    void *warm[2];
    backtrace(warm, 2);             /* loads libgcc now, not in the handler */
    crash_slot = w;
    struct sigaction sa = { .sa_sigaction = on_crash, .sa_flags = SA_SIGINFO | SA_ONSTACK };
    sigemptyset(&sa.sa_mask);
    static char altstack[65536];
    stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack };
    sigaltstack(&ss, NULL);
    int sigs[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++)
        sigaction(sigs[i], &sa, NULL);
}

static void print_crash(const wstats *w)
{
    fprintf(stderr, "      fault address %#lx; backtrace:\n", (unsigned long)w->crash_addr);
    char exe[64];
    snprintf(exe, sizeof exe, "/proc/%d/exe", (int)getpid());
    char *argv[BT_MAX + 8];
    char addrs[BT_MAX][24];
    int a = 0;
    argv[a++] = (char *)"addr2line";
    argv[a++] = (char *)"-f";
    argv[a++] = (char *)"-i";
    argv[a++] = (char *)"-p";
    argv[a++] = (char *)"-e";
    argv[a++] = exe;
    for (int i = 0; i < w->nbt && i < BT_MAX; i++) {
        /* return addresses point after the call: look up the call itself */
        snprintf(addrs[i], sizeof addrs[i], "%#lx", (unsigned long)(w->bt[i] - (i ? 1 : 0)));
        argv[a++] = addrs[i];
    }
    argv[a] = NULL;
    static char out[16384];
    if (th_run(argv, out, sizeof out, 10000) == 0) {
        int k = 0;
        for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n"))
            fprintf(stderr, "      #%-2d %s\n", k++, line);
    }
}

static void worker(shared *sh, int id)
{
    wstats *w = &sh->w[id];
    install_crash_handler(w);
    pb_client *c = NULL;
    while (!atomic_load(&sh->stop)) {
        w->iters++;
        int rc;
        if (!c) {
            atomic_store(&w->phase, PH_CONNECT);
            if ((rc = pb_connect(env.sock_path, &c)) != PB_OK) {
                count_err(w, rc);
                c = NULL;
                sleep_ms(20);
                continue;
            }
        }
        pb_lease *l = NULL;
        int redis = (w->iters & 1) != 0;
        atomic_store(&w->phase, PH_ACQUIRE);
        if ((rc = pb_acquire(c, redis ? "cache" : "main", 1000, &l)) != PB_OK) {
            count_err(w, rc);
            if (rc == PB_EBROKER || rc == PB_EVERSION || rc == PB_EPROTO) {
                atomic_store(&w->phase, PH_DISCONNECT);
                pb_disconnect(c);
                c = NULL;
            }
            continue;
        }
        if (redis) {
            atomic_store(&w->phase, PH_REDIS);
            redisReply *rr = NULL;
            rc = pb_redis_command(l, &rr, "PING");
            if (rc != PB_OK)
                count_err(w, rc);
            else if (!rr || rr->type != REDIS_REPLY_STATUS || !rr->str || strcmp(rr->str, "PONG") != 0)
                w->wrong_answer++;
            else
                w->redis_ok++;
            if (rr)
                freeReplyObject(rr);
        } else {
            atomic_store(&w->phase, PH_EXEC);
            pb_result *r = NULL;
            rc = pb_pg_exec(l, "SELECT 1", &r);
            if (rc != PB_OK)
                count_err(w, rc);
            else if (pb_result_status(r) == PB_RES_ERROR)
                w->sql_error++;
            else if (pb_result_status(r) != PB_RES_TUPLES_OK || pb_ntuples(r) != 1 || pb_nfields(r) != 1 ||
                     strcmp(pb_getvalue(r, 0, 0), "1") != 0)
                w->wrong_answer++;
            else
                w->ok++;
            pb_result_free(r);
        }
        atomic_store(&w->phase, PH_RELEASE);
        if ((rc = pb_release(l)) != PB_OK)
            count_err(w, rc);
    }
    atomic_store(&w->phase, PH_DISCONNECT);
    pb_disconnect(c);
    atomic_store(&w->phase, PH_DONE);
}

static uint64_t xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* The rogue: map the segment read-write and write random bytes at random
 * offsets, rate writes a second, until killed. */
static void rogue(uint64_t seed, int rate)
{
    int fd = shm_open(env.shm_name, O_RDWR, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror("rogue: shm_open");
        _exit(2);
    }
    size_t size = (size_t)st.st_size;
    uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        perror("rogue: mmap");
        _exit(2);
    }
    uint64_t s = seed ? seed : 1;
    long long t0 = now_ms();
    uint64_t done = 0;
    for (;;) {
        for (int i = 0; i < 50; i++, done++) {
            uint64_t r = xorshift(&s);
            size_t off = (size_t)(r % size);
            size_t len = 1 + (size_t)((r >> 48) % 8);
            uint64_t bytes = xorshift(&s);
            for (size_t k = 0; k < len && off + k < size; k++)
                p[off + k] = (uint8_t)(bytes >> (8 * k));
        }
        /* pace: done writes should take done/rate seconds */
        long long due = t0 + (long long)(done * 1000 / (uint64_t)rate);
        long long now = now_ms();
        if (due > now)
            sleep_ms((int)(due - now));
    }
}

/* Broker-owned fields a worker has no business writing: what we compare
 * before and after the storm. */
typedef struct pool_fields {
    char name[PB_NAME_MAX];
    uint32_t type, first_slot, slot_capacity, min_size, max_size, acquire_timeout_ms, reset_policy, accepting,
        health, validate_after_idle_ms;
    uint64_t max_uses;
} pool_fields;

typedef struct slot_fields {
    uint32_t pool, index, req_size, rep_size;
    uint64_t req_off, rep_off, word;
} slot_fields;

typedef struct seg_view {
    pb_shm_header h;
    uint32_t npools, nslots;
    pool_fields pools[4];
    slot_fields slots[64];
} seg_view;

static int map_segment(void **base, size_t *size)
{
    int fd = shm_open(env.shm_name, O_RDONLY, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    *size = (size_t)st.st_size;
    *base = mmap(NULL, *size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    return *base == MAP_FAILED ? -1 : 0;
}

/* Copy the broker-owned fields, using the offsets of `layout` (the header as
 * the broker wrote it before the storm), not the possibly scribbled ones. */
static void view_segment(seg_view *v, const pb_shm_header *layout)
{
    memset(v, 0, sizeof *v);
    void *base;
    size_t size;
    if (map_segment(&base, &size) < 0)
        return;
    memcpy(&v->h, base, sizeof v->h);
    const pb_shm_header *L = layout ? layout : &v->h;
    v->npools = L->npools < 4 ? L->npools : 4;
    v->nslots = L->nslots < 64 ? L->nslots : 64;
    if (L->pool_off + 4 * sizeof(pb_shm_pool) <= size && L->slot_off + 64 * sizeof(pb_shm_slot) <= size) {
        pb_shm_pool *pp = (pb_shm_pool *)((char *)base + L->pool_off);
        for (uint32_t i = 0; i < v->npools; i++) {
            pool_fields *f = &v->pools[i];
            memcpy(f->name, pp[i].name, PB_NAME_MAX);
            f->type = pp[i].type;
            f->first_slot = pp[i].first_slot;
            f->slot_capacity = pp[i].slot_capacity;
            f->min_size = atomic_load(&pp[i].min_size);
            f->max_size = atomic_load(&pp[i].max_size);
            f->acquire_timeout_ms = atomic_load(&pp[i].acquire_timeout_ms);
            f->reset_policy = atomic_load(&pp[i].reset_policy);
            f->accepting = atomic_load(&pp[i].accepting);
            f->health = atomic_load(&pp[i].health);
            f->validate_after_idle_ms = atomic_load(&pp[i].validate_after_idle_ms);
            f->max_uses = atomic_load(&pp[i].max_uses);
        }
        pb_shm_slot *ss = (pb_shm_slot *)((char *)base + L->slot_off);
        for (uint32_t i = 0; i < v->nslots; i++) {
            slot_fields *f = &v->slots[i];
            f->pool = ss[i].pool;
            f->index = ss[i].index;
            f->req_size = ss[i].req_size;
            f->rep_size = ss[i].rep_size;
            f->req_off = ss[i].req_off;
            f->rep_off = ss[i].rep_off;
            f->word = atomic_load(&ss[i].word);
        }
    }
    munmap(base, size);
}

static const char *state_name(unsigned s)
{
    static const char *const n[] = { "EMPTY", "CONNECTING", "FREE", "LEASED", "RELEASING",
                                     "RESETTING", "RECLAIMING", "BROKEN", "CLOSING" };
    return s < sizeof n / sizeof *n ? n[s] : "INVALID";
}

/* Print every broker-owned field that differs from before the storm; returns
 * how many. */
static int diff_segment(const seg_view *a, const seg_view *b)
{
    int n = 0;
#define HDIFF(field, fmt)                                                                              \
    if (a->h.field != b->h.field) {                                                                    \
        fprintf(stderr, "    header." #field ": " fmt " -> " fmt "\n", a->h.field, b->h.field);      \
        n++;                                                                                           \
    }
    HDIFF(magic, "%#" PRIx64)
    HDIFF(version, "%u")
    HDIFF(fingerprint, "%#x")
    HDIFF(total_size, "%" PRIu64)
    HDIFF(generation, "%u")
    HDIFF(state, "%u")
    HDIFF(broker_pid, "%d")
    HDIFF(npools, "%u")
    HDIFF(nslots, "%u")
    HDIFF(max_clients, "%u")
    HDIFF(pool_off, "%" PRIu64)
    HDIFF(client_off, "%" PRIu64)
    HDIFF(slot_off, "%" PRIu64)
    HDIFF(buf_off, "%" PRIu64)
#undef HDIFF
    if (strncmp(a->h.shm_name, b->h.shm_name, sizeof a->h.shm_name)) {
        fprintf(stderr, "    header.shm_name changed\n");
        n++;
    }
    for (uint32_t i = 0; i < a->npools; i++) {
        const pool_fields *x = &a->pools[i], *y = &b->pools[i];
#define PDIFF(field, fmt)                                                                              \
    if (x->field != y->field) {                                                                        \
        fprintf(stderr, "    pool[%u].%s: " fmt " -> " fmt "\n", i, #field, x->field, y->field);     \
        n++;                                                                                           \
    }
        if (strncmp(x->name, y->name, PB_NAME_MAX)) {
            fprintf(stderr, "    pool[%u].name: \"%.31s\" -> \"%.31s\"\n", i, x->name, y->name);
            n++;
        }
        PDIFF(type, "%u")
        PDIFF(first_slot, "%u")
        PDIFF(slot_capacity, "%u")
        PDIFF(min_size, "%u")
        PDIFF(max_size, "%u")
        PDIFF(acquire_timeout_ms, "%u")
        PDIFF(reset_policy, "%u")
        PDIFF(accepting, "%u")
        PDIFF(health, "%u")
        PDIFF(validate_after_idle_ms, "%u")
        PDIFF(max_uses, "%" PRIu64)
#undef PDIFF
    }
    for (uint32_t i = 0; i < a->nslots; i++) {
        const slot_fields *x = &a->slots[i], *y = &b->slots[i];
        if (x->pool != y->pool || x->index != y->index || x->req_off != y->req_off || x->rep_off != y->rep_off ||
            x->req_size != y->req_size || x->rep_size != y->rep_size) {
            fprintf(stderr,
                    "    slot[%u] layout: pool %u index %u req %" PRIu64 "+%u rep %" PRIu64 "+%u -> pool %u index %u "
                    "req %" PRIu64 "+%u rep %" PRIu64 "+%u\n",
                    i, x->pool, x->index, x->req_off, x->req_size, x->rep_off, x->rep_size, y->pool, y->index,
                    y->req_off, y->req_size, y->rep_off, y->rep_size);
            n++;
        }
    }
    return n;
}

static void print_slot_words(const seg_view *v)
{
    for (uint32_t i = 0; i < v->nslots; i++) {
        uint64_t w = v->slots[i].word;
        fprintf(stderr, "    slot %2u: word %016" PRIx64 " = %s owner %u gen %u\n", i, w,
                state_name(PB_WORD_STATE(w)), PB_WORD_OWNER(w), PB_WORD_GEN(w));
    }
}

/* A fresh client leases every slot of main (4) and cache (2) at once and
 * uses each.  0, or -1 with why in buf. */
static int all_pools_serve(char *why, size_t n)
{
    pb_client *c = NULL;
    int rc = pb_connect(env.sock_path, &c);
    if (rc != PB_OK) {
        snprintf(why, n, "pb_connect: %s", pb_strerror(rc));
        return -1;
    }
    static const struct { const char *pool; int slots, redis; } pools[] = { { "main", 4, 0 }, { "cache", 2, 1 } };
    int ret = 0;
    for (size_t p = 0; p < 2 && ret == 0; p++) {
        pb_lease *l[4] = { 0 };
        int got = 0;
        for (; got < pools[p].slots; got++) {
            if ((rc = pb_acquire(c, pools[p].pool, 1000, &l[got])) != PB_OK) {
                snprintf(why, n, "pool %s: lease %d of %d: pb_acquire: %s", pools[p].pool, got + 1, pools[p].slots,
                         pb_strerror(rc));
                ret = -1;
                break;
            }
        }
        for (int i = 0; i < got && ret == 0; i++) {
            if (pools[p].redis) {
                redisReply *rr = NULL;
                rc = pb_redis_command(l[i], &rr, "PING");
                int good = rc == PB_OK && rr && rr->type == REDIS_REPLY_STATUS && strcmp(rr->str, "PONG") == 0;
                if (rr)
                    freeReplyObject(rr);
                if (!good) {
                    snprintf(why, n, "pool cache slot lease %d: PING: %s", i, rc ? pb_strerror(rc) : "wrong answer");
                    ret = -1;
                }
            } else {
                pb_result *r = NULL;
                rc = pb_pg_exec(l[i], "SELECT 1", &r);
                int good = rc == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK &&
                           strcmp(pb_getvalue(r, 0, 0), "1") == 0;
                if (!good)
                    snprintf(why, n, "pool main lease %d: SELECT 1: %s", i,
                             rc ? pb_strerror(rc) : pb_result_status(r) == PB_RES_ERROR ? pb_error_message(r)
                                                                                        : "wrong answer");
                pb_result_free(r);
                if (!good)
                    ret = -1;
            }
        }
        for (int i = 0; i < got; i++)
            pb_release(l[i]);
    }
    pb_disconnect(c);
    return ret;
}

/* all_pools_serve() in a child (killed after 15 s: the library's waits
 * are not all bounded). */
static char *probe_why;

static int child_probe(void *arg)
{
    (void)arg;
    return all_pools_serve(probe_why, 256) == 0 ? 0 : 1;
}

static int probe_all_pools(char *why, size_t n)
{
    probe_why = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (probe_why == MAP_FAILED)
        return -1;
    snprintf(probe_why, 256, "probe did not finish in 15 s (a library call that never returns)");
    int rc = run_child(0, child_probe, NULL, 15000);
    snprintf(why, n, "%s", probe_why);
    munmap(probe_why, 4096);
    return rc == 0 ? 0 : -1;
}

static int sanitizer_report(const char *log)
{
    static const char *const pat[] = { "ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
                                       "WARNING: ThreadSanitizer", NULL };
    for (int i = 0; pat[i]; i++)
        if (strstr(log, pat[i]))
            return 1;
    return 0;
}

static void rogue_run(uint64_t default_seed)
{
    NEED_ROOT();
    const char *e;
    /* A fixed seed by default, so make test is repeatable; PB_ROGUE_SEED
     * (a number, or "random") for another. */
    e = getenv("PB_ROGUE_SEED");
    uint64_t seed = !e || !*e                 ? default_seed
                    : strcmp(e, "random") == 0 ? ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid()
                                               : strtoull(e, NULL, 0);
    int rate = (e = getenv("PB_ROGUE_RATE")) && *e ? atoi(e) : 10000;
    int storm_ms = (e = getenv("PB_ROGUE_MS")) && *e ? atoi(e) : 2000;
    if (rate < 1)
        rate = 1;

    /* Small tables and buffers, no spare slots: most of the segment is
     * metadata, so a uniform storm hits headers, pools, clients and slots. */
    assert_int_equal(start_broker(BROKER_SECTION("max_clients = 32\nspare_slots = 0\nshutdown_timeout_ms = 3000")
                                  "[pool main]\n"
                                  "type = postgres\n"
                                  "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres "
                                  "sslmode=disable\n"
                                  "min_size = 2\nmax_size = 4\n"
                                  "acquire_timeout_ms = 2000\ncommand_timeout_ms = 3000\n"
                                  "request_buffer = 4k\nreply_buffer = 16k\n\n"
                                  "[pool cache]\n"
                                  "type = redis\n"
                                  "host = 127.0.0.1\nport = @REDISPORT@\n"
                                  "min_size = 1\nmax_size = 2\n"
                                  "acquire_timeout_ms = 2000\ncommand_timeout_ms = 3000\n"
                                  "request_buffer = 4k\nreply_buffer = 16k\n"),
                     0);
    pid_t broker = env.broker_pid;
    void *base;
    size_t seg_size;
    assert_int_equal(map_segment(&base, &seg_size), 0);
    pb_shm_header layout = *(pb_shm_header *)base;
    munmap(base, seg_size);
    fprintf(stderr,
            "  segment %s: %zu bytes (header %zu, pools @%" PRIu64 ", clients @%" PRIu64 ", slots @%" PRIu64
            ", buffers @%" PRIu64 ")\n",
            env.shm_name, seg_size, sizeof(pb_shm_header), layout.pool_off, layout.client_off, layout.slot_off,
            layout.buf_off);
    fprintf(stderr, "  rogue: seed %#" PRIx64 " (PB_ROGUE_SEED), %d writes/s of 1..8 bytes for %d ms\n", seed, rate,
            storm_ms);
    char why[256] = "";
    if (probe_all_pools(why, sizeof why) != 0)
        fail_msg("before the storm: %s", why);
    seg_view before;
    view_segment(&before, &layout);
    assert_int_equal(before.h.repairs, 0);      /* no false alarms from normal work */

    shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);
    memset(sh, 0, sizeof *sh);
    pid_t wp[NWORKERS];
    fflush(NULL);
    for (int i = 0; i < NWORKERS; i++) {
        wp[i] = fork();
        assert_true(wp[i] >= 0);
        if (wp[i] == 0) {
            reset_child_signals();
            worker(sh, i);
            _exit(0);
        }
    }
    sleep_ms(700);
    uint64_t warm = 0;
    for (int i = 0; i < NWORKERS; i++)
        warm += sh->w[i].ok + sh->w[i].redis_ok;
    fprintf(stderr, "  warm-up: %" PRIu64 " good commands in 700 ms\n", warm);

    pid_t rp = fork();
    assert_true(rp >= 0);
    if (rp == 0) {
        reset_child_signals();
        rogue(seed, rate);
        _exit(0);
    }
    sleep_ms(storm_ms);
    kill(rp, SIGKILL);
    waitpid(rp, NULL, 0);
    long long killed_at = now_ms();
    int bst = 0;
    int alive_after_storm = broker_alive(&bst);
    fprintf(stderr, "  rogue killed; broker %s\n", alive_after_storm ? "still running" : "GONE");

    /* Workers go on a little with the segment as the rogue left it. */
    sleep_ms(1000);
    atomic_store(&sh->stop, 1);
    int crashed = 0, hung = 0;
    long long wdeadline = now_ms() + 20000;
    for (int i = 0; i < NWORKERS; i++) {
        int st;
        pid_t w;
        while ((w = waitpid(wp[i], &st, WNOHANG)) == 0 && now_ms() < wdeadline)
            sleep_ms(20);
        if (w == 0) {
            int ph = atomic_load(&sh->w[i].phase);
            fprintf(stderr, "  worker %d (pid %d) HUNG in %s: killed\n", i, (int)wp[i], phase_names[ph]);
            print_backtrace(wp[i]);
            if (!hung) {
                fprintf(stderr, "    the broker's view:\n");
                gdb_report(env.broker_pid, "broker-slots.gdb");
            }
            kill(wp[i], SIGKILL);
            waitpid(wp[i], &st, 0);
            hung++;
        } else if (WIFSIGNALED(st)) {
            int ph = atomic_load(&sh->w[i].phase);
            fprintf(stderr, "  worker %d CRASHED: signal %d (%s) in %s\n", i, WTERMSIG(st), strsignal(WTERMSIG(st)),
                    phase_names[ph]);
            if (sh->w[i].crash_sig)
                print_crash(&sh->w[i]);
            crashed++;
        } else if (WEXITSTATUS(st) != 0) {
            fprintf(stderr, "  worker %d exited %d\n", i, WEXITSTATUS(st));
            crashed++;
        }
    }
    uint64_t tot[NCODES] = { 0 }, ok = 0, rok = 0, wrong = 0, sqlerr = 0, iters = 0;
    for (int i = 0; i < NWORKERS; i++) {
        wstats *w = &sh->w[i];
        iters += w->iters;
        ok += w->ok;
        rok += w->redis_ok;
        wrong += w->wrong_answer;
        sqlerr += w->sql_error;
        for (int k = 0; k < NCODES; k++)
            tot[k] += w->err[k];
    }
    fprintf(stderr, "  workers: %" PRIu64 " iterations, %" PRIu64 " SELECT 1 ok, %" PRIu64 " PING ok, %" PRIu64
                    " wrong answers, %" PRIu64 " SQL errors\n", iters, ok, rok, wrong, sqlerr);
    fprintf(stderr, "  errors:");
    for (int k = 1; k < NCODES; k++)
        if (tot[k])
            fprintf(stderr, " %s %" PRIu64 ";", pb_strerror(-k), tot[k]);
    fprintf(stderr, "\n");
    munmap(sh, sizeof *sh);

    /* Recovery: within ~10 s of the rogue's death every pool serves again. */
    snprintf(why, sizeof why, "broker gone");
    int recovered = 0;
    long long t_rec = 0;
    if (broker_alive(&bst)) {
        long long deadline = killed_at + 10000;
        if (deadline < now_ms() + 3000)
            deadline = now_ms() + 3000;
        while (now_ms() < deadline && broker_alive(&bst)) {
            if (probe_all_pools(why, sizeof why) == 0) {
                recovered = 1;
                t_rec = now_ms() - killed_at;
                break;
            }
            fprintf(stderr, "  probe at %lld ms: %s\n", now_ms() - killed_at, why);
            sleep_ms(250);
        }
    }
    int alive = broker_alive(&bst);
    if (recovered)
        fprintf(stderr, "  recovered: every slot of every pool served %lld ms after the rogue died\n", t_rec);
    else
        fprintf(stderr, "  NOT recovered: %s\n", why);
    seg_view now;
    view_segment(&now, &layout);
    fprintf(stderr, "  segment repairs the broker counted (shmstat segment_repairs): %u\n", now.h.repairs);
    int counted = now.h.repairs > 0;  /* 5 to 29 in our runs: operators see it happened */

    char *log = log_since_mark();
    int san = sanitizer_report(log);
    if (!alive) {
        fprintf(stderr, "  broker (pid %d) DIED: %s %d\n", (int)broker,
                WIFSIGNALED(bst) ? "signal" : "exit status", WIFSIGNALED(bst) ? WTERMSIG(bst) : WEXITSTATUS(bst));
        /* the end of its log: the sanitizer's report, if this is a sanitized build */
        const char *tail = log + strlen(log);
        for (int lines = 0; tail > log && lines < 40; tail--)
            if (tail[-1] == '\n')
                lines++;
        fprintf(stderr, "  ---- broker log tail ----\n%s  ----\n", tail);
    }
    long warns = 0;
    for (const char *p = log; (p = strstr(p, " warn ")); p++)
        warns++;
    fprintf(stderr, "  broker log since start: %zu bytes, %ld warnings%s\n", strlen(log), warns,
            san ? ", SANITIZER REPORT" : "");
    free(log);

    if (!recovered || !alive) {
        seg_view after;
        view_segment(&after, &layout);
        fprintf(stderr, "  broker-owned fields still different from before the storm:\n");
        int d = diff_segment(&before, &after);
        if (!d)
            fprintf(stderr, "    (none)\n");
        fprintf(stderr, "  slot words now:\n");
        print_slot_words(&after);
        const char *build = getenv("PB_BUILD") ? getenv("PB_BUILD") : "build";
        char shmstat[512];
        snprintf(shmstat, sizeof shmstat, "%s/shmstat", build);
        char *argv[] = { shmstat, (char *)"-s", env.shm_name, (char *)"--json", NULL };
        static char json[65536];
        int src = th_run(argv, json, sizeof json, 5000);
        fprintf(stderr, "  shmstat --json (exit %d):\n%s\n", src, json);
    }
    if (!alive) {
        /* th_teardown would otherwise fail on a broker that is not there. */
        env.broker_pid = 0;
    }
    assert_true(alive);
    assert_false(san);
    assert_int_equal(crashed, 0);
    assert_int_equal(hung, 0);
    assert_true(recovered);
    assert_true(counted);
}

static void test_rogue_process_scribbles_segment(void **state)
{
    (void)state;
    rogue_run(12);
}

/* This seed scribbled the header's table offsets the moment a worker
 * re-attached: a library that took its offsets from the header then pushed
 * its requests into a ring the broker never reads, and waited forever.  The
 * library now takes the layout from the attach answer. */
static void test_rogue_scribbles_header_during_attach(void **state)
{
    (void)state;
    rogue_run(0x6b044894047eeull);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_other_uid_refused_by_socket_mode),
        cmocka_unit_test(test_other_uid_refused_by_peercred),
        cmocka_unit_test(test_allowed_uid_can_attach_and_lease),
        cmocka_unit_test_teardown(test_no_password_in_segment_or_log, clear_redis_password),
        cmocka_unit_test(test_password_file_readable_by_others_refused),
        cmocka_unit_test(test_password_file_readable_by_others_refused_on_reload),
        cmocka_unit_test(test_world_readable_conf_with_password_refused),
        cmocka_unit_test(test_rogue_process_scribbles_segment),
        cmocka_unit_test(test_rogue_scribbles_header_during_attach),
    };
    /* PB_TEST_FILTER=test_rogue* runs only the matching tests. */
    const char *filter = getenv("PB_TEST_FILTER");
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
