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
#include <malloc.h>
#include <stdarg.h>
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

/* Free a buffer that held a streamed request; one of RETURN_TO_OS bytes or
 * more is given back to the kernel at once (malloc_trim): glibc would keep
 * a freed heap block of that size for the next malloc, and the broker's
 * resident size would stay at its largest request ever. */
#define RETURN_TO_OS (1u << 20)
static void free_big(drv_buf *b)
{
    uint32_t cap = b->cap;
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    if (cap >= RETURN_TO_OS)
        malloc_trim(0);
}

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

/* A send buffer that held a streamed request is given back once empty:
 * a connection keeps at most SBUF_KEEP bytes between requests. */
#define SBUF_KEEP (256u * 1024u)
static void sbuf_trim(conn *c)
{
    if (c->sbuf.len == 0 && c->sbuf.cap > SBUF_KEEP)
        free_big(&c->sbuf);
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
    sbuf_trim(c);
    if (c->mux) {
        txn_mux_sent(c);
        return;
    }
    /* A release that waited for this send resumes if no reply is owed; a
     * lease's deferred SUBMIT may go now. */
    if (c->phase == PH_READY || (c->phase == PH_DRAINING && !c->expect))
        conn_next(c);
}

/* The conn a lease's streamed request is kept on: a bound backend's
 * handle, else c itself (see conn.stream). */
static conn *lease_conn(conn *c)
{
    return c->bound && !c->handle ? c->bound : c;
}

/* The conn holding the lease's authoritative acked_seq: a bound handle's
 * backend (unbind copies it back), else c itself. */
static conn *ack_conn(conn *c)
{
    return c->handle && c->bound ? c->bound : c;
}

void conn_stream_drop(conn *c)
{
    conn *l = lease_conn(c);
    free_big(&l->stream);
    l->stream_total = l->stream_seq = 0;
    l->stream_word = 0;
    l->stream_ready = 0;
}

/* Tell the holder its request buffer is free again (req_ack = seq), waking
 * it if it waits for that (req_waiting). */
static void ack_request(conn *c, uint32_t seq)
{
    ack_conn(c)->acked_seq = seq;
    atomic_store(&c->slot->req_ack, seq);
    /* Only a holder waiting for its request buffer (pipelining, COPY, the
     * next part of a streamed request) is woken by the ack; one asleep for
     * its reply is woken by the reply (a wake here would cost it a second
     * context switch per query). */
    if (atomic_load(&c->slot->req_waiting))
        broker_wake(&c->slot->rep_futex, &c->slot->rep_sleeping);
}

/* Fail the command the lease holder just submitted (nothing was sent). */
void conn_fail_submit(conn *c, int err, uint32_t seq)
{
    conn_stream_drop(c);
    atomic_store(&c->slot->io_error, err);
    c->acked_seq = seq;
    atomic_store_explicit(&c->slot->req_ack, seq, memory_order_release);
    broker_wake(&c->slot->rep_futex, &c->slot->rep_sleeping);
}

/* What stream_take found in the request buffer. */
enum take {
    TAKE_NONE,               /* nothing new (seq already taken), or failed and acked */
    TAKE_PART,               /* a part of a streamed request, taken and acked: more follow */
    TAKE_WHOLE,              /* a request that fits, in the request buffer */
    TAKE_STREAM,             /* the last part: the whole request is in lease_conn(c)->stream */
};

