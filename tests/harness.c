/*
 * harness.c - integration-test helpers: temp dirs, real PostgreSQL and
 * Redis (via tools/pg-start and tools/redis-start), the broker process, and
 * sanitizer checks of its log at teardown. See harness.h for the contract.
 *
 * Children are always reaped with bounded waits: a child that outlives its
 * timeout is SIGKILLed together with its process group (helper commands and
 * the broker each lead their own) and then reaped. The servers themselves
 * daemonize into their own sessions and are stopped by the stop scripts.
 */
#include "harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TH_READY_LINE "poolbroker ready"
#define TH_BROKER_WAIT_MS 30000    /* ready / stop wait */
#define TH_SERVER_START_MS 120000  /* pg-start, redis-start (initdb included) */
#define TH_SERVER_STOP_MS 60000    /* pg-stop, redis-stop */
#define TH_CLIENT_MS 60000         /* psql, redis-cli */
#define TH_MAX_LIVE 16             /* environments the signal handler knows */
#define TH_TAIL_LINES 40           /* log lines shown on failure */

static const char *const th_sanitizer_patterns[] = {
    "ERROR: AddressSanitizer",
    "runtime error:",
    "ERROR: LeakSanitizer",
    "WARNING: ThreadSanitizer",
    NULL,
};

/* ---- small utilities ---------------------------------------------------- */

static long long th_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void th_sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* snprintf that reports truncation: 0 if it fit, -1 otherwise. */
__attribute__((format(printf, 3, 4)))
static int th_fmt(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    if (r < 0 || (size_t)r >= n) {
        fprintf(stderr, "harness: path or string too long (%d chars)\n", r);
        return -1;
    }
    return 0;
}

static void th_rtrim(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' ||
                     s[n - 1] == '\t'))
        s[--n] = '\0';
}

/* Read the whole file from byte offset off; malloc'd, NUL-terminated. */
static char *th_read_from(const char *path, off_t off, size_t *lenp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 || lseek(fd, off, SEEK_SET) < 0) {
        close(fd);
        return NULL;
    }
    size_t cap = st.st_size > off ? (size_t)(st.st_size - off) + 1 : 1;
    size_t len = 0;
    char *buf = malloc(cap + 1);
    if (buf == NULL) {
        close(fd);
        return NULL;
    }
    for (;;) {
        if (len + 1 >= cap) {
            char *nb = realloc(buf, cap * 2 + 1);
            if (nb == NULL)
                break;
            buf = nb;
            cap = cap * 2;
        }
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = '\0';
    if (lenp != NULL)
        *lenp = len;
    return buf;
}

static off_t th_file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : 0;
}

/* Print the last `lines` lines of path from offset off to stderr. */
static void th_print_tail(const char *path, off_t off, int lines)
{
    size_t len = 0;
    char *buf = th_read_from(path, off, &len);
    if (buf == NULL) {
        fprintf(stderr, "harness: (cannot read %s)\n", path);
        return;
    }
    size_t start = len;
    if (start > 0 && buf[start - 1] == '\n')
        start--;  /* the final newline does not start a line */
    int seen = 0;
    while (start > 0) {
        if (buf[start - 1] == '\n' && ++seen >= lines)
            break;
        start--;
    }
    fprintf(stderr, "harness: ---- %s (last %d lines) ----\n%s%s"
            "harness: ----\n", path, lines, buf + start,
            (len > 0 && buf[len - 1] != '\n') ? "\n" : "");
    free(buf);
}

/* In a freshly forked child: default signals, empty mask, no stray fds. */
static void th_child_reset(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    if (close_range(3, ~0U, 0) != 0) {
        long max = sysconf(_SC_OPEN_MAX);
        for (long fd = 3; fd < (max > 0 ? max : 1024); fd++)
            close((int)fd);
    }
}

/* Wait for pid up to timeout_ms; 1 and *status if it exited, 0 if not. */
static int th_wait_pid(pid_t pid, int *status, int timeout_ms)
{
    long long deadline = th_now_ms() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid)
            return 1;
        if (r < 0 && errno != EINTR)
            return -1;
        if (th_now_ms() >= deadline)
            return 0;
        th_sleep_ms(10);
    }
}

/* ---- emergency cleanup on SIGINT/SIGTERM/SIGHUP ------------------------- */

static th_env *volatile th_live[TH_MAX_LIVE];
static volatile pid_t th_run_child;  /* th_run's current child (its pgid) */

static void th_live_add(th_env *e)
{
    for (int i = 0; i < TH_MAX_LIVE; i++)
        if (th_live[i] == NULL) {
            th_live[i] = e;
            return;
        }
}

static void th_live_del(th_env *e)
{
    for (int i = 0; i < TH_MAX_LIVE; i++)
        if (th_live[i] == e)
            th_live[i] = NULL;
}

/* The directories under an env's dir that replicas live in (th_pg_standby_start,
 * th_redis_replica_start, th_sentinels_start), sentinels first: stopped
 * before the servers they watch. */
static const char *const th_subdirs[] = { "sentinel1", "sentinel2", "sentinel3", "replica", "standby" };

/* Async-signal-safe: fork, exec "bash <srcdir>/tools/<tool> <dir>[/<sub>]", wait. */
static void th_emergency_tool(const th_env *e, const char *tool, const char *sub)
{
    char script[600], dir[600];
    size_t a = strlen(e->srcdir), b = strlen(tool), d = strlen(e->dir), s = sub ? strlen(sub) : 0;
    if (a + 7 + b + 1 > sizeof(script) || d + 1 + s + 1 > sizeof(dir))
        return;
    memcpy(script, e->srcdir, a);
    memcpy(script + a, "/tools/", 7);
    memcpy(script + a + 7, tool, b + 1);
    memcpy(dir, e->dir, d + 1);
    if (sub) {
        dir[d] = '/';
        memcpy(dir + d + 1, sub, s + 1);
    }
    pid_t pid = fork();
    if (pid == 0) {
        char *argv[] = { (char *)"bash", script, dir, NULL };
        execvp("bash", argv);
        _exit(127);
    }
    if (pid > 0)
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
}

