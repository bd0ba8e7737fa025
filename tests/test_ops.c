/*
 * test_ops.c — operating the broker: config checks, SIGHUP reload (grow,
 * shrink, add, remove a pool with a lease out, an invalid file kept out),
 * SIGTERM drain with a lease in flight, the systemd notify protocol (a fake
 * NOTIFY_SOCKET), and shmstat against a SIGSTOPped broker.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"

static th_env env;
static int notify_fd = -1;
static char notify_log[8192];

#define PG "type = postgres\nconninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres " \
           "sslmode=disable application_name=pbops\n"

static void drain_notify(void)
{
    char buf[1024];
    ssize_t n;
    while ((n = recv(notify_fd, buf, sizeof buf - 1, MSG_DONTWAIT)) > 0) {
        buf[n] = 0;
        strncat(notify_log, buf, sizeof notify_log - strlen(notify_log) - 2);
        strcat(notify_log, "|");
    }
}

static int wait_notify(const char *needle, int ms)
{
    for (int i = 0; i < ms / 20; i++) {
        drain_notify();
        if (strstr(notify_log, needle))
            return 0;
        usleep(20000);
    }
    return -1;
}

static int group_setup(void **state)
{
    (void)state;
    if (th_setup(&env, 1, 0) < 0)
        return -1;
    /* A stand-in for systemd's notify socket. */
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(env.dir) + 13 >= sizeof sa.sun_path)
        return -1;
    memcpy(sa.sun_path, env.dir, strlen(env.dir));
    strcat(sa.sun_path, "/notify.sock");
    notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (notify_fd < 0 || bind(notify_fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        return -1;
    setenv("NOTIFY_SOCKET", sa.sun_path, 1);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    unsetenv("NOTIFY_SOCKET");
    if (notify_fd >= 0)
        close(notify_fd);
    return th_teardown(&env);
}

static void write_conf(const char *text)
{
    /* The same header th_broker_start writes, then our pools. */
    char path[512];
    snprintf(path, sizeof path, "%s", env.conf_path);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fchmod(fileno(f), 0600);
    const char *io = getenv("PB_IO_BACKEND");
    fprintf(f, "[broker]\nsocket = %s\nshm_name = %s\nlog_level = debug\nspare_slots = 8\n%s%s%s\n", env.sock_path,
            env.shm_name, io && *io ? "io_backend = " : "", io && *io ? io : "", io && *io ? "\n" : "");
    /* Substitute the placeholders the way the harness does. */
    char port[16];
    snprintf(port, sizeof port, "%d", env.pg_port);
    for (const char *p = text; *p;) {
        if (strncmp(p, "@PGHOST@", 8) == 0) {
            fputs(env.pg_host, f);
            p += 8;
        } else if (strncmp(p, "@PGPORT@", 8) == 0) {
            fputs(port, f);
            p += 8;
        } else {
            fputc(*p++, f);
        }
    }
    fclose(f);
}

static int run_broker_t(const char *conf_text, char *out, size_t outlen)
{
    char path[512];
    snprintf(path, sizeof path, "%s/check.conf", env.dir);
    FILE *f = fopen(path, "w");
    fchmod(fileno(f), 0600);
    fputs(conf_text, f);
    fclose(f);
    const char *broker = getenv("PB_BROKER") ? getenv("PB_BROKER") : "build/poolbroker";
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s -t -c %s 2>&1", broker, path);
    FILE *p = popen(cmd, "r");
    size_t n = fread(out, 1, outlen - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_config_check(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(run_broker_t("[broker]\nsocket = /tmp/x.sock\n\n[pool a]\ntype = postgres\nconninfo = dbname=x\n", out,
                                  sizeof out),
                     0);
    assert_non_null(strstr(out, "configuration OK"));
    assert_int_not_equal(run_broker_t("[broker]\nsocket = /tmp/x.sock\n\n[pool a]\ntype = postgres\n"
                                      "conninfo = dbname=x\nmax_size = lots\n",
                                      out, sizeof out),
                         0);
    assert_non_null(strstr(out, "check.conf:7:"));
    assert_non_null(strstr(out, "max_size"));
    assert_int_not_equal(run_broker_t("[broker]\nsockett = /tmp/x.sock\n", out, sizeof out), 0);
    assert_non_null(strstr(out, "check.conf:2:"));
    assert_non_null(strstr(out, "sockett"));
    /* -V and -h */
    const char *broker = getenv("PB_BROKER") ? getenv("PB_BROKER") : "build/poolbroker";
    char *argv[] = { (char *)broker, "-V", NULL };
    assert_int_equal(th_run(argv, out, sizeof out, 5000), 0);
    assert_non_null(strstr(out, PB_VERSION));
}

static int pool_size(const char *pool, char *json, size_t n)
{
    const char *build = getenv("PB_BUILD") ? getenv("PB_BUILD") : "build";
    char shmstat[512];
    snprintf(shmstat, sizeof shmstat, "%s/shmstat", build);
    char *argv[] = { shmstat, "-s", env.shm_name, "-p", (char *)pool, "--json", NULL };
    if (th_run(argv, json, n, 5000) != 0)
        return -1;
    const char *p = strstr(json, "\"size\":");
    return p ? atoi(p + 7) : -1;
}

static int wait_pool_size(const char *pool, int want, int ms)
{
    char json[16384];
    int got = -1;
    for (int i = 0; i < ms / 100; i++) {
        if ((got = pool_size(pool, json, sizeof json)) == want)
            return want;
        usleep(100000);
    }
    return got;
}

static void test_reload(void **state)
{
    (void)state;
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 4\n\n"
               "[pool gone]\n" PG "min_size = 1\nmax_size = 2\n");
    assert_int_equal(th_broker_restart(&env), 0);
    assert_int_equal(wait_notify("READY=1", 5000), 0);
    assert_non_null(strstr(notify_log, "STATUS="));

    pb_client *c;
    assert_int_equal(pb_connect(env.sock_path, &c), PB_OK);
    pb_lease *held, *l;
    pb_result *r;
    assert_int_equal(pb_acquire(c, "gone", 5000, &held), PB_OK);
    assert_int_equal(pb_pg_exec(held, "BEGIN", &r), PB_OK);
    pb_result_free(r);

    /* Grow main's min_size, remove "gone" (a lease is out), add "fresh". */
    write_conf("[pool main]\n" PG "min_size = 3\nmax_size = 4\n\n"
               "[pool fresh]\n" PG "min_size = 1\nmax_size = 2\n");
    notify_log[0] = 0;
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "reload:", 1, 5000), 0);
    assert_int_equal(wait_notify("RELOADING=1", 5000), 0);
    assert_int_equal(wait_notify("READY=1", 5000), 0);
    assert_int_equal(wait_pool_size("main", 3, 5000), 3);
    assert_int_equal(pb_acquire(c, "fresh", 5000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT 'fresh'", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "fresh");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    assert_int_equal(pb_acquire(c, "gone", 100, &l), PB_ENOPOOL);
    /* The lease on the removed pool still works, and is not dropped. */
    assert_int_equal(pb_pg_exec(held, "SELECT 'still here'", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "still here");
    pb_result_free(r);
    assert_int_equal(pb_release(held), PB_OK);

    /* Shrink: min_size back to 1, idle connections close down to it. */
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 2\nidle_timeout_s = 1\n\n"
               "[pool fresh]\n" PG "min_size = 1\nmax_size = 2\n");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "reload:", 3, 5000), 0);
    assert_int_equal(wait_pool_size("main", 1, 8000), 1);

    /* An invalid file is logged and the running configuration kept. */
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = many\n");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "keeping the current configuration", 1, 5000), 0);
    assert_int_equal(pb_acquire(c, "fresh", 5000, &l), PB_OK);
    assert_int_equal(pb_release(l), PB_OK);
    /* So is one asking for what needs a restart. */
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 65\n\n[pool fresh]\n" PG "max_size = 2\n");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "keeping the current configuration", 2, 5000), 0);
    pb_disconnect(c);
}

