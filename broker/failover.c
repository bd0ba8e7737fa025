/*
 * failover.c — following a failover: PostgreSQL promotions through a
 * multi-host conninfo, Redis masters moved by Sentinel.
 *
 * The engines fail over by themselves (pg_ctl promote, Patroni, Sentinel);
 * the broker only has to stop using the server that failed and find the one
 * that took over.  A pool that follows (conf_pool.follow, worked out by
 * conf.c from the conninfo or the sentinels keys) does this:
 *
 *   - each connection remembers the server it reached (c->server, the
 *     driver's "host:port" after the handshake);
 *   - when a connection to server S is lost under I/O, or S answers that it
 *     is going away (SQLSTATE 57P01/57P02/57P03, -MASTERDOWN) or, for a
 *     pool that wants the primary, that it is read-only (25006, -READONLY),
 *     every connection of the pool to S is marked suspect: free ones close
 *     at once, leased ones get PB_SF_RETIRE and close when they come back
 *     (never mid-lease: the holder's lease runs on until it releases; in
 *     transaction mode, a bound backend closes when its transaction ends);
 *   - new connections go through the host list again (libpq tries the hosts
 *     in order under target_session_attrs) or to the address the sentinels
 *     give now (sentinel.c), at once: the connect backoff is cleared;
 *   - the first connection that reaches a server other than S is the
 *     switch: the pool's failover counter goes up, shm->server names the
 *     new server, and the log says from where to where and why.
 *
 * In the gap, while a pool has no live connection, acquires fail fast with
 * PB_EBACKEND (conn.c: connect_failed), as for any outage.
 *
 * A pool that does not follow (one host, no target_session_attrs) keeps the
 * old behaviour: a lost connection is only that connection.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "broker.h"
#include "conn.h"
#include "log.h"

/* Copy the private server name into the segment if it differs (a worker may
 * have scribbled it; the broker never reads it back otherwise). */
static void publish_server(pool *p)
{
    if (strncmp(p->shm->server, p->server, sizeof p->shm->server) != 0)
        snprintf(p->shm->server, sizeof p->shm->server, "%s", p->server);
    if (atomic_load(&p->shm->failovers) != p->failovers)
        atomic_store(&p->shm->failovers, p->failovers);
}

void failover_connected(conn *c)
{
    pool *p = c->pool;
    if (!c->server[0] || strcmp(c->server, p->server) == 0) {
        if (p->failed[0] && strcmp(c->server, p->failed) == 0) {
            /* The same server again (it came back, or it was only a dropped
             * connection): no switch. */
            log_info("pool %s: server %s serves again after %s", p->cf->name, c->server, p->failed_why);
            p->failed[0] = 0;
        }
        return;
    }
    if (p->failed[0] && strcmp(p->failed, c->server) != 0) {
        p->failovers++;
        log_warn("pool %s: failover: now connected to %s (was %s: %s); %llu failover%s so far", p->cf->name,
                 c->server, p->failed, p->failed_why, (unsigned long long)p->failovers, p->failovers == 1 ? "" : "s");
        p->failed[0] = 0;
    } else if (p->server[0]) {
        /* A pool with several good servers (load_balance_hosts, a replica
         * pool) moves between them without any failing. */
        log_debug("pool %s: connection to %s (was %s)", p->cf->name, c->server, p->server);
    } else {
        log_info("pool %s: connected to %s", p->cf->name, c->server);
    }
    snprintf(p->server, sizeof p->server, "%s", c->server);
    publish_server(p);
}

/* Take a suspect free connection back and close it; a leased one is flagged
 * to come back through the broker, which closes it then.  In transaction
 * mode a backend at home is taken from its private record the same way; a
 * bound one closes when it is offered again at the end of its transaction
 * (pool_offer), and the flag makes its handle's holder release through us. */
static void retire_suspect(conn *c)
{
    uint64_t w = atomic_load(&c->slot->word);
    if (PB_WORD_STATE(w) == PB_SLOT_FREE && c->phase == PH_READY && !c->expect) {
        if (slot_take_free(c, PB_SLOT_CLOSING)) {
            atomic_fetch_add_explicit(&c->pool->shm->retired, 1, memory_order_relaxed);
            conn_close(c, "its server failed");
            return;
        }
    }
    atomic_fetch_or(&c->slot->flags, PB_SF_RETIRE);
}

void failover_drain(pool *p, const char *server, const char *why)
{
    if (p->cf->follow == PB_FOLLOW_NONE || !server || !server[0])
        return;
    char srv[PB_SERVER_MAX];
    /* server may be a c->server, which a connect that the closes below
     * start in that slot clears */
    snprintf(srv, sizeof srv, "%s", server);
    uint32_t marked = 0, closed = 0;
    conn *backs = POOL_BACKENDS(p);     /* transaction mode: the backends, not the handles */
    for (uint32_t k = 0; k < POOL_NBACKENDS(p); k++) {
        conn *c = &backs[k];
        if (!PH_UP(c->phase) || c->suspect || strcmp(c->server, srv) != 0)
            continue;
        c->suspect = 1;
        marked++;
        retire_suspect(c);
        closed += !PH_UP(c->phase);
    }
    if (strcmp(p->failed, srv) != 0) {
        log_warn("pool %s: server %s failed (%s): its %u connection%s drained (%u closed now, the rest at "
                 "release); reconnecting",
                 p->cf->name, srv, why, marked, marked == 1 ? "" : "s", closed);
        snprintf(p->failed, sizeof p->failed, "%s", srv);
        snprintf(p->failed_why, sizeof p->failed_why, "%s", why);
    }
    /* Look for the new server now, not after a backoff earned on the old one. */
    p->backoff_ms = 0;
    p->backoff_until_ms = 0;
    p->sentinel_reask = 1;
    pool_maybe_grow(p);
}

void failover_conn_lost(pool *p, const char *server, const char *why)
{
    failover_drain(p, server, why);
}

void failover_reply(conn *c, const char *why, int readonly)
{
    int follow = c->pool->cf->follow;
    /* A read pool's server is read-only on purpose: its 25006 is the
     * writer's mistake, not a failover. */
    if (follow == PB_FOLLOW_NONE || c->suspect || (readonly && follow != PB_FOLLOW_PRIMARY))
        return;
    failover_drain(c->pool, c->server, why);
}

void failover_tick(pool *p)
{
    if (p->cf->follow == PB_FOLLOW_NONE && !p->server[0])
        return;
    publish_server(p);
    conn *backs = POOL_BACKENDS(p);
    for (uint32_t k = 0; k < POOL_NBACKENDS(p); k++) {
        conn *c = &backs[k];
        if (c->suspect && PH_UP(c->phase))
            retire_suspect(c);      /* leased again through the free map before we flagged it */
    }
}
