/*
 * check.c — the soak's invariant checks and its one-screen summary.
 *
 *   soak check --dir DIR --conninfo STR --redis-port N --shmstat FILE
 *              [--workers 12] [--seed S] [--grace-ms 2000]
 *
 * Runs after the workers have stopped.  Reads what the workers recorded
 * (DIR/workers/wNN.I.log and .stats, see worker.c), the fault schedule as it
 * was applied (DIR/phases: "T_MS KIND [detail]" per line, the first being
 * "start"), the sampler's results (DIR/sampler.result, .events), the workers'
 * exit statuses (DIR/exits: "WID INC STATUS") and a `shmstat --json` taken
 * after the workers stopped; queries PostgreSQL and Redis directly (not
 * through the broker); prints the summary.  Exit status 0 when every
 * invariant held, 1 when one failed, 2 when the check itself could not run.
 */
#include <dirent.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#include "soak.h"

/* --------------------------------------------------------------- id sets */

struct ids {
    int64_t *v;
    size_t n, cap;
};

static int ids_add(struct ids *s, int64_t id)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 4096;
        int64_t *v = realloc(s->v, cap * sizeof *v);
        if (!v)
            return -1;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = id;
    return 0;
}

static int cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void ids_sort(struct ids *s)
{
    if (s->n)
        qsort(s->v, s->n, sizeof *s->v, cmp64);
    size_t o = 0;
    for (size_t i = 0; i < s->n; i++)
        if (o == 0 || s->v[o - 1] != s->v[i])
            s->v[o++] = s->v[i];
    s->n = o;
}

static int ids_has(const struct ids *s, int64_t id)
{
    return s->n && bsearch(&id, s->v, s->n, sizeof *s->v, cmp64) != NULL;
}

/* ------------------------------------------------------------ fault phases */

#define MAXPHASES 512
#define MAXKINDS  24
#define MAXCODES  48

struct phase { int64_t t; int kind; };
static struct phase g_ph[MAXPHASES];
static int g_nph;
static char g_kind[MAXKINDS][64];
static int g_nkind, g_kind_count[MAXKINDS];
static int64_t g_start_ms, g_broker_restart_ms = -1, g_end_ms;

/* errors per (phase kind, code) */
static char g_code[MAXCODES][64];
static int g_ncode;
static uint64_t g_err[MAXKINDS][MAXCODES], g_err_other;

static int kind_index(const char *k)
{
    for (int i = 0; i < g_nkind; i++)
        if (!strcmp(g_kind[i], k))
            return i;
    if (g_nkind == MAXKINDS)
        return -1;
    snprintf(g_kind[g_nkind], sizeof g_kind[0], "%s", k);
    return g_nkind++;
}

static int code_index(const char *c)
{
    for (int i = 0; i < g_ncode; i++)
        if (!strcmp(g_code[i], c))
            return i;
    if (g_ncode == MAXCODES)
        return -1;
    snprintf(g_code[g_ncode], sizeof g_code[0], "%s", c);
    return g_ncode++;
}

static int read_phases(const char *dir)
{
    char path[4096], line[512];
    snprintf(path, sizeof path, "%s/phases", dir);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f) && g_nph < MAXPHASES) {
        long long t;
        char kind[64];
        if (sscanf(line, "%lld %63s", &t, kind) != 2)
            continue;
        if (!strcmp(kind, "start"))
            g_start_ms = t;
        if (!strcmp(kind, "broker_restarted"))
            g_broker_restart_ms = t;   /* marks readiness; not a phase */
        if (!strcmp(kind, "end")) {
            g_end_ms = t;
            continue;
        }
        if (!strcmp(kind, "broker_restarted") || !strcmp(kind, "note"))
            continue;
        /* "start" is the fault-free baseline; "quiet" the fault-free tail. */
        int k = kind_index(!strcmp(kind, "start") ? "baseline" : kind);
        if (k < 0)
            continue;
        g_kind_count[k]++;
        g_ph[g_nph].t = t;
        g_ph[g_nph].kind = k;
        g_nph++;
    }
    fclose(f);
    return g_nph ? 0 : -1;
}

static int phase_kind_at(int64_t t)
{
    int k = g_nph ? g_ph[0].kind : -1;
    for (int i = 0; i < g_nph && g_ph[i].t <= t; i++)
        k = g_ph[i].kind;
    return k;
}