static void th_emergency(int sig)
{
    int saved = errno;
    if (th_run_child > 0)
        kill(-th_run_child, SIGKILL);
    for (int i = 0; i < TH_MAX_LIVE; i++) {
        th_env *e = th_live[i];
        if (e == NULL)
            continue;
        if (e->broker_pid > 0) {
            kill(-e->broker_pid, SIGKILL);
            kill(e->broker_pid, SIGKILL);
        }
        for (size_t k = 0; k < sizeof th_subdirs / sizeof th_subdirs[0]; k++) {
            th_emergency_tool(e, "redis-stop", th_subdirs[k]);
            th_emergency_tool(e, "pg-stop", th_subdirs[k]);
        }
        th_emergency_tool(e, "redis-stop", NULL);
        th_emergency_tool(e, "pg-stop", NULL);
        if (e->shm_name[0] != '\0')
            shm_unlink(e->shm_name);
    }
    signal(sig, SIG_DFL);
    errno = saved;
    raise(sig);
}

static void th_init_process(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    signal(SIGPIPE, SIG_IGN);
    const int sigs[] = { SIGINT, SIGTERM, SIGHUP };
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        struct sigaction old;
        if (sigaction(sigs[i], NULL, &old) != 0 || old.sa_handler != SIG_DFL)
            continue;  /* ignored (nohup) or someone else's handler: keep */
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = th_emergency;
        sigemptyset(&sa.sa_mask);
        sigaction(sigs[i], &sa, NULL);
    }
}

/* ---- running helper commands -------------------------------------------- */

/* Read what is readable from non-blocking fd, appending to out (excess
 * is discarded). Returns 1 at EOF, 0 when it would block. */
static int th_drain(int fd, char *out, size_t outlen, size_t *used)
{
    for (;;) {
        char tmp[4096];
        ssize_t r = read(fd, tmp, sizeof(tmp));
        if (r > 0) {
            if (out != NULL && outlen > 0 && *used < outlen - 1) {
                size_t n = (size_t)r;
                if (n > outlen - 1 - *used)
                    n = outlen - 1 - *used;
                memcpy(out + *used, tmp, n);
                *used += n;
                out[*used] = '\0';
            }
            continue;
        }
        if (r == 0)
            return 1;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : 1;
    }
}

int th_run(char *const argv[], char *out, size_t outlen, int timeout_ms)
{
    size_t used = 0;
    if (out != NULL && outlen > 0)
        out[0] = '\0';
    th_init_process();

    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        fprintf(stderr, "harness: pipe: %s\n", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "harness: fork: %s\n", strerror(errno));
        close(pfd[0]);
        close(pfd[1]);
        return -1;
    }
    if (pid == 0) {
        setpgid(0, 0);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, 0);
        dup2(pfd[1], 1);
        th_child_reset();
        execvp(argv[0], argv);
        fprintf(stderr, "harness: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);  /* also here: no race with a kill(-pid) below */
    th_run_child = pid;
    close(pfd[1]);
    fcntl(pfd[0], F_SETFL, fcntl(pfd[0], F_GETFL) | O_NONBLOCK);

    long long deadline = th_now_ms() + timeout_ms;
    int status = 0, exited = 0, eof = 0;
    for (;;) {
        if (!eof)
            eof = th_drain(pfd[0], out, outlen, &used);
        if (!exited) {
            pid_t w = waitpid(pid, &status, WNOHANG);
            if (w == pid)
                exited = 1;
        }
        /* Done once it exited and its stdout is drained; a daemon it left
         * holding the pipe does not keep us waiting. */
        if (exited) {
            if (!eof)
                (void)th_drain(pfd[0], out, outlen, &used);
            break;
        }
        long long left = deadline - th_now_ms();
        if (left <= 0) {
            fprintf(stderr, "harness: %s timed out after %d ms; killing it\n",
                    argv[0], timeout_ms);
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            if (th_wait_pid(pid, &status, 10000) != 1)
                fprintf(stderr, "harness: %s (pid %ld) did not die on SIGKILL\n",
                        argv[0], (long)pid);
            th_run_child = 0;
            close(pfd[0]);
            return -1;
        }
        if (eof) {
            th_sleep_ms(left < 5 ? (int)left : 5);
        } else {
            struct pollfd p = { .fd = pfd[0], .events = POLLIN };
            poll(&p, 1, left < 50 ? (int)left : 50);
        }
    }
    th_run_child = 0;
    close(pfd[0]);
    if (out != NULL && outlen > 0)
        th_rtrim(out);
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    fprintf(stderr, "harness: %s killed by signal %d\n", argv[0],
            WIFSIGNALED(status) ? WTERMSIG(status) : -1);
    return -1;
}

/* Run "bash <srcdir>/tools/<tool> <dir> [extra...]" (extra: NULL-terminated,
 * may be NULL); stdout into out. */
static int th_tool_in(th_env *e, const char *tool, const char *dir, const char *const extra[], char *out,
                      size_t outlen, int timeout_ms)
{
    char script[PATH_MAX];
    if (th_fmt(script, sizeof(script), "%s/tools/%s", e->srcdir, tool) != 0)
        return -1;
    char *argv[32] = { (char *)"bash", script, (char *)dir };
    int n = 3;
    for (int i = 0; extra && extra[i] && n < 31; i++)
        argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    int rc = th_run(argv, out, outlen, timeout_ms);
    if (rc != 0)
        fprintf(stderr, "harness: tools/%s %s failed (status %d)\n", tool,
                dir, rc);
    return rc;
}

