/*
 * shmview.h — read a poolbroker shared-memory segment and render it.
 *
 * The internal API behind shmstat (tools/shmstat.c) and the broker's
 * /metrics and /health endpoint (broker/metrics.c): copy the segment into
 * private memory, check it, derive what a person or a scraper wants to see
 * (slot counts by state, lease ages, owner pids, broker liveness), and print
 * that as text, JSON or the Prometheus text format.  Not installed: the
 * sources in common/ are compiled into both programs (shmview_load.c loads,
 * shmview_text.c, shmview_json.c and shmview_prom.c render).
 *
 * The segment is untrusted input (any client maps it read-write), so a view
 * is a validated private copy: nothing in it changes after shmview_load
 * returns, impossible values print as "?" (null in JSON, left out in
 * Prometheus), and strings are printable ASCII.  A view owns its memory and
 * may be used from any one thread at a time; separate views are independent.
 */
#ifndef PB_SHMVIEW_H
#define PB_SHMVIEW_H

#include <stddef.h>
#include <stdio.h>

/* Results of shmview_load.  The values are shmstat's exit statuses, so the
 * CLI returns them as they are. */
enum {
    SHMVIEW_OK = 0,
    SHMVIEW_ENOPOOL = 1,            /* the pool filter names no pool of the segment */
    SHMVIEW_EOPEN = 2,              /* cannot open, map or copy the segment; out of memory */
    SHMVIEW_ELAYOUT = 3,            /* not a poolbroker segment, another layout version, corrupt header */
};

/* shmview_print_prometheus flags. */
#define SHMVIEW_PROM_UPTIME 0x1u    /* add poolbroker_uptime_seconds (the broker's own /metrics) */

typedef struct shmview shmview;

/*
 * Copy the segment called shm_name (e.g. "/poolbroker") and build its view,
 * restricted to the pool named pool when pool is not NULL.  Opens the segment
 * read-only and unmaps it before returning.  Returns SHMVIEW_OK and stores a
 * new view in *out (free it with shmview_free), or another SHMVIEW_* code
 * with *out set to NULL and a one-line message (no trailing newline) in err.
 */
int shmview_load(const char *shm_name, const char *pool, shmview **out, char *err, size_t errlen);

/* Free a view; NULL is a harmless no-op. */
void shmview_free(shmview *v);

/* The human-readable report: a broker line, the pool table (with last
 * errors) and one line per slot that has a connection. */
void shmview_print_text(FILE *out, const shmview *v);

/* One JSON object on one line, newline-terminated: {"broker": {...},
 * "pools": [...], "slots": [...]} (shmstat(1) describes every field). */
void shmview_print_json(FILE *out, const shmview *v);

/* The Prometheus text exposition format (version 0.0.4): broker gauges, then
 * per pool (removed pools left out) gauges, counters and the acquire-wait and
 * command-latency histograms in seconds.  flags: SHMVIEW_PROM_* or 0. */
void shmview_print_prometheus(FILE *out, const shmview *v, unsigned flags);

/*
 * The health report as one JSON object on one line:
 *   {"status": "ok"|"degraded", "broker": {...}, "pools": [{"name", "type",
 *    "health", "size", "last_error"}], "reasons": ["pool 'x' is down: ...", ...]}
 * Removed pools are left out.  Returns 1 when healthy — the broker is
 * running with a fresh heartbeat and every pool left in is healthy — else 0
 * (each cause is one entry of "reasons").
 */
int shmview_health_json(FILE *out, const shmview *v);

/* Write s as a JSON string literal (quotes, backslashes and control bytes
 * escaped; bytes outside ASCII as \u00XX); NULL as null. */
void shmview_json_str(FILE *out, const char *s);

/*
 * Survive a segment that shrinks while shmview_load copies it (someone
 * truncated it: reading past the new end raises SIGBUS): installs a SIGBUS
 * handler, after which a fault inside the copy makes shmview_load fail with
 * SHMVIEW_EOPEN ("segment shrank while being read") instead of killing the
 * process; a SIGBUS anywhere else still kills it.  Process-wide; call it once,
 * before starting threads.  Returns 0, or -errno if sigaction failed.
 *
 * shmstat calls it.  The broker does not: it never truncates its own
 * segment, and a segment truncated under it would fault its own accesses
 * just the same.  Without the handler the copy runs unguarded (no sigsetjmp),
 * so shmview_load is safe from any thread.  With it, too: the jump buffer is
 * per thread and SIGBUS is delivered to the thread that faulted.
 */
int shmview_catch_sigbus(void);

#endif /* PB_SHMVIEW_H */
