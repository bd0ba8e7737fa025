/*
 * bench.c — the benchmark driver of `make bench` (bench/run starts the
 * servers and calls this once per measurement point).
 *
 *   bench lease  --workers N --seconds S --socket PATH [--pool main]
 *   bench pg     --mode poolbroker|pgbouncer|direct|connect --workers N --seconds S [--pools N] [--slow-ms MS]
 *                [--socket PATH] [--pool main] [--conninfo STR] [--query SQL] [--prepared] [--cpu-pid PID]
 *                [--server-pid PID]
 *   bench redis  --mode poolbroker|twemproxy|direct --workers N --seconds S
 *                [--socket PATH] [--pool cache] [--host H] [--port N] [--key K] [--cpu-pid PID]
 *                [--server-pid PID]
 *   bench attach --workers N --socket PATH --broker-pid PID --shm NAME [--settle S]
 *
 * Every run forks its worker processes; they set up (attach, connect), wait
 * on a shared start flag, run a warm-up (--warmup, default 0.5 s, not
 * counted), then a measured window of --seconds (BENCH_SECONDS in bench/run),
 * then stop.  Each worker times every operation with CLOCK_MONOTONIC into a
 * private log-linear histogram (128 sub-buckets per power of two: < 0.8 %
 * error) and copies it into a shared anonymous mapping when it stops; the
 * parent merges them and computes the percentiles.
 *
 * --prepared runs the query as a prepared statement without parameters:
 * pb_pg_prepare once per worker, then pb_pg_exec_prepared (poolbroker
 * modes); PQprepare once per connection, then PQexecPrepared (direct).
 * Not for pgbouncer (transaction pooling before 1.21 has no protocol-level
 * prepared statements) or connect.  The RESULT line then says prepared=1.
 *
 * One line goes to stdout per run, `RESULT key=value ...`; diagnostics go to
 * stderr.  With --cpu-pid, the user+system CPU time that process used during
 * the measured window is reported too (cpu_s, cpu_s_per_mop = CPU seconds per
 * million operations).
 *
 * Where the time goes, per process class (the "perf stat" line of
 * bench/run): every run reports the workers' CPU and context switches per
 * operation (worker_cpu_ns_per_op, worker_cs_per_op: CLOCK_PROCESS_CPUTIME_ID
 * and getrusage's nvcsw + nivcsw, in the measured window).  --cpu-pid adds
 * the same for the proxy (cpu_us_per_op, cpu_cs_per_op: the broker,
 * PgBouncer or twemproxy), and --server-pid for the server: that pid and its
 * children, i.e. a postmaster and every backend, or redis-server
 * (server_us_per_op, server_cs_per_op).  CPU time comes from
 * /proc/PID/schedstat (nanoseconds on CPU) where the kernel has it, else from
 * /proc/PID/stat ticks; context switches from /proc/PID/status.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <poolbroker.h>

/* ------------------------------------------------------------------ time */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t deadline_ns)
{
    struct timespec ts = { (time_t)(deadline_ns / 1000000000u), (long)(deadline_ns % 1000000000u) };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void sleep_ms(unsigned ms)
{
    sleep_until(now_ns() + (uint64_t)ms * 1000000u);
}

/* ------------------------------------------------------------- histogram */

#define HIST_SUB_BITS 7
#define HIST_SUB      (1u << HIST_SUB_BITS)
#define HIST_BUCKETS  ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

static unsigned hist_index(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    unsigned sub = (unsigned)(v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
    return (e - HIST_SUB_BITS + 1) * HIST_SUB + sub;
}

/* Midpoint of a bucket, in ns. */
static double hist_value(unsigned idx)
{
    if (idx < HIST_SUB)
        return idx;
    unsigned e = idx / HIST_SUB + HIST_SUB_BITS - 1;
    uint64_t sub = idx % HIST_SUB;
    uint64_t width = 1ull << (e - HIST_SUB_BITS);
    return (double)((HIST_SUB + sub) * width) + (double)width / 2.0;
}

static double hist_percentile(const uint64_t *h, uint64_t n, double p)
{
    if (n == 0)
        return 0;
    uint64_t rank = (uint64_t)(p * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h[i];
        if (seen >= rank)
            return hist_value(i);
    }
    return hist_value(HIST_BUCKETS - 1);
}

/* ---------------------------------------------------------- shared state */

enum { PH_WAIT = 0, PH_WARMUP, PH_MEASURE, PH_STOP };

struct wstat {
    uint64_t ops, errors;
    uint64_t cpu_ns;            /* this worker's CPU time in the measured window */
    uint64_t csw;               /* this worker's context switches in the measured window */
    uint64_t max_ns;            /* this worker's slowest timed operation */
    uint32_t hist[HIST_BUCKETS];
};

struct shared {
    _Atomic uint32_t phase;
    _Atomic uint32_t ready;
    _Atomic uint32_t failed;
    _Atomic uint32_t errlock;
    _Atomic uint32_t done;
    char errmsg[512];
    struct wstat w[];
};

static long futex_op(_Atomic uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    /* Shared futex (no FUTEX_PRIVATE_FLAG): the word is in a MAP_SHARED mapping. */
    return syscall(SYS_futex, (void *)addr, op, val, ts, NULL, 0);
}

static void wait_phase_past(struct shared *sh, uint32_t ph)
{
    uint32_t cur;
    while ((cur = atomic_load(&sh->phase)) == ph) {
        struct timespec ts = { 1, 0 };
        futex_op(&sh->phase, FUTEX_WAIT, cur, &ts);
    }
}

static void set_phase(struct shared *sh, uint32_t ph)
{
    atomic_store(&sh->phase, ph);
    futex_op(&sh->phase, FUTEX_WAKE, INT_MAX, NULL);
}

/* The first error any worker saw, for the report on stderr. */
static void note_error(struct shared *sh, const char *msg)
{
    uint32_t expect = 0;
    if (atomic_compare_exchange_strong(&sh->errlock, &expect, 1)) {
        snprintf(sh->errmsg, sizeof sh->errmsg, "pid %d: %s", (int)getpid(), msg);
        atomic_store(&sh->errlock, 2);
    }
}

/* --------------------------------------------------------------- options */

struct opts {
    const char *cmd;
    const char *mode;
    int workers;
    double seconds;
    double warmup;
    double settle;
    const char *socket;
    const char *pool;
    int pools;                  /* > 1: worker i uses pool <pool><i % pools> (one pool per worker) */
    double slow_ms;             /* > 0: report each operation slower than this (report_slow) */
    const char *conninfo;
    const char *query;
    int prepared;               /* --prepared: the query as a prepared statement */
    const char *host;
    int port;
    const char *key;
    int cpu_pid;
    int server_pid;
    int broker_pid;
    const char *shm;
    const char *label;
};

/* --------------------------------------------------------------- the ops */

struct ctx {
    const struct opts *o;
    pb_client *pb;
    PGconn *pg;
    redisContext *rc;
    char err[300];
};

static void seterr(struct ctx *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void seterr(struct ctx *x, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->err, sizeof x->err, fmt, ap);
    va_end(ap);
    /* libpq messages end with a newline */
    size_t n = strlen(x->err);
    while (n > 0 && (x->err[n - 1] == '\n' || x->err[n - 1] == ' '))
        x->err[--n] = '\0';
}

struct bench_ops {
    int (*setup)(struct ctx *x);
    int (*op)(struct ctx *x);
    void (*teardown)(struct ctx *x);
    int timed;          /* time every op (percentiles) */
};

/* poolbroker attach, for lease / pg / redis in mode poolbroker */
static int pb_setup(struct ctx *x)
{
    int rc = pb_connect(x->o->socket, &x->pb);
    if (rc != PB_OK) {
        seterr(x, "pb_connect(%s): %s", x->o->socket ? x->o->socket : "default", pb_strerror(rc));
        return -1;
    }
    /* One lease up front: proves the pool exists and is up. */
    pb_lease *l;
    rc = pb_acquire(x->pb, x->o->pool, -1, &l);
    if (rc != PB_OK) {
        seterr(x, "pb_acquire(%s): %s", x->o->pool, pb_strerror(rc));
        return -1;
    }
    if (x->o->prepared && strcmp(x->o->cmd, "pg") == 0) {
        pb_result *r = NULL;
        rc = pb_pg_prepare(l, "q", x->o->query, 0, NULL, &r);
        if (rc != PB_OK || pb_result_status(r) == PB_RES_ERROR) {
            seterr(x, "pb_pg_prepare: %s", rc != PB_OK ? pb_strerror(rc) : pb_error_message(r));
            pb_result_free(r);
            pb_release(l);
            return -1;
        }
        pb_result_free(r);
    }
    pb_release(l);
    return 0;
}

static void pb_teardown(struct ctx *x)
{
    pb_disconnect(x->pb);
    x->pb = NULL;
}

static int lease_op(struct ctx *x)
{
    pb_lease *l;
    int rc = pb_acquire(x->pb, x->o->pool, -1, &l);
    if (rc != PB_OK) {
        seterr(x, "pb_acquire: %s", pb_strerror(rc));
        return -1;
    }
    rc = pb_release(l);
    if (rc != PB_OK) {
        seterr(x, "pb_release: %s", pb_strerror(rc));
        return -1;
    }
    return 0;
}

static int pg_pb_op(struct ctx *x)
{
    pb_lease *l;
    pb_result *r = NULL;
    int rc = pb_acquire(x->pb, x->o->pool, -1, &l);
    if (rc != PB_OK) {
        seterr(x, "pb_acquire: %s", pb_strerror(rc));
        return -1;
    }
    rc = x->o->prepared ? pb_pg_exec_prepared(l, "q", 0, NULL, NULL, NULL, 0, &r) : pb_pg_exec(l, x->o->query, &r);
    int ok = rc == PB_OK && pb_result_status(r) == PB_RES_TUPLES_OK;
    if (!ok) {
        if (rc != PB_OK)
            seterr(x, "pb_pg_exec: %s", pb_strerror(rc));
        else
            seterr(x, "pb_pg_exec: %s", pb_error_message(r));
    }
    pb_result_free(r);
    rc = pb_release(l);
    if (ok && rc != PB_OK) {
        seterr(x, "pb_release: %s", pb_strerror(rc));
        ok = 0;
    }
    return ok ? 0 : -1;
}

static int pg_conn_setup(struct ctx *x)
{
    x->pg = PQconnectdb(x->o->conninfo);
    if (PQstatus(x->pg) != CONNECTION_OK) {
        seterr(x, "PQconnectdb: %s", PQerrorMessage(x->pg));
        PQfinish(x->pg);
        x->pg = NULL;
        return -1;
    }
    if (x->o->prepared) {
        PGresult *r = PQprepare(x->pg, "q", x->o->query, 0, NULL);
        int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok)
            seterr(x, "PQprepare: %s", r ? PQresultErrorMessage(r) : PQerrorMessage(x->pg));
        PQclear(r);
        if (!ok) {
            PQfinish(x->pg);
            x->pg = NULL;
            return -1;
        }
    }
    return 0;
}

static void pg_conn_teardown(struct ctx *x)
{
    PQfinish(x->pg);
    x->pg = NULL;
}

static int pg_exec_on(struct ctx *x, PGconn *conn)
{
    PGresult *r = x->o->prepared ? PQexecPrepared(conn, "q", 0, NULL, NULL, NULL, 0) : PQexec(conn, x->o->query);
    int ok = PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!ok)
        seterr(x, "PQexec: %s", r ? PQresultErrorMessage(r) : PQerrorMessage(conn));
    PQclear(r);
    return ok ? 0 : -1;
}