/* Run "bash <srcdir>/tools/<tool> <dir>"; stdout into out. */
static int th_tool(th_env *e, const char *tool, char *out, size_t outlen,
                   int timeout_ms)
{
    return th_tool_in(e, tool, e->dir, NULL, out, outlen, timeout_ms);
}

/* Find "KEY=value" on its own line in text; copy value. 0 if found. */
static int th_env_get(const char *text, const char *key, char *val, size_t n)
{
    size_t klen = strlen(key);
    const char *p = text;
    while (p != NULL && *p != '\0') {
        if (strncmp(p, key, klen) == 0 && p[klen] == '=') {
            const char *v = p + klen + 1;
            size_t vlen = strcspn(v, "\n");
            if (vlen >= n)
                return -1;
            memcpy(val, v, vlen);
            val[vlen] = '\0';
            th_rtrim(val);
            return 0;
        }
        p = strchr(p, '\n');
        if (p != NULL)
            p++;
    }
    return -1;
}

static int th_env_get_port(const char *text, const char *key, int *port)
{
    char v[32];
    if (th_env_get(text, key, v, sizeof(v)) != 0)
        return -1;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end != '\0' || x <= 0 || x > 65535)
        return -1;
    *port = (int)x;
    return 0;
}

/* ---- setup / teardown --------------------------------------------------- */

int th_setup(th_env *e, int want_pg, int want_redis)
{
    static unsigned counter;

    memset(e, 0, sizeof(*e));
    e->broker_status = -1;
    th_init_process();

    const char *src = getenv("PB_SRCDIR");
    char cwd[PATH_MAX];
    if (src == NULL || src[0] == '\0') {
        if (getcwd(cwd, sizeof(cwd)) == NULL) {
            fprintf(stderr, "harness: getcwd: %s\n", strerror(errno));
            return -1;
        }
        src = cwd;
    }
    char real[PATH_MAX];
    if (realpath(src, real) == NULL) {
        fprintf(stderr, "harness: source dir %s: %s\n", src, strerror(errno));
        return -1;
    }
    if (th_fmt(e->srcdir, sizeof(e->srcdir), "%s", real) != 0)
        return -1;
    char probe[PATH_MAX];
    if (th_fmt(probe, sizeof(probe), "%s/tools/pg-start", e->srcdir) != 0)
        return -1;
    if (access(probe, R_OK) != 0) {
        fprintf(stderr, "harness: %s not found: run tests from the repo root "
                "or set PB_SRCDIR\n", probe);
        return -1;
    }

    char tmpl[] = "/tmp/pbtest.XXXXXX";
    if (mkdtemp(tmpl) == NULL) {
        fprintf(stderr, "harness: mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    /* 0755: the postgres OS user (when we are root) must traverse it. */
    if (chmod(tmpl, 0755) != 0) {
        fprintf(stderr, "harness: chmod %s: %s\n", tmpl, strerror(errno));
        rmdir(tmpl);
        return -1;
    }
    memcpy(e->dir, tmpl, sizeof(tmpl));
    if (th_fmt(e->sock_path, sizeof(e->sock_path), "%s/pb.sock", e->dir) ||
        th_fmt(e->conf_path, sizeof(e->conf_path), "%s/poolbroker.conf", e->dir) ||
        th_fmt(e->broker_log, sizeof(e->broker_log), "%s/broker.log", e->dir) ||
        th_fmt(e->shm_name, sizeof(e->shm_name), "/pbtest-%ld-%u",
               (long)getpid(), ++counter))
        goto fail;
    th_live_add(e);

    char out[4096];
    if (want_pg) {
        if (th_tool(e, "pg-start", out, sizeof(out), TH_SERVER_START_MS) != 0)
            goto fail;
        if (th_env_get_port(out, "PGPORT", &e->pg_port) != 0 ||
            th_env_get(out, "PGHOST", e->pg_host, sizeof(e->pg_host)) != 0) {
            fprintf(stderr, "harness: cannot parse pg-start output:\n%s\n", out);
            goto fail;
        }
        if (th_env_get(out, "PG_BINDIR", e->pg_bindir, sizeof(e->pg_bindir)) != 0)
            e->pg_bindir[0] = '\0';
    }
    if (want_redis) {
        if (th_tool(e, "redis-start", out, sizeof(out), TH_SERVER_START_MS) != 0)
            goto fail;
        if (th_env_get_port(out, "REDIS_PORT", &e->redis_port) != 0 ||
            th_env_get(out, "REDIS_SOCKET", e->redis_socket,
                       sizeof(e->redis_socket)) != 0) {
            fprintf(stderr, "harness: cannot parse redis-start output:\n%s\n", out);
            goto fail;
        }
    }
    return 0;

fail:
    th_teardown(e);
    return -1;
}

static int th_rm_cb(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    if (remove(path) != 0 && errno != ENOENT)
        fprintf(stderr, "harness: remove %s: %s\n", path, strerror(errno));
    return 0;
}

/* Print sanitizer lines of the broker log; 1 if there were any. */
static int th_scan_sanitizers(const char *log)
{
    FILE *f = fopen(log, "re");
    if (f == NULL)
        return 0;
    char *line = NULL;
    size_t cap = 0;
    long lineno = 0, first = 0, shown = 0;
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        for (int i = 0; th_sanitizer_patterns[i] != NULL; i++) {
            if (strstr(line, th_sanitizer_patterns[i]) == NULL)
                continue;
            if (first == 0) {
                first = lineno;
                fprintf(stderr, "harness: SANITIZER REPORT in %s:\n", log);
            }
            if (shown++ < 50)
                fprintf(stderr, "harness:   %ld: %s", lineno, line);
            break;
        }
    }
    free(line);
    fclose(f);
    if (first == 0)
        return 0;
    /* The report itself follows its first line: show that too. */
    f = fopen(log, "re");
    if (f != NULL) {
        line = NULL;
        cap = 0;
        lineno = 0;
        fprintf(stderr, "harness: ---- report from line %ld ----\n", first);
        while (getline(&line, &cap, f) >= 0) {
            if (++lineno >= first && lineno < first + 60)
                fputs(line, stderr);
        }
        fprintf(stderr, "harness: ----\n");
        free(line);
        fclose(f);
    }
    return 1;
}

int th_teardown(th_env *e)
{
    int rc = 0;
    if (e == NULL || e->dir[0] == '\0')
        return 0;

    if (e->broker_pid > 0) {
        int st = th_broker_stop(e, SIGTERM);
        if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "harness: broker did not exit cleanly on SIGTERM "
                    "(status %d%s)\n", st,
                    st != -1 && WIFSIGNALED(st) ? ", killed by a signal" : "");
            th_print_tail(e->broker_log, 0, TH_TAIL_LINES);
            rc = -1;
        }
    }

    char path[PATH_MAX];
    for (size_t k = 0; k < sizeof th_subdirs / sizeof th_subdirs[0]; k++) {
        if (th_fmt(path, sizeof(path), "%s/%s", e->dir, th_subdirs[k]) != 0 || access(path, F_OK) != 0)
            continue;
        if (th_tool_in(e, "redis-stop", path, NULL, NULL, 0, TH_SERVER_STOP_MS) != 0 ||
            th_tool_in(e, "pg-stop", path, NULL, NULL, 0, TH_SERVER_STOP_MS) != 0)
            rc = -1;
    }
    e->standby_port = e->replica_port = 0;
    memset(e->sentinel_ports, 0, sizeof e->sentinel_ports);
    if (th_fmt(path, sizeof(path), "%s/redis.pid", e->dir) == 0 &&
        access(path, F_OK) == 0 &&
        th_tool(e, "redis-stop", NULL, 0, TH_SERVER_STOP_MS) != 0)
        rc = -1;
    if (th_fmt(path, sizeof(path), "%s/pgdata", e->dir) == 0 &&
        access(path, F_OK) == 0 &&
        th_tool(e, "pg-stop", NULL, 0, TH_SERVER_STOP_MS) != 0)
        rc = -1;
    if (e->shm_name[0] != '\0')
        (void)shm_unlink(e->shm_name);  /* best effort: usually already gone */

    if (th_scan_sanitizers(e->broker_log))
        rc = -1;

    th_live_del(e);
    const char *keep = getenv("PB_KEEP_TMP");
    if (keep != NULL && keep[0] != '\0') {
        fprintf(stderr, "harness: PB_KEEP_TMP set: kept %s\n", e->dir);
    } else {
        nftw(e->dir, th_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    }
    e->dir[0] = '\0';
    e->pg_port = 0;
    e->redis_port = 0;
    return rc;
}

