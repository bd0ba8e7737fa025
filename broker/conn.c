/*
 * conn.c — a connection's phases (enum conn_phase in broker.h) and the moves
 * between them: connecting, the idle watch, closing, failure and command
 * timeouts.  conn_set_phase() is the only place a phase changes; conn_next()
 * is the only place that decides what a connection does once nothing is owed
 * on it.  Sending and receiving are connio.c's; releasing, resetting and
 * validating are release.c's.
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

#define BACKOFF_MIN_MS    50        /* after a failed connect, doubling ... */
#define BACKOFF_MAX_MS    1000      /* ... up to this */

/* Replies owed by the backend; B.inflight counts connections owing any, so
 * the main loop knows whether a completion may be on its way. */
void conn_expect_add(conn *c, uint32_t n)
{
    if (n && c->expect == 0)
        B.inflight++;
    c->expect += n;
}

void conn_expect_clear(conn *c)
{
    if (c->expect && ALWAYS(B.inflight > 0))
        B.inflight--;
    c->expect = 0;
}

static const char *const phase_names[PH_COUNT] = {
    [PH_EMPTY] = "empty",         [PH_CONNECTING] = "connecting",     [PH_READY] = "ready",
    [PH_DRAINING] = "draining",   [PH_AWAIT_CANCEL] = "await_cancel", [PH_RESETTING] = "resetting",
    [PH_VALIDATING] = "validating", [PH_CLOSING] = "closing",
};

const char *conn_phase_name(enum conn_phase ph)
{
    return (unsigned)ph < PH_COUNT ? phase_names[ph] : "invalid";
}

/* The moves the diagram in broker.h has, and no others. */
int conn_phase_allowed(enum conn_phase from, enum conn_phase to)
{
    switch (from) {
    case PH_EMPTY:
        return to == PH_CONNECTING;
    case PH_CONNECTING:
        return to == PH_READY || to == PH_EMPTY;
    case PH_READY:
        return to == PH_DRAINING || to == PH_RESETTING || to == PH_VALIDATING || to == PH_CLOSING;
    case PH_DRAINING:
        return to == PH_AWAIT_CANCEL || to == PH_READY || to == PH_RESETTING || to == PH_VALIDATING ||
               to == PH_CLOSING;
    case PH_AWAIT_CANCEL:
        return to == PH_READY || to == PH_RESETTING || to == PH_VALIDATING || to == PH_CLOSING;
    case PH_RESETTING:
    case PH_VALIDATING:
        return to == PH_READY || to == PH_CLOSING;
    case PH_CLOSING:
        return to == PH_EMPTY;
    case PH_COUNT:
        break;
    }
    return 0;
}

/* The one place a connection changes phase: one switch for what leaving the
 * old phase undoes, one for what entering the new one sets up.  Slot words
 * are not written here (slot.c does, at the call sites that own the CAS).
 * Returns PB_OK, or PB_EINVAL for a move the diagram does not have (logged as
 * an error; an abort in debug builds), leaving the phase as it was. */
int conn_set_phase(conn *c, enum conn_phase to)
{
    pool *p = c->pool;
    enum conn_phase from = c->phase;

    if (NEVER(!conn_phase_allowed(from, to))) {
        slog(LOG_LVL_ERROR, c, "impossible phase change %s -> %s refused", conn_phase_name(from),
             conn_phase_name(to));
        return PB_EINVAL;
    }
    if (log_level <= LOG_LVL_DEBUG)
        slog(LOG_LVL_DEBUG, c, "phase %s -> %s", conn_phase_name(from), conn_phase_name(to));

    switch (from) {
    case PH_CONNECTING:
        if (ALWAYS(p->connecting > 0))
            p->connecting--;
        break;
    case PH_READY:
        /* Whatever the holder asked for is the lease's, and the lease is over. */
        c->submit_deferred = 0;
        break;
    default:
        break;
    }

    c->phase = to;
    switch (to) {
    case PH_CONNECTING:
        p->connecting++;
        p->live++;
        c->broken = 0;
        conn_expect_clear(c);
        c->txn = 'I';
        c->sstate = 0;              /* a new backend carries no session state */
        c->partial = 0;
        c->submit_deferred = c->watch = 0;
        c->to_sink = 0;
        c->error[0] = 0;
        c->reply_errors = 0;
        c->server[0] = 0;           /* the driver says where this one lands */
        c->suspect = 0;
        break;
    case PH_READY:
        c->to_sink = 0;
        c->submit_deferred = 0;
        break;
    case PH_DRAINING:
    case PH_RESETTING:
    case PH_VALIDATING:
        c->to_sink = 1;             /* nobody reads these replies */
        break;
    case PH_CLOSING:
        /* No longer up: the janitor and pool_maybe_grow must not count it. */
        if (ALWAYS(p->live > 0))
            p->live--;
        pool_publish_size(p);
        break;
    case PH_EMPTY:
        if (from == PH_CONNECTING && ALWAYS(p->live > 0))
            p->live--;
        break;
    case PH_AWAIT_CANCEL:
    case PH_COUNT:
        break;
    }
    return PB_OK;
}

