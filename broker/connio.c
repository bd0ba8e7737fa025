/*
 * connio.c — the bytes of a connected connection: the lease holder's
 * requests (copied out of shared memory, checked by the driver, sent) and the
 * server's replies (received into the slot's reply ring, or into a private
 * sink when nobody will read them, and counted by the driver's scanner).
 * When everything owed has arrived it hands over to conn_next() (conn.c).
 *
 * Replies go into the slot's reply ring only while the lease that submitted
 * the command still holds the slot; otherwise (the holder released early or
 * died) they go to the sink, and the connection is handed to nobody until
 * every reply it owes has arrived.
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

#define SCRATCH_SIZE      65536     /* the sink for replies nobody reads */

/* I/O on the backend socket: io_uring (or epoll) directly, or through
 * OpenSSL for a TLS connection. */
void conn_io_recv(conn *c, void *buf, size_t len)
{
    if (c->ssl)
        tls_recv(c, buf, len);
    else
        loop_recv(B.lp, &c->recv_op, c->fd, buf, len);
}

void conn_io_send(conn *c, const void *buf, size_t len)
{
    if (c->ssl)
        tls_send(c, buf, len);
    else
        loop_send(B.lp, &c->send_op, c->fd, buf, len);
}

void conn_io_cancel(conn *c, ev_op *op)
{
    if (c->ssl)
        tls_cancel(c, op);
    else
        loop_cancel(B.lp, op);
}

/* ------------------------------------------------------------------ sending */

/* Send sbuf.p[soff..sbuf.len) and arm the receive. */
void conn_send_private(conn *c)
{
    if (!c->sending && c->soff < c->sbuf.len) {
        c->sending = 1;
        conn_io_send(c, c->sbuf.p + c->soff, c->sbuf.len - c->soff);
    }
    conn_arm_recv(c);
}

/* PH_READY: take up a SUBMIT that had to wait, if it can go now. */
void conn_retry_deferred(conn *c)
{
    if (c->submit_deferred && c->broken) {
        /* It will never be sent: conn_submit fails it (PB_EBACKEND). */
        c->submit_deferred = 0;
        uint64_t w = atomic_load(&c->slot->word);
        if (PB_WORD_STATE(w) == PB_SLOT_LEASED)
            conn_submit(c, w, atomic_load(&c->slot->req_seq));
        return;
    }
    if (!c->submit_deferred || c->sending || c->phase != PH_READY)
        return;
    uint64_t w = atomic_load(&c->slot->word);
    if (c->expect && w != c->cmd_word)
        return;
    c->submit_deferred = 0;
    if (PB_WORD_STATE(w) == PB_SLOT_LEASED)
        conn_submit(c, w, atomic_load(&c->slot->req_seq));
}

void conn_on_send(ev_op *op, int res)
{
    conn *c = op->data;
    c->sending = 0;
    if (c->phase == PH_CLOSING) {
        conn_finish_close(c);
        return;
    }
    if (res < 0) {
        conn_io_failed(c, strerror(-res));
        return;
    }
    c->soff += (uint32_t)res;
    if (c->soff < c->sbuf.len) {
        conn_send_private(c);
        return;
    }
    c->soff = c->sbuf.len = 0;
    if (c->mux) {
        txn_mux_sent(c);
        return;
    }
    /* A release that waited for this send resumes if no reply is owed; a
     * lease's deferred SUBMIT may go now. */
    if (c->phase == PH_READY || (c->phase == PH_DRAINING && !c->expect))
        conn_next(c);
}

/* Fail the command the lease holder just submitted (nothing was sent). */
void conn_fail_submit(conn *c, int err, uint32_t seq)
{
    atomic_store(&c->slot->io_error, err);
    c->acked_seq = seq;
    atomic_store_explicit(&c->slot->req_ack, seq, memory_order_release);
    broker_wake(&c->slot->rep_futex, &c->slot->rep_sleeping);
}

