/*
 * shmview_json.c — the JSON renderings of a view: shmstat --json and the
 * broker's /health report.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "shmview_int.h"

/* ------------------------------------------------------------ JSON output */

void shmview_json_str(FILE *out, const char *s)
{
    if (!s) {
        fputs("null", out);
        return;
    }
    fputc('"', out);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(out, "\\%c", *c);
        else if (*c < 0x20 || *c >= 0x7f)
            fprintf(out, "\\u%04x", *c);
        else
            fputc(*c, out);
    }
    fputc('"', out);
}

/* An optional number in JSON: V_NONE as 0, V_UNKNOWN as null. */
static void json_num(FILE *out, int64_t v)
{
    if (v == V_NONE)
        fputs("0", out);
    else if (v < 0)
        fputs("null", out);
    else
        fprintf(out, "%" PRId64, v);
}

static void json_broker(FILE *out, const broker_view *b)
{
    fputs("\"broker\": {\"pid\": ", out);
    json_num(out, b->pid);
    fprintf(out, ", \"generation\": %" PRIu32 ", \"state\": ", b->generation);
    shmview_json_str(out, b->state);
    fputs(", \"io_backend\": ", out);
    shmview_json_str(out, b->io_backend);
    fprintf(out, ", \"alive\": %s, \"responding\": %s, \"heartbeat_age_ms\": ", b->alive ? "true" : "false",
            b->responding ? "true" : "false");
    json_num(out, b->heartbeat_age_ms == V_NONE ? V_UNKNOWN : b->heartbeat_age_ms);
    fputs(", \"uptime_ms\": ", out);
    json_num(out, b->uptime_ms);
    fprintf(out, ", \"clients_attached\": %" PRIu32 ", \"segment_repairs\": %" PRIu32, b->clients_attached,
            b->repairs);
    fprintf(out,
            ", \"work\": {\"loop_passes\": %" PRIu64 ", \"scans\": %" PRIu64 ", \"scan_words\": %" PRIu64
            ", \"scan_rings\": %" PRIu64 ", \"sq_entries\": %" PRIu64 ", \"janitor_passes\": %" PRIu64
            ", \"sweep_records\": %" PRIu64 ", \"sweep_rings\": %" PRIu64 "}}",
            b->loop_passes, b->scans, b->scan_words, b->scan_rings, b->sq_entries, b->janitor_passes,
            b->sweep_records, b->sweep_rings);
}

static void json_pool(FILE *out, const pool_view *pv)
{
    const pb_shm_pool *p = pv->p;
    fputs("{\"name\": ", out);
    shmview_json_str(out, pv->name);
    fputs(", \"type\": ", out);
    shmview_json_str(out, pv->type);
    fputs(", \"health\": ", out);
    shmview_json_str(out, pv->health);
    fprintf(out, ", \"size\": %" PRIu32 ", \"min_size\": %" PRIu32 ", \"max_size\": %" PRIu32 ", \"free\": ",
            (uint32_t)p->size, (uint32_t)p->min_size, (uint32_t)p->max_size);
    json_num(out, pv->by_state[PB_SLOT_FREE]);
    fputs(", \"leased\": ", out);
    json_num(out, pv->by_state[PB_SLOT_LEASED]);
    fprintf(out, ", \"waiting\": %" PRIu32 ", \"broken\": ", (uint32_t)p->nwaiters);
    json_num(out, pv->by_state[PB_SLOT_BROKEN]);
    fprintf(out, ", \"acquires\": %" PRIu64 ", \"waits\": %" PRIu64 ", \"timeouts\": %" PRIu64
            ", \"errors\": %" PRIu64 ", \"reclaims\": %" PRIu64 ", \"resets\": %" PRIu64
            ", \"connects\": %" PRIu64 ", \"connect_failures\": %" PRIu64 ", \"handoffs\": %" PRIu64
            ", \"wakeups\": %" PRIu64 ", \"leaks\": %" PRIu64 ", \"failovers\": %" PRIu64 ", \"server\": ",
            (uint64_t)p->acquires, (uint64_t)p->waits, (uint64_t)p->timeouts, (uint64_t)p->errors,
            (uint64_t)p->reclaims, (uint64_t)p->resets, (uint64_t)p->connects, (uint64_t)p->connect_failures,
            (uint64_t)p->handoffs, (uint64_t)p->wakeups, (uint64_t)p->leaks, (uint64_t)p->failovers);
    shmview_json_str(out, pv->server);
    fputs(", \"last_error\": ", out);
    shmview_json_str(out, pv->last_error);
    /* Transaction mode: the backends behind the handles (0 in session mode). */
    fputs(", \"pool_mode\": ", out);
    shmview_json_str(out, pv->mode);
    fputs(", \"backends\": ", out);
    json_num(out, pv->txn ? pv->backends : V_NONE);
    fputs(", \"backends_bound\": ", out);
    json_num(out, pv->txn ? pv->bound : V_NONE);
    fputs(", \"backends_idle\": ", out);
    json_num(out, pv->txn ? pv->idle : V_NONE);
    fprintf(out, ", \"queued\": %" PRIu32 "}", pv->txn ? (uint32_t)p->txn_queued : 0u);
}