static int pg_persistent_op(struct ctx *x)
{
    int rc = pg_exec_on(x, x->pg);
    if (rc != 0 && PQstatus(x->pg) != CONNECTION_OK) {
        PQreset(x->pg);
        if (x->o->prepared)         /* a new session: prepare again */
            PQclear(PQprepare(x->pg, "q", x->o->query, 0, NULL));
    }
    return rc;
}

static int pg_connect_setup(struct ctx *x)
{
    /* Prove the conninfo works; the op connects by itself. */
    if (pg_conn_setup(x) != 0)
        return -1;
    pg_conn_teardown(x);
    return 0;
}

static int pg_connect_op(struct ctx *x)
{
    PGconn *conn = PQconnectdb(x->o->conninfo);
    int rc;
    if (PQstatus(conn) != CONNECTION_OK) {
        seterr(x, "PQconnectdb: %s", PQerrorMessage(conn));
        rc = -1;
    } else {
        rc = pg_exec_on(x, conn);
    }
    PQfinish(conn);
    return rc;
}

static void noop_teardown(struct ctx *x)
{
    (void)x;
}

static int redis_reply_ok(struct ctx *x, redisReply *r)
{
    if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_NIL)
        return 0;
    seterr(x, "GET: unexpected reply type %d%s%s", r->type,
           r->type == REDIS_REPLY_ERROR ? ": " : "", r->type == REDIS_REPLY_ERROR ? r->str : "");
    return -1;
}