/* A fresh client leases pool, runs sql, and gets want in the first field. */
static void query_gives(const char *pool, const char *sql, const char *want)
{
    pb_client *c;
    pb_lease *l;
    pb_result *r;
    assert_int_equal(pb_connect(env.sock_path, &c), PB_OK);
    assert_int_equal(pb_acquire(c, pool, 5000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, sql, &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), want);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

/* Backend pids of n leases held at once on pool, or -1 if one could not be
 * had within timeout_ms. */
static int hold_leases(pb_client *c, const char *pool, int n, int timeout_ms)
{
    pb_lease *l[16];
    int got = 0, pids = 0;
    for (; got < n; got++) {
        if (pb_acquire(c, pool, timeout_ms, &l[got]) != PB_OK)
            break;
        pb_result *r;
        if (pb_pg_exec(l[got], "SELECT 1", &r) == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK)
            pids++;
        pb_result_free(r);
    }
    for (int i = 0; i < got; i++)
        pb_release(l[i]);
    return got == n && pids == n ? n : -1;
}

/* A pool started with slots = 6 and max_size = 2 grows to 6 connections
 * with a reload, and no further: past its slots, or changing them, needs a
 * restart and is refused with the reason; lowered again, the pool closes
 * what is above it.  (This test found the broker
 * blocking on a full NOTIFY_SOCKET: it never reads it.) */
static void test_reload_grows_into_slots(void **state)
{
    (void)state;
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 2\nslots = 6\n");
    assert_int_equal(th_broker_restart(&env), 0);
    pb_client *c;
    assert_int_equal(pb_connect(env.sock_path, &c), PB_OK);
    assert_int_equal(hold_leases(c, "main", 2, 5000), 2);
    assert_int_equal(hold_leases(c, "main", 3, 300), -1);      /* max_size 2 */

    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 6\nslots = 6\n");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "reload:", 1, 5000), 0);
    assert_int_equal(hold_leases(c, "main", 6, 5000), 6);
    assert_int_equal(wait_pool_size("main", 6, 5000), 6);

    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 7\n");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "max_size 7 is more than the 6 slots it started with", 1, 5000), 0);
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 6\nslots = 8\n");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "slots cannot change without a restart", 1, 5000), 0);
    assert_int_equal(hold_leases(c, "main", 7, 300), -1);       /* still 6 */

    /* Nobody reads the notify socket meanwhile: 40 more reloads (each
     * sends RELOADING=1 and READY=1) overflow it, and the broker must carry
     * on, not block in the send. */
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 6\nslots = 6\n");
    long applied = th_count_lines(env.broker_log, "applied");
    for (int i = 1; i <= 40; i++) {
        kill(env.broker_pid, SIGHUP);
        assert_int_equal(th_wait_log(&env, "applied", applied + i, 5000), 0);
    }
    assert_int_equal(hold_leases(c, "main", 6, 5000), 6);

    /* And back down: the free connections above the new max_size close at
     * once, not only after idle_timeout_s (300 s here). */
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 2\nslots = 6\n");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(wait_pool_size("main", 2, 5000), 2);
    assert_int_equal(hold_leases(c, "main", 2, 5000), 2);
    assert_int_equal(hold_leases(c, "main", 3, 300), -1);
    pb_disconnect(c);
}

/* ---------------------------------------------------------- log_target = syslog
 * syslog(3) writes to /dev/log, a path no test may take over on the host.
 * So a child gets a private mount namespace with a tmpfs over /dev (the few
 * device files the broker needs bound back in from the real one) and its
 * own datagram socket at /dev/log, and runs the broker there.  It returns 0
 * when every check passed, else the number of the first that failed. */
static char syslog_msgs[64][512];
static int syslog_n;

/* Read datagrams into syslog_msgs until one contains needle or timeout_ms. */
static int syslog_wait(int s, const char *needle, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        for (int i = 0; i < syslog_n; i++)
            if (strstr(syslog_msgs[i], needle))
                return i;
        char buf[512];
        ssize_t n;
        while ((n = recv(s, buf, sizeof buf - 1, MSG_DONTWAIT)) > 0) {
            buf[n] = 0;
            if (syslog_n < 64)
                memcpy(syslog_msgs[syslog_n++], buf, (size_t)n + 1);
        }
        usleep(50000);
    }
    return -1;
}

