/*
 * worker.c — one soak workload process.
 *
 *   soak worker --id N --inc I --dir DIR --socket PATH --until-ms T --seed S
 *               [--acquire-timeout-ms 3000] [--command-timeout-ms 5000]
 *
 * Until wall-clock time T (ms) it leases from pools "pg" and "redis" and runs,
 * chosen at random (seeded by S, N and I): money transfers between accounts
 * (one BEGIN..COMMIT string, rows updated in id order so no deadlock), logged
 * inserts, inserts left uncommitted (the lease released inside an open or a
 * failed transaction: the broker must roll back), SELECTs of 2 MB, pipelines
 * of five inserts, Redis INCRs and pipelines of eight INCRs.
 *
 * What it observes goes to DIR/wNN.I.log (one write(2) per line, so a SIGKILL
 * loses at most the line being written) and DIR/wNN.I.stats (struct
 * soak_stats, mapped shared):
 *   P id        an insert of id is about to be sent (outcome unknown yet)
 *   C id        its commit was acknowledged: the row must exist afterwards
 *   F id        the server refused it: the row must not exist
 *   U id        inserted inside a transaction that is never committed
 *   E t op code an error (t wall ms): a PB_E* name, sql:SQLSTATE, redis:WORD, bad:what
 *   L t op us   a call longer than its timeout + 1 s
 * A call that spans a SIGSTOP of this process (seen by a SIGCONT handler) is
 * counted but not timed.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <poolbroker.h>

#include "soak.h"

static volatile sig_atomic_t g_conts;   /* SIGCONTs seen */
static volatile sig_atomic_t g_stop;    /* SIGTERM/SIGINT seen */

static void on_cont(int sig) { (void)sig; g_conts++; }
static void on_term(int sig) { (void)sig; g_stop = 1; }

struct worker {
    int wid, inc;
    int logfd;
    struct soak_stats *st;
    pb_client *c;
    uint64_t rng;
    int64_t seq;                /* insert ids: wid * 1e12 + inc * 1e9 + seq */
    uint64_t limit_us[OP_N];    /* timeout + 1 s per operation type */
};

static uint64_t rnd(struct worker *w)
{
    /* xorshift64* */
    w->rng ^= w->rng >> 12;
    w->rng ^= w->rng << 25;
    w->rng ^= w->rng >> 27;
    return w->rng * 2685821657736338717ull;
}