static int redis_pb_op(struct ctx *x)
{
    pb_lease *l;
    redisReply *r = NULL;
    int rc = pb_acquire(x->pb, x->o->pool, -1, &l);
    if (rc != PB_OK) {
        seterr(x, "pb_acquire: %s", pb_strerror(rc));
        return -1;
    }
    rc = pb_redis_command(l, &r, "GET %s", x->o->key);
    int ok;
    if (rc != PB_OK) {
        seterr(x, "pb_redis_command: %s", pb_strerror(rc));
        ok = 0;
    } else {
        ok = redis_reply_ok(x, r) == 0;
    }
    freeReplyObject(r);
    rc = pb_release(l);
    if (ok && rc != PB_OK) {
        seterr(x, "pb_release: %s", pb_strerror(rc));
        ok = 0;
    }
    return ok ? 0 : -1;
}

static int redis_conn_setup(struct ctx *x)
{
    struct timeval tv = { 5, 0 };
    x->rc = redisConnectWithTimeout(x->o->host, x->o->port, tv);
    if (x->rc == NULL || x->rc->err) {
        seterr(x, "redisConnect(%s:%d): %s", x->o->host, x->o->port,
               x->rc ? x->rc->errstr : "out of memory");
        if (x->rc)
            redisFree(x->rc);
        x->rc = NULL;
        return -1;
    }
    return 0;
}

static void redis_conn_teardown(struct ctx *x)
{
    if (x->rc)
        redisFree(x->rc);
    x->rc = NULL;
}

static int redis_direct_op(struct ctx *x)
{
    redisReply *r = redisCommand(x->rc, "GET %s", x->o->key);
    if (r == NULL) {
        seterr(x, "redisCommand: %s", x->rc->errstr);
        redisReconnect(x->rc);
        return -1;
    }
    int rc = redis_reply_ok(x, r);
    freeReplyObject(r);
    return rc;
}

/* ---------------------------------------------------------------- runner */

static uint64_t read_cpu_ticks(int pid)
{
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return UINT64_MAX;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return UINT64_MAX;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p)
        return UINT64_MAX;
    /* After ") ": field 3 (state) ... field 14 utime, 15 stime. */
    unsigned long long ut = 0, st = 0;
    int field = 2;
    for (char *tok = strtok(p + 1, " "); tok; tok = strtok(NULL, " ")) {
        field++;
        if (field == 14)
            ut = strtoull(tok, NULL, 10);
        else if (field == 15) {
            st = strtoull(tok, NULL, 10);
            break;
        }
    }
    if (field != 15)
        return UINT64_MAX;
    return ut + st;
}