static int syslog_child(void)
{
    char real[600], p[700];
    snprintf(real, sizeof real, "%s/realdev", env.dir);
    if (mkdir(real, 0755) < 0 && errno != EEXIST)
        return 1;
    if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        return 2;
    if (mount("/dev", real, NULL, MS_BIND | MS_REC, NULL) < 0 || mount("tmpfs", "/dev", "tmpfs", 0, "mode=0755") < 0)
        return 3;
    static const char *const files[] = { "null", "zero", "urandom", "random" };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(p, sizeof p, "/dev/%s", files[i]);
        int fd = open(p, O_CREAT | O_WRONLY, 0666);
        if (fd < 0)
            return 4;
        close(fd);
        char from[700];
        snprintf(from, sizeof from, "%s/%s", real, files[i]);
        if (mount(from, p, NULL, MS_BIND, NULL) < 0)
            return 4;
    }
    snprintf(p, sizeof p, "%s/shm", real);
    if (mkdir("/dev/shm", 01777) < 0 || mount(p, "/dev/shm", NULL, MS_BIND, NULL) < 0)
        return 5;
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX, .sun_path = "/dev/log" };
    if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof sa) < 0)
        return 6;

    pid_t b = fork();
    if (b == 0) {
        int log = open(env.broker_log, O_WRONLY | O_APPEND | O_CREAT, 0644);
        if (log >= 0) {
            dup2(log, 1);
            dup2(log, 2);
        }
        execl(getenv("PB_BROKER") ? getenv("PB_BROKER") : "build/poolbroker", "poolbroker", "-c", env.conf_path,
              (char *)NULL);
        _exit(127);
    }
    char tag[64];
    snprintf(tag, sizeof tag, "poolbroker[%d]: ", (int)b);
    int rc = 0, i;
    /* <30> is daemon.info: LOG_DAEMON (3) * 8 + LOG_INFO (6). */
    if ((i = syslog_wait(s, "poolbroker ready", 10000)) < 0)
        rc = 7;
    else if (strncmp(syslog_msgs[i], "<30>", 4) != 0 || !strstr(syslog_msgs[i], tag))
        rc = 8;
    /* An error: a reload of a broken file, at daemon.err (<27>). */
    FILE *f = rc ? NULL : fopen(env.conf_path, "a");
    if (f) {
        fputs("max_size = many\n", f);
        fclose(f);
        kill(b, SIGHUP);
        if ((i = syslog_wait(s, "keeping the current configuration", 5000)) < 0)
            rc = 9;
        else if (strncmp(syslog_msgs[i], "<27>", 4) != 0 || !strstr(syslog_msgs[i], "key 'max_size'"))
            rc = 10;
    }
    kill(b, SIGTERM);
    int st;
    waitpid(b, &st, 0);
    if (!rc && !(WIFEXITED(st) && WEXITSTATUS(st) == 0))
        rc = 11;
    for (i = 0; i < syslog_n && rc; i++)
        fprintf(stderr, "  syslog: %s\n", syslog_msgs[i]);
    return rc;
}