void conn_submit(conn *c, uint64_t lease_word, uint32_t seq)
{
    if (c->handle) {
        txn_submit(c, lease_word, seq);     /* transaction mode: bind a backend first */
        return;
    }
    if (seq == c->acked_seq)
        return;                     /* nothing new */
    if (c->broken || !PH_UP(c->phase)) {
        conn_fail_submit(c, PB_EBACKEND, seq);
        return;
    }
    /* One request in the private buffer at a time, never while replies
     * owed to somebody else are still coming, never while the broker has
     * the connection (a scribbled slot word can get us here), and never
     * while a cancel request for an earlier command may still land. */
    if (c->sending || c->phase != PH_READY || (c->expect && c->cmd_word != lease_word) ||
        atomic_load(&c->cancel_inflight)) {
        c->submit_deferred = 1;
        return;
    }
    uint32_t len = atomic_load(&c->slot->req_len);   /* read once */
    if (len == 0 || len > c->req_size) {
        slog(LOG_LVL_WARN, c, "request length %u impossible (buffer %u): rejected", len, c->req_size);
        shm_note_repair(&B);
        conn_fail_submit(c, PB_EPROTO, seq);
        return;
    }
    c->sbuf.len = c->soff = 0;
    /* Copy first, then validate the copy: the client cannot change what we
     * checked after we checked it. */
    if (drv_buf_append(&c->sbuf, c->req, len) != PB_OK) {
        conn_fail_submit(c, PB_ENOMEM, seq);
        return;
    }
    uint32_t nrep = 0;
    const char *why = NULL;
    int frc = c->pool->drv->frame_request(c, &c->sbuf, &nrep, &why);
    if (frc != PB_OK) {
        c->sbuf.len = 0;
        if (frc == PB_EPERM) {
            /* a policy, not a scribble: no repair counted */
            slog(LOG_LVL_INFO, c, "request refused: %s", why ? why : "not allowed");
        } else if (frc == PB_EPROTO) {
            slog(LOG_LVL_WARN, c, "malformed request rejected: %s", why ? why : "bad framing");
            shm_note_repair(&B);
        }
        conn_fail_submit(c, frc == PB_ENOMEM ? PB_ENOMEM : PB_EPROTO, seq);
        return;
    }
    if (why)
        slog(LOG_LVL_INFO, c, "command refused by policy, answered with an error reply: %s", why);
    atomic_store(&c->slot->io_error, 0);
    if (c->expect == 0) {
        c->cmd_start_ms = B.now_ms;
        c->cancel_sent = 0;
    }
    conn_expect_add(c, nrep);
    /* What we now owe, before the ack: a holder that sees the ack sees it. */
    atomic_store(&c->slot->rep_owed, c->expect);
    c->acked_seq = seq;
    atomic_store(&c->slot->req_ack, seq);
    /* Only a holder waiting for its request buffer (pipelining, COPY) is
     * woken by the ack; one asleep for its reply is woken by the reply (a
     * wake here would cost it a second context switch per query). */
    if (atomic_load(&c->slot->req_waiting))
        broker_wake(&c->slot->rep_futex, &c->slot->rep_sleeping);
    c->cmd_word = lease_word;
    c->to_sink = 0;
    conn_send_private(c);
}

/* ---------------------------------------------------------------- receiving */

void conn_arm_recv(conn *c)
{
    if (c->recv_op.pending || !PH_UP(c->phase) || c->broken || (c->expect == 0 && !c->watch) ||
        c->mux_pos < c->mux_len)    /* scratch still holds replies to route (txn.c) */
        return;
    void *buf;
    size_t len;
    if (c->to_sink) {
        if (!c->scratch && !(c->scratch = malloc(SCRATCH_SIZE))) {
            conn_io_failed(c, "out of memory");
            return;
        }
        buf = c->scratch;
        len = SCRATCH_SIZE;
        c->recv_sink = 1;
    } else {
        uint64_t tail = atomic_load_explicit(&c->slot->rep_tail, memory_order_acquire);
        uint64_t used = c->rep_head - tail;
        if (used > c->rep_size) {
            /* The holder wrote an impossible tail: its replies are lost to it. */
            slog(LOG_LVL_WARN, c, "reply ring tail corrupted; replies discarded");
            shm_note_repair(&B);
            atomic_store(&c->slot->io_error, PB_EPROTO);
            c->to_sink = 1;
            conn_arm_recv(c);
            return;
        }
        if (used == c->rep_size) {
            /* Full: stop reading (the backend blocks) until the holder drains. */
            atomic_store(&c->slot->rep_paused, 1);
            uint64_t t2 = atomic_load(&c->slot->rep_tail);
            if (t2 == tail)
                return;
            atomic_store(&c->slot->rep_paused, 0);
            used = c->rep_head - t2;
        }
        uint32_t off = (uint32_t)(c->rep_head & (c->rep_size - 1));
        len = c->rep_size - used;
        if (len > c->rep_size - off)
            len = c->rep_size - off;
        buf = c->rep + off;
        c->recv_sink = 0;
    }
    conn_io_recv(c, buf, len);
}