/* ---- broker ------------------------------------------------------------- */

struct th_subst_rule {
    const char *from;
    const char *to;
};

/* in with placeholders replaced; malloc'd. */
static char *th_subst(const th_env *e, const char *in)
{
    char pgport[16], redisport[16];
    snprintf(pgport, sizeof(pgport), "%d", e->pg_port);
    snprintf(redisport, sizeof(redisport), "%d", e->redis_port);
    const struct th_subst_rule rules[] = {
        { "@PGPORT@", pgport },
        { "@PGHOST@", e->pg_host },
        { "@REDISPORT@", redisport },
        { "@REDISSOCK@", e->redis_socket },
        { "@DIR@", e->dir },
        { "@SOCK@", e->sock_path },
        { "@SHM@", e->shm_name },
    };
    const size_t nrules = sizeof(rules) / sizeof(rules[0]);

    size_t cap = strlen(in) + 1, len = 0;
    for (const char *p = in; *p != '\0'; p++)
        if (*p == '@')
            cap += sizeof(e->sock_path);  /* >= any replacement */
    char *out = malloc(cap);
    if (out == NULL)
        return NULL;
    for (const char *p = in; *p != '\0';) {
        size_t i;
        for (i = 0; i < nrules; i++) {
            size_t fl = strlen(rules[i].from);
            if (strncmp(p, rules[i].from, fl) == 0) {
                size_t tl = strlen(rules[i].to);
                memcpy(out + len, rules[i].to, tl);
                len += tl;
                p += fl;
                break;
            }
        }
        if (i == nrules)
            out[len++] = *p++;
    }
    out[len] = '\0';
    return out;
}

static int th_write_file(const char *path, const char *a, const char *b)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || fchmod(fd, 0600) != 0) {
        fprintf(stderr, "harness: cannot write %s: %s\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    const char *parts[2] = { a, b };
    for (int i = 0; i < 2; i++) {
        const char *p = parts[i];
        size_t left = p != NULL ? strlen(p) : 0;
        while (left > 0) {
            ssize_t w = write(fd, p, left);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                fprintf(stderr, "harness: write %s: %s\n", path, strerror(errno));
                close(fd);
                return -1;
            }
            p += w;
            left -= (size_t)w;
        }
    }
    return close(fd);
}

static int th_broker_path(const th_env *e, char *buf, size_t n)
{
    const char *env = getenv("PB_BROKER");
    int r = (env != NULL && env[0] != '\0')
                ? th_fmt(buf, n, "%s", env)
                : th_fmt(buf, n, "%s/build/poolbroker", e->srcdir);
    if (r != 0)
        return -1;
    if (access(buf, X_OK) != 0) {
        fprintf(stderr, "harness: broker binary %s: %s (build it with `make`, "
                "or set PB_BROKER)\n", buf, strerror(errno));
        return -1;
    }
    return 0;
}