static void test_log_target_syslog(void **state)
{
    (void)state;
    if (geteuid() != 0) {
        print_message("log_target = syslog: needs root (a mount namespace); skipped\n");
        skip();
    }
    write_conf("log_target = syslog\n\n[pool main]\n" PG "min_size = 1\nmax_size = 2\n");
    th_broker_stop(&env, SIGTERM);
    long before = th_count_lines(env.broker_log, "");
    if (before < 0)
        before = 0;                 /* no log file yet */
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(syslog_child());
    int st = 0;
    pid_t w = 0;
    for (int i = 0; i < 600 && (w = waitpid(pid, &st, WNOHANG)) == 0; i++)
        usleep(50000);
    if (w == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        fail_msg("the syslog child did not finish in 30 s");
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail_msg("syslog check %d failed (see the numbered checks in syslog_child)",
                 WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    /* Nothing went to stderr meanwhile: the log went to syslog only. */
    assert_int_equal(th_count_lines(env.broker_log, ""), before);
    print_message("log_target = syslog: ready (daemon.info) and a refused reload (daemon.err) arrived at /dev/log "
                  "with the tag poolbroker[pid]; nothing on stderr\n");
}

/* ------------------------------------------------ reload during a handshake
 * A TCP proxy to PostgreSQL's Unix socket that holds each connection until
 * the test opens the gate (writes a byte to gate_fd), so a reload can land
 * while the broker's handshake through it is in flight. */
static void gate_proxy(int lfd, int gate_fd)
{
    char b;
    /* Not the harness's emergency cleanup (it would stop the servers), and
     * gone with the test, even one that failed before stopping us. */
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0)
            _exit(0);
        if (read(gate_fd, &b, 1) != 1)        /* the gate; EOF: the test is done */
            _exit(0);
        if (fork() != 0) {
            close(cfd);
            continue;
        }
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int sfd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char path[300];
        int plen = snprintf(path, sizeof path, "%s/.s.PGSQL.%d", env.pg_host, env.pg_port);
        if (plen < 0 || (size_t)plen >= sizeof sa.sun_path)
            _exit(1);
        memcpy(sa.sun_path, path, (size_t)plen + 1);
        if (sfd < 0 || connect(sfd, (struct sockaddr *)&sa, sizeof sa) < 0)
            _exit(1);
        struct pollfd pf[2] = { { .fd = cfd, .events = POLLIN }, { .fd = sfd, .events = POLLIN } };
        char buf[16384];
        for (;;) {
            if (poll(pf, 2, -1) < 0)
                _exit(1);
            for (int i = 0; i < 2; i++) {
                if (!pf[i].revents)
                    continue;
                ssize_t n = read(pf[i].fd, buf, sizeof buf);
                if (n <= 0 || write(pf[1 - i].fd, buf, (size_t)n) != n)
                    _exit(0);
            }
        }
    }
}