/* Fail a request from stream_take: logged, its parts freed, acked with err. */
static enum take take_fail(conn *c, int err, uint32_t seq, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static enum take take_fail(conn *c, int err, uint32_t seq, const char *fmt, ...)
{
    char why[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (err == PB_ETOOBIG) {
        slog(LOG_LVL_INFO, c, "request refused: %s", why);     /* a limit, not a scribble */
    } else if (err == PB_EPROTO) {
        slog(LOG_LVL_WARN, c, "malformed request rejected: %s", why);
        shm_note_repair(&B);
    } else {
        slog(LOG_LVL_WARN, c, "request dropped: %s", why);
    }
    conn_stream_drop(c);
    atomic_store(&c->slot->io_error, err);
    ack_request(c, seq);
    return TAKE_NONE;
}

/* Take what the holder of lease_word put in c's request buffer as req_seq
 * seq (c: the conn the lease holds, a session-mode conn or a handle).  A
 * request that fits is left where it is (TAKE_WHOLE); a part of a larger
 * one is appended to c->stream and acked at once, so the holder writes the
 * next part while no backend is involved; the last part makes the request
 * whole (TAKE_STREAM), unacked until it is checked and sent.  Every field
 * read is the holder's and untrusted: a part out of order or a total that
 * changes fails the request with PB_EPROTO, a total over the pool's
 * max_request_size with PB_ETOOBIG; either way nothing was sent. */
static enum take stream_take(conn *c, uint64_t lease_word, uint32_t seq)
{
    if (seq == ack_conn(c)->acked_seq)
        return TAKE_NONE;
    if (c->stream_ready || c->stream.len) {
        if (c->stream_word != lease_word)
            conn_stream_drop(c);    /* left by a lease that ended without a release we saw */
        else if (c->stream_ready && c->stream_seq == seq)
            return TAKE_STREAM;     /* whole already, deferred: still waiting to be sent */
        else if (c->stream_ready)
            conn_stream_drop(c);    /* a new request after one never sent: the holder lost track */
    }
    uint32_t len = atomic_load(&c->slot->req_len);       /* each read once */
    uint32_t total = atomic_load(&c->slot->req_total);
    uint32_t pos = atomic_load(&c->slot->req_pos);
    uint32_t cap = c->pool->cf->max_request_size;
    switch (pb_req_part(len, total, pos, c->stream.len, c->stream_total, c->req_size, cap)) {
    case PB_PART_WHOLE:
        return TAKE_WHOLE;
    case PB_PART_FIRST:
        conn_stream_drop(c);        /* a request in progress: the holder started over */
        c->stream_total = total;
        c->stream_word = lease_word;
        atomic_store(&c->slot->io_error, 0);
        break;
    case PB_PART_NEXT:
        break;
    case PB_PART_BAD_LEN:
        return take_fail(c, PB_EPROTO, seq, "request length %u impossible (buffer %u)", len, c->req_size);
    case PB_PART_BAD_ORDER:
        return take_fail(c, PB_EPROTO, seq, "streamed request part at %u of %u bytes, expected at %u of %u",
                         pos, total, c->stream.len, c->stream_total);
    case PB_PART_OVERRUN:
        return take_fail(c, PB_EPROTO, seq, "streamed request part of %u bytes at %u overruns its %u bytes",
                         len, pos, c->stream_total);
    case PB_PART_TOO_BIG:
        return take_fail(c, PB_ETOOBIG, seq, "a request of %u bytes is over max_request_size (%u bytes)",
                         total, cap);
    }
    if (drv_buf_append(&c->stream, c->req, len) != PB_OK)
        return take_fail(c, PB_ENOMEM, seq, "out of memory for a streamed request of %u bytes", c->stream_total);
    if (c->stream.len < c->stream_total) {
        ack_request(c, seq);
        return TAKE_PART;
    }
    c->stream_ready = 1;
    c->stream_seq = seq;
    return TAKE_STREAM;
}

void conn_submit(conn *c, uint64_t lease_word, uint32_t seq)
{
    /* The parts of a streamed request are taken on the lease's own conn,
     * as they come (a session-mode conn only while it is in service: else
     * the checks below fail or defer the SUBMIT, and a retry takes it). */
    if (c->handle || (!c->bound && c->phase == PH_READY && !c->broken)) {
        enum take t = stream_take(c, lease_word, seq);
        if (t == TAKE_NONE || t == TAKE_PART)
            return;
    }
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
    c->sbuf.len = c->soff = 0;
    conn *l = lease_conn(c);
    if (l->stream_ready && l->stream_seq == seq && l->stream_word == lease_word) {
        /* Streamed: the whole request is in the lease's private buffer
         * already; it becomes the send buffer (no copy). */
        drv_buf whole = l->stream;
        l->stream = c->sbuf;
        c->sbuf = whole;
        conn_stream_drop(c);
    } else {
        uint32_t len = atomic_load(&c->slot->req_len);   /* read once */
        if (len == 0 || len > c->req_size) {
            slog(LOG_LVL_WARN, c, "request length %u impossible (buffer %u): rejected", len, c->req_size);
            shm_note_repair(&B);
            conn_fail_submit(c, PB_EPROTO, seq);
            return;
        }
        /* Copy first, then validate the copy: the client cannot change what we
         * checked after we checked it. */
        if (drv_buf_append(&c->sbuf, c->req, len) != PB_OK) {
            conn_fail_submit(c, PB_ENOMEM, seq);
            return;
        }
    }
    uint32_t nrep = 0;
    const char *why = NULL;
    int frc = c->pool->drv->frame_request(c, &c->sbuf, &nrep, &why);
    if (frc != PB_OK) {
        c->sbuf.len = 0;
        sbuf_trim(c);
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
    ack_request(c, seq);
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