/* Refuse to overwrite the config of a running broker. */
static int th_check_idle(const th_env *e)
{
    if (e->dir[0] == '\0') {
        fprintf(stderr, "harness: broker start without th_setup\n");
        return -1;
    }
    if (e->broker_pid > 0) {
        fprintf(stderr, "harness: a broker (pid %ld) is already running\n",
                (long)e->broker_pid);
        return -1;
    }
    return 0;
}

/* Fork/exec the broker on conf_path; wait for the ready line. */
static int th_spawn_broker(th_env *e)
{
    char bin[PATH_MAX];
    if (th_check_idle(e) != 0)
        return -1;
    if (th_broker_path(e, bin, sizeof(bin)) != 0)
        return -1;

    int logfd = open(e->broker_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                     0644);
    if (logfd < 0) {
        fprintf(stderr, "harness: open %s: %s\n", e->broker_log, strerror(errno));
        return -1;
    }
    char mark[512];
    int ml = snprintf(mark, sizeof(mark), "==== harness: starting %s -c %s\n",
                      bin, e->conf_path);
    if (ml > 0 && write(logfd, mark, (size_t)ml) < 0)
        fprintf(stderr, "harness: write %s: %s\n", e->broker_log, strerror(errno));
    off_t start = th_file_size(e->broker_log);

    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "harness: fork: %s\n", strerror(errno));
        close(logfd);
        return -1;
    }
    if (pid == 0) {
        /* Own process group: a SIGKILL after a timeout takes anything it
         * started along with it. */
        setpgid(0, 0);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, 0);
        dup2(logfd, 1);
        dup2(logfd, 2);
        th_child_reset();
        char *argv[] = { bin, (char *)"-c", e->conf_path, NULL };
        execv(bin, argv);
        fprintf(stderr, "harness: exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);
    close(logfd);
    e->broker_pid = pid;

    long long deadline = th_now_ms() + TH_BROKER_WAIT_MS;
    for (;;) {
        int st;
        pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) {
            e->broker_pid = 0;
            e->broker_status = st;
            fprintf(stderr, "harness: broker exited before \"" TH_READY_LINE
                    "\" (%s %d)\n", WIFEXITED(st) ? "exit status" : "signal",
                    WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
            th_print_tail(e->broker_log, start, TH_TAIL_LINES);
            return -1;
        }
        char *log = th_read_from(e->broker_log, start, NULL);
        int ready = log != NULL && strstr(log, TH_READY_LINE) != NULL;
        free(log);
        if (ready)
            return 0;
        if (th_now_ms() >= deadline)
            break;
        th_sleep_ms(20);
    }
    fprintf(stderr, "harness: broker not ready after %d ms; killing it\n",
            TH_BROKER_WAIT_MS);
    th_print_tail(e->broker_log, start, TH_TAIL_LINES);
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    int st;
    if (th_wait_pid(pid, &st, 10000) == 1)
        e->broker_status = st;
    e->broker_pid = 0;
    return -1;
}

/* PB_POOL_MODE=transaction runs a test file's pools in that mode: a
 * "pool_mode = ..." line goes after every [pool NAME] header of a section
 * that does not set pool_mode itself.  Returns a new string (or NULL). */
static char *with_pool_mode(char *body)
{
    const char *mode = getenv("PB_POOL_MODE");
    if (mode == NULL || *mode == 0)
        return body;
    size_t n = strlen(body), extra = strlen(mode) + 16;
    size_t cap = n + 1;
    for (const char *q = body; (q = strstr(q, "[pool ")) != NULL; q++)
        cap += extra;
    char *out = malloc(cap), *o = out;
    if (out == NULL) {
        free(body);
        return NULL;
    }
    for (const char *q = body; *q;) {
        const char *eol = strchr(q, '\n');
        size_t len = eol ? (size_t)(eol - q) + 1 : strlen(q);
        memcpy(o, q, len);
        o += len;
        if (strncmp(q, "[pool ", 6) == 0) {
            const char *next = strstr(q + len, "\n[");
            const char *own = strstr(q + len, "pool_mode");
            if (own == NULL || (next != NULL && own > next))
                o += sprintf(o, "%spool_mode = %s\n", eol ? "" : "\n", mode);
        }
        q += len;
    }
    *o = 0;
    free(body);
    return out;
}

int th_broker_start(th_env *e, const char *pools_ini)
{
    if (th_check_idle(e) != 0)
        return -1;
    char head[1024];
    /* PB_IO_BACKEND runs the whole suite on one event-loop backend. */
    const char *io = getenv("PB_IO_BACKEND");
    if (th_fmt(head, sizeof(head),
               "[broker]\nsocket = %s\nshm_name = %s\nlog_level = debug\n%s%s%s\n",
               e->sock_path, e->shm_name, io && *io ? "io_backend = " : "", io && *io ? io : "",
               io && *io ? "\n" : "") != 0)
        return -1;
    char *body = with_pool_mode(th_subst(e, pools_ini != NULL ? pools_ini : ""));
    if (body == NULL)
        return -1;
    int r = th_write_file(e->conf_path, head, body);
    free(body);
    return r != 0 ? -1 : th_spawn_broker(e);
}

int th_broker_start_raw(th_env *e, const char *conf_text)
{
    if (th_check_idle(e) != 0)
        return -1;
    char *body = th_subst(e, conf_text != NULL ? conf_text : "");
    if (body == NULL)
        return -1;
    int r = th_write_file(e->conf_path, body, NULL);
    free(body);
    return r != 0 ? -1 : th_spawn_broker(e);
}

int th_broker_restart(th_env *e)
{
    if (access(e->conf_path, R_OK) != 0) {
        fprintf(stderr, "harness: restart: no config written yet (%s)\n",
                e->conf_path);
        return -1;
    }
    if (e->broker_pid > 0)
        (void)th_broker_stop(e, SIGTERM);
    return th_spawn_broker(e);
}

