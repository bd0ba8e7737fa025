/*
 * reload.c — SIGHUP: apply a changed configuration without dropping a lease.
 *
 * The new file is parsed completely first; if it has an error, or asks for
 * something that cannot change while running, the broker logs why and keeps
 * the configuration it has.  Otherwise, pool by pool (matched by name):
 *
 *   - sizes, timeouts, limits, reset policy: take effect at once (the
 *     figures clients read are republished; the janitor grows or shrinks);
 *   - max_size can grow only up to the slots the pool was started with
 *     (its `slots` key, max_size by default);
 *   - connection settings (conninfo, host, port, password, db, ...): new
 *     connections use them, and existing ones retire as they come free;
 *   - a pool that is new gets slots from the spare region (spare_slots);
 *   - a pool that is gone stops leasing (PB_ENOPOOL) and its connections
 *     close as their leases return.
 *
 * What cannot change without a restart — the socket, the segment name and
 * modes, max_clients, io_backend, spare_slots, a pool's type or buffer
 * sizes — is refused with the reason.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker.h"
#include "log.h"
#include "poolbroker.h"

static int same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Connection settings changed: connections must be made anew. */
static int conn_settings_changed(const conf_pool *a, const conf_pool *b)
{
    return !same_str(a->conninfo, b->conninfo) || !same_str(a->host, b->host) || a->port != b->port ||
           !same_str(a->unix_socket, b->unix_socket) || !same_str(a->password, b->password) ||
           !same_str(a->user, b->user) || a->db != b->db || !same_str(a->sentinels, b->sentinels) ||
           !same_str(a->sentinel_master, b->sentinel_master) ||
           !same_str(a->sentinel_password, b->sentinel_password) || a->sentinel_replica != b->sentinel_replica;
}

/* Everything that needs a restart; returns the first reason or NULL. */
static const char *needs_restart(broker *b, conf *nc, char *why, size_t n)
{
    conf *oc = b->cf;
    if (strcmp(oc->socket, nc->socket) != 0)
        return "socket cannot change without a restart";
    if (strcmp(oc->shm_name, nc->shm_name) != 0)
        return "shm_name cannot change without a restart";
    if (oc->shm_mode != nc->shm_mode || oc->socket_mode != nc->socket_mode)
        return "shm_mode and socket_mode cannot change without a restart";
    if (oc->max_clients != nc->max_clients)
        return "max_clients cannot change without a restart";
    if (strcmp(oc->io_backend, nc->io_backend) != 0)
        return "io_backend cannot change without a restart";
    if (oc->spare_slots != nc->spare_slots)
        return "spare_slots cannot change without a restart";
    if ((oc->metrics_listen == NULL) != (nc->metrics_listen == NULL) ||
        (oc->metrics_listen && strcmp(oc->metrics_listen, nc->metrics_listen) != 0))
        return "metrics_listen cannot change without a restart";
    uint32_t spare_needed = 0;
    for (int i = 0; i < nc->npools; i++) {
        conf_pool *np = &nc->pools[i];
        pool *p = NULL;
        for (uint32_t k = 0; k < b->npools; k++)
            if (!b->pools[k].removed && strcmp(b->pools[k].cf->name, np->name) == 0)
                p = &b->pools[k];
        if (!p) {
            if (np->request_buffer > SPARE_REQ || np->reply_buffer > SPARE_REP) {
                snprintf(why, n, "pool %s: a pool added by a reload has spare-slot buffers "
                         "(request_buffer <= %uk, reply_buffer <= %uk)", np->name, SPARE_REQ / 1024, SPARE_REP / 1024);
                return why;
            }
            spare_needed += conf_pool_slots(np);
            continue;
        }
        if (p->cf->type != np->type) {
            snprintf(why, n, "pool %s: type cannot change without a restart", np->name);
            return why;
        }
        if (p->cf->pool_mode != np->pool_mode) {
            /* The pool's slots are connections in one mode and lease
             * handles in the other: the segment's layout differs. */
            snprintf(why, n, "pool %s: pool_mode cannot change without a restart (its slots are %s)", np->name,
                     p->cf->pool_mode == PB_MODE_TRANSACTION ? "lease handles" : "connections");
            return why;
        }
        if (p->cf->request_buffer != np->request_buffer || p->cf->reply_buffer != np->reply_buffer) {
            snprintf(why, n, "pool %s: request_buffer and reply_buffer cannot change without a restart",
                     np->name);
            return why;
        }
        if (np->max_size > p->nconns) {
            snprintf(why, n, "pool %s: max_size %u is more than the %u slots it started with (a restart "
                     "can grow it; 'slots' reserves room to grow by reload)", np->name, np->max_size, p->nconns);
            return why;
        }
        if (np->slots && np->slots != p->nconns) {
            snprintf(why, n, "pool %s: slots cannot change without a restart (%u now)", np->name, p->nconns);
            return why;
        }
    }
    if (spare_needed > b->nslots - b->spare_first) {
        snprintf(why, n, "new pools need %u slots, %u spare left (spare_slots)", spare_needed,
                 b->nslots - b->spare_first);
        return why;
    }
    uint32_t added = 0;
    for (int i = 0; i < nc->npools; i++) {
        int found = 0;
        for (uint32_t k = 0; k < b->npools; k++)
            found |= !b->pools[k].removed && strcmp(b->pools[k].cf->name, nc->pools[i].name) == 0;
        added += !found;
    }
    if (b->npools + added > PB_MAX_POOLS) {
        snprintf(why, n, "more than %d pools over the broker's life", PB_MAX_POOLS);
        return why;
    }
    return NULL;
}