static void logline(struct worker *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logline(struct worker *w, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = (int)sizeof buf - 1;
    for (int tries = 0; tries < 3; tries++) {
        ssize_t k = write(w->logfd, buf, (size_t)n);
        if (k == n || (k < 0 && errno != EINTR))
            return;
    }
}

/* A call of type op started at t0 (with g_conts == conts0) has ended. */
static void timed(struct worker *w, enum soak_op op, uint64_t t0, sig_atomic_t conts0, int ok)
{
    uint64_t d = soak_mono_us() - t0;
    if (ok) {
        w->st->ok[op]++;
        w->st->last_ok_ms = soak_wall_ms();
    } else {
        w->st->err[op]++;
    }
    if (g_conts != conts0) {
        w->st->stopped[op]++;
        return;
    }
    if (d > w->st->worst_us[op])
        w->st->worst_us[op] = d;
    if (d > w->limit_us[op]) {
        w->st->over_limit[op]++;
        logline(w, "L %" PRId64 " %s %" PRIu64 "\n", soak_wall_ms(), soak_op_name[op], d);
    }
}

static void error_event(struct worker *w, enum soak_op op, const char *code)
{
    logline(w, "E %" PRId64 " %s %s\n", soak_wall_ms(), soak_op_name[op], code);
}

static void pb_error(struct worker *w, enum soak_op op, int rc)
{
    error_event(w, op, soak_code_name(rc));
}

static void sql_error(struct worker *w, enum soak_op op, const pb_result *r)
{
    char code[32];
    const char *s = pb_error_field(r, 'C');
    snprintf(code, sizeof code, "sql:%s", s ? s : "?????");
    error_event(w, op, code);
}

static void redis_error(struct worker *w, enum soak_op op, const redisReply *r)
{
    char code[40] = "redis:";
    size_t n = 0;
    if (r->str)
        while (n < r->len && n < 24 && r->str[n] != ' ')
            n++;
    memcpy(code + 6, r->str ? r->str : "", n);
    code[6 + n] = '\0';
    error_event(w, op, code);
}

/* Lease from pool; NULL on failure (counted, logged, backed off a little). */
static pb_lease *lease(struct worker *w, const char *pool)
{
    pb_lease *l = NULL;
    sig_atomic_t c0 = g_conts;
    uint64_t t0 = soak_mono_us();
    int rc = pb_acquire(w->c, pool, -1, &l);
    timed(w, OP_ACQUIRE, t0, c0, rc == PB_OK);
    if (rc == PB_OK)
        return l;
    pb_error(w, OP_ACQUIRE, rc);
    /* A broker being restarted or a backend known down fail at once: do not spin. */
    if (rc == PB_EBROKER || rc == PB_EBACKEND || rc == PB_ESHUTDOWN || rc == PB_ENOPOOL)
        soak_sleep_ms(rc == PB_EBROKER ? 100 : 20);
    return NULL;
}

static void unlease(struct worker *w, pb_lease *l)
{
    sig_atomic_t c0 = g_conts;
    uint64_t t0 = soak_mono_us();
    int rc = pb_release(l);
    /* PB_ESTALE after a broken connection or a broker restart is expected. */
    timed(w, OP_RELEASE, t0, c0, rc == PB_OK || rc == PB_ESTALE);
    if (rc != PB_OK)
        pb_error(w, OP_RELEASE, rc);
}

/* Run sql on l as operation op; 1 when the server answered without error. */
static int pg_run(struct worker *w, pb_lease *l, enum soak_op op, const char *sql, pb_result **keep)
{
    pb_result *r = NULL;
    sig_atomic_t c0 = g_conts;
    uint64_t t0 = soak_mono_us();
    int rc = pb_pg_exec(l, sql, &r);
    int ok = rc == PB_OK && r && pb_result_status(r) != PB_RES_ERROR;
    timed(w, op, t0, c0, ok);
    if (rc != PB_OK)
        pb_error(w, op, rc);
    else if (!ok && r)
        sql_error(w, op, r);
    if (keep && ok)
        *keep = r;
    else
        pb_result_free(r);
    return rc == PB_OK ? (ok ? 1 : 0) : -1;   /* -1: no answer */
}

static void op_transfer(struct worker *w)
{
    int a = (int)(rnd(w) % SOAK_NACCOUNTS), b = (int)(rnd(w) % (SOAK_NACCOUNTS - 1));
    if (b >= a)
        b++;
    int amount = 1 + (int)(rnd(w) % 50);
    /* From a to b; rows updated in id order. */
    int lo = a < b ? a : b, hi = a < b ? b : a;
    int dlo = lo == a ? -amount : amount;
    char sql[300];
    snprintf(sql, sizeof sql,
             "BEGIN; UPDATE soak_accounts SET balance = balance + (%d) WHERE id = %d; "
             "UPDATE soak_accounts SET balance = balance + (%d) WHERE id = %d; COMMIT",
             dlo, lo, -dlo, hi);
    pb_lease *l = lease(w, "pg");
    if (!l)
        return;
    pg_run(w, l, OP_TRANSFER, sql, NULL);
    unlease(w, l);
}

static int64_t next_id(struct worker *w)
{
    return (int64_t)w->wid * 1000000000000LL + (int64_t)w->inc * 1000000000LL + ++w->seq;
}

static void op_insert(struct worker *w)
{
    pb_lease *l = lease(w, "pg");
    if (!l)
        return;
    int64_t id = next_id(w);
    char sql[160];
    snprintf(sql, sizeof sql, "INSERT INTO soak_log (id, worker) VALUES (%" PRId64 ", %d)", id, w->wid);
    logline(w, "P %" PRId64 "\n", id);
    int r = pg_run(w, l, OP_INSERT, sql, NULL);
    if (r == 1)
        logline(w, "C %" PRId64 "\n", id);
    else if (r == 0)
        logline(w, "F %" PRId64 "\n", id);
    unlease(w, l);
}

/* An insert inside a transaction left open (or failed) at release. */
static void op_uncommitted(struct worker *w)
{
    pb_lease *l = lease(w, "pg");
    if (!l)
        return;
    int64_t id = next_id(w);
    char sql[200];
    snprintf(sql, sizeof sql, "BEGIN; INSERT INTO soak_log (id, worker) VALUES (%" PRId64 ", %d)%s", id, w->wid,
             rnd(w) % 2 ? "; SELECT 1/0" : "");
    logline(w, "U %" PRId64 "\n", id);
    sig_atomic_t c0 = g_conts;
    uint64_t t0 = soak_mono_us();
    pb_result *r = NULL;
    int rc = pb_pg_exec(l, sql, &r);
    /* Both forms answer: "INSERT 0 1" (open) or division_by_zero (failed). */
    timed(w, OP_UNCOMMITTED, t0, c0, rc == PB_OK);
    if (rc != PB_OK)
        pb_error(w, OP_UNCOMMITTED, rc);
    else if (pb_result_status(r) == PB_RES_ERROR && strcmp(pb_error_field(r, 'C') ? pb_error_field(r, 'C') : "", "22012"))
        sql_error(w, OP_UNCOMMITTED, r);
    pb_result_free(r);
    unlease(w, l);
}

static void op_big(struct worker *w)
{
    pb_lease *l = lease(w, "pg");
    if (!l)
        return;
    pb_result *r = NULL;
    char sql[80];
    snprintf(sql, sizeof sql, "SELECT repeat('x', %d)", SOAK_BIG_BYTES);
    if (pg_run(w, l, OP_BIG, sql, &r) == 1) {
        if (pb_ntuples(r) != 1 || pb_getlength(r, 0, 0) != SOAK_BIG_BYTES) {
            error_event(w, OP_BIG, "bad:big_result_length");
            w->st->ok[OP_BIG]--;
            w->st->err[OP_BIG]++;
        }
        pb_result_free(r);
    }
    unlease(w, l);
}

static void op_pg_pipeline(struct worker *w)
{
    enum { N = 5 };
    pb_lease *l = lease(w, "pg");
    if (!l)
        return;
    int64_t ids[N];
    int sent = 0;
    for (int i = 0; i < N; i++) {
        char idbuf[24], wbuf[12];
        ids[i] = next_id(w);
        snprintf(idbuf, sizeof idbuf, "%" PRId64, ids[i]);
        snprintf(wbuf, sizeof wbuf, "%d", w->wid);
        const char *vals[2] = { idbuf, wbuf };
        logline(w, "P %" PRId64 "\n", ids[i]);
        int rc = pb_pg_send_params(l, "INSERT INTO soak_log (id, worker) VALUES ($1, $2)", 2, NULL, vals,
                                   NULL, NULL, 0);
        if (rc != PB_OK) {
            pb_error(w, OP_PG_PIPE, rc);
            w->st->err[OP_PG_PIPE]++;
            break;
        }
        sent++;
    }
    /* sent results, then the end (NULL); bounded. */
    for (int i = 0; i <= sent && sent > 0; i++) {
        pb_result *r = NULL;
        sig_atomic_t c0 = g_conts;
        uint64_t t0 = soak_mono_us();
        int rc = pb_pg_get_result(l, &r);
        int ok = rc == PB_OK && (i == sent ? r == NULL : r && pb_result_status(r) == PB_RES_COMMAND_OK);
        timed(w, OP_PG_PIPE, t0, c0, ok);
        if (rc != PB_OK) {
            pb_error(w, OP_PG_PIPE, rc);
            break;
        }
        if (i == sent) {
            if (r) {
                error_event(w, OP_PG_PIPE, "bad:extra_pipeline_result");
                pb_result_free(r);
            }
            break;
        }
        if (!r) {
            error_event(w, OP_PG_PIPE, "bad:missing_pipeline_result");
            break;
        }
        if (pb_result_status(r) == PB_RES_COMMAND_OK) {
            logline(w, "C %" PRId64 "\n", ids[i]);
        } else {
            sql_error(w, OP_PG_PIPE, r);
            if (pb_result_status(r) == PB_RES_ERROR)
                logline(w, "F %" PRId64 "\n", ids[i]);
        }
        pb_result_free(r);
    }
    unlease(w, l);
}

/* Account for one INCR of key k: reply r (NULL: none came). */
static void incr_outcome(struct worker *w, enum soak_op op, int k, int rc, redisReply *r)
{
    struct soak_stats *st = w->st;
    /* The outcome is recorded before pending drops, so a SIGKILL in between
     * can only make the checker's window wider, never wrong. */
    if (rc == PB_OK && r && r->type == REDIS_REPLY_INTEGER) {
        st->incr_acked[k]++;
    } else if (rc == PB_OK && r) {
        st->incr_refused[k]++;
        if (r->type == REDIS_REPLY_ERROR)
            redis_error(w, op, r);
        else
            error_event(w, op, "bad:incr_reply_type");
    } else {
        st->incr_unknown[k]++;
        pb_error(w, op, rc);
    }
    st->incr_pending[k]--;
}

static void op_incr(struct worker *w)
{
    pb_lease *l = lease(w, "redis");
    if (!l)
        return;
    int k = (int)(rnd(w) % SOAK_NKEYS);
    redisReply *r = NULL;
    w->st->incr_pending[k]++;
    sig_atomic_t c0 = g_conts;
    uint64_t t0 = soak_mono_us();
    int rc = pb_redis_command(l, &r, "INCR soak:ctr:%d", k);
    timed(w, OP_INCR, t0, c0, rc == PB_OK && r && r->type == REDIS_REPLY_INTEGER);
    incr_outcome(w, OP_INCR, k, rc, r);
    if (r)
        freeReplyObject(r);
    unlease(w, l);
}

static void op_redis_pipeline(struct worker *w)
{
    enum { N = 8 };
    pb_lease *l = lease(w, "redis");
    if (!l)
        return;
    int keys[N], sent = 0;
    for (int i = 0; i < N; i++) {
        keys[i] = (int)(rnd(w) % SOAK_NKEYS);
        w->st->incr_pending[keys[i]]++;
        int rc = pb_redis_append_command(l, "INCR soak:ctr:%d", keys[i]);
        if (rc != PB_OK) {
            w->st->incr_pending[keys[i]]--;   /* never sent */
            pb_error(w, OP_REDIS_PIPE, rc);
            break;
        }
        sent++;
    }
    int i = 0;
    for (; i < sent; i++) {
        redisReply *r = NULL;
        sig_atomic_t c0 = g_conts;
        uint64_t t0 = soak_mono_us();
        int rc = pb_redis_get_reply(l, &r);
        timed(w, OP_REDIS_PIPE, t0, c0, rc == PB_OK && r && r->type == REDIS_REPLY_INTEGER);
        incr_outcome(w, OP_REDIS_PIPE, keys[i], rc, r);
        if (r)
            freeReplyObject(r);
        if (rc != PB_OK) {
            i++;
            break;
        }
    }
    /* Replies never read: their outcome is unknown. */
    for (; i < sent; i++) {
        w->st->incr_unknown[keys[i]]++;
        w->st->incr_pending[keys[i]]--;
    }
    unlease(w, l);
}

static struct soak_stats *map_stats(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return NULL;
    if (ftruncate(fd, sizeof(struct soak_stats)) != 0) {
        close(fd);
        return NULL;
    }
    void *p = mmap(NULL, sizeof(struct soak_stats), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

int soak_worker_main(int argc, char **argv)
{
    struct worker w = { .wid = -1 };
    const char *dir = NULL, *sock = NULL;
    int64_t until = 0;
    uint64_t seed = 1;
    long acq_to = 3000, cmd_to = 5000;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--id")) w.wid = atoi(v);
        else if (!strcmp(k, "--inc")) w.inc = atoi(v);
        else if (!strcmp(k, "--dir")) dir = v;
        else if (!strcmp(k, "--socket")) sock = v;
        else if (!strcmp(k, "--until-ms")) until = strtoll(v, NULL, 10);
        else if (!strcmp(k, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--acquire-timeout-ms")) acq_to = atol(v);
        else if (!strcmp(k, "--command-timeout-ms")) cmd_to = atol(v);
        else { fprintf(stderr, "soak worker: unknown option %s\n", k); return 2; }
    }
    if (w.wid < 0 || w.wid > 99 || w.inc < 0 || w.inc > 999 || !dir || !sock || until <= 0) {
        fprintf(stderr, "soak worker: --id 0..99 --inc 0..999 --dir --socket --until-ms are required\n");
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/w%02d.%d.log", dir, w.wid, w.inc);
    w.logfd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    snprintf(path, sizeof path, "%s/w%02d.%d.stats", dir, w.wid, w.inc);
    w.st = map_stats(path);
    if (w.logfd < 0 || !w.st) {
        fprintf(stderr, "soak worker %d: cannot create its files in %s: %s\n", w.wid, dir, strerror(errno));
        return 1;
    }
    w.st->wid = w.wid;
    w.st->inc = w.inc;
    w.st->pid = (int32_t)getpid();
    w.st->start_ms = soak_wall_ms();
    w.st->magic = SOAK_MAGIC;
    for (int i = 0; i < OP_N; i++)
        w.limit_us[i] = (uint64_t)(cmd_to + 1000) * 1000u;
    w.limit_us[OP_ACQUIRE] = (uint64_t)(acq_to + 1000) * 1000u;
    w.limit_us[OP_RELEASE] = 1000000u;   /* never waits for the backend */
    w.rng = seed * 0x9E3779B97F4A7C15ull ^ ((uint64_t)w.wid << 32) ^ (uint64_t)w.inc << 16 ^ 0x5eed;
    if (!w.rng)
        w.rng = 1;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_cont;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGCONT, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    /* Attach; the broker may be down right now (restart): retry until the end. */
    int rc = PB_EBROKER;
    while (!g_stop && soak_wall_ms() < until) {
        rc = pb_connect(sock, &w.c);
        if (rc == PB_OK)
            break;
        error_event(&w, OP_ACQUIRE, soak_code_name(rc));
        soak_sleep_ms(200);
    }
    if (rc != PB_OK)
        return 1;

    while (!g_stop && soak_wall_ms() < until) {
        unsigned r = (unsigned)(rnd(&w) % 100);
        if (r < 30) op_transfer(&w);
        else if (r < 50) op_insert(&w);
        else if (r < 55) op_uncommitted(&w);
        else if (r < 58) op_big(&w);
        else if (r < 65) op_pg_pipeline(&w);
        else if (r < 90) op_incr(&w);
        else op_redis_pipeline(&w);
    }
    pb_disconnect(w.c);
    w.st->clean_exit = 1;
    msync(w.st, sizeof *w.st, MS_SYNC);
    close(w.logfd);
    return 0;
}