int th_broker_stop(th_env *e, int sig)
{
    pid_t pid = e->broker_pid;
    if (pid <= 0)
        return -1;
    /* The broker is our child: even if it already died, it is a zombie
     * until reaped here, so kill() cannot hit a recycled pid. */
    kill(pid, sig);
    int st = 0;
    int r = th_wait_pid(pid, &st, TH_BROKER_WAIT_MS);
    if (r == 1) {
        e->broker_pid = 0;
        e->broker_status = st;
        return st;
    }
    fprintf(stderr, "harness: broker %ld still running %d ms after signal %d; "
            "sending SIGKILL\n", (long)pid, TH_BROKER_WAIT_MS, sig);
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    if (th_wait_pid(pid, &st, 10000) == 1)
        e->broker_status = st;
    else
        fprintf(stderr, "harness: broker %ld did not die on SIGKILL\n", (long)pid);
    e->broker_pid = 0;
    return -1;
}

/* ---- clients and log helpers -------------------------------------------- */

int th_psql(th_env *e, const char *sql, char *out, size_t outlen)
{
    if (out != NULL && outlen > 0)
        out[0] = '\0';
    if (e->pg_port <= 0) {
        fprintf(stderr, "harness: th_psql: no PostgreSQL in this env\n");
        return -1;
    }
    char psql[PATH_MAX] = "psql";
    if (e->pg_bindir[0] != '\0') {
        char cand[PATH_MAX];
        if (th_fmt(cand, sizeof(cand), "%s/psql", e->pg_bindir) == 0 &&
            access(cand, X_OK) == 0)
            memcpy(psql, cand, sizeof(cand));
    }
    char port[16];
    snprintf(port, sizeof(port), "%d", e->pg_port);
    char *argv[] = { psql, (char *)"-X", (char *)"-A", (char *)"-t", (char *)"-q",
                     (char *)"-v", (char *)"ON_ERROR_STOP=1",
                     (char *)"-h", e->pg_host, (char *)"-p", port,
                     (char *)"-U", (char *)"postgres", (char *)"-d",
                     (char *)"postgres", (char *)"-c", (char *)sql, NULL };
    return th_run(argv, out, outlen, TH_CLIENT_MS);
}

int th_redis_cli(th_env *e, const char *args, char *out, size_t outlen)
{
    if (out != NULL && outlen > 0)
        out[0] = '\0';
    if (e->redis_port <= 0) {
        fprintf(stderr, "harness: th_redis_cli: no Redis in this env\n");
        return -1;
    }
    return th_redis_cli_port(e->redis_port, args, out, outlen);
}

int th_redis_cli_port(int redis_port, const char *args, char *out, size_t outlen)
{
    return th_redis_cli_auth(redis_port, NULL, args, out, outlen);
}

int th_redis_cli_auth(int redis_port, const char *password, const char *args, char *out, size_t outlen)
{
    enum { MAXARGS = 64 };
    if (out != NULL && outlen > 0)
        out[0] = '\0';
    char port[16];
    snprintf(port, sizeof(port), "%d", redis_port);
    char *copy = strdup(args != NULL ? args : "");
    if (copy == NULL)
        return -1;
    char *argv[MAXARGS + 9];
    int argc = 0;
    argv[argc++] = (char *)"redis-cli";
    argv[argc++] = (char *)"-h";
    argv[argc++] = (char *)"127.0.0.1";
    argv[argc++] = (char *)"-p";
    argv[argc++] = port;
    if (password) {
        argv[argc++] = (char *)"-a";
        argv[argc++] = (char *)password;
        argv[argc++] = (char *)"--no-auth-warning";
    }
    /* Split on blanks; "double quotes" group (no escapes inside). */
    char *p = copy;
    for (;;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0')
            break;
        if (argc >= MAXARGS + 5) {
            fprintf(stderr, "harness: th_redis_cli: too many arguments\n");
            free(copy);
            return -1;
        }
        char *tok = p, *w = p;
        int quoted = 0;
        while (*p != '\0' && (quoted || (*p != ' ' && *p != '\t'))) {
            if (*p == '"') {
                quoted = !quoted;
                p++;
                continue;
            }
            *w++ = *p++;
        }
        if (*p != '\0')
            p++;
        *w = '\0';
        argv[argc++] = tok;
    }
    argv[argc] = NULL;
    int rc = th_run(argv, out, outlen, TH_CLIENT_MS);
    free(copy);
    return rc;
}

long th_count_lines(const char *path, const char *needle)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    long n = 0;
    while (getline(&line, &cap, f) >= 0)
        if (strstr(line, needle) != NULL)
            n++;
    free(line);
    fclose(f);
    return n;
}

int th_wait_log(th_env *e, const char *needle, long min_count, int timeout_ms)
{
    long long deadline = th_now_ms() + timeout_ms;
    for (;;) {
        if (th_count_lines(e->broker_log, needle) >= min_count)
            return 0;
        if (th_now_ms() >= deadline) {
            fprintf(stderr, "harness: \"%s\" not seen %ld time(s) in %s within "
                    "%d ms\n", needle, min_count, e->broker_log, timeout_ms);
            return -1;
        }
        th_sleep_ms(20);
    }
}

int th_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = 0;
    socklen_t sl = sizeof(sa);
    int port = -1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

/* ---- stopping and restarting servers in place --------------------------- */

/* Run tools/<tool> <dir> with <var>=<port> in its environment. */
static int th_tool_port(th_env *e, const char *tool, const char *var, int port,
                        char *out, size_t outlen)
{
    char val[16];
    snprintf(val, sizeof(val), "%d", port);
    if (setenv(var, val, 1) != 0) {
        fprintf(stderr, "harness: setenv %s: %s\n", var, strerror(errno));
        return -1;
    }
    int rc = th_tool(e, tool, out, outlen, TH_SERVER_START_MS);
    unsetenv(var);
    return rc;
}