/* A reload that changes a pool's conninfo while a connection's handshake
 * still runs on the old one: that connection must not be handed out. */
static void test_reload_during_handshake(void **state)
{
    (void)state;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof sin;
    assert_true(lfd >= 0);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sin, sizeof sin), 0);
    assert_int_equal(listen(lfd, 8), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sin, &sl), 0);
    int gate[2];
    assert_int_equal(pipe2(gate, O_CLOEXEC), 0);     /* the broker must not hold it */
    fflush(NULL);
    pid_t proxy = fork();
    assert_true(proxy >= 0);
    if (proxy == 0) {
        close(gate[1]);
        gate_proxy(lfd, gate[0]);
    }
    close(lfd);
    close(gate[0]);

    char conf[1024];
    snprintf(conf, sizeof conf,
             "[pool gate]\ntype = postgres\nconninfo = host=127.0.0.1 port=%d user=postgres dbname=postgres "
             "sslmode=disable application_name=old_settings\nmin_size = 1\nmax_size = 1\n",
             ntohs(sin.sin_port));
    write_conf(conf);
    assert_int_equal(th_broker_restart(&env), 0);
    usleep(200000);                 /* the broker's handshake waits at the gate */
    write_conf("[pool gate]\ntype = postgres\nconninfo = host=@PGHOST@ port=@PGPORT@ user=postgres "
               "dbname=postgres sslmode=disable application_name=new_settings\nmin_size = 1\nmax_size = 1\n");
    long applied = th_count_lines(env.broker_log, "applied");
    kill(env.broker_pid, SIGHUP);
    assert_int_equal(th_wait_log(&env, "applied", applied + 1, 5000), 0);
    assert_int_equal(write(gate[1], "g", 1), 1);  /* the old handshake completes now */

    /* The pool's one connection, when a worker gets it, is on the new
     * settings (the lease waits while the old one is closed and replaced). */
    query_gives("gate", "SHOW application_name", "new_settings");
    assert_int_equal(th_wait_log(&env, "connection settings changed during its handshake", 1, 5000), 0);
    close(gate[1]);
    kill(proxy, SIGKILL);
    waitpid(proxy, NULL, 0);
}