static void json_backend(FILE *out, const backend_view *bv)
{
    fputs("{\"pool\": ", out);
    shmview_json_str(out, bv->pool);
    fprintf(out, ", \"number\": %" PRIu32 ", \"state\": ", bv->number);
    shmview_json_str(out, bv->state);
    fputs(", \"handle\": ", out);
    json_num(out, bv->handle == V_NONE ? V_UNKNOWN : bv->handle);
    fputs(", \"worker_pid\": ", out);
    json_num(out, bv->worker_pid);
    fputs(", \"backend_pid\": ", out);
    json_num(out, bv->backend_pid);
    fputs(", \"conn_age_ms\": ", out);
    json_num(out, bv->conn_age_ms);
    fprintf(out, ", \"uses\": %" PRIu64 ", \"server\": ", bv->uses);
    shmview_json_str(out, bv->server);
    fputc('}', out);
}

static void json_slot(FILE *out, const slot_view *sv)
{
    fputs("{\"pool\": ", out);
    shmview_json_str(out, sv->pool);
    fprintf(out, ", \"index\": %" PRIu32 ", \"state\": ", sv->index);
    shmview_json_str(out, sv->state);
    fputs(", \"owner_pid\": ", out);
    json_num(out, sv->owner_pid);
    fputs(", \"lease_age_ms\": ", out);
    json_num(out, sv->lease_age_ms);
    fprintf(out, ", \"uses\": %" PRIu64 ", \"backend_pid\": ", sv->uses);
    json_num(out, sv->backend_pid);
    fputs(", \"conn_age_ms\": ", out);
    json_num(out, sv->conn_age_ms);
    fputs(", \"command\": ", out);
    shmview_json_str(out, sv->command);
    fputc('}', out);
}

/* One JSON object on one line (a stream of lines under shmstat -w). */
void shmview_print_json(FILE *out, const shmview *sv)
{
    const view *v = &sv->v;
    fputc('{', out);
    json_broker(out, &v->broker);
    fputs(", \"pools\": [", out);
    int first = 1;
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        if (!v->pools[i].selected)
            continue;
        fputs(first ? "" : ", ", out);
        json_pool(out, &v->pools[i]);
        first = 0;
    }
    fputs("], \"slots\": [", out);
    for (uint32_t i = 0; i < v->nslots; i++) {
        fputs(i ? ", " : "", out);
        json_slot(out, &v->slots[i]);
    }
    fputs("], \"backends\": [", out);
    for (uint32_t i = 0; i < v->nbackends; i++) {
        fputs(i ? ", " : "", out);
        json_backend(out, &v->backends[i]);
    }
    fputs("]}\n", out);
}

/* ------------------------------------------------------------ health */

/* One entry of "reasons", comma-separated from the ones before it. */
static void health_reason(FILE *out, int *n, const char *msg)
{
    fputs((*n)++ ? ", " : "", out);
    shmview_json_str(out, msg);
}

/* Whether the broker itself is well: alive, running (not starting or
 * draining) and its loop ticking. */
static int broker_healthy(const broker_view *b)
{
    return b->responding && b->state && strcmp(b->state, "running") == 0;
}

/* Whether pool pv counts for health: selected and not removed. */
static int health_counts(const pool_view *pv)
{
    return pv->selected && pv->p->health != PB_HEALTH_REMOVED && pv->p->health != PB_HEALTH_PENDING;
}

int shmview_health_json(FILE *out, const shmview *sv)
{
    const view *v = &sv->v;
    const broker_view *b = &v->broker;
    int healthy = broker_healthy(b);
    for (uint32_t i = 0; i < v->s->hdr.npools; i++)
        if (health_counts(&v->pools[i]) && v->pools[i].p->health != PB_HEALTH_HEALTHY)
            healthy = 0;

    fprintf(out, "{\"status\": \"%s\", \"broker\": {\"pid\": ", healthy ? "ok" : "degraded");
    json_num(out, b->pid);
    fputs(", \"state\": ", out);
    shmview_json_str(out, b->state);
    fputs(", \"io_backend\": ", out);
    shmview_json_str(out, b->io_backend);
    fprintf(out, ", \"responding\": %s, \"uptime_ms\": ", b->responding ? "true" : "false");
    json_num(out, b->uptime_ms);
    fprintf(out, ", \"clients_attached\": %" PRIu32 "}, \"pools\": [", b->clients_attached);
    int first = 1;
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!health_counts(pv))
            continue;
        fputs(first ? "{\"name\": " : ", {\"name\": ", out);
        shmview_json_str(out, pv->name);
        fputs(", \"type\": ", out);
        shmview_json_str(out, pv->type);
        fputs(", \"health\": ", out);
        shmview_json_str(out, pv->health);
        fprintf(out, ", \"size\": %" PRIu32 ", \"last_error\": ", (uint32_t)pv->p->size);
        shmview_json_str(out, pv->last_error);
        fputc('}', out);
        first = 0;
    }

    fputs("], \"reasons\": [", out);
    int n = 0;
    char msg[sizeof v->pools[0].last_error + PB_NAME_MAX + 64], age[32];
    if (!b->alive) {
        health_reason(out, &n, "broker is not running");
    } else if (!broker_healthy(b)) {
        if (!b->responding)
            snprintf(msg, sizeof msg, "broker is not responding (heartbeat %s old)",
                     sv_fmt_age(age, sizeof age, b->heartbeat_age_ms));
        else
            snprintf(msg, sizeof msg, "broker is %s", b->state ? b->state : "in an unknown state");
        health_reason(out, &n, msg);
    }
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!health_counts(pv) || pv->p->health == PB_HEALTH_HEALTHY)
            continue;
        snprintf(msg, sizeof msg, "pool '%s' is %s%s%s", pv->name, pv->health ? pv->health : "in an unknown state",
                 pv->last_error[0] ? ": " : "", pv->last_error);
        health_reason(out, &n, msg);
    }
    fputs("]}\n", out);
    return healthy;
}
