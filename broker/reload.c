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
 *     (its `slots` key; by default 4 x max_size, at least 64: conf.h);
 *   - connection settings (conninfo, host, port, password, db, ...): tried
 *     first on a connection of their own; once one connects, new
 *     connections use them and existing ones retire as they come free;
 *     while they fail, the pool keeps serving on its old connections and
 *     settings and the try is repeated with backoff (see "settings trial"
 *     below);
 *   - a pool that is new gets slots from the spare region (spare_slots);
 *   - a pool that is gone stops leasing (PB_ENOPOOL) and its connections
 *     close as their leases return;
 *   - pool_mode: the pool's slots are connections in one mode and lease
 *     handles in the other, so the new mode gets a new pool of the same
 *     name from the spare region, built beside the old one (see "pool_mode
 *     switch" below).
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

/* The slots a pool added by a reload takes from the spare region: its
 * `slots`, else max_size (no default headroom: spare slots are few). */
static uint32_t added_pool_slots(const conf_pool *np)
{
    return np->slots ? conf_pool_slots(np) : np->max_size;
}

/* The pool serving name now: not removed, and not the pending successor of
 * a pool_mode switch (that one is found through its predecessor). */
static pool *current_pool(broker *b, const char *name)
{
    for (uint32_t k = 0; k < b->npools; k++) {
        pool *p = &b->pools[k];
        if (!p->removed && !p->replaces && strcmp(p->cf->name, name) == 0)
            return p;
    }
    return NULL;
}

/* The pool that takes settings np for current pool p: p itself when the
 * mode stays, p's pending successor when np keeps asking for its mode, or
 * NULL when np's mode needs a new pool. */
static pool *mode_target(pool *p, const conf_pool *np)
{
    if (p->cf->pool_mode == np->pool_mode)
        return p;
    if (p->successor && p->successor->cf->pool_mode == np->pool_mode)
        return p->successor;
    return NULL;
}

static const char *mode_name(int mode)
{
    return mode == PB_MODE_TRANSACTION ? "transaction" : "session";
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
    uint32_t spare_needed = 0, added = 0;
    for (int i = 0; i < nc->npools; i++) {
        conf_pool *np = &nc->pools[i];
        pool *cur = current_pool(b, np->name);
        if (cur && cur->cf->type != np->type) {
            snprintf(why, n, "pool %s: type cannot change without a restart", np->name);
            return why;
        }
        pool *p = cur ? mode_target(cur, np) : NULL;
        if (!p) {
            /* A new pool, or a pool_mode switch: its slots (connections in
             * one mode, lease handles in the other) come from the spare
             * region, a new table entry beside the old one. */
            if (np->request_buffer > SPARE_REQ || np->reply_buffer > SPARE_REP) {
                snprintf(why, n, "pool %s: a pool %s by a reload has spare-slot buffers "
                         "(request_buffer <= %uk, reply_buffer <= %uk)", np->name,
                         cur ? "switching pool_mode" : "added", SPARE_REQ / 1024, SPARE_REP / 1024);
                return why;
            }
            spare_needed += added_pool_slots(np);
            added++;
            continue;
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
        snprintf(why, n, "new pools (added, or switching pool_mode) need %u slots, %u spare left (spare_slots)",
                 spare_needed, b->nslots - b->spare_first);
        return why;
    }
    if (b->npools + added > PB_MAX_POOLS) {
        snprintf(why, n, "more than %d pools over the broker's life", PB_MAX_POOLS);
        return why;
    }
    return NULL;
}

/* Switch the pool to connection settings cs: handshakes in flight on the
 * old ones are closed when they finish, and every connection up retires as
 * it comes free (a leased one at its release). */
static void retire_all(pool *p, const conf_pool *cs, const char *why)
{
    p->cset = cs;
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

/* ----------------------------------------------------------- settings trial
 * A reload that changes a pool's connection settings must not take a working
 * pool down when the new ones cannot connect (a closed port, a role or
 * database that does not exist, a wrong password).  So the new settings are
 * first tried on a connection of their own, outside the pool's slots: it
 * never serves a lease and is closed as soon as it is up.  Until one such try
 * succeeds the pool goes on as before: its connections keep serving, and one
 * that closes is replaced with the settings in use (p->cset).  Once a try
 * succeeds, the new settings become p->cset and the old connections retire
 * as they come free.  A failed try is logged (the 1st, every 20th, and
 * whenever the reason changes: one line, the whole reason) and repeated
 * after a backoff of 0.5 s doubling to 30 s; the pool's last_error (shmstat)
 * says why too.  A later reload back to the settings in use drops the trial;
 * one to yet other settings starts a new one.
 *
 * The try is one more connection to the server than max_size, for as long
 * as a handshake takes. */
#define TRIAL_BACKOFF_MIN_MS 500
#define TRIAL_BACKOFF_MAX_MS 30000

typedef struct settings_trial {
    conn c;                  /* the try: the driver's c.drv, c.fd, c.error, with c.cset the new
                                settings; no slot (c.slot NULL), never leased */
    uint32_t fails;          /* tries failed in a row */
    uint32_t backoff_ms;     /* the wait after the last failure */
    uint64_t next_ms;        /* no handshake in flight: start the next one at (monotonic ms) */
    uint64_t started_ms;     /* a handshake in flight started at */
    int connecting;          /* a handshake is in flight (the driver state exists) */
    int timed_out;           /* its poll was cancelled past CONNECT_TIMEOUT_MS */
    int orphan;              /* given up with its poll in flight: the callback frees it */
    struct settings_trial *next_orphan;
    char logged[sizeof ((conn *)0)->error];     /* the reason last logged */
} settings_trial;

/* Trials given up with a poll still in flight: freed by their callback, or
 * at exit. */
static settings_trial *orphans;

static void trial_free(settings_trial *t)
{
    if (t->connecting)
        t->c.pool->drv->close(&t->c);
    free(t);
}

static void trial_failed(settings_trial *t, const char *why)
{
    pool *p = t->c.pool;
    char reason[sizeof t->logged];

    snprintf(reason, sizeof reason, "%s", why);     /* why may be t->c.error, which close clears */
    p->drv->close(&t->c);
    t->connecting = 0;
    t->timed_out = 0;
    t->fails++;
    t->backoff_ms = t->backoff_ms ? t->backoff_ms * 2 : TRIAL_BACKOFF_MIN_MS;
    if (t->backoff_ms > TRIAL_BACKOFF_MAX_MS)
        t->backoff_ms = TRIAL_BACKOFF_MAX_MS;
    t->next_ms = B.now_ms + t->backoff_ms;
    snprintf(p->shm->last_error, sizeof p->shm->last_error, "new settings: %.*s",
             (int)sizeof p->shm->last_error - 15, reason);     /* shmstat: the head of it */
    if (t->fails == 1 || t->fails % 20 == 0 || strcmp(reason, t->logged) != 0)
        log_warn("pool %s: the new connection settings do not connect (%u in a row): %s; still serving on "
                 "the previous ones (%u connections), next try in %u ms",
                 p->cf->name, t->fails, reason, p->live, t->backoff_ms);
    snprintf(t->logged, sizeof t->logged, "%s", reason);
}

static void trial_succeeded(settings_trial *t)
{
    pool *p = t->c.pool;
    const conf_pool *cs = t->c.cset;
    p->drv->close(&t->c);
    p->trial = NULL;
    free(t);
    retire_all(p, cs, "a connection with the new connection settings succeeded");
}

/* What the driver said of the try's handshake step. */
static void trial_went(settings_trial *t, int rc, const drv_poll *want)
{
    switch (rc) {
    case DRV_AGAIN:
        if (want->fd < 0) {
            trial_failed(t, "driver asked to poll no socket");
            return;
        }
        loop_poll(B.lp, &t->c.poll_op, want->fd, want->events);
        return;
    case DRV_OK:
        trial_succeeded(t);
        return;
    default:                        /* DRV_ERROR, DRV_NOT_READY: not serving either way */
        trial_failed(t, t->c.error[0] ? t->c.error : "connect failed");
        return;
    }
}

static void trial_on_poll(ev_op *op, int res)
{
    settings_trial *t = op->data;
    if (t->orphan) {
        for (settings_trial **pp = &orphans; *pp; pp = &(*pp)->next_orphan)
            if (*pp == t) {
                *pp = t->next_orphan;
                break;
            }
        trial_free(t);
        return;
    }
    if (op->cancelled || res < 0) {
        trial_failed(t, t->timed_out ? "connect timed out" : op->cancelled ? "cancelled" : strerror(-res));
        return;
    }
    drv_poll want = { -1, 0 };
    trial_went(t, t->c.pool->drv->connect_step(&t->c, res, &want), &want);
}

static void trial_start(settings_trial *t)
{
    t->connecting = 1;
    t->started_ms = B.now_ms;
    t->c.error[0] = 0;
    drv_poll want = { -1, 0 };
    trial_went(t, t->c.pool->drv->connect_start(&t->c, &want), &want);
}

/* Drop the pool's trial, if any (the settings it tried are no longer
 * wanted, or the pool is gone). */
static void trial_stop(pool *p)
{
    settings_trial *t = p->trial;
    if (!t)
        return;
    p->trial = NULL;
    if (t->c.poll_op.pending) {
        t->orphan = 1;
        t->next_orphan = orphans;
        orphans = t;
        loop_cancel(B.lp, &t->c.poll_op);
        return;
    }
    trial_free(t);
}

/* A reload brings settings np for pool p: keep them as they are, go on
 * trying them, or start trying them. */
static void settings_reloaded(pool *p, const conf_pool *np)
{
    if (!conn_settings_changed(p->cset, np)) {
        if (p->trial)
            log_info("pool %s: connection settings back to the ones in use: the untried new ones are dropped",
                     p->cf->name);
        trial_stop(p);
        return;
    }
    if (p->trial && !conn_settings_changed(p->trial->c.cset, np)) {
        p->trial->c.cset = np;      /* the same settings: the trial goes on */
        return;
    }
    trial_stop(p);
    settings_trial *t = calloc(1, sizeof *t);
    if (!t) {
        log_error("pool %s: connection settings changed, but no memory to try them: keeping the previous ones",
                  p->cf->name);
        return;
    }
    t->c.pool = p;
    t->c.index = UINT32_MAX;
    t->c.fd = -1;
    t->c.cset = np;
    t->c.poll_op.cb = trial_on_poll;
    t->c.poll_op.data = t;
    p->trial = t;
    log_info("pool %s: connection settings changed: trying them on a connection of their own first", p->cf->name);
    trial_start(t);
}

void settings_trial_tick(pool *p)
{
    settings_trial *t = p->trial;
    if (!t)
        return;
    if (t->connecting) {
        if (!t->timed_out && t->c.poll_op.pending && B.now_ms - t->started_ms > CONNECT_TIMEOUT_MS) {
            t->timed_out = 1;
            loop_cancel(B.lp, &t->c.poll_op);       /* trial_on_poll fails it */
        }
        return;
    }
    if (B.now_ms >= t->next_ms)
        trial_start(t);
}

void settings_trial_free(pool *p)
{
    if (p->trial)
        trial_free(p->trial);
    p->trial = NULL;
    while (orphans) {
        settings_trial *t = orphans;
        orphans = t->next_orphan;
        trial_free(t);
    }
}

/* ------------------------------------------------------ pool_mode switch
 * A pool's slots are connections in session mode and lease handles in
 * transaction mode (with its backends outside the segment), so a reload that
 * changes pool_mode cannot convert the pool in place: a worker would see a
 * torn pool.  It builds a pool of the new mode under the same name in a new
 * table entry, with slots from the spare region (added_pool_slots), beside
 * the old one:
 *
 *   1. pending: clients' lookups (find_pool: the first entry of that name
 *      not removed) still find the old pool, which goes on serving in its
 *      mode; the new one connects (one connection at least, pool_maybe_grow)
 *      with its settings;
 *   2. once it has a connection up (the janitor looks, reload_switch_tick),
 *      the old pool is removed with superseded set: no new leases (its
 *      waiters are failed PB_ENOPOOL, which the library answers by looking
 *      the name up again: it then finds the new pool); leases held keep
 *      working in the old mode until released, and its connections close as
 *      they come free once no lease needs them.
 *
 * While the new pool cannot connect (settings that fail), step 2 never
 * comes: the old pool serves, the new one retries with the pool's backoff and
 * says why in its last_error.  A reload back to the old mode drops the
 * pending pool.  Each switch takes a table entry and slots that are not given
 * back (as for a pool removed and added again): spare_slots bounds how often
 * a pool can switch in a broker's life. */

/* Take p out of service: no new leases, waiters failed PB_ENOPOOL,
 * connections close as leases return (pool_gone says when for a
 * superseded pool, whose held leases' queued statements are kept). */
static void pool_remove(pool *p)
{
    p->removed = 1;
    if (p->replaces)
        p->replaces->successor = NULL;
    if (p->successor)
        p->successor->replaces = NULL;
    p->replaces = p->successor = NULL;
    trial_stop(p);
    pool_publish_health(p);
    atomic_store(&p->shm->min_size, 0);
    if (p->superseded)
        pool_fail_acquirers(p, PB_ENOPOOL);     /* held leases' statements still go out */
    else
        pool_fail_waiters(p, PB_ENOPOOL);
}

void reload_switch_tick(pool *q)
{
    pool *p = q->replaces;
    if (!p || q->removed || q->live <= q->connecting)
        return;                     /* no switch pending, or no connection up yet */
    uint32_t held = pool_leases_held(p);
    /* The new pool serves before the old one is REMOVED: a lookup that
     * sees the old one removed finds the new one (client.c: find_pool). */
    q->replaces = NULL;
    p->successor = NULL;
    pool_publish_health(q);
    p->superseded = 1;
    pool_remove(p);
    log_info("pool %s: pool_mode is %s now (a connection of the new pool is up): the %s-mode pool takes no "
             "new leases, its %u held lease%s keep%s that mode until released", q->cf->name,
             mode_name(q->cf->pool_mode), mode_name(p->cf->pool_mode), held, held == 1 ? "" : "s",
             held == 1 ? "s" : "");
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
        pool *cur = current_pool(b, np->name);
        pool *p = cur ? mode_target(cur, np) : NULL;
        if (cur && p == cur && cur->successor) {
            log_info("pool %s: pool_mode back to %s: the pending %s-mode pool is dropped", np->name,
                     mode_name(np->pool_mode), mode_name(cur->successor->cf->pool_mode));
            pool_remove(cur->successor);
        }
        if (p) {
            settings_reloaded(p, np);
            p->cf = np;
            pool_publish_limits(p);
            continue;
        }
        p = &b->pools[b->npools];
        np->slots = added_pool_slots(np);       /* pool_setup sizes it with conf_pool_slots */
        if (pool_setup(b, p, b->npools, np, b->spare_first) < 0) {
            log_error("reload: pool %s: out of memory", np->name);
            continue;
        }
        b->spare_first += p->nconns;
        if (cur) {
            /* PENDING before it is published: nobody finds it by name. */
            p->replaces = cur;
            cur->successor = p;
            pool_publish_health(p);
        }
        atomic_store_explicit(&b->hdr->npools, ++b->npools, memory_order_release);
        if (cur)
            log_info("reload: pool %s: pool_mode %s -> %s: a new pool (%u slots) is built beside the old one and "
                     "takes over once a connection is up", np->name, mode_name(cur->cf->pool_mode),
                     mode_name(np->pool_mode), p->nconns);
        else
            log_info("reload: pool %s added (%u slots)", np->name, p->nconns);
    }
    /* Pools that are gone. */
    for (uint32_t k = 0; k < b->npools; k++) {
        pool *p = &b->pools[k];
        if (p->removed || conf_find_pool(nc, p->cf->name))
            continue;
        if (p->cf >= nc->pools && p->cf < nc->pools + nc->npools)
            continue;               /* added just now */
        pool_remove(p);
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