/* Context switches (voluntary + involuntary) of the calling process. */
static uint64_t own_csw(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (uint64_t)ru.ru_nvcsw + (uint64_t)ru.ru_nivcsw;
}

/* CPU time and context switches of one process, from /proc. */
struct proc_cost {
    uint64_t cpu_ns;            /* on-CPU time */
    uint64_t csw;               /* voluntary + nonvoluntary context switches */
};

static int read_file(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    return 0;
}

/* 0 and *out filled, or -1 when the process is gone. */
static int read_proc_cost(int pid, struct proc_cost *out)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/schedstat", pid);
    unsigned long long ns = 0;
    if (read_file(path, buf, sizeof buf) == 0 && sscanf(buf, "%llu", &ns) == 1) {
        out->cpu_ns = ns;
    } else {
        uint64_t ticks = read_cpu_ticks(pid);
        if (ticks == UINT64_MAX)
            return -1;
        out->cpu_ns = ticks * (1000000000u / (uint64_t)sysconf(_SC_CLK_TCK));
    }
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    out->csw = 0;
    if (read_file(path, buf, sizeof buf) == 0) {
        for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
            unsigned long long v;
            if (sscanf(line, "voluntary_ctxt_switches: %llu", &v) == 1 ||
                sscanf(line, "nonvoluntary_ctxt_switches: %llu", &v) == 1)
                out->csw += v;
        }
    }
    return 0;
}

/* Parent pid of a process, or -1. */
static int read_ppid(int pid)
{
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    if (read_file(path, buf, sizeof buf) != 0)
        return -1;
    char *p = strrchr(buf, ')');
    int ppid;
    char state;
    if (!p || sscanf(p + 1, " %c %d", &state, &ppid) != 2)
        return -1;
    return ppid;
}

/* Cost of a server: pid itself and every process whose parent it is (a
 * postmaster's backends).  Backends that come and go between the two samples
 * are missed; in these closed-loop runs the pooled backends live throughout,
 * and for "direct" mode every worker's backend lives from set-up to stop. */
#define MAX_SERVER_PROCS 1024
struct server_cost {
    int n;
    int pid[MAX_SERVER_PROCS];
    struct proc_cost c[MAX_SERVER_PROCS];
};

static void read_server_cost(int pid, struct server_cost *out)
{
    out->n = 0;
    if (read_proc_cost(pid, &out->c[0]) == 0)
        out->pid[out->n++] = pid;
    DIR *d = opendir("/proc");
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) && out->n < MAX_SERVER_PROCS) {
        int child = atoi(de->d_name);
        if (child <= 0 || child == pid || read_ppid(child) != pid)
            continue;
        if (read_proc_cost(child, &out->c[out->n]) == 0)
            out->pid[out->n++] = child;
    }
    closedir(d);
}

/* What the processes alive in both samples spent between them. */
static struct proc_cost server_cost_delta(const struct server_cost *a, const struct server_cost *b)
{
    struct proc_cost d = { 0, 0 };
    for (int i = 0; i < b->n; i++)
        for (int j = 0; j < a->n; j++)
            if (a->pid[j] == b->pid[i]) {
                d.cpu_ns += b->c[i].cpu_ns - a->c[j].cpu_ns;
                d.csw += b->c[i].csw - a->c[j].csw;
                break;
            }
    return d;
}

/* --slow-ms: where a slow operation's time went.  /proc/PID/schedstat is
 * "ns on a CPU, ns runnable but waiting for a CPU, timeslices"; pid 0 is
 * this process. */
struct sched_sample {
    uint64_t run_ns, wait_ns;
};

static struct sched_sample sched_sample(int pid)
{
    struct sched_sample r = { 0, 0 };
    char path[64], buf[128];
    if (pid > 0)
        snprintf(path, sizeof path, "/proc/%d/schedstat", pid);
    else
        snprintf(path, sizeof path, "/proc/self/schedstat");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return r;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n > 0) {
        unsigned long long a = 0, w = 0;
        buf[n] = 0;
        if (sscanf(buf, "%llu %llu", &a, &w) == 2) {
            r.run_ns = a;
            r.wait_ns = w;
        }
    }
    return r;
}

/* One stderr line per operation slower than --slow-ms: its time, and how
 * much of it this worker and the --cpu-pid process (the broker's main
 * thread) spent runnable but not running.  An operation that took 1 s while
 * both were on a CPU or asleep is a lost event; one whose broker waited for
 * a CPU most of it is an oversubscribed machine. */
static void report_slow(const struct opts *o, uint64_t ns, struct sched_sample s0, struct sched_sample b0)
{
    struct sched_sample s1 = sched_sample(0), b1 = { 0, 0 };
    if (o->cpu_pid > 0)
        b1 = sched_sample(o->cpu_pid);
    fprintf(stderr, "SLOW op_ms=%.1f worker_cpu_ms=%.2f worker_runqueue_ms=%.1f", (double)ns / 1e6,
            (double)(s1.run_ns - s0.run_ns) / 1e6, (double)(s1.wait_ns - s0.wait_ns) / 1e6);
    if (o->cpu_pid > 0)
        fprintf(stderr, " proxy_cpu_ms=%.2f proxy_runqueue_ms=%.1f", (double)(b1.run_ns - b0.run_ns) / 1e6,
                (double)(b1.wait_ns - b0.wait_ns) / 1e6);
    fprintf(stderr, "\n");
}

