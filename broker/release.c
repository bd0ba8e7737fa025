/*
 * release.c — giving a connection back: the holder's release, the broker's
 * reclaim of a lease whose holder died or overstayed, and what makes a
 * connection fit for the next holder (retire it, reset its session, or check
 * it is alive after a long idle) before pool_offer() hands it on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker.h"
#include "conn.h"
#include "invariant.h"
#include "log.h"
#include "poolbroker.h"

static int should_retire(conn *c, const char **why)
{
    pool *p = c->pool;
    if (c->broken) {
        *why = "broken";
        return 1;
    }
    /* A transaction-mode backend counts its binds in its home record. */
    pb_shm_slot *own = c->home ? c->home : c->slot;
    if (p->cf->max_uses && atomic_load(&own->uses) >= p->cf->max_uses) {
        *why = "max_uses reached";
        return 1;
    }
    if (c->retire_at_ms && B.now_ms >= c->retire_at_ms) {
        *why = "max_lifetime reached";
        return 1;
    }
    if (pool_gone(p)) {
        *why = "pool removed";
        return 1;
    }
    if (c->suspect) {
        *why = "its server failed";     /* failover.c */
        return 1;
    }
    if (pool_over_max(p)) {
        *why = "above max_size";      /* no reset for a connection about to close */
        return 1;
    }
    return 0;
}

/* Start a broker-private command (reset or liveness check) that the driver
 * has put in sbuf: n replies to come, into the sink. */
static void start_private(conn *c, enum conn_phase ph, int n)
{
    if (conn_set_phase(c, ph) != PB_OK)
        return;
    c->cmd_start_ms = B.now_ms;
    c->cancel_sent = 0;
    c->reply_errors = 0;
    c->partial = 0;                 /* our Query ends whatever exchange the lease left open */
    conn_expect_add(c, (uint32_t)n);
    conn_send_private(c);
}

/* The broker holds c (RESETTING) and nothing is in flight: reset, retire or
 * hand out. */
void conn_release_clean(conn *c)
{
    const char *why;
    if (should_retire(c, &why)) {
        atomic_fetch_add_explicit(&c->pool->shm->retired, 1, memory_order_relaxed);
        conn_close(c, why);
        return;
    }
    uint32_t cflags = atomic_load(&c->slot->client_flags);
    if (cflags & PB_CF_PIN)
        c->sstate |= SS_PIN;        /* pb_pin: state the server did not report */
    uint32_t dirty = cflags & PB_CF_DIRTY;
    c->sbuf.len = c->soff = 0;
    int n = c->pool->drv->build_reset(c, dirty, &c->sbuf);
    if (n < 0) {
        conn_close(c, "cannot build reset");
        return;
    }
    if (n == 0) {
        conn_validate_or_offer(c);
        return;
    }
    atomic_fetch_add_explicit(&c->pool->shm->resets, 1, memory_order_relaxed);
    start_private(c, PH_RESETTING, n);
}

/* Our reset (or validation) commands have all answered. */
void conn_finish_reset(conn *c)
{
    /* A reset the server refused (a custom reset SQL that fails) left the
     * session as the last holder had it: the next one must not get that.
     * A failing statement aborts the whole reset string, so nothing of it
     * took effect.  Only PostgreSQL counts errors: a Redis reset may draw
     * an error reply that means nothing (DISCARD without MULTI). */
    if (c->reply_errors) {
        slog(LOG_LVL_WARN, c, "reset failed on the server (%u error%s): connection closed", c->reply_errors,
             c->reply_errors == 1 ? "" : "s");
        c->reply_errors = 0;
        conn_close(c, "reset failed");
        return;
    }
    if (c->txn != 'I') {
        conn_close(c, "still in a transaction after reset");
        return;
    }
    pool_offer(c);
}

/* A broker-held, clean connection: if it sat idle past
 * validate_after_idle_ms, check it is alive (empty query / PING) before
 * anyone gets it; otherwise hand it out. */
void conn_validate_or_offer(conn *c)
{
    uint32_t limit = c->pool->cf->validate_after_idle_ms;
    uint64_t idle = atomic_load(&c->slot->idle_ms);
    if (!limit || c->broken || B.now_ms < idle || B.now_ms - idle <= limit) {
        pool_offer(c);
        return;
    }
    c->sbuf.len = c->soff = 0;
    int n = c->pool->drv->build_ping(c, &c->sbuf);
    if (n <= 0) {
        pool_offer(c);
        return;
    }
    start_private(c, PH_VALIDATING, n);
}

/* Take the slot from whoever holds it (word as read) into the broker's hands
 * (RECLAIMING for a reclaim, else RESETTING) and clean it. */
static void release_take(conn *c, uint64_t word, int reclaim)
{
    c->watch = 0;
    if (!slot_take(c, &word, reclaim ? PB_SLOT_RECLAIMING : PB_SLOT_RESETTING))
        return;
    if (reclaim)
        atomic_fetch_add_explicit(&c->pool->shm->reclaims, 1, memory_order_relaxed);
    if (!PH_UP(c->phase) || c->broken) {
        if (PH_UP(c->phase) || c->phase == PH_CONNECTING)
            conn_close(c, "broken");
        else if (c->phase == PH_EMPTY)
            slot_set(c, PB_SLOT_EMPTY);
        return;
    }
    if (c->phase != PH_READY) {
        /* The broker has the connection already: a worker wrote the word we
         * just took (a runtime check, never an assertion).  What the broker
         * was doing goes on. */
        slog(LOG_LVL_WARN, c, "release of a slot the broker holds (%s): ignored", conn_phase_name(c->phase));
        shm_note_repair(&B);
        return;
    }
    if (c->expect || c->sending) {
        /* Replies still owed: they go to the sink, the slot waits for them.
         * Nobody will read them, so do not wait out a long query: cancel it
         * (PostgreSQL), or give the connection up (Redis). */
        if (conn_set_phase(c, PH_DRAINING) != PB_OK)
            return;
        conn_arm_recv(c);
        conn_command_timeout(c, reclaim ? "its lease was taken back" : "its lease was released");
        return;
    }
    conn_release_clean(c);
}

/* The holder gave the slot back (word: RELEASING, as read). */
void conn_release(conn *c, uint64_t word)
{
    conn_stream_drop(c);            /* a request still streaming: its parts never went out */
    if (c->handle) {
        txn_release(c, word, 0, NULL);
        return;
    }
    release_take(c, word, 0);
}

/* Take a lease back from a holder that died or overstayed. */
void conn_take_back(conn *c, uint64_t word, const char *why)
{
    conn_stream_drop(c);            /* a holder that died mid-stream: its parts never went out */
    if (c->handle) {
        txn_release(c, word, 1, why);
        return;
    }
    slog(LOG_LVL_INFO, c, "reclaiming lease: %s", why);
    release_take(c, word, 1);
}
