/*
 * shmview_prom.c — the Prometheus text rendering of a view (shmstat
 * --prometheus and the broker's /metrics).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "shmview_int.h"

/* ------------------------------------------------------------ Prometheus output */

static void prom_head(FILE *out, const char *name, const char *type, const char *help)
{
    fprintf(out, "# HELP poolbroker_%s %s\n# TYPE poolbroker_%s %s\n", name, help, name, type);
}

/* Whether pool pv appears in Prometheus output: selected, and not removed
 * (a removed pool's entry stays in the table, and a pool re-added under the
 * same name would otherwise make duplicate series). */
static int prom_shown(const pool_view *pv)
{
    return pv->selected && pv->p->health != PB_HEALTH_REMOVED && pv->p->health != PB_HEALTH_PENDING;
}

/* A pool name is sv_printable ASCII already; escape what the label syntax needs. */
static void prom_label(FILE *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fputc('\\', out);
        fputc(*s, out);
    }
}

/* One sample per selected pool of a gauge or counter; samples whose value is
 * V_UNKNOWN are left out (Prometheus has no "unknown"). */
static void prom_pool_metric(FILE *out, const view *v, const char *name, const char *type, const char *help,
                             int64_t (*get)(const pool_view *))
{
    prom_head(out, name, type, help);
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        int64_t val = prom_shown(pv) ? get(pv) : V_UNKNOWN;
        if (val == V_UNKNOWN)
            continue;
        fprintf(out, "poolbroker_%s{pool=\"", name);
        prom_label(out, pv->name);
        fprintf(out, "\"} %" PRId64 "\n", val == V_NONE ? 0 : val);
    }
}

/* Counters are 64-bit; a garbage value above INT64_MAX is reported as unknown. */
#define CLAMP_U64(x) ((uint64_t)(x) > (uint64_t)INT64_MAX ? (int64_t)V_UNKNOWN : (int64_t)(uint64_t)(x))
#define POOL_GETTER(fn, expr) \
    static int64_t fn(const pool_view *pv) { return (expr); }
POOL_GETTER(get_size, (int64_t)pv->p->size)
POOL_GETTER(get_min, (int64_t)pv->p->min_size)
POOL_GETTER(get_max, (int64_t)pv->p->max_size)
POOL_GETTER(get_free, pv->by_state[PB_SLOT_FREE])
POOL_GETTER(get_leased, pv->by_state[PB_SLOT_LEASED])
POOL_GETTER(get_broken, pv->by_state[PB_SLOT_BROKEN])
POOL_GETTER(get_waiting, (int64_t)pv->p->nwaiters)
POOL_GETTER(get_oldest, pv->oldest_lease_ms == V_NONE ? 0 : pv->oldest_lease_ms / 1000)
POOL_GETTER(get_acquires, CLAMP_U64(pv->p->acquires))
POOL_GETTER(get_waits, CLAMP_U64(pv->p->waits))
POOL_GETTER(get_timeouts, CLAMP_U64(pv->p->timeouts))
POOL_GETTER(get_errors, CLAMP_U64(pv->p->errors))
POOL_GETTER(get_reclaims, CLAMP_U64(pv->p->reclaims))
POOL_GETTER(get_resets, CLAMP_U64(pv->p->resets))
POOL_GETTER(get_connects, CLAMP_U64(pv->p->connects))
POOL_GETTER(get_connfail, CLAMP_U64(pv->p->connect_failures))
POOL_GETTER(get_handoffs, CLAMP_U64(pv->p->handoffs))
POOL_GETTER(get_wakeups, CLAMP_U64(pv->p->wakeups))
POOL_GETTER(get_leaks, CLAMP_U64(pv->p->leaks))
POOL_GETTER(get_retired, CLAMP_U64(pv->p->retired))
POOL_GETTER(get_failovers, CLAMP_U64(pv->p->failovers))

/* A pb_hist as a Prometheus histogram in seconds: bucket i's upper bound is
 * 16 µs * 2^i, the last is +Inf; counts are cumulative (saturating).  The
 * +Inf bucket and _count are both the sum of the buckets, so they agree even
 * when the histogram was being updated while we copied it. */