static void child_init(void)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_IGN);
}

static void worker_main(const struct bench_ops *b, const struct opts *o, struct shared *sh, int idx)
{
    struct ctx x = { .o = o };
    struct opts own;            /* with --pools: this worker's pool */
    char pool_name[64];
    if (o->pools > 1 && o->pool) {
        own = *o;
        snprintf(pool_name, sizeof pool_name, "%s%d", o->pool, idx % o->pools);
        own.pool = pool_name;
        x.o = &own;
    }
    child_init();
    if (b->setup(&x) != 0) {
        note_error(sh, x.err);
        atomic_fetch_add(&sh->failed, 1);
        _exit(1);
    }
    struct wstat *mine = calloc(1, sizeof *mine);
    if (!mine) {
        note_error(sh, "out of memory");
        atomic_fetch_add(&sh->failed, 1);
        _exit(1);
    }
    atomic_fetch_add(&sh->ready, 1);
    wait_phase_past(sh, PH_WAIT);

    uint64_t ops = 0, errors = 0, t0 = 0, t1 = 0, cpu0 = 0, csw0 = 0;
    uint32_t last_ph = PH_WAIT;
    unsigned consecutive_errors = 0;
    for (;;) {
        uint32_t ph = atomic_load_explicit(&sh->phase, memory_order_relaxed);
        if (ph != last_ph) {
            if (ph == PH_MEASURE) {
                cpu0 = cpu_now_ns();
                csw0 = own_csw();
            } else if (last_ph == PH_MEASURE) {
                mine->cpu_ns = cpu_now_ns() - cpu0;
                mine->csw = own_csw() - csw0;
            }
            last_ph = ph;
        }
        if (ph >= PH_STOP)
            break;
        struct sched_sample s0 = { 0, 0 }, b0 = { 0, 0 };
        if (o->slow_ms > 0) {
            s0 = sched_sample(0);
            b0 = sched_sample(o->cpu_pid);
        }
        if (b->timed)
            t0 = now_ns();
        int rc = b->op(&x);
        if (b->timed)
            t1 = now_ns();
        if (o->slow_ms > 0 && b->timed && t1 - t0 > (uint64_t)(o->slow_ms * 1e6))
            report_slow(o, t1 - t0, s0, b0);
        if (ph == PH_MEASURE && atomic_load_explicit(&sh->phase, memory_order_relaxed) == PH_MEASURE) {
            if (rc == 0) {
                ops++;
                if (b->timed) {
                    mine->hist[hist_index(t1 - t0)]++;
                    if (t1 - t0 > mine->max_ns)
                        mine->max_ns = t1 - t0;
                }
            } else {
                errors++;
            }
        }
        if (rc != 0) {
            note_error(sh, x.err);
            if (++consecutive_errors > 3)
                usleep(1000);       /* do not spin on a dead backend */
        } else {
            consecutive_errors = 0;
        }
    }
    b->teardown(&x);
    mine->ops = ops;
    mine->errors = errors;
    memcpy(&sh->w[idx], mine, sizeof *mine);
    atomic_fetch_add(&sh->done, 1);
    _exit(0);
}

/* Wait for all children; SIGKILL what is left after timeout_ms. */
static void reap_all(pid_t *pids, int n, unsigned timeout_ms)
{
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000u;
    int left = 0;
    for (int i = 0; i < n; i++)
        if (pids[i] > 0)
            left++;
    while (left > 0) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p > 0) {
            for (int i = 0; i < n; i++)
                if (pids[i] == p) {
                    pids[i] = 0;
                    left--;
                }
            continue;
        }
        if (p < 0 && errno == ECHILD)
            break;
        if (now_ns() > deadline) {
            fprintf(stderr, "bench: %d worker(s) did not stop in %u ms; killing them\n", left, timeout_ms);
            for (int i = 0; i < n; i++)
                if (pids[i] > 0)
                    kill(pids[i], SIGKILL);
            deadline = UINT64_MAX;
        }
        sleep_ms(5);
    }
}