/* ------------------------------------------------------------ worker files */

static struct ids g_committed, g_refused, g_uncommitted, g_pending;
static uint64_t g_over_lines;
static struct soak_stats g_sum;
static int64_t g_last_ok[100];
static int g_nstats;

static int read_log(const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        long long id, t;
        char op[40], code[64];
        switch (line[0]) {
        case 'C': case 'F': case 'U': case 'P':
            if (sscanf(line + 1, "%lld", &id) != 1)
                break;   /* a line cut by SIGKILL */
            ids_add(line[0] == 'C' ? &g_committed : line[0] == 'F' ? &g_refused
                    : line[0] == 'U' ? &g_uncommitted : &g_pending, id);
            break;
        case 'E':
            if (sscanf(line + 1, "%lld %39s %63s", &t, op, code) == 3) {
                int k = phase_kind_at(t), c = code_index(code);
                if (k >= 0 && c >= 0)
                    g_err[k][c]++;
                else
                    g_err_other++;
            }
            break;
        case 'L':
            g_over_lines++;
            break;
        default:
            break;
        }
    }
    fclose(f);
    return 0;
}

static int read_stats(const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    struct soak_stats s;
    size_t n = fread(&s, 1, sizeof s, f);
    fclose(f);
    if (n != sizeof s || s.magic != SOAK_MAGIC || s.wid < 0 || s.wid >= 100)
        return -1;
    g_nstats++;
    for (int i = 0; i < OP_N; i++) {
        g_sum.ok[i] += s.ok[i];
        g_sum.err[i] += s.err[i];
        g_sum.stopped[i] += s.stopped[i];
        g_sum.over_limit[i] += s.over_limit[i];
        if (s.worst_us[i] > g_sum.worst_us[i])
            g_sum.worst_us[i] = s.worst_us[i];
    }
    for (int k = 0; k < SOAK_NKEYS; k++) {
        g_sum.incr_acked[k] += s.incr_acked[k];
        g_sum.incr_unknown[k] += s.incr_unknown[k];
        g_sum.incr_pending[k] += s.incr_pending[k];
        g_sum.incr_refused[k] += s.incr_refused[k];
    }
    if (s.last_ok_ms > g_last_ok[s.wid])
        g_last_ok[s.wid] = s.last_ok_ms;
    return 0;
}

static int read_workers(const char *dir)
{
    char wdir[4096];
    snprintf(wdir, sizeof wdir, "%s/workers", dir);
    DIR *d = opendir(wdir);
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", wdir, e->d_name);
        if (e->d_name[0] != 'w')
            continue;
        if (n > 4 && !strcmp(e->d_name + n - 4, ".log"))
            read_log(path);
        else if (n > 6 && !strcmp(e->d_name + n - 6, ".stats"))
            read_stats(path);
    }
    closedir(d);
    return 0;
}

/* ------------------------------------------------------------------ output */

static int g_failed, g_checks;