/* Decide what a connection does once nothing is owed on it any more: the
 * last reply arrived, the last byte of a release's command went out, or a
 * cancel request was delivered.  The event handlers call this; they never
 * pick the next phase themselves. */
void conn_next(conn *c)
{
    switch (c->phase) {
    case PH_RESETTING:
    case PH_VALIDATING:
        conn_finish_reset(c);
        return;
    case PH_DRAINING:
    case PH_AWAIT_CANCEL:
        if (atomic_load(&c->cancel_inflight)) {
            /* conn_settle resumes once it is delivered. */
            if (c->phase == PH_DRAINING)
                conn_set_phase(c, PH_AWAIT_CANCEL);
            return;
        }
        c->watch = 0;
        if (c->broken) {
            conn_close(c, "broken");
            return;
        }
        if (c->expect || c->sending) {
            /* The replies are in but the request is still going out (its
             * tail asks for none: Parse/Bind without Sync): conn_on_send comes
             * back here. */
            conn_arm_recv(c);
            return;
        }
        conn_release_clean(c);
        return;
    case PH_READY:
        conn_retry_deferred(c);
        if (c->bound)
            txn_maybe_unbind(c);
        return;
    default:
        return;
    }
}

/* ------------------------------------------------------------ connecting */

static void conn_connected(conn *c);
static void connect_failed(conn *c, const char *why, int not_ready);

/* What the driver said of a handshake step: wait for the poll it wants,
 * or it is connected, or it failed. */
static void connect_went(conn *c, int rc, const drv_poll *want)
{
    switch (rc) {
    case DRV_AGAIN:
        if (want->fd < 0) {
            conn_connect_failed(c, "driver asked to poll no socket");
            return;
        }
        loop_poll(B.lp, &c->poll_op, want->fd, want->events);
        return;
    case DRV_OK:
        conn_connected(c);
        return;
    case DRV_NOT_READY:
        /* Up, but not serving yet (loading, starting up): not connected,
         * and tried again after the backoff like any failed connect. */
        connect_failed(c, c->error[0] ? c->error : "server not ready", 1);
        return;
    default:
        conn_connect_failed(c, c->error[0] ? c->error : "connect failed");
        return;
    }
}

void conn_start_connect(conn *c)
{
    pool *p = c->pool;
    slot_set(c, PB_SLOT_CONNECTING);
    if (conn_set_phase(c, PH_CONNECTING) != PB_OK)
        return;
    c->created_ms = B.now_ms;
    c->settings_gen = p->settings_gen;
    c->cset = p->cset;
    atomic_fetch_add_explicit(&p->shm->connects, 1, memory_order_relaxed);
    drv_poll want = { -1, 0 };
    connect_went(c, p->drv->connect_start(c, &want), &want);
}