/* Stop the server of this env that runs on port (tool: pg-stop,
 * redis-stop). */
static int server_stop(th_env *e, int port, const char *what, const char *tool)
{
    if (e->dir[0] == '\0' || port <= 0) {
        fprintf(stderr, "harness: no %s in this env to stop\n", what);
        return -1;
    }
    return th_tool(e, tool, NULL, 0, TH_SERVER_STOP_MS) == 0 ? 0 : -1;
}

/* Start it again on the same port: the tool gets the port in port_var and
 * prints it back as out_var=N. */
static int server_start_again(th_env *e, int port, const char *what, const char *tool, const char *port_var,
                              const char *out_var)
{
    if (e->dir[0] == '\0' || port <= 0) {
        fprintf(stderr, "harness: no %s in this env to start again\n", what);
        return -1;
    }
    char out[4096];
    int got = 0;
    if (th_tool_port(e, tool, port_var, port, out, sizeof(out)) != 0)
        return -1;
    if (th_env_get_port(out, out_var, &got) != 0 || got != port) {
        fprintf(stderr, "harness: %s restarted on port %d, not %d:\n%s\n", what, got, port, out);
        return -1;
    }
    return 0;
}

int th_pg_stop(th_env *e)
{
    return server_stop(e, e->pg_port, "PostgreSQL", "pg-stop");
}

int th_pg_start_again(th_env *e)
{
    return server_start_again(e, e->pg_port, "PostgreSQL", "pg-start", "PB_PG_PORT", "PGPORT");
}

int th_redis_stop(th_env *e)
{
    return server_stop(e, e->redis_port, "Redis", "redis-stop");
}

int th_redis_start_again(th_env *e)
{
    return server_start_again(e, e->redis_port, "Redis", "redis-start", "PB_REDIS_PORT", "REDIS_PORT");
}

/* ---- replicas ------------------------------------------------------------ */

int th_pg_program(th_env *e, const char *prog, const char *const args[])
{
    char path[PATH_MAX], out[4096];
    if (th_fmt(path, sizeof(path), "%s/%s", e->pg_bindir[0] ? e->pg_bindir : "/usr/bin", prog) != 0)
        return -1;
    const char *user = getenv("PB_PG_OS_USER") ? getenv("PB_PG_OS_USER") : "postgres";
    char *argv[40];
    int n = 0;
    if (getuid() == 0) {
        argv[n++] = (char *)"runuser";
        argv[n++] = (char *)"-u";
        argv[n++] = (char *)user;
        argv[n++] = (char *)"--";
    }
    argv[n++] = path;
    for (int i = 0; args && args[i] && n < 39; i++)
        argv[n++] = (char *)args[i];
    argv[n] = NULL;
    int rc = th_run(argv, out, sizeof(out), TH_CLIENT_MS);
    if (rc != 0)
        fprintf(stderr, "harness: %s exited %d: %s\n", prog, rc, out);
    return rc;
}

int th_pg_standby_start(th_env *e, int want_port, const char *const opts[])
{
    char sdir[PATH_MAX], pgdata[PATH_MAX], port[16], out[4096];
    if (e->pg_port <= 0 || th_fmt(sdir, sizeof(sdir), "%s/standby", e->dir) != 0 ||
        th_fmt(pgdata, sizeof(pgdata), "%s/pgdata", sdir) != 0)
        return -1;
    if (mkdir(sdir, 0755) != 0 || mkdir(pgdata, 0700) != 0) {
        fprintf(stderr, "harness: mkdir %s: %s\n", pgdata, strerror(errno));
        return -1;
    }
    if (getuid() == 0) {
        const char *user = getenv("PB_PG_OS_USER") ? getenv("PB_PG_OS_USER") : "postgres";
        char *argv[] = { (char *)"chown", (char *)user, pgdata, NULL };
        if (th_run(argv, NULL, 0, TH_CLIENT_MS) != 0)
            return -1;
    }
    snprintf(port, sizeof(port), "%d", e->pg_port);
    /* -R: standby.signal and primary_conninfo; -X stream: WAL while copying. */
    const char *bb[] = { "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-D", pgdata, "-R", "-X", "stream", NULL };
    if (th_pg_program(e, "pg_basebackup", bb) != 0)
        return -1;
    snprintf(port, sizeof(port), "%d", want_port);
    if (want_port > 0 && setenv("PB_PG_PORT", port, 1) != 0)
        return -1;
    int rc = th_tool_in(e, "pg-start", sdir, opts, out, sizeof(out), TH_SERVER_START_MS);
    unsetenv("PB_PG_PORT");
    if (rc != 0 || th_env_get_port(out, "PGPORT", &e->standby_port) != 0) {
        fprintf(stderr, "harness: standby did not start:\n%s\n", out);
        return -1;
    }
    return 0;
}

int th_pg_promote(th_env *e, int timeout_ms)
{
    char pgdata[PATH_MAX];
    if (th_fmt(pgdata, sizeof(pgdata), "%s/standby/pgdata", e->dir) != 0)
        return -1;
    const char *args[] = { "-D", pgdata, "-w", "-t", "30", "promote", NULL };
    long long t0 = th_now_ms();
    for (;;) {
        if (th_pg_program(e, "pg_ctl", args) == 0)
            return 0;
        if (th_now_ms() - t0 > timeout_ms)
            return -1;
        th_sleep_ms(200);
    }
}