static void retire_all(pool *p, const char *why)
{
    p->settings_gen++;              /* handshakes in flight are closed when they finish */
    conn *backs = POOL_BACKENDS(p);
    for (uint32_t k = 0; k < POOL_NBACKENDS(p); k++) {
        conn *c = &backs[k];
        if (PH_UP(c->phase)) {
            c->retire_at_ms = B.now_ms;     /* closed when next free */
            atomic_fetch_or(&c->slot->flags, PB_SF_RETIRE);
        }
    }
    log_info("pool %s: %s: connections will be replaced as they come free", p->cf->name, why);
}

void reload_config(broker *b)
{
    char err[CONF_ERR_MAX], why[256];
    conf *nc = conf_load(b->cf->path, err, sizeof err);
    if (!nc) {
        log_error("reload: %s; keeping the current configuration", err);
        return;
    }
    const char *what = needs_restart(b, nc, why, sizeof why);
    if (what) {
        log_error("reload: %s: %s; keeping the current configuration", nc->path, what);
        conf_free(nc);
        return;
    }

    /* Pools that stay, or are new. */
    for (int i = 0; i < nc->npools; i++) {
        conf_pool *np = &nc->pools[i];
        pool *p = NULL;
        for (uint32_t k = 0; k < b->npools; k++)
            if (!b->pools[k].removed && strcmp(b->pools[k].cf->name, np->name) == 0)
                p = &b->pools[k];
        if (p) {
            if (conn_settings_changed(p->cf, np))
                retire_all(p, "connection settings changed");
            p->cf = np;
            pool_publish_limits(p);
            continue;
        }
        p = &b->pools[b->npools];
        if (pool_setup(b, p, b->npools, np, b->spare_first) < 0) {
            log_error("reload: pool %s: out of memory", np->name);
            continue;
        }
        b->spare_first += p->nconns;
        atomic_store_explicit(&b->hdr->npools, ++b->npools, memory_order_release);
        log_info("reload: pool %s added (%u slots)", np->name, p->nconns);
    }
    /* Pools that are gone. */
    for (uint32_t k = 0; k < b->npools; k++) {
        pool *p = &b->pools[k];
        if (p->removed || conf_find_pool(nc, p->cf->name))
            continue;
        if (p->cf >= nc->pools && p->cf < nc->pools + nc->npools)
            continue;               /* added just now */
        p->removed = 1;
        atomic_store(&p->shm->accepting, 0);
        atomic_store(&p->shm->health, PB_HEALTH_REMOVED);
        atomic_store(&p->shm->min_size, 0);
        pool_fail_waiters(p, PB_ENOPOOL);
        log_info("reload: pool %s removed: no new leases; connections close as leases return", p->cf->name);
    }

    /* Removed pools still point into the old configuration. */
    conf **keep = realloc(b->old_confs, (b->nold_confs + 1) * sizeof *keep);
    if (keep) {
        keep[b->nold_confs++] = b->cf;
        b->old_confs = keep;
    }
    b->cf = nc;
    log_level = nc->log_level;
    log_use_syslog(nc->log_target && strcmp(nc->log_target, "syslog") == 0);
    log_info("reload: %s applied (%d pool%s)", nc->path, nc->npools, nc->npools == 1 ? "" : "s");
    for (uint32_t k = 0; k < b->npools; k++)
        pool_maybe_grow(&b->pools[k]);
}