/* The handshake is done: the connection is READY and offered. */
static void conn_connected(conn *c)
{
    pool *p = c->pool;
    uint64_t life = (uint64_t)p->cf->max_lifetime_s * 1000;

    if (conn_set_phase(c, PH_READY) != PB_OK)
        return;
    c->created_ms = B.now_ms;
    /* Each connection gets its own lifetime once, 0..20% short of the
     * maximum, so connections made together do not all expire together. */
    c->retire_at_ms = life ? B.now_ms + life - (uint64_t)(random() % (life / 5 + 1)) : 0;
    atomic_store(&c->slot->backend_pid, c->backend_pid);
    atomic_store(&c->slot->conn_created_ms, B.now_ms);
    atomic_store(&c->slot->uses, 0);
    atomic_store(&c->slot->txn_status, 'I');
    atomic_store(&c->slot->flags, 0);
    atomic_store(&c->slot->io_error, 0);
    /* Our ring position runs on across connections of this slot; the one
     * in the segment is only ever a copy of it (a worker may have written
     * anything there). */
    atomic_store(&c->slot->rep_head, c->rep_head);
    c->reply_done = 0;
    atomic_store(&c->slot->reply_done, 0);
    pool_publish_size(p);
    p->fails = 0;
    p->health = PB_HEALTH_HEALTHY;
    atomic_store(&p->shm->consecutive_failures, 0);
    pool_publish_health(p);
    p->backoff_ms = 0;
    p->backoff_until_ms = 0;
    if (p->not_ready) {
        p->not_ready = 0;
        log_info("pool %s: server ready", p->cf->name);
    }
    slog(LOG_LVL_DEBUG, c, "connected to %s", c->server[0] ? c->server : "?");
    failover_connected(c);
    if (c->settings_gen != p->settings_gen) {
        /* A reload changed the connection settings while this handshake
         * ran on the old ones: nobody gets it. */
        atomic_fetch_add_explicit(&p->shm->retired, 1, memory_order_relaxed);
        conn_close(c, "connection settings changed during its handshake");
        pool_maybe_grow(p);
        return;
    }
    pool_offer(c);
    pool_maybe_grow(p);
}

void conn_connect_failed(conn *c, const char *why)
{
    connect_failed(c, why, 0);
}

/* A handshake failed (not_ready: the server answered that it does not serve
 * yet).  Either way the slot is EMPTY again and the next try waits out the
 * backoff; a pool with nothing live fails its waiters fast.  A server that
 * is not ready is logged once per episode, not every 20 tries. */
static void connect_failed(conn *c, const char *why, int not_ready)
{
    pool *p = c->pool;

    if (c->poll_op.pending)
        loop_cancel(B.lp, &c->poll_op);
    p->drv->close(c);
    if (conn_set_phase(c, PH_EMPTY) != PB_OK)
        return;
    slot_set(c, PB_SLOT_EMPTY);
    atomic_fetch_add_explicit(&p->shm->connect_failures, 1, memory_order_relaxed);
    uint32_t fails = ++p->fails;
    atomic_store(&p->shm->consecutive_failures, fails);
    snprintf(p->shm->last_error, sizeof p->shm->last_error, "%s", why);
    /* Exponential backoff with jitter, capped. */
    p->backoff_ms = p->backoff_ms ? p->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (p->backoff_ms > BACKOFF_MAX_MS)
        p->backoff_ms = BACKOFF_MAX_MS;
    p->backoff_until_ms = B.now_ms + p->backoff_ms / 2 + (uint64_t)(random() % (p->backoff_ms / 2 + 1));
    if (not_ready) {
        if (!p->not_ready)
            log_warn("pool %s: server not ready yet (%s): retrying with backoff", p->cf->name, why);
        p->not_ready = 1;
    } else if (fails == 1 || fails % 20 == 0) {
        log_warn("pool %s: connect failed (%u in a row): %s", p->cf->name, fails, why);
    }
    p->health = p->live == 0 ? PB_HEALTH_DOWN : PB_HEALTH_DEGRADED;
    pool_publish_health(p);
    if (p->live == 0) {
        /* Nobody will get a connection soon: fail fast rather than time out. */
        pool_fail_waiters(p, PB_EBACKEND);
    }
}

static void idle_readable(conn *c);

void conn_on_poll(ev_op *op, int res)
{
    conn *c = op->data;
    if (c->phase == PH_CLOSING) {
        conn_finish_close(c);
        return;
    }
    if (op->cancelled)
        return;
    if (PH_UP(c->phase)) {
        if (res > 0)
            idle_readable(c);
        return;
    }
    if (c->phase != PH_CONNECTING)
        return;
    if (res < 0) {
        conn_connect_failed(c, strerror(-res));
        return;
    }
    drv_poll want = { -1, 0 };
    connect_went(c, c->pool->drv->connect_step(c, res, &want), &want);
}

/* ------------------------------------------------------------ idle watch
 * A free connection has little to say.  If its socket becomes readable the
 * server has closed it (pg_terminate_backend, CLIENT KILL, a restart) or sent
 * something unasked: the broker takes the slot, reads what is there, and
 * either absorbs it — the protocol's asynchronous messages (driver
 * idle_data: PostgreSQL's ParameterStatus, NoticeResponse and
 * NotificationResponse) — and offers the connection again, or replaces the
 * connection before a worker can lease it and see its first command fail.
 * A TLS connection's bytes are not read here (they are records, not
 * messages): anything on one closes it.  The poll stays armed while a
 * worker holds the slot; it then fires on the worker's first reply and is
 * simply ignored (the janitor re-arms it once free). */