static int run_workers(const struct bench_ops *b, const struct opts *o)
{
    int n = o->workers;
    size_t size = sizeof(struct shared) + (size_t)n * sizeof(struct wstat);
    struct shared *sh = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("bench: mmap");
        return 1;
    }
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    if (!pids)
        return 1;
    fflush(NULL);
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) {
            perror("bench: fork");
            set_phase(sh, PH_STOP);
            reap_all(pids, i, 30000);
            return 1;
        }
        if (p == 0)
            worker_main(b, o, sh, i);
        pids[i] = p;
    }

    /* Barrier: every worker set up (or failed). */
    uint64_t deadline = now_ns() + 120ull * 1000000000u;
    while (atomic_load(&sh->ready) + atomic_load(&sh->failed) < (uint32_t)n) {
        if (now_ns() > deadline) {
            fprintf(stderr, "bench: only %u of %d workers ready after 120 s\n", atomic_load(&sh->ready), n);
            break;
        }
        sleep_ms(2);
    }
    uint32_t ready = atomic_load(&sh->ready), failed = atomic_load(&sh->failed);
    if (failed)
        fprintf(stderr, "bench: %u of %d workers failed to set up: %s\n", failed, n, sh->errmsg);
    if (ready == 0) {
        set_phase(sh, PH_STOP);
        reap_all(pids, n, 30000);
        printf("RESULT bench=%s mode=%s workers=%d ok=0 setup_failed=%u\n", o->cmd, o->mode, n, failed);
        return 1;
    }

    set_phase(sh, PH_WARMUP);
    sleep_until(now_ns() + (uint64_t)(o->warmup * 1e9));
    static struct server_cost srv0, srv1;
    struct proc_cost px0 = { 0, 0 }, px1 = { 0, 0 };
    int px_ok = o->cpu_pid > 0 && read_proc_cost(o->cpu_pid, &px0) == 0;
    if (o->server_pid > 0)
        read_server_cost(o->server_pid, &srv0);
    uint64_t cpu0 = o->cpu_pid > 0 ? read_cpu_ticks(o->cpu_pid) : 0;
    uint64_t t0 = now_ns();
    set_phase(sh, PH_MEASURE);
    sleep_until(t0 + (uint64_t)(o->seconds * 1e9));
    uint64_t t1 = now_ns();
    set_phase(sh, PH_STOP);
    uint64_t cpu1 = o->cpu_pid > 0 ? read_cpu_ticks(o->cpu_pid) : 0;
    px_ok = px_ok && read_proc_cost(o->cpu_pid, &px1) == 0;
    if (o->server_pid > 0)
        read_server_cost(o->server_pid, &srv1);
    reap_all(pids, n, 30000);

    uint64_t *hist = calloc(HIST_BUCKETS, sizeof *hist);
    uint64_t ops = 0, errors = 0, wcpu = 0, wcsw = 0, max_ns = 0;
    for (int i = 0; i < n; i++) {
        ops += sh->w[i].ops;
        wcpu += sh->w[i].cpu_ns;
        wcsw += sh->w[i].csw;
        errors += sh->w[i].errors;
        if (sh->w[i].max_ns > max_ns)
            max_ns = sh->w[i].max_ns;
        for (unsigned k = 0; k < HIST_BUCKETS; k++)
            hist[k] += sh->w[i].hist[k];
    }
    uint32_t done = atomic_load(&sh->done);
    double secs = (double)(t1 - t0) / 1e9;
    double ops_s = (double)ops / secs;

    printf("RESULT bench=%s mode=%s workers=%d ok=%d seconds=%.3f ops=%" PRIu64 " errors=%" PRIu64
           " ops_per_s=%.1f",
           o->cmd, o->mode, n, done == ready && ops > 0, secs, ops, errors, ops_s);
    if (o->prepared)
        printf(" prepared=1");
    if (failed)
        printf(" setup_failed=%u", failed);
    /* CPU the workers themselves spent per op (client library, spinning,
     * syscalls), from CLOCK_PROCESS_CPUTIME_ID: immune to descheduling. */
    if (ops > 0)
        printf(" worker_cpu_ns_per_op=%.1f worker_cs_per_op=%.3f", (double)wcpu / (double)ops,
               (double)wcsw / (double)ops);
    if (ops > 0 && px_ok)
        printf(" cpu_us_per_op=%.2f cpu_cs_per_op=%.3f", (double)(px1.cpu_ns - px0.cpu_ns) / 1e3 / (double)ops,
               (double)(px1.csw - px0.csw) / (double)ops);
    if (ops > 0 && o->server_pid > 0) {
        struct proc_cost d = server_cost_delta(&srv0, &srv1);
        printf(" server_us_per_op=%.2f server_cs_per_op=%.3f server_procs=%d", (double)d.cpu_ns / 1e3 / (double)ops,
               (double)d.csw / (double)ops, srv1.n);
    }
    if (b->timed) {
        printf(" p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f",
               hist_percentile(hist, ops, 0.50) / 1e3, hist_percentile(hist, ops, 0.90) / 1e3,
               hist_percentile(hist, ops, 0.99) / 1e3, hist_percentile(hist, ops, 0.999) / 1e3,
               (double)max_ns / 1e3);
    } else if (ops > 0) {
        /* lease: wall-clock ns per cycle (all workers together), and the
         * average cycle as one worker sees it. */
        printf(" ns_per_cycle=%.1f ns_per_cycle_per_worker=%.1f",
               (double)(t1 - t0) / (double)ops, (double)(t1 - t0) * ready / (double)ops);
    }
    if (o->cpu_pid > 0) {
        if (cpu0 == UINT64_MAX || cpu1 == UINT64_MAX) {
            printf(" cpu_s=NA");
        } else {
            double cpu = (double)(cpu1 - cpu0) / (double)sysconf(_SC_CLK_TCK);
            printf(" cpu_pid=%d cpu_s=%.2f cpu_util=%.3f cpu_s_per_mop=%.2f", o->cpu_pid, cpu, cpu / secs,
                   ops ? cpu / (double)ops * 1e6 : 0.0);
        }
    }
    printf("\n");
    fflush(stdout);
    if (errors || sh->errmsg[0])
        fprintf(stderr, "bench: %s %s %d workers: %" PRIu64 " errors; first: %s\n", o->cmd, o->mode, n, errors,
                sh->errmsg);
    free(hist);
    free(pids);
    munmap(sh, size);
    return 0;
}