static void prom_hist(FILE *out, const view *v, const char *name, const char *help, size_t field)
{
    prom_head(out, name, "histogram", help);
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!prom_shown(pv))
            continue;
        const pb_hist *h = (const pb_hist *)((const char *)pv->p + field);
        uint64_t cum = 0;
        for (unsigned b = 0; b < PB_HIST_BUCKETS; b++) {
            uint64_t n = h->bucket[b];
            cum = cum + n < cum ? UINT64_MAX : cum + n;     /* garbage must not wrap */
            fprintf(out, "poolbroker_%s_bucket{pool=\"", name);
            prom_label(out, pv->name);
            if (b + 1 < PB_HIST_BUCKETS)
                fprintf(out, "\",le=\"%.6f\"} %" PRIu64 "\n", 16e-6 * (double)(1u << b), cum);
            else
                fprintf(out, "\",le=\"+Inf\"} %" PRIu64 "\n", cum);
        }
        uint64_t sum_us = h->sum_us;
        fprintf(out, "poolbroker_%s_sum{pool=\"", name);
        prom_label(out, pv->name);
        fprintf(out, "\"} %" PRIu64 ".%06" PRIu64 "\n", sum_us / 1000000, sum_us % 1000000);
        fprintf(out, "poolbroker_%s_count{pool=\"", name);
        prom_label(out, pv->name);
        fprintf(out, "\"} %" PRIu64 "\n", cum);
    }
}

static void prom_broker(FILE *out, const view *v, unsigned flags)
{
    const broker_view *b = &v->broker;
    prom_head(out, "broker_up", "gauge", "1 when the broker process is alive and its heartbeat is fresh.");
    fprintf(out, "poolbroker_broker_up %d\n", b->responding);
    prom_head(out, "broker_info", "gauge", "Broker state and I/O backend (value always 1).");
    fprintf(out, "poolbroker_broker_info{state=\"%s\",io_backend=\"%s\"} 1\n", b->state ? b->state : "unknown",
            b->io_backend ? b->io_backend : "unknown");
    prom_head(out, "broker_generation", "gauge", "Broker start count for this segment name.");
    fprintf(out, "poolbroker_broker_generation %" PRIu32 "\n", b->generation);
    if (b->heartbeat_age_ms >= 0) {
        prom_head(out, "broker_heartbeat_age_seconds", "gauge", "Seconds since the broker's loop last ticked.");
        fprintf(out, "poolbroker_broker_heartbeat_age_seconds %" PRId64 ".%03" PRId64 "\n",
                b->heartbeat_age_ms / 1000, b->heartbeat_age_ms % 1000);
    }
    if (v->s->hdr.start_ms) {
        prom_head(out, "broker_start_time_seconds", "gauge", "Broker start time, seconds since the epoch.");
        fprintf(out, "poolbroker_broker_start_time_seconds %" PRIu64 "\n", v->s->hdr.start_ms / 1000);
    }
    prom_head(out, "broker_clients_attached", "gauge", "Worker processes attached to the broker.");
    fprintf(out, "poolbroker_broker_clients_attached %" PRIu32 "\n", b->clients_attached);
    prom_head(out, "segment_repairs_total", "counter",
              "Things a worker wrote into shared memory that the broker found impossible and undid.");
    fprintf(out, "poolbroker_segment_repairs_total %" PRIu32 "\n", b->repairs);
    prom_head(out, "broker_work_total", "counter",
              "The broker's work by kind (as of its last janitor pass); per query it must not grow with "
              "broker_clients_attached.");
    const struct {
        const char *kind;
        uint64_t v;
    } work[] = {
        { "loop_passes", b->loop_passes },     { "scans", b->scans },
        { "scan_words", b->scan_words },       { "scan_rings", b->scan_rings },
        { "sq_entries", b->sq_entries },       { "janitor_passes", b->janitor_passes },
        { "sweep_records", b->sweep_records }, { "sweep_rings", b->sweep_rings },
    };
    for (size_t i = 0; i < sizeof work / sizeof work[0]; i++)
        fprintf(out, "poolbroker_broker_work_total{kind=\"%s\"} %" PRIu64 "\n", work[i].kind, work[i].v);
    if ((flags & SHMVIEW_PROM_UPTIME) && b->uptime_ms >= 0) {
        prom_head(out, "uptime_seconds", "gauge", "Seconds since the broker started.");
        fprintf(out, "poolbroker_uptime_seconds %" PRId64 ".%03" PRId64 "\n", b->uptime_ms / 1000,
                b->uptime_ms % 1000);
    }
}

