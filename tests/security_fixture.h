/*
 * security_fixture.h — the fixture shared by the trust-model test files
 * (test_access.c, test_secrets.c, test_rogue.c), included by each of them once: the trust model of
 * docs/architecture.md, hostile shared memory included, end to end on a
 * real PostgreSQL, a real Redis and a real broker.
 *
 * Needs root (children setuid to nobody, 65534; the rogue maps the segment
 * itself); run as anyone else, every test is skipped with a message.  Each
 * test starts its own broker (the previous one is stopped) on the group's
 * servers.  Library calls that might never return run in child processes
 * with a time limit (a hung child's gdb backtrace, lease and slot are printed
 * when gdb is installed, with the broker's view of every slot: tests/gdb/).
 *
 * Environment (besides the harness's):
 *   PB_TEST_FILTER   run only the tests matching this cmocka filter
 */
#ifndef PB_TEST_SECURITY_FIXTURE_H
#define PB_TEST_SECURITY_FIXTURE_H


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
#include "pbtest.h"


/* Not every file uses every helper. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

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

#pragma GCC diagnostic pop

#endif /* PB_TEST_SECURITY_FIXTURE_H */