int th_redis_replica_start(th_env *e)
{
    char rdir[PATH_MAX], port[16], out[4096];
    if (e->redis_port <= 0 || th_fmt(rdir, sizeof(rdir), "%s/replica", e->dir) != 0)
        return -1;
    snprintf(port, sizeof(port), "%d", e->redis_port);
    const char *extra[] = { "--replicaof", "127.0.0.1", port, NULL };
    if (th_tool_in(e, "redis-start", rdir, extra, out, sizeof(out), TH_SERVER_START_MS) != 0 ||
        th_env_get_port(out, "REDIS_PORT", &e->replica_port) != 0)
        return -1;
    for (long long t0 = th_now_ms(); th_now_ms() - t0 < 20000; th_sleep_ms(50)) {
        if (th_redis_cli_port(e->replica_port, "INFO replication", out, sizeof(out)) == 0 &&
            strstr(out, "master_link_status:up"))
            return 0;
    }
    fprintf(stderr, "harness: replica on port %d never linked to its master: %s\n", e->replica_port, out);
    return -1;
}

int th_redis_kill(th_env *e, const char *sub)
{
    char path[PATH_MAX], buf[32] = "";
    if (th_fmt(path, sizeof(path), "%s%s%s/redis.pid", e->dir, sub && *sub ? "/" : "", sub ? sub : "") != 0)
        return -1;
    FILE *f = fopen(path, "r");
    if (!f || !fgets(buf, sizeof(buf), f)) {
        fprintf(stderr, "harness: cannot read %s\n", path);
        if (f)
            fclose(f);
        return -1;
    }
    fclose(f);
    long pid = strtol(buf, NULL, 10);
    if (pid <= 1 || kill((pid_t)pid, SIGKILL) != 0) {
        fprintf(stderr, "harness: kill -9 %ld (%s): %s\n", pid, path, strerror(errno));
        return -1;
    }
    /* A daemon: not our child; wait until it is gone. */
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/%ld/stat", pid);
    for (long long t0 = th_now_ms(); th_now_ms() - t0 < 10000; th_sleep_ms(10)) {
        FILE *st = fopen(proc, "r");
        char line[512] = "";
        if (st) {
            if (!fgets(line, sizeof(line), st))
                line[0] = 0;
            fclose(st);
        }
        const char *rp = strrchr(line, ')');
        if (!st || (rp && (rp[2] == 'Z' || rp[2] == 'X')))
            return 0;
    }
    return -1;
}

int th_sentinels_start(th_env *e, int n, const char *name, int quorum, int down_after_ms, const char *password)
{
    if (n < 1 || n > TH_SENTINELS || e->redis_port <= 0 ||
        th_fmt(e->sentinel_password, sizeof(e->sentinel_password), "%s", password ? password : "") != 0)
        return -1;
    for (int i = 0; i < n; i++) {
        char sdir[PATH_MAX], conf[PATH_MAX], out[4096];
        int port = th_free_port();
        if (port <= 0 || th_fmt(sdir, sizeof(sdir), "%s/sentinel%d", e->dir, i + 1) != 0 ||
            th_fmt(conf, sizeof(conf), "%s/sentinel.conf", sdir) != 0 || mkdir(sdir, 0700) != 0)
            return -1;
        FILE *f = fopen(conf, "w");
        if (!f)
            return -1;
        /* The file is the sentinel's own: it writes what it learns into it. */
        fprintf(f,
                "port %d\nbind 127.0.0.1\ndaemonize yes\npidfile %s/redis.pid\nlogfile %s/redis.log\ndir %s\n"
                "sentinel monitor %s 127.0.0.1 %d %d\n"
                "sentinel down-after-milliseconds %s %d\n"
                "sentinel failover-timeout %s 10000\n"
                "sentinel parallel-syncs %s 1\n",
                port, sdir, sdir, sdir, name, e->redis_port, quorum, name, down_after_ms, name, name);
        if (password)   /* clients (the broker) and the other sentinels need it */
            fprintf(f, "requirepass \"%s\"\nsentinel sentinel-pass \"%s\"\n", password, password);
        if (fclose(f) != 0)
            return -1;
        char *argv[] = { (char *)"redis-server", conf, (char *)"--sentinel", NULL };
        if (th_run(argv, out, sizeof(out), TH_CLIENT_MS) != 0) {
            fprintf(stderr, "harness: sentinel %d did not start: %s\n", i + 1, out);
            return -1;
        }
        e->sentinel_ports[i] = port;
    }
    /* Up, and each knows the replica (and the other sentinels). */
    for (int i = 0; i < n; i++) {
        char out[8192], cmd[160];
        snprintf(cmd, sizeof(cmd), "SENTINEL master %s", name);
        int ok = 0;
        for (long long t0 = th_now_ms(); !ok && th_now_ms() - t0 < 30000; th_sleep_ms(50)) {
            if (th_sentinel_cli(e, i, cmd, out, sizeof(out)) != 0)
                continue;
            /* redis-cli prints the field names and values one per line */
            const char *rs = strstr(out, "num-slaves\n");
            const char *os = strstr(out, "num-other-sentinels\n");
            ok = rs && atoi(rs + 11) >= 1 && (!os || n == 1 || atoi(os + 20) >= n - 1);
        }
        if (!ok) {
            fprintf(stderr, "harness: sentinel on port %d does not know master %s's replica and peers: %s\n",
                    e->sentinel_ports[i], name, out);
            return -1;
        }
    }
    return 0;
}

int th_sentinel_cli(th_env *e, int i, const char *args, char *out, size_t outlen)
{
    if (i < 0 || i >= TH_SENTINELS || e->sentinel_ports[i] <= 0) {
        fprintf(stderr, "harness: no sentinel %d in this env\n", i);
        return -1;
    }
    return th_redis_cli_auth(e->sentinel_ports[i], e->sentinel_password[0] ? e->sentinel_password : NULL, args, out,
                             outlen);
}