static void test_drain_with_lease_in_flight(void **state)
{
    (void)state;
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 2\n");
    assert_int_equal(th_broker_restart(&env), 0);
    notify_log[0] = 0;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        pb_client *c;
        pb_lease *l;
        pb_result *r;
        if (pb_connect(env.sock_path, &c) != PB_OK || pb_acquire(c, "main", 5000, &l) != PB_OK)
            _exit(1);
        if (pb_pg_exec(l, "SELECT pg_sleep(1), 'done'", &r) != PB_OK || strcmp(pb_getvalue(r, 0, 1), "done"))
            _exit(2);
        pb_result_free(r);
        if (pb_release(l) != PB_OK)
            _exit(3);
        /* No new leases while draining. */
        int rc = pb_acquire(c, "main", 1000, &l);
        _exit(rc == PB_ESHUTDOWN || rc == PB_EBROKER || rc == PB_ENOPOOL ? 0 : 4);
    }
    usleep(300000);                 /* the query is running */
    pid_t bpid = env.broker_pid;
    kill(bpid, SIGTERM);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    st = th_broker_stop(&env, SIGTERM);
    assert_true(st == -1 || (WIFEXITED(st) && WEXITSTATUS(st) == 0));
    if (st == -1)                   /* it had already exited: the harness saw its status */
        assert_true(WIFEXITED(env.broker_status) && WEXITSTATUS(env.broker_status) == 0);
    assert_int_equal(wait_notify("STOPPING=1", 2000), 0);
}

static void test_shmstat_with_broker_stopped(void **state)
{
    (void)state;
    write_conf("[pool main]\n" PG "min_size = 2\nmax_size = 3\n");
    assert_int_equal(th_broker_restart(&env), 0);
    pb_client *c;
    pb_lease *l;
    assert_int_equal(pb_connect(env.sock_path, &c), PB_OK);
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    kill(env.broker_pid, SIGSTOP);
    const char *build = getenv("PB_BUILD") ? getenv("PB_BUILD") : "build";
    char shmstat[512], out[65536];
    snprintf(shmstat, sizeof shmstat, "%s/shmstat", build);
    char *text[] = { shmstat, "-s", env.shm_name, NULL };
    assert_int_equal(th_run(text, out, sizeof out, 5000), 0);
    assert_non_null(strstr(out, "main"));
    assert_non_null(strstr(out, "leased"));
    char *json[] = { shmstat, "-s", env.shm_name, "--json", NULL };
    int json_rc = th_run(json, out, sizeof out, 5000);
    char mypid[32];
    snprintf(mypid, sizeof mypid, "%d", (int)getpid());
    int json_ok = json_rc == 0 && strstr(out, "\"leased\"") && strstr(out, mypid);
    if (!json_ok)
        kill(env.broker_pid, SIGCONT);
    if (!json_ok)
        fail_msg("shmstat --json: %s", out);
    char *prom[] = { shmstat, "-s", env.shm_name, "--prometheus", NULL };
    assert_int_equal(th_run(prom, out, sizeof out, 5000), 0);
    assert_non_null(strstr(out, "poolbroker_pool_acquires_total{pool=\"main\"}"));
    assert_non_null(strstr(out, "poolbroker_pool_acquire_wait_seconds_bucket"));
    kill(env.broker_pid, SIGCONT);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
    /* And with the broker gone altogether. */
    th_broker_stop(&env, SIGKILL);
    assert_int_equal(th_run(text, out, sizeof out, 5000), 0);
    assert_non_null(strstr(out, "not running"));
}