/* The holder wants what the server sends unasked (LISTEN). */
void conn_watch(conn *c, uint64_t lease_word)
{
    if (c->handle) {
        txn_watch(c, lease_word);
        return;
    }
    if (c->broken || c->phase != PH_READY)
        return;
    if (c->expect && c->cmd_word != lease_word)
        return;
    c->watch = 1;
    c->cmd_word = lease_word;
    c->to_sink = 0;
    conn_arm_recv(c);
}

void conn_drained(conn *c)
{
    if (c->handle) {
        txn_drained(c);
        return;
    }
    if (atomic_exchange(&c->slot->rep_paused, 0))
        conn_arm_recv(c);
}

/* The scanner found one complete reply.  PB_EPROTO if none was owed (the
 * stream is out of step with the requests). */
int conn_got_reply(conn *c, const drv_reply *r)
{
    char txn = r->txn;
    if (c->expect == 0)
        return PB_EPROTO;
    c->reply_errors += r->errors;
    c->expect--;
    if (c->expect == 0 && ALWAYS(B.inflight > 0))
        B.inflight--;
    if (txn)
        c->txn = txn;
    if (!c->to_sink) {
        atomic_store(&c->slot->txn_status, (uint32_t)(unsigned char)c->txn);
        c->unpublished++;           /* counted in reply_done once its bytes are published */
    }
    if (r->server_gone || r->server_readonly)     /* failover.c: the server is not what it was */
        failover_reply(c, r->server_gone ? r->server_gone : r->server_readonly, r->server_gone == NULL);
    return PB_OK;
}

/* Let the driver find the complete replies in n fresh bytes, one at a time. */
static int scan_replies(conn *c, const uint8_t *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        size_t used = 0;
        drv_reply r = { 0 };
        int rc = c->pool->drv->scan_reply(c, p + off, n - off, &used, &r);
        if (rc == DRV_ERROR || used > n - off)
            return PB_EPROTO;
        off += used;
        if (rc == DRV_AGAIN)
            break;
        if (conn_got_reply(c, &r) != PB_OK)
            return PB_EPROTO;
    }
    return PB_OK;
}

void conn_on_recv(ev_op *op, int res)
{
    conn *c = op->data;
    if (c->phase == PH_CLOSING) {
        conn_finish_close(c);
        return;
    }
    if (res <= 0) {
        conn_io_failed(c, res == 0 ? "server closed the connection" : strerror(-res));
        return;
    }
    if (c->mux) {
        txn_mux_recv(c, (size_t)res);  /* replies of several handles: routed one by one */
        return;
    }
    /* Where this recv was pointed when it was armed (to_sink may have
     * changed since: the holder released meanwhile). */
    int sink = c->recv_sink;
    const uint8_t *p = sink ? c->scratch : c->rep + (c->rep_head & (c->rep_size - 1));
    if (scan_replies(c, p, (size_t)res) != PB_OK) {
        conn_io_failed(c, "protocol error in the server's reply");
        return;
    }
    if (!sink) {
        if (atomic_load(&c->slot->word) == c->cmd_word) {
            /* The scan above stored PB_SF_RESET for state these bytes
             * report (driver.h): this release store publishes it with them. */
            c->rep_head += (uint64_t)res;
            atomic_store_explicit(&c->slot->rep_head, c->rep_head, memory_order_release);
            /* After the bytes: a holder that sees reply_done sees them too. */
            c->reply_done += c->unpublished;
            atomic_store(&c->slot->reply_done, c->reply_done);
            atomic_store(&c->slot->rep_owed, c->expect);
            broker_wake(&c->slot->rep_futex, &c->slot->rep_sleeping);
        } else {
            c->to_sink = 1;         /* the lease is gone: nobody reads these */
        }
    }
    c->unpublished = 0;
    if (c->expect) {
        conn_arm_recv(c);
        return;
    }
    if (c->watch) {
        /* Keep listening while the same lease holds the slot. */
        if (!c->to_sink && atomic_load(&c->slot->word) == c->cmd_word) {
            conn_arm_recv(c);
            return;
        }
        c->watch = 0;
    }
    conn_next(c);                   /* everything owed has arrived */
}

/* Called when a cancel request was delivered (doorbell) and by the
 * janitor: resume what waited for the connection to be quiet. */
void conn_settle(conn *c)
{
    if (!PH_UP(c->phase) || atomic_load(&c->cancel_inflight))
        return;
    if (c->phase == PH_AWAIT_CANCEL ? !c->expect && !c->sending
                                    : c->phase == PH_READY && c->submit_deferred)
        conn_next(c);
}