void conn_watch_idle(conn *c)
{
    if (PH_UP(c->phase) && !c->broken && !c->poll_op.pending && c->fd >= 0)
        loop_poll(B.lp, &c->poll_op, c->fd, POLLIN);
}

static void idle_readable(conn *c)
{
    if (!c->idle_async) {
        uint64_t w = atomic_load(&c->slot->word);
        if (PB_WORD_STATE(w) != PB_SLOT_FREE || c->expect || c->phase != PH_READY)
            return;                 /* leased (the data is its reply), or the broker's own
                                       command is answering (a FREE word then is a scribble) */
        if (!slot_take(c, &w, PB_SLOT_RESETTING))
            return;
        conn_freemap_clear(c);
    } else if (c->phase != PH_READY) {
        return;
    }
    int (*absorb)(conn *, const uint8_t *, size_t) = c->ssl ? NULL : c->pool->drv->idle_data;
    uint8_t buf[4096];
    for (;;) {
        /* Without a driver to read it: one byte, peeked, is enough to know. */
        ssize_t n = absorb ? recv(c->fd, buf, sizeof buf, MSG_DONTWAIT)
                           : recv(c->fd, buf, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            if (c->idle_async)
                conn_watch_idle(c);     /* the rest of the message is to come; we keep the slot */
            else
                pool_offer(c);          /* nothing more (or nothing after all) */
            return;
        }
        if (n > 0 && absorb) {
            int rc = absorb(c, buf, (size_t)n);
            if (rc != DRV_ERROR) {
                c->idle_async = rc == DRV_AGAIN;
                continue;
            }
        }
        char why[sizeof c->error];  /* closing clears c->error */
        snprintf(why, sizeof why, "%s", n == 0 ? "server closed the idle connection"
                                        : n < 0 ? strerror(errno)
                                        : absorb ? c->error : "unsolicited data on an idle connection");
        c->idle_async = 0;
        conn_io_failed(c, why);
        return;
    }
}

/* ----------------------------------------------------------------- closing */

/* Close the connection behind a slot the broker holds (or that is EMPTY'd by
 * it now).  Waits for in-flight operations, then frees the driver state. */
void conn_close(conn *c, const char *why)
{
    if (c->phase == PH_EMPTY || c->phase == PH_CLOSING)
        return;
    slog(LOG_LVL_DEBUG, c, "closing: %s", why);
    c->idle_async = 0;
    if (c->phase == PH_CONNECTING) {
        conn_connect_failed(c, why);
        return;
    }
    if (c->bound)
        txn_unbind_for_close(c);    /* the slot word below is the backend's own */
    if (c->mux)
        txn_mux_fail(c, PB_EBACKEND);
    if (conn_set_phase(c, PH_CLOSING) != PB_OK)
        return;
    slot_set(c, PB_SLOT_CLOSING);
    conn_freemap_clear(c);
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    if (c->send_op.pending)
        conn_io_cancel(c, &c->send_op);
    if (c->recv_op.pending)
        conn_io_cancel(c, &c->recv_op);
    if (c->poll_op.pending)
        loop_cancel(B.lp, &c->poll_op);
    if (c->tls_poll_op.pending)
        loop_cancel(B.lp, &c->tls_poll_op);
    conn_finish_close(c);
}

void conn_finish_close(conn *c)
{
    pool *p = c->pool;
    if (c->phase != PH_CLOSING || c->send_op.pending || c->recv_op.pending || c->poll_op.pending ||
        c->tls_poll_op.pending || c->tls_queued)
        return;
    p->drv->close(c);
    c->ssl = NULL;
    c->fd = -1;
    if (conn_set_phase(c, PH_EMPTY) != PB_OK)
        return;
    conn_expect_clear(c);
    c->sending = 0;
    c->backend_pid = 0;
    atomic_store(&c->slot->backend_pid, 0);
    slot_set(c, PB_SLOT_EMPTY);
    pool_maybe_grow(p);
}

/* The connection failed under I/O (or is given up on: err says how the
 * lease holder learns it).  Tell the holder, and close it as soon as nobody
 * holds it. */