static void test_max_clients_refused(void **state)
{
    (void)state;
    write_conf("max_clients = 2\n\n[pool main]\n" PG "min_size = 1\nmax_size = 2\n");
    assert_int_equal(th_broker_restart(&env), 0);
    pb_client *a, *b, *c = NULL;
    assert_int_equal(pb_connect(env.sock_path, &a), PB_OK);
    assert_int_equal(pb_connect(env.sock_path, &b), PB_OK);
    assert_int_equal(pb_connect(env.sock_path, &c), PB_EPERM);
    assert_null(c);
    assert_int_equal(th_wait_log(&env, "max_clients (2) reached", 1, 5000), 0);
    /* A record frees when a client leaves (once the broker saw it go). */
    pb_disconnect(a);
    int rc = PB_EPERM;
    for (int i = 0; i < 100 && rc == PB_EPERM; i++) {
        usleep(50000);
        rc = pb_connect(env.sock_path, &c);
    }
    assert_int_equal(rc, PB_OK);
    pb_disconnect(b);
    pb_disconnect(c);
}

/* Where io_uring_setup is denied (Docker's seccomp profile,
 * kernel.io_uring_disabled), io_backend = auto falls back to epoll, says so,
 * and serves. */
static void test_io_uring_denied_falls_back(void **state)
{
    (void)state;
    const char *build = getenv("PB_BUILD") ? getenv("PB_BUILD") : "build";
    const char *real = getenv("PB_BROKER") ? getenv("PB_BROKER") : "build/poolbroker";
    char noring[512], realbuf[512];
    snprintf(noring, sizeof noring, "%s/tests/noring", build);
    snprintf(realbuf, sizeof realbuf, "%s", real);
    /* io_backend = auto, whatever backend this run of the suite uses. */
    char io[32] = "";
    if (getenv("PB_IO_BACKEND"))
        snprintf(io, sizeof io, "%s", getenv("PB_IO_BACKEND"));
    unsetenv("PB_IO_BACKEND");
    write_conf("[pool main]\n" PG "min_size = 1\nmax_size = 2\n");
    if (*io)
        setenv("PB_IO_BACKEND", io, 1);
    setenv("PB_REAL_BROKER", realbuf, 1);
    setenv("PB_BROKER", noring, 1);
    int rc = th_broker_restart(&env);
    setenv("PB_BROKER", realbuf, 1);
    unsetenv("PB_REAL_BROKER");
    assert_int_equal(rc, 0);
    assert_int_equal(th_wait_log(&env, "falling back to epoll", 1, 5000), 0);
    char shmstat[512], out[65536];
    snprintf(shmstat, sizeof shmstat, "%s/shmstat", build);
    char *json[] = { shmstat, "-s", env.shm_name, "--json", NULL };
    assert_int_equal(th_run(json, out, sizeof out, 5000), 0);
    assert_non_null(strstr(out, "\"epoll\""));
    query_gives("main", "SELECT 'via epoll'", "via epoll");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_check),
        cmocka_unit_test(test_reload),
        cmocka_unit_test(test_reload_grows_into_slots),
        cmocka_unit_test(test_log_target_syslog),
        cmocka_unit_test(test_reload_during_handshake),
        cmocka_unit_test(test_drain_with_lease_in_flight),
        cmocka_unit_test(test_shmstat_with_broker_stopped),
        cmocka_unit_test(test_max_clients_refused),
        cmocka_unit_test(test_io_uring_denied_falls_back),
    };
    /* PB_TEST_FILTER=test_reload* runs only the matching tests. */
    const char *filter = getenv("PB_TEST_FILTER");
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests_name("ops", tests, group_setup, group_teardown);
}