/* ---------------------------------------------------------------- attach */

/* A "Key:   123 kB" line of /proc/<pid>/status, in kB; -1 if absent. */
static long status_kb(int pid, const char *key)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    long v = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, kl) == 0 && line[kl] == ':') {
            v = strtol(line + kl + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

static int count_fds(int pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static int cmd_attach(const struct opts *o)
{
    int n = o->workers;
    if (o->broker_pid <= 0 || !o->shm) {
        fprintf(stderr, "bench attach: --broker-pid and --shm are required\n");
        return 2;
    }
    struct shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("bench: mmap");
        return 1;
    }
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    if (!pids)
        return 1;
    long rss_before = status_kb(o->broker_pid, "VmRSS");
    int fds_before = count_fds(o->broker_pid);
    uint64_t t0 = now_ns();
    fflush(NULL);
    int forked = 0;
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) {
            perror("bench: fork");
            break;
        }
        if (p == 0) {
            pb_client *c;
            child_init();
            int rc = pb_connect(o->socket, &c);
            if (rc != PB_OK) {
                char msg[200];
                snprintf(msg, sizeof msg, "pb_connect: %s", pb_strerror(rc));
                note_error(sh, msg);
                atomic_fetch_add(&sh->failed, 1);
                _exit(1);
            }
            atomic_fetch_add(&sh->ready, 1);
            wait_phase_past(sh, PH_WAIT);
            pb_disconnect(c);
            _exit(0);
        }
        pids[i] = p;
        forked++;
    }
    uint64_t deadline = now_ns() + 120ull * 1000000000u;
    while (atomic_load(&sh->ready) + atomic_load(&sh->failed) < (uint32_t)forked && now_ns() < deadline)
        sleep_ms(5);
    double attach_s = (double)(now_ns() - t0) / 1e9;
    sleep_ms((unsigned)(o->settle * 1000));

    uint32_t ready = atomic_load(&sh->ready), failed = atomic_load(&sh->failed);
    long rss = status_kb(o->broker_pid, "VmRSS");
    long hwm = status_kb(o->broker_pid, "VmHWM");
    long anon = status_kb(o->broker_pid, "RssAnon");
    long file = status_kb(o->broker_pid, "RssFile");
    long shmem = status_kb(o->broker_pid, "RssShmem");
    int fds = count_fds(o->broker_pid);
    char path[300];
    struct stat st;
    snprintf(path, sizeof path, "/dev/shm/%s", o->shm[0] == '/' ? o->shm + 1 : o->shm);
    long long shm_bytes = -1, shm_alloc = -1;
    if (stat(path, &st) == 0) {
        shm_bytes = (long long)st.st_size;
        shm_alloc = (long long)st.st_blocks * 512;
    }

    set_phase(sh, PH_STOP);
    uint64_t t1 = now_ns();
    reap_all(pids, n, 60000);
    double detach_s = (double)(now_ns() - t1) / 1e9;

    printf("RESULT bench=attach mode=poolbroker workers=%d ok=%d attached=%u failed=%u attach_s=%.2f detach_s=%.2f"
           " rss_before_kb=%ld rss_kb=%ld hwm_kb=%ld rss_anon_kb=%ld rss_file_kb=%ld rss_shmem_kb=%ld"
           " shm_bytes=%lld shm_alloc_bytes=%lld broker_fds_before=%d broker_fds=%d\n",
           n, ready == (uint32_t)n, ready, failed, attach_s, detach_s, rss_before, rss, hwm, anon, file, shmem,
           shm_bytes, shm_alloc, fds_before, fds);
    fflush(stdout);
    if (failed)
        fprintf(stderr, "bench: attach: %u of %d failed; first: %s\n", failed, n, sh->errmsg);
    free(pids);
    munmap(sh, sizeof *sh);
    return ready == (uint32_t)n ? 0 : 1;
}