static void prom_pool_info(FILE *out, const view *v)
{
    prom_head(out, "pool_info", "gauge", "Pool type and health (value always 1).");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!prom_shown(pv))
            continue;
        fputs("poolbroker_pool_info{pool=\"", out);
        prom_label(out, pv->name);
        fprintf(out, "\",type=\"%s\",health=\"%s\"} 1\n", pv->type ? pv->type : "unknown",
                pv->health ? pv->health : "unknown");
    }
    prom_head(out, "pool_server", "gauge",
              "The server the pool's newest connection reached (host:port; value always 1).");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!prom_shown(pv) || !pv->server[0])
            continue;
        fputs("poolbroker_pool_server{pool=\"", out);
        prom_label(out, pv->name);
        fputs("\",server=\"", out);
        prom_label(out, pv->server);
        fputs("\"} 1\n", out);
    }
    prom_head(out, "pool_slots", "gauge", "Slots of the pool by state.");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        for (unsigned st = 0; st < PB_SLOT_STATE_MAX && prom_shown(pv); st++) {
            if (pv->by_state[st] < 0)
                continue;
            fputs("poolbroker_pool_slots{pool=\"", out);
            prom_label(out, pv->name);
            fprintf(out, "\",state=\"%s\"} %" PRId64 "\n", sv_slot_state_name(st), pv->by_state[st]);
        }
    }
    /* Transaction mode: the backends behind the handles, and the queue. */
    prom_head(out, "pool_backends", "gauge", "Backend connections of a transaction-mode pool by state.");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!prom_shown(pv) || !pv->txn || pv->backends < 0)
            continue;
        const struct { const char *state; int64_t n; } by[] = {
            { "bound", pv->bound }, { "idle", pv->idle }, { "other", pv->backends - pv->bound - pv->idle },
        };
        for (size_t k = 0; k < sizeof by / sizeof by[0]; k++) {
            fputs("poolbroker_pool_backends{pool=\"", out);
            prom_label(out, pv->name);
            fprintf(out, "\",state=\"%s\"} %" PRId64 "\n", by[k].state, by[k].n);
        }
    }
    prom_head(out, "pool_statements_queued", "gauge",
              "Statements of a transaction-mode pool waiting for a backend.");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!prom_shown(pv) || !pv->txn)
            continue;
        fputs("poolbroker_pool_statements_queued{pool=\"", out);
        prom_label(out, pv->name);
        fprintf(out, "\"} %" PRIu32 "\n", (uint32_t)pv->p->txn_queued);
    }
}

void shmview_print_prometheus(FILE *out, const shmview *sv, unsigned flags)
{
    const view *v = &sv->v;
    static const struct {
        const char *name, *type, *help;
        int64_t (*get)(const pool_view *);
    } metrics[] = {
        { "pool_size", "gauge", "Live connections of the pool.", get_size },
        { "pool_min_size", "gauge", "Configured minimum connections.", get_min },
        { "pool_max_size", "gauge", "Configured maximum connections.", get_max },
        { "pool_free", "gauge", "Idle connections ready to lease.", get_free },
        { "pool_leased", "gauge", "Connections leased by a worker.", get_leased },
        { "pool_broken", "gauge", "Connections lost, waiting to reconnect.", get_broken },
        { "pool_waiting", "gauge", "Workers queued for a connection.", get_waiting },
        { "pool_oldest_lease_seconds", "gauge", "Age of the oldest current lease (0 when none).", get_oldest },
        { "pool_acquires_total", "counter", "Leases granted.", get_acquires },
        { "pool_waits_total", "counter", "Acquires that had to wait.", get_waits },
        { "pool_timeouts_total", "counter", "Acquires that timed out.", get_timeouts },
        { "pool_errors_total", "counter", "Backend errors.", get_errors },
        { "pool_reclaims_total", "counter", "Leases taken back from dead or overstaying workers.", get_reclaims },
        { "pool_resets_total", "counter", "Connection resets after release.", get_resets },
        { "pool_connects_total", "counter", "Backend connections opened.", get_connects },
        { "pool_connect_failures_total", "counter", "Backend connection attempts that failed.", get_connfail },
        { "pool_handoffs_total", "counter", "Slots handed straight to a waiting worker.", get_handoffs },
        { "pool_wakeups_total", "counter", "Waiting workers woken.", get_wakeups },
        { "pool_leaks_total", "counter", "Leases held past the leak threshold.", get_leaks },
        { "pool_retired_total", "counter", "Connections retired (lifetime, uses, idle).", get_retired },
        { "pool_failovers_total", "counter", "Times the pool moved to another server after its server failed.",
          get_failovers },
    };
    prom_broker(out, v, flags);
    prom_pool_info(out, v);
    for (size_t i = 0; i < sizeof metrics / sizeof metrics[0]; i++)
        prom_pool_metric(out, v, metrics[i].name, metrics[i].type, metrics[i].help, metrics[i].get);
    prom_hist(out, v, "pool_acquire_wait_seconds", "Time acquires spent waiting for a slot.",
              offsetof(pb_shm_pool, acquire_wait));
    prom_hist(out, v, "pool_command_latency_seconds", "Command round trip as seen by the worker.",
              offsetof(pb_shm_pool, command_latency));
}