void conn_fail(conn *c, const char *why, int err)
{
    if (c->broken)
        return;
    c->broken = 1;
    slog(LOG_LVL_WARN, c, "connection lost: %s", why);
    atomic_fetch_add_explicit(&c->pool->shm->errors, 1, memory_order_relaxed);
    snprintf(c->pool->shm->last_error, sizeof c->pool->shm->last_error, "%s", why);
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    if (c->mux)
        txn_mux_fail(c, err);       /* every handle with a request in flight on it */
    atomic_fetch_or(&c->slot->flags, PB_SF_RETIRE);
    uint64_t w = atomic_load(&c->slot->word);
    unsigned st = PB_WORD_STATE(w);
    if (st == PB_SLOT_LEASED) {
        /* The holder finds out from io_error and releases through us.  A
         * request it is still waiting to hand over will never be taken:
         * acknowledge it, so the holder looks at io_error. */
        atomic_store(&c->slot->io_error, err);
        c->submit_deferred = 0;
        c->acked_seq = atomic_load(&c->slot->req_seq);
        atomic_store(&c->slot->rep_owed, 0);
        atomic_store_explicit(&c->slot->req_ack, c->acked_seq, memory_order_release);
        broker_wake(&c->slot->rep_futex, &c->slot->rep_sleeping);
        return;
    }
    if (st == PB_SLOT_FREE && !slot_take(c, &w, PB_SLOT_RESETTING))
        return;                     /* someone leased it this instant: they will see io_error */
    st = PB_WORD_STATE(atomic_load(&c->slot->word));
    if (st == PB_SLOT_RESETTING || st == PB_SLOT_RECLAIMING)
        conn_close(c, why);
}

void conn_io_failed(conn *c, const char *why)
{
    /* A pool that follows failovers drains the connection's whole server.
     * Which server, from before conn_fail: closing c can start a new
     * connect in its slot at once, which clears c->server. */
    char server[PB_SERVER_MAX];
    int first = !c->broken && !c->suspect;
    snprintf(server, sizeof server, "%s", c->server);
    conn_fail(c, why, PB_EBACKEND);
    if (first)
        failover_conn_lost(c->pool, server, why);
}

/* The command in flight has run past command_timeout_ms (why NULL), or
 * nobody will read its reply (why says so: the lease was released or taken
 * back with it running).  A driver that can cancel (PostgreSQL) sends a
 * cancel request first (the holder then sees SQLSTATE 57014) and the
 * connection is closed only if that does not end the command within the
 * grace period; a Redis command cannot be cancelled, so its connection is
 * closed and replaced at once. */
#define CANCEL_GRACE_MS 2000
void conn_command_timeout(conn *c, const char *why)
{
    if (c->broken || !PH_UP(c->phase) || !c->expect)
        return;
    /* A cancel names the backend, not the statement: on a backend shared by
     * several leases' requests it could stop the wrong one.  Closing it
     * fails them all, the one that ran too long with PB_ETIMEDOUT. */
    if (c->pool->drv->cancel && !c->cancel_sent && !c->mux) {
        c->cancel_sent = 1;
        c->cancel_why = why;
        c->cancel_deadline_ms = B.now_ms + CANCEL_GRACE_MS;
        if (why)
            slog(LOG_LVL_INFO, c, "cancelling the command in flight (running for %llu ms): %s",
                 (unsigned long long)(B.now_ms - c->cmd_start_ms), why);
        else
            slog(LOG_LVL_WARN, c, "command running for %llu ms (command_timeout_ms %u): cancelling",
                 (unsigned long long)(B.now_ms - c->cmd_start_ms), c->pool->cf->command_timeout_ms);
        if (c->pool->drv->cancel(c, &c->cancel_inflight, B.doorbell_fd) == PB_OK)
            return;
    } else if (c->cancel_sent && B.now_ms < c->cancel_deadline_ms) {
        return;
    }
    /* No cancel possible (Redis, a shared backend), it could not be sent,
     * or it did not end the command within the grace period. */
    const char *reason = why ? why : c->cancel_sent ? c->cancel_why : NULL;
    if (reason) {
        char msg[160];
        snprintf(msg, sizeof msg, "closed with a command still running: %s", reason);
        conn_fail(c, msg, PB_ETIMEDOUT);
    } else {
        conn_fail(c, "command timed out", PB_ETIMEDOUT);
    }
}

/* Process exit: free the driver state whatever the phase (no transition: the
 * machine stops here). */
void conn_shutdown(conn *c)
{
    if (c->phase != PH_EMPTY)
        c->pool->drv->close(c);
    c->phase = PH_EMPTY;
}
