/*
 * sampler.c — watches PostgreSQL from outside the broker during the soak.
 *
 *   soak sampler --dir DIR --conninfo STR --until-ms T [--interval-ms 250] [--grace-ms 2000]
 *
 * Every interval it counts the pool's backends in pg_stat_activity
 * (application_name = 'soak_pg', set in the pool's conninfo) and compares the
 * count with the pool's current max_size, read from DIR/maxsize ("MAX
 * EVENT_MS", rewritten by soak/run at each reload and broker restart; EVENT_MS
 * is when the bound last went down or the broker restarted).  A count above
 * max_size within grace-ms of such an event is the documented transition
 * ("closes as they come free"); later it is a violation, reported with the
 * time since the event.  It also counts backends idle in a transaction for
 * more than 5 s.  Its own connection (libpq, direct) is re-made after
 * PostgreSQL restarts.
 *
 * Output: DIR/sampler.events (one line per violation, as it happens) and
 * DIR/sampler.result (key=value lines, written at the end).
 */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "soak.h"

static volatile sig_atomic_t g_stop;
static void on_term(int sig) { (void)sig; g_stop = 1; }

static int read_maxsize(const char *dir, long *max, int64_t *event_ms)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/maxsize", dir);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    long m = 0;
    long long e = 0;
    int n = fscanf(f, "%ld %lld", &m, &e);
    fclose(f);
    if (n != 2)
        return -1;
    *max = m;
    *event_ms = e;
    return 0;
}

int soak_sampler_main(int argc, char **argv)
{
    const char *dir = NULL, *conninfo = NULL;
    int64_t until = 0;
    long interval = 250, grace = 2000;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--dir")) dir = v;
        else if (!strcmp(k, "--conninfo")) conninfo = v;
        else if (!strcmp(k, "--until-ms")) until = strtoll(v, NULL, 10);
        else if (!strcmp(k, "--interval-ms")) interval = atol(v);
        else if (!strcmp(k, "--grace-ms")) grace = atol(v);
        else { fprintf(stderr, "soak sampler: unknown option %s\n", k); return 2; }
    }
    if (!dir || !conninfo || until <= 0 || interval < 10) {
        fprintf(stderr, "soak sampler: --dir --conninfo --until-ms are required\n");
        return 2;
    }
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    char path[4096];
    snprintf(path, sizeof path, "%s/sampler.events", dir);
    FILE *ev = fopen(path, "we");
    if (!ev)
        return 1;
    setvbuf(ev, NULL, _IOLBF, 0);

    PGconn *pg = NULL;
    uint64_t samples = 0, failed = 0, over_grace = 0, over_beyond = 0, idle_txn = 0, max_seen = 0;
    int64_t worst_since = -1, worst_at = 0;
    long worst_count = 0, worst_max = 0;
    /* Bounded: the loop ends at until (plus nothing: each pass is short). */
    while (!g_stop && soak_wall_ms() < until) {
        soak_sleep_ms((unsigned)interval);
        if (!pg || PQstatus(pg) != CONNECTION_OK) {
            PQfinish(pg);
            pg = PQconnectdb(conninfo);
            if (PQstatus(pg) != CONNECTION_OK) {
                failed++;
                continue;
            }
        }
        PGresult *r = PQexec(pg,
                             "SELECT count(*) FILTER (WHERE application_name = 'soak_pg'),"
                             " count(*) FILTER (WHERE state LIKE 'idle in transaction%'"
                             "   AND now() - state_change > interval '5 s')"
                             " FROM pg_stat_activity WHERE pid <> pg_backend_pid()");
        if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
            PQclear(r);
            failed++;
            continue;
        }
        long count = atol(PQgetvalue(r, 0, 0));
        long itx = atol(PQgetvalue(r, 0, 1));
        PQclear(r);
        long max = 0;
        int64_t event_ms = 0;
        if (read_maxsize(dir, &max, &event_ms) != 0)
            continue;
        int64_t now = soak_wall_ms();
        samples++;
        if ((uint64_t)count > max_seen)
            max_seen = (uint64_t)count;
        if (itx > 0) {
            idle_txn++;
            fprintf(ev, "IDLE_IN_TXN %" PRId64 " backends=%ld (state_change > 5 s ago)\n", now, itx);
        }
        if (count > max) {
            int64_t since = now - event_ms;
            if (since <= grace) {
                over_grace++;
            } else {
                over_beyond++;
                fprintf(ev, "OVER %" PRId64 " count=%ld max_size=%ld since_event_ms=%" PRId64 "\n", now, count,
                        max, since);
                if (since > worst_since) {
                    worst_since = since;
                    worst_at = now;
                    worst_count = count;
                    worst_max = max;
                }
            }
        }
    }
    PQfinish(pg);
    fclose(ev);
    snprintf(path, sizeof path, "%s/sampler.result", dir);
    FILE *f = fopen(path, "we");
    if (!f)
        return 1;
    fprintf(f,
            "samples=%" PRIu64 "\nfailed=%" PRIu64 "\nmax_seen=%" PRIu64 "\nover_in_grace=%" PRIu64
            "\nover_beyond_grace=%" PRIu64 "\nidle_in_txn_samples=%" PRIu64 "\nworst_since_ms=%" PRId64
            "\nworst_at_ms=%" PRId64 "\nworst_count=%ld\nworst_max=%ld\ngrace_ms=%ld\n",
            samples, failed, max_seen, over_grace, over_beyond, idle_txn, worst_since, worst_at, worst_count,
            worst_max, grace);
    fclose(f);
    return 0;
}
