/*
 * shmview_text.c — the human-readable rendering of a view (shmstat's default output).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "shmview_int.h"

/* ------------------------------------------------------------ text output */

static void text_broker(FILE *out, const char *shm_name, const broker_view *b)
{
    char age[32];
    fprintf(out, "segment %s: ", shm_name);
    if (!b->alive) {
        if (b->pid == 0)
            fputs("broker", out);
        else if (b->pid < 0)
            fputs("broker pid ?:", out);
        else
            fprintf(out, "broker pid %" PRId64 ":", b->pid);
        fprintf(out, " not running (%ssegment left from generation %" PRIu32 ")\n",
                b->state && strcmp(b->state, "stopped") == 0 ? "stopped cleanly, " : "", b->generation);
        return;
    }
    fprintf(out, "broker pid %" PRId64 " (%s, gen %" PRIu32 ", %s) ", b->pid, b->state ? b->state : "?",
            b->generation, b->io_backend ? b->io_backend : "?");
    if (b->responding)
        fprintf(out, "up %s", sv_fmt_age(age, sizeof age, b->uptime_ms));
    else if (b->heartbeat_age_ms >= 0)
        fprintf(out, "not responding (heartbeat %" PRId64 " s old)", b->heartbeat_age_ms / 1000);
    else
        fprintf(out, "not responding (heartbeat %s)", b->heartbeat_age_ms == V_NONE ? "never" : "?");
    fprintf(out, ", %" PRIu32 " client%s attached", b->clients_attached, b->clients_attached == 1 ? "" : "s");
    if (b->repairs)
        fprintf(out, ", %" PRIu32 " segment repair%s (see the broker log)", b->repairs, b->repairs == 1 ? "" : "s");
    fputc('\n', out);
}

/* Width of the pool-name column: the longest selected name, at least 4. */
static int name_width(const view *v)
{
    size_t w = 4;
    for (uint32_t i = 0; i < v->s->hdr.npools; i++)
        if (v->pools[i].selected && strlen(v->pools[i].name) > w)
            w = strlen(v->pools[i].name);
    return (int)w;
}

static void text_pools(FILE *out, const view *v)
{
    char n[12][24];
    int nw = name_width(v);
    fprintf(out, "\n%-*s %-8s %-8s %5s %5s %5s %5s %6s %4s %6s %10s %8s %8s %7s %8s\n", nw, "POOL", "TYPE", "HEALTH",
            "SIZE", "MIN", "MAX", "FREE", "LEASED", "WAIT", "BROKEN", "ACQUIRES", "WAITS", "TIMEOUTS", "ERRORS",
            "RECLAIMS");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        const pb_shm_pool *p = pv->p;
        if (!pv->selected)
            continue;
        fprintf(out, "%-*s %-8s %-8s %5" PRIu32 " %5" PRIu32 " %5" PRIu32 " %5s %6s %4" PRIu32 " %6s %10" PRIu64
                " %8" PRIu64 " %8" PRIu64 " %7" PRIu64 " %8" PRIu64 "\n",
                nw, pv->name, pv->type ? pv->type : "?", pv->health ? pv->health : "?", (uint32_t)p->size,
                (uint32_t)p->min_size, (uint32_t)p->max_size,
                sv_fmt_num(n[0], sizeof n[0], pv->by_state[PB_SLOT_FREE]),
                sv_fmt_num(n[1], sizeof n[1], pv->by_state[PB_SLOT_LEASED]), (uint32_t)p->nwaiters,
                sv_fmt_num(n[2], sizeof n[2], pv->by_state[PB_SLOT_BROKEN]), (uint64_t)p->acquires,
                (uint64_t)p->waits, (uint64_t)p->timeouts, (uint64_t)p->errors, (uint64_t)p->reclaims);
        if (pv->txn)
            fprintf(out, "  %s transaction mode: %s handle%s in use, %s backend%s (%s bound, %s idle), %" PRIu32
                    " statement%s queued\n", pv->name, sv_fmt_num(n[3], sizeof n[3], pv->by_state[PB_SLOT_LEASED]),
                    pv->by_state[PB_SLOT_LEASED] == 1 ? "" : "s", sv_fmt_num(n[4], sizeof n[4], pv->backends),
                    pv->backends == 1 ? "" : "s", sv_fmt_num(n[5], sizeof n[5], pv->bound),
                    sv_fmt_num(n[6], sizeof n[6], pv->idle), (uint32_t)p->txn_queued,
                    p->txn_queued == 1 ? "" : "s");
        if (pv->server[0])
            fprintf(out, "  %s server: %s, %" PRIu64 " failover%s\n", pv->name, pv->server, (uint64_t)p->failovers,
                    p->failovers == 1 ? "" : "s");
        if (pv->last_error[0])
            fprintf(out, "  %s last error: %s\n", pv->name, pv->last_error);
    }
}

static void text_slots(FILE *out, const view *v)
{
    char owner[24], lease[24], conn[24], backend[24];
    if (v->nslots == 0) {
        fprintf(out, "\nno connections\n");
        return;
    }
    int nw = name_width(v);
    fprintf(out, "\n%-*s %5s %-10s %8s %9s %8s %10s %9s  %s\n", nw, "POOL", "SLOT", "STATE", "OWNER", "LEASE_AGE",
            "USES", "BACKEND", "CONN_AGE", "COMMAND");
    for (uint32_t i = 0; i < v->nslots; i++) {
        const slot_view *sv = &v->slots[i];
        fprintf(out, "%-*s %5" PRIu32 " %-10s %8s %9s %8" PRIu64 " %10s %9s  %s\n", nw, sv->pool ? sv->pool : "?",
                sv->index, sv->state ? sv->state : "?", sv_fmt_num(owner, sizeof owner, sv->owner_pid),
                sv_fmt_age(lease, sizeof lease, sv->lease_age_ms), sv->uses,
                sv_fmt_num(backend, sizeof backend, sv->backend_pid), sv_fmt_age(conn, sizeof conn, sv->conn_age_ms),
                sv->command);
    }
}

/* Transaction-mode backends: which handle (and worker) each one serves. */
static void text_backends(FILE *out, const view *v)
{
    char handle[24], worker[24], backend[24], conn[24];
    if (v->nbackends == 0)
        return;
    int nw = name_width(v);
    fprintf(out, "\n%-*s %7s %-10s %6s %8s %10s %9s %8s  %s\n", nw, "POOL", "BACKEND", "STATE", "HANDLE", "WORKER",
            "PID", "CONN_AGE", "USES", "SERVER");
    for (uint32_t i = 0; i < v->nbackends; i++) {
        const backend_view *bv = &v->backends[i];
        fprintf(out, "%-*s %7" PRIu32 " %-10s %6s %8s %10s %9s %8" PRIu64 "  %s\n", nw, bv->pool, bv->number,
                bv->state ? bv->state : "?", sv_fmt_num(handle, sizeof handle, bv->handle),
                sv_fmt_num(worker, sizeof worker, bv->worker_pid), sv_fmt_num(backend, sizeof backend, bv->backend_pid),
                sv_fmt_age(conn, sizeof conn, bv->conn_age_ms), bv->uses, bv->server);
    }
}

void shmview_print_text(FILE *out, const shmview *sv)
{
    const view *v = &sv->v;
    text_broker(out, sv->shm_name, &v->broker);
    text_pools(out, v);
    text_slots(out, v);
    text_backends(out, v);
}