/* ------------------------------------------------------------------ main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: bench lease  --workers N --seconds S --socket PATH [--pool main]\n"
            "       bench pg     --mode poolbroker|pgbouncer|direct|connect --workers N --seconds S [--pools N] [--slow-ms MS]\n"
            "                    [--socket PATH] [--pool main] [--conninfo STR] [--query SQL] [--prepared]\n"
            "                    [--cpu-pid PID] [--server-pid PID]\n"
            "       bench redis  --mode poolbroker|twemproxy|direct --workers N --seconds S\n"
            "                    [--socket PATH] [--pool cache] [--host H] [--port N] [--key K] [--cpu-pid PID]\n"
            "                    [--server-pid PID]\n"
            "       bench attach --workers N --socket PATH --broker-pid PID --shm NAME [--settle S]\n"
            "common: [--warmup S] (default 0.5)\n"
            "prints one line: RESULT bench=... mode=... workers=... key=value ...\n");
}

int main(int argc, char **argv)
{
    struct opts o = {
        .workers = 1, .seconds = 3, .warmup = 0.5, .settle = 1.0, .query = "SELECT 1",
        .host = "127.0.0.1", .port = 6379, .key = "bench:key",
    };
    if (argc < 2 || argv[1][0] == '-') {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    o.cmd = argv[1];
    static const struct option lo[] = {
        { "mode", required_argument, NULL, 'm' },    { "workers", required_argument, NULL, 'w' },
        { "seconds", required_argument, NULL, 's' }, { "warmup", required_argument, NULL, 'W' },
        { "socket", required_argument, NULL, 'S' },  { "pool", required_argument, NULL, 'P' },
        { "pools", required_argument, NULL, 'N' },  { "slow-ms", required_argument, NULL, 'L' },
        { "conninfo", required_argument, NULL, 'c' }, { "query", required_argument, NULL, 'q' },
        { "prepared", no_argument, NULL, 'R' },
        { "host", required_argument, NULL, 'H' },    { "port", required_argument, NULL, 'p' },
        { "key", required_argument, NULL, 'k' },     { "cpu-pid", required_argument, NULL, 'C' },
        { "server-pid", required_argument, NULL, 'V' },
        { "broker-pid", required_argument, NULL, 'B' }, { "shm", required_argument, NULL, 'n' },
        { "settle", required_argument, NULL, 'T' },  { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    optind = 2;
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (ch) {
        case 'm': o.mode = optarg; break;
        case 'w': o.workers = atoi(optarg); break;
        case 's': o.seconds = atof(optarg); break;
        case 'W': o.warmup = atof(optarg); break;
        case 'S': o.socket = optarg; break;
        case 'P': o.pool = optarg; break;
        case 'N': o.pools = atoi(optarg); break;
        case 'L': o.slow_ms = atof(optarg); break;
        case 'c': o.conninfo = optarg; break;
        case 'q': o.query = optarg; break;
        case 'R': o.prepared = 1; break;
        case 'H': o.host = optarg; break;
        case 'p': o.port = atoi(optarg); break;
        case 'k': o.key = optarg; break;
        case 'C': o.cpu_pid = atoi(optarg); break;
        case 'V': o.server_pid = atoi(optarg); break;
        case 'B': o.broker_pid = atoi(optarg); break;
        case 'n': o.shm = optarg; break;
        case 'T': o.settle = atof(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || o.workers < 1 || o.workers > 100000 || o.seconds <= 0 || o.warmup < 0) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    static const struct bench_ops lease = { pb_setup, lease_op, pb_teardown, 0 };
    static const struct bench_ops pg_pb = { pb_setup, pg_pb_op, pb_teardown, 1 };
    static const struct bench_ops pg_persistent = { pg_conn_setup, pg_persistent_op, pg_conn_teardown, 1 };
    static const struct bench_ops pg_connect = { pg_connect_setup, pg_connect_op, noop_teardown, 1 };
    static const struct bench_ops redis_pb = { pb_setup, redis_pb_op, pb_teardown, 1 };
    static const struct bench_ops redis_direct = { redis_conn_setup, redis_direct_op, redis_conn_teardown, 1 };

    if (strcmp(o.cmd, "lease") == 0) {
        o.mode = "poolbroker";
        if (!o.pool)
            o.pool = "main";
        return run_workers(&lease, &o);
    }
    if (strcmp(o.cmd, "pg") == 0) {
        if (!o.mode)
            o.mode = "poolbroker";
        if (!o.pool)
            o.pool = strcmp(o.mode, "poolbroker-txn") == 0 ? "tmain" : "main";
        if (strcmp(o.mode, "poolbroker") == 0 || strcmp(o.mode, "poolbroker-txn") == 0)
            return run_workers(&pg_pb, &o);
        if (o.prepared && strcmp(o.mode, "direct") != 0) {
            fprintf(stderr, "bench pg --prepared: modes poolbroker, poolbroker-txn and direct only\n");
            return 2;
        }
        if (!o.conninfo) {
            fprintf(stderr, "bench pg --mode %s needs --conninfo\n", o.mode);
            return 2;
        }
        if (strcmp(o.mode, "pgbouncer") == 0 || strcmp(o.mode, "direct") == 0)
            return run_workers(&pg_persistent, &o);
        if (strcmp(o.mode, "connect") == 0)
            return run_workers(&pg_connect, &o);
    } else if (strcmp(o.cmd, "redis") == 0) {
        if (!o.mode)
            o.mode = "poolbroker";
        if (!o.pool)
            o.pool = strcmp(o.mode, "poolbroker-txn") == 0 ? "tcache" : "cache";
        if (strcmp(o.mode, "poolbroker") == 0 || strcmp(o.mode, "poolbroker-txn") == 0)
            return run_workers(&redis_pb, &o);
        if (strcmp(o.mode, "twemproxy") == 0 || strcmp(o.mode, "direct") == 0)
            return run_workers(&redis_direct, &o);
    } else if (strcmp(o.cmd, "attach") == 0) {
        return cmd_attach(&o);
    } else {
        fprintf(stderr, "bench: unknown subcommand '%s'\n", o.cmd);
        usage(stderr);
        return 2;
    }
    fprintf(stderr, "bench %s: unknown --mode '%s'\n", o.cmd, o.mode ? o.mode : "");
    return 2;
}