static void verdict(int ok, const char *what, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void verdict(int ok, const char *what, const char *fmt, ...)
{
    char buf[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_checks++;
    if (!ok)
        g_failed++;
    printf("  %s  %-34s %s\n", ok ? "PASS" : "FAIL", what, buf);
}

static long kv_long(const char *file, const char *key, long dflt)
{
    FILE *f = fopen(file, "re");
    if (!f)
        return dflt;
    char line[256];
    size_t kl = strlen(key);
    long v = dflt;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == '=')
            v = atol(line + kl + 1);
    fclose(f);
    return v;
}

/* Sum of the pools' "leased" and "waiting" numbers in a shmstat --json. */
static int shm_counts(const char *file, long *leased, long *waiting)
{
    FILE *f = fopen(file, "re");
    if (!f)
        return -1;
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    if (n == 0)
        return -1;
    *leased = *waiting = 0;
    for (const char *p = buf; (p = strstr(p, "\"leased\": ")) != NULL; p++)
        *leased += atol(p + 10);
    for (const char *p = buf; (p = strstr(p, "\"waiting\": ")) != NULL; p++)
        *waiting += atol(p + 11);
    return 0;
}

static double secs(int64_t ms) { return (double)ms / 1000.0; }

int soak_check_main(int argc, char **argv)
{
    const char *dir = NULL, *conninfo = NULL, *shmfile = NULL, *seed = "?";
    int redis_port = 0, nworkers = 12;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--dir")) dir = v;
        else if (!strcmp(k, "--conninfo")) conninfo = v;
        else if (!strcmp(k, "--redis-port")) redis_port = atoi(v);
        else if (!strcmp(k, "--shmstat")) shmfile = v;
        else if (!strcmp(k, "--workers")) nworkers = atoi(v);
        else if (!strcmp(k, "--seed")) seed = v;
        else { fprintf(stderr, "soak check: unknown option %s\n", k); return 2; }
    }
    if (!dir || !conninfo || redis_port <= 0 || !shmfile || nworkers < 1 || nworkers > 99) {
        fprintf(stderr, "soak check: --dir --conninfo --redis-port --shmstat are required\n");
        return 2;
    }
    if (read_phases(dir) != 0) {
        fprintf(stderr, "soak check: no %s/phases\n", dir);
        return 2;
    }
    if (read_workers(dir) != 0 || g_nstats == 0) {
        fprintf(stderr, "soak check: no worker files in %s/workers\n", dir);
        return 2;
    }
    ids_sort(&g_committed);
    ids_sort(&g_refused);
    ids_sort(&g_uncommitted);
    ids_sort(&g_pending);

    /* ---- PostgreSQL, directly */
    PGconn *pg = PQconnectdb(conninfo);
    if (PQstatus(pg) != CONNECTION_OK) {
        fprintf(stderr, "soak check: PostgreSQL: %s", PQerrorMessage(pg));
        return 2;
    }
    PGresult *r = PQexec(pg, "SELECT sum(balance), count(*) FROM soak_accounts");
    long long balance = -1, naccounts = -1;
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
        balance = atoll(PQgetvalue(r, 0, 0));
        naccounts = atoll(PQgetvalue(r, 0, 1));
    }
    PQclear(r);
    struct ids db = { 0 };
    r = PQexec(pg, "SELECT id FROM soak_log ORDER BY id");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "soak check: SELECT soak_log: %s", PQerrorMessage(pg));
        return 2;
    }
    for (int i = 0; i < PQntuples(r); i++)
        ids_add(&db, atoll(PQgetvalue(r, i, 0)));
    PQclear(r);
    ids_sort(&db);
    long idle_txn = -1;
    r = PQexec(pg, "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
                   " AND pid <> pg_backend_pid()");
    if (PQresultStatus(r) == PGRES_TUPLES_OK)
        idle_txn = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    PQfinish(pg);

    size_t missing = 0, visible_unc = 0, visible_ref = 0, unknown = 0, unknown_present = 0, phantom = 0;
    int64_t first_missing = 0;
    for (size_t i = 0; i < g_committed.n; i++)
        if (!ids_has(&db, g_committed.v[i]) && missing++ == 0)
            first_missing = g_committed.v[i];
    for (size_t i = 0; i < g_uncommitted.n; i++)
        visible_unc += (size_t)ids_has(&db, g_uncommitted.v[i]);
    for (size_t i = 0; i < g_refused.n; i++)
        visible_ref += (size_t)ids_has(&db, g_refused.v[i]);
    for (size_t i = 0; i < g_pending.n; i++) {
        int64_t id = g_pending.v[i];
        if (ids_has(&g_committed, id) || ids_has(&g_refused, id))
            continue;
        unknown++;
        unknown_present += (size_t)ids_has(&db, id);
    }
    for (size_t i = 0; i < db.n; i++)
        if (!ids_has(&g_pending, db.v[i]) && !ids_has(&g_uncommitted, db.v[i]))
            phantom++;

    /* ---- Redis, directly */
    int64_t acked = 0, unk = 0, refused = 0, value_sum = 0, redis_bad = 0;
    char redis_first_bad[160] = "";
    struct timeval tv = { 5, 0 };
    redisContext *rc = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    if (!rc || rc->err) {
        fprintf(stderr, "soak check: Redis: %s\n", rc ? rc->errstr : "out of memory");
        return 2;
    }
    for (int k = 0; k < SOAK_NKEYS; k++) {
        redisReply *rr = redisCommand(rc, "GET soak:ctr:%d", k);
        int64_t v = 0;
        if (rr && rr->type == REDIS_REPLY_STRING)
            v = strtoll(rr->str, NULL, 10);
        if (rr)
            freeReplyObject(rr);
        int64_t a = g_sum.incr_acked[k], u = g_sum.incr_unknown[k] + g_sum.incr_pending[k];
        acked += a;
        unk += u;
        refused += g_sum.incr_refused[k];
        value_sum += v;
        if (v < a || v > a + u) {
            if (!redis_bad++)
                snprintf(redis_first_bad, sizeof redis_first_bad,
                         "; first: soak:ctr:%d = %" PRId64 ", acked %" PRId64 ", unknown %" PRId64, k, v, a, u);
        }
    }
    redisFree(rc);

    long leased = -1, waiting = -1;
    int shm_ok = shm_counts(shmfile, &leased, &waiting) == 0;

    /* ---- sampler */
    char sres[4096];
    snprintf(sres, sizeof sres, "%s/sampler.result", dir);
    long samples = kv_long(sres, "samples", -1), over = kv_long(sres, "over_beyond_grace", -1),
         over_grace = kv_long(sres, "over_in_grace", -1), itx_samples = kv_long(sres, "idle_in_txn_samples", -1),
         worst_since = kv_long(sres, "worst_since_ms", -1), worst_at = kv_long(sres, "worst_at_ms", 0),
         worst_count = kv_long(sres, "worst_count", 0), worst_max = kv_long(sres, "worst_max", 0),
         grace = kv_long(sres, "grace_ms", 0), max_seen = kv_long(sres, "max_seen", -1);

    /* ---- exits */
    char epath[4096];
    snprintf(epath, sizeof epath, "%s/exits", dir);
    int exits = 0, bad_exits = 0;
    char first_bad_exit[80] = "";
    FILE *ef = fopen(epath, "re");
    if (ef) {
        int wid, inc, st;
        while (fscanf(ef, "%d %d %d", &wid, &inc, &st) == 3) {
            exits++;
            if (st != 0 && !bad_exits++)
                snprintf(first_bad_exit, sizeof first_bad_exit, "; first: worker %d.%d status %d", wid, inc, st);
        }
        fclose(ef);
    }
    int resumed = 0;
    for (int w = 0; w < nworkers; w++)
        resumed += g_broker_restart_ms > 0 && g_last_ok[w] > g_broker_restart_ms;

    /* ------------------------------------------------------------ summary */
    int64_t total_ok = 0, total_err = 0;
    for (int i = 0; i < OP_N; i++) {
        total_ok += (int64_t)g_sum.ok[i];
        total_err += (int64_t)g_sum.err[i];
    }
    int nfaults = 0;
    for (int k = 0; k < g_nkind; k++)
        if (strcmp(g_kind[k], "baseline") && strcmp(g_kind[k], "quiet"))
            nfaults += g_kind_count[k];
    printf("==================== poolbroker soak: summary ====================\n");
    printf("seed %s   ran %.0f s   %d workers (%d incarnations)   %d faults injected\n", seed,
           secs(g_end_ms - g_start_ms), nworkers, g_nstats, nfaults);
    printf("calls ok/failed:");
    for (int i = 0; i < OP_N; i++)
        printf("%s %s %" PRIu64 "/%" PRIu64, i == 5 ? "\n               " : "", soak_op_name[i], g_sum.ok[i],
               g_sum.err[i]);
    printf("\n");
    printf("INVARIANTS\n");
    verdict(naccounts == SOAK_NACCOUNTS && balance == (long long)SOAK_NACCOUNTS * SOAK_BALANCE,
            "balance sum constant", "%lld == %lld over %lld accounts", balance,
            (long long)SOAK_NACCOUNTS * SOAK_BALANCE, naccounts);
    if (missing)
        verdict(0, "no committed write lost", "%zu of %zu acknowledged rows MISSING (first id %" PRId64 ")",
                missing, g_committed.n, first_missing);
    else
        verdict(1, "no committed write lost", "%zu of %zu acknowledged rows present", g_committed.n, g_committed.n);
    verdict(visible_unc == 0 && visible_ref == 0 && phantom == 0, "no uncommitted write visible",
            "%zu of %zu uncommitted, %zu of %zu refused, %zu never-sent rows visible", visible_unc,
            g_uncommitted.n, visible_ref, g_refused.n, phantom);
    printf("        (inserts with unknown outcome: %zu, of which %zu committed — allowed either way)\n", unknown,
           unknown_present);
    verdict(redis_bad == 0, "Redis counters == acked INCRs",
            "%d keys: sum %" PRId64 ", acked %" PRId64 ", unknown %" PRId64 ", refused %" PRId64 "%s",
            SOAK_NKEYS, value_sum, acked, unk, refused, redis_first_bad);
    if (shm_ok)
        verdict(leased == 0 && waiting == 0, "no lease leaked", "%ld leased, %ld waiting after the workers stopped",
                leased, waiting);
    else
        verdict(0, "no lease leaked", "shmstat --json output unreadable (%s)", shmfile);
    verdict(idle_txn == 0 && itx_samples == 0, "no idle-in-transaction backend",
            "%ld at the end; %ld samples with one idle in transaction > 5 s", idle_txn, itx_samples);
    if (over > 0)
        verdict(0, "backends <= current max_size",
                "%ld of %ld samples over AFTER the %ld ms grace; worst %ld > max_size %ld still %.1f s after "
                "the event (at t+%.0f s)",
                over, samples, grace, worst_count, worst_max, secs(worst_since), secs(worst_at - g_start_ms));
    else
        verdict(samples > 0 && over == 0, "backends <= current max_size",
                "%ld samples, max %ld backends; %ld over within the %ld ms grace", samples, max_seen, over_grace,
                grace);
    uint64_t over_limit = 0;
    for (int i = 0; i < OP_N; i++)
        over_limit += g_sum.over_limit[i];
    verdict(over_limit == 0, "no call past its timeout + 1 s", "%" PRIu64 " over (see the worst below)", over_limit);
    if (g_broker_restart_ms > 0)
        verdict(resumed == nworkers, "workers resumed after broker restart",
                "%d of %d served after the broker restarted (t+%.0f s)", resumed, nworkers,
                secs(g_broker_restart_ms - g_start_ms));
    else
        verdict(0, "workers resumed after broker restart", "no broker restart happened in this run");
    uint64_t enopool = 0, loading = 0, starting = 0;
    for (int k = 0; k < g_nkind; k++)
        for (int c = 0; c < g_ncode; c++) {
            if (!strcmp(g_code[c], "PB_ENOPOOL"))
                enopool += g_err[k][c];
            else if (!strcmp(g_code[c], "redis:LOADING"))
                loading += g_err[k][c];
            else if (!strcmp(g_code[c], "sql:57P03"))
                starting += g_err[k][c];
        }
    verdict(enopool == 0, "no PB_ENOPOOL (every pool exists)", "%" PRIu64 " PB_ENOPOOL", enopool);
    verdict(loading == 0 && starting == 0, "no command sent to a server not ready",
            "%" PRIu64 " redis -LOADING replies, %" PRIu64 " sql 57P03 (starting up)", loading, starting);
    verdict(exits > 0 && bad_exits == 0, "workers ran to the end", "%d of %d final incarnations exited 0%s",
            exits - bad_exits, exits, first_bad_exit);

    printf("WORST CALL (ms; limit = timeout + 1 s; calls spanning a SIGSTOP not timed)\n ");
    for (int i = 0; i < OP_N; i++)
        printf(" %s %.1f%s", soak_op_name[i], (double)g_sum.worst_us[i] / 1000.0,
               g_sum.over_limit[i] ? "(!)" : "");
    printf("\nERRORS PER FAULT PHASE (phase kind x times: error counts, most frequent first)\n");
    for (int k = 0; k < g_nkind; k++) {
        printf("  %-22s x%-3d", g_kind[k], g_kind_count[k]);
        uint64_t shown[MAXCODES] = { 0 };
        int printed = 0;
        for (int pass = 0; pass < 6; pass++) {
            int best = -1;
            for (int c = 0; c < g_ncode; c++)
                if (!shown[c] && g_err[k][c] && (best < 0 || g_err[k][c] > g_err[k][best]))
                    best = c;
            if (best < 0)
                break;
            shown[best] = 1;
            printf("%s %s %" PRIu64, printed++ ? "," : "", g_code[best], g_err[k][best]);
        }
        printf("%s\n", printed ? "" : " none");
    }
    printf("RESULT: %s (%d of %d invariants failed); %" PRId64 " calls ok, %" PRId64 " failed\n",
           g_failed ? "FAIL" : "PASS", g_failed, g_checks, total_ok, total_err);
    free(db.v);
    return g_failed ? 1 : 0;
}
