/*
 * txn.c — transaction pooling (pool_mode = transaction): a lease is a handle
 * with its own request buffer and reply ring, and a backend connection is
 * bound to it only while it needs one.
 *
 *   - A handle's statement that finds no backend bound (txn_submit) takes an
 *     idle one, or waits in the pool's FIFO (p->tq) until one frees
 *     (txn_offer_backend).  The worker sleeps once: its reply wakes it.
 *   - After the reply that leaves the backend idle (ReadyForQuery 'I' for
 *     PostgreSQL, a complete reply outside MULTI for Redis) the backend is
 *     unbound at once (txn_maybe_unbind), unless the lease is pinned: an open
 *     transaction, session state the server reported (conn.sstate), an
 *     explicit pb_pin (PB_CF_PIN), a LISTEN watch, or replies still owed.
 *   - Releasing a bound handle releases its backend the way session mode
 *     releases a connection (drain, reset exactly the state left, validate),
 *     with the handle held by the broker until the backend is clean: a
 *     receive may still be writing into the handle's ring.  The handle is
 *     unbound when the backend is offered again (pool_offer) or closed.
 *
 *   - A request the driver calls shareable (Redis: plain commands;
 *     PostgreSQL: a query text the server has shown to leave nothing
 *     behind, pgshare.h) of a handle that is not bound does not bind a
 *     backend: it is appended to one in mux use (mux_pick: for Redis the
 *     least busy one while it has fewer than 8 in flight, else an idle one;
 *     for PostgreSQL a quick statement joins quick ones, up to 4, others
 *     take an idle backend first), together with
 *     the other handles' requests taken in the same pass of the loop, and
 *     they go out in one write (txn_mux_flush).  The replies come back in
 *     order into the backend's scratch buffer; each is copied into the ring
 *     of the handle whose request it answers (mux_route), while that lease
 *     still holds the handle, else dropped.  A handle's requests in flight all go to one
 *     backend (mux_back) so that its replies stay in order; a request of it
 *     that cannot share waits until they are answered (mux_deferred).  A
 *     backend that loses its connection fails every request in flight
 *     (txn_mux_fail); when nothing is in flight it is offered again.
 *
 * Binding swaps the handle's slot view into the backend (bind/unbind): its
 * slot record, buffers and ring positions.  While bound, connio.c and
 * release.c work on the backend exactly as on a session-mode slot; while at
 * home, the backend's slot record is private (CONN_AT_HOME): no worker can
 * lease it, no free-map bit stands for it.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "broker.h"
#include "conn.h"
#include "invariant.h"
#include "log.h"
#include "poolbroker.h"

int txn_setup(pool *p)
{
    uint32_t n = p->nconns;         /* max_size can never pass the handle count */
    p->backs = calloc(n, sizeof *p->backs);
    p->homes = aligned_alloc(PB_CACHELINE, (size_t)n * sizeof *p->homes);
    p->tq = calloc(n, sizeof *p->tq);
    if (!p->backs || !p->homes || !p->tq)
        return -1;
    memset(p->homes, 0, (size_t)n * sizeof *p->homes);
    p->nbacks = n;
    for (uint32_t k = 0; k < n; k++) {
        conn *c = &p->backs[k];
        c->pool = p;
        c->home = &p->homes[k];
        c->home_index = k;
        c->slot = c->home;
        c->index = k;
        c->fd = -1;
        c->send_op.cb = conn_on_send;
        c->recv_op.cb = conn_on_recv;
        c->poll_op.cb = conn_on_poll;
        c->send_op.data = c->recv_op.data = c->poll_op.data = c;
        c->txn = 'I';
    }
    for (uint32_t k = 0; k < p->nconns; k++)
        p->conns[k].handle = 1;
    return 0;
}

void txn_free(pool *p)
{
    for (uint32_t k = 0; k < p->nbacks; k++) {
        conn_shutdown(&p->backs[k]);
        free(p->backs[k].sbuf.p);
        free(p->backs[k].scratch);
        free(p->backs[k].mq);
        free(p->backs[k].mux_out.p);
    }
    free(p->backs);
    free(p->homes);
    free(p->tq);
}

/* ------------------------------------------------------------- binding */

/* Backend b (at home, clean, its home record broker-held) serves handle h. */
static void bind(conn *b, conn *h)
{
    ALWAYS(CONN_AT_HOME(b) && !h->bound && !b->expect);
    b->bound = h;
    h->bound = b;
    b->slot = h->slot;
    b->index = h->index;
    b->req = h->req;
    b->rep = h->rep;
    b->req_size = h->req_size;
    b->rep_size = h->rep_size;
    b->rep_head = h->rep_head;
    b->acked_seq = h->acked_seq;
    b->reply_done = h->reply_done;
    b->cmd_word = h->cmd_word;
    b->unpublished = 0;
    b->watch = 0;
    b->to_sink = 0;
    b->submit_deferred = 0;
    /* max_uses counts binds in this mode: each is a use of the backend. */
    atomic_fetch_add_explicit(&b->home->uses, 1, memory_order_relaxed);
    /* What the holder (and shmstat) sees of the backend now serving it. */
    pb_shm_slot *s = h->slot;
    atomic_store(&s->backend_pid, b->backend_pid);
    atomic_store(&s->conn_created_ms, atomic_load(&b->home->conn_created_ms));
    atomic_store(&s->txn_status, (uint32_t)(unsigned char)b->txn);
    atomic_store(&s->flags, (b->sstate ? PB_SF_RESET : 0u) |
                            (atomic_load(&b->home->flags) & PB_SF_RETIRE));
}

/* Give b its home view back; returns the handle it served, whose own view
 * takes the ring positions over.  b's home record is broker-held
 * (RESETTING): the caller offers or closes b. */
static conn *unbind(conn *b)
{
    conn *h = b->bound;
    if (NEVER(!h))
        return NULL;
    h->rep_head = b->rep_head;
    h->acked_seq = b->acked_seq;
    h->reply_done = b->reply_done;
    h->cmd_word = b->cmd_word;
    h->bound = NULL;
    b->bound = NULL;
    b->slot = b->home;
    b->index = b->home_index;
    b->req = b->rep = NULL;
    b->req_size = b->rep_size = 0;
    b->rep_head = 0;
    b->acked_seq = 0;
    b->reply_done = 0;
    b->cmd_word = 0;
    b->watch = 0;
    slot_set(b, PB_SLOT_RESETTING);
    return h;
}

/* An idle backend of p, taken from its home record (RESETTING), or NULL. */
static conn *take_idle(pool *p)
{
    for (uint32_t k = 0; k < p->nbacks; k++) {
        conn *b = &p->backs[k];
        if (b->phase == PH_READY && CONN_AT_HOME(b) && !b->expect && !b->sending && !b->broken &&
            slot_take_free(b, PB_SLOT_RESETTING))
            return b;
    }
    return NULL;
}

/* --------------------------------------------------------- the queue */

static void tq_push(pool *p, conn *h)
{
    if (NEVER(p->tq_len == p->nconns))
        return;
    p->tq[(p->tq_head + p->tq_len) % p->nconns] = h;
    p->tq_len++;
    h->queued = 1;
    h->queued_ms = B.now_ms;
}

static conn *tq_pop(pool *p)
{
    if (!p->tq_len)
        return NULL;
    conn *h = p->tq[p->tq_head];
    p->tq_head = (p->tq_head + 1) % p->nconns;
    p->tq_len--;
    h->queued = 0;
    return h;
}

/* Put h back at the head of the queue (it was popped, and waits on). */
static void tq_unpop(pool *p, conn *h)
{
    p->tq_head = (p->tq_head + p->nconns - 1) % p->nconns;
    p->tq[p->tq_head] = h;
    p->tq_len++;
    h->queued = 1;
}

static void tq_remove(pool *p, conn *h)
{
    for (uint32_t i = 0; i < p->tq_len; i++) {
        if (p->tq[(p->tq_head + i) % p->nconns] != h)
            continue;
        for (uint32_t j = i; j + 1 < p->tq_len; j++)
            p->tq[(p->tq_head + j) % p->nconns] = p->tq[(p->tq_head + j + 1) % p->nconns];
        p->tq_len--;
        break;
    }
    h->queued = 0;
}

/* Fail every queued statement with err (the backend is down, shutdown). */
void txn_fail_queue(pool *p, int err)
{
    conn *h;
    while ((h = tq_pop(p)) != NULL)
        conn_fail_submit(h, err, atomic_load(&h->slot->req_seq));
}

static int mux_submit(conn *h, uint64_t word, uint32_t seq, conn *onto);

/* A backend of p came clean (pool_offer, PH_READY, its home record
 * broker-held): bind it to the first queued handle that still has a
 * statement to send.  A shareable one (driver.shareable) does not bind it:
 * the backend goes into mux use and takes, in queue order, that one and
 * the shareable ones behind it, up to the driver's share_depth (PostgreSQL:
 * none after one that is not quick), all in one write; the queue then
 * empties as fast as it formed, and new statements, which never overtake
 * it, may share again.  Returns 1 if it took one. */
int txn_offer_backend(conn *b)
{
    pool *p = b->pool;
    conn *h;
    while ((h = tq_pop(p)) != NULL) {
        uint64_t w = atomic_load(&h->slot->word);
        uint32_t seq = atomic_load(&h->slot->req_seq);
        if (PB_WORD_STATE(w) != PB_SLOT_LEASED || h->bound || seq == h->acked_seq)
            continue;               /* released or reclaimed meanwhile */
        if (b->mux && (b->mq_len >= p->drv->share_depth || (p->drv->share_idle_first && b->mq_slow))) {
            tq_unpop(p, h);
            break;
        }
        if (p->drv->shareable && mux_submit(h, w, seq, b)) {
            if (b->broken || b->phase != PH_READY)
                return 1;           /* lost with it (conn_fail): not to be offered */
            continue;
        }
        if (b->mq_len) {
            tq_unpop(p, h);         /* not shareable: it waits for a backend of its own */
            break;
        }
        if (b->mux) {
            b->mux = 0;             /* taken for a request that failed before it was queued */
            b->to_sink = 0;
        }
        bind(b, h);
        conn_submit(b, w, seq);
        return 1;
    }
    if (b->mux && !b->mq_len) {
        b->mux = 0;                 /* every request it took failed at once */
        b->to_sink = 0;
    }
    return b->mux;
}

/* ---------------------------------------------------------- pipelining */

/* Room for one more entry in b->mq.  PB_OK or PB_ENOMEM. */
static int mq_reserve(conn *b)
{
    if (b->mq_len < b->mq_cap)
        return PB_OK;
    uint32_t cap = b->mq_cap ? b->mq_cap * 2 : 16;
    mux_ent *q = malloc((size_t)cap * sizeof *q);
    if (!q)
        return PB_ENOMEM;
    for (uint32_t i = 0; i < b->mq_len; i++)
        q[i] = b->mq[(b->mq_head + i) % b->mq_cap];
    free(b->mq);
    b->mq = q;
    b->mq_cap = cap;
    b->mq_head = 0;
    return PB_OK;
}

/* May backend b (in mux use) take requests of handles with none in flight?
 * Not once it is to close when it comes free (lifetime, a reload, a failed
 * server, max_uses, a pool above max_size): it must come free for that,
 * and a backend that always has a request in flight never does.  Nor once
 * a reply on it reported session state or an open transaction (a shared
 * PostgreSQL statement that was not what the server had shown it to be):
 * it is reset when it comes free (mux_settle). */
static int mux_may_grow(const conn *b)
{
    const pool *p = b->pool;
    uint64_t uses = p->cf->max_uses;
    return !b->broken && b->phase == PH_READY && !b->suspect && !(b->retire_at_ms && B.now_ms >= b->retire_at_ms) &&
           !(uses && atomic_load(&b->home->uses) >= uses) && !pool_over_max(p) && !b->sstate && b->txn == 'I' &&
           !b->cancel_sent;
}

/* How long (ms, on the loop's clock) the oldest request on a backend may
 * have been out for a quick PostgreSQL statement to join it. */
#define MUX_YOUNG_MS 2

/* Does worker `owner` hold, in any PostgreSQL pool, a connection with a
 * transaction open?  Then a statement of its must not go behind another
 * lease's on a shared backend: that one may wait for a lock the worker's
 * own transaction holds, and the worker, waiting for its statement, never
 * ends the transaction, a deadlock the server cannot see.  Bound, the
 * statement takes a backend of its own, as without sharing.  Looks at
 * every backend connection (few: that is what pools are for). */
static int owner_in_txn(uint32_t owner)
{
    for (uint32_t i = 0; i < B.npools; i++) {
        const pool *q = &B.pools[i];
        if (q->drv != &pg_driver)
            continue;
        uint32_t n = POOL_NBACKENDS(q);
        for (uint32_t k = 0; k < n; k++) {
            const conn *c = q->backs ? &q->backs[k] : &q->conns[k];
            if (c->txn == 'I' || c->phase == PH_EMPTY)
                continue;
            const pb_shm_slot *s = q->backs ? (c->bound ? c->bound->slot : NULL) : c->slot;
            if (!s)
                continue;
            uint64_t w = atomic_load(&s->word);
            if (PB_WORD_STATE(w) == PB_SLOT_LEASED && PB_WORD_OWNER(w) == owner)
                return 1;
        }
    }
    return 0;
}

/* An idle backend taken into mux use, or NULL. */
static conn *mux_take_idle(pool *p)
{
    conn *idle = take_idle(p);
    if (!idle)
        return NULL;
    idle->mux = 1;
    idle->to_sink = 1;              /* recvs go to scratch; mux_route copies */
    atomic_fetch_add_explicit(&idle->home->uses, 1, memory_order_relaxed);
    return idle;
}

/* A backend for a shareable request (quick: driver.shareable said 2), or
 * NULL (it goes the bound way).  NULL while statements wait in the queue
 * for a backend of their own: taking more requests would keep every
 * backend busy past them.  Else, by the driver's share_idle_first:
 *   - off (Redis): the backend in mux use with the fewest requests in
 *     flight if it has fewer than share_depth, else an idle one (taken into
 *     mux use), else that least busy one;
 *   - on (PostgreSQL): a quick request joins the least busy backend in mux
 *     use below share_depth that carries only quick ones, else takes an
 *     idle one; any other takes an idle one, else joins the least busy
 *     below share_depth.  Else NULL: a slow statement holds up only what
 *     was sent behind it knowingly. */
static conn *mux_pick(pool *p, int quick)
{
    if (p->tq_len)
        return NULL;
    const driver *drv = p->drv;
    int strict = drv->share_idle_first;
    if (strict && !quick) {
        conn *idle = mux_take_idle(p);
        if (idle)
            return idle;
    }
    conn *best = NULL;
    for (uint32_t k = 0; k < p->nbacks; k++) {
        conn *b = &p->backs[k];
        /* strict, quick: behind quick statements only, and only while the
         * oldest has been out no longer than a quick one takes: one that
         * waits on a lock would hold up everything sent behind it. */
        if (b->mux && mux_may_grow(b) &&
            !(strict && quick && (b->mq_slow || B.now_ms - b->cmd_start_ms > MUX_YOUNG_MS)) &&
            (!best || b->mq_len < best->mq_len))
            best = b;
    }
    if (best && best->mq_len < drv->share_depth)
        return best;
    if (strict && !quick)
        return NULL;
    conn *idle = mux_take_idle(p);
    if (idle)
        return idle;
    return strict ? NULL : best;
}

/* Nothing in flight on b any more: it leaves mux use and is offered. */
static void mux_settle(conn *b)
{
    if (!b->mux || b->mq_len || b->sending || b->mux_out.len || b->mux_pos < b->mux_len || b->broken ||
        b->phase != PH_READY)
        return;
    b->mux = 0;
    if (b->sstate || b->txn != 'I') {
        b->mux_tainted = 0;
        conn_release_clean(b);      /* reset exactly what was left, as a release does */
        return;
    }
    pool_offer(b);
}

/* Send what was taken for b since its last send, unless a send is in flight
 * (txn_mux_sent comes back here).  The two buffers swap: the one being sent
 * is never appended to (a realloc would move it under the send). */
static void mux_send(conn *b)
{
    if (b->sending || b->broken || !b->mux_out.len || b->phase != PH_READY)
        return;
    drv_buf t = b->sbuf;
    b->sbuf = b->mux_out;
    b->mux_out = t;
    b->mux_out.len = 0;
    b->soff = 0;
    conn_send_private(b);
}

int txn_mux_flush(void)
{
    int any = 0;
    conn *b;
    while ((b = B.mux_flush) != NULL) {
        B.mux_flush = b->mux_next;
        b->mux_next = NULL;
        b->mux_listed = 0;
        any |= b->mux_out.len && !b->sending;
        mux_send(b);
    }
    return any;
}

void txn_mux_sent(conn *b)
{
    mux_send(b);
    mux_settle(b);
}

/* h has no request in flight on a shared backend any more (answered,
 * failed): a request of its lease that had to wait for that goes now. */
static void mux_handle_done(conn *h)
{
    if (NEVER(h->mux_ents == 0) || --h->mux_ents)
        return;
    h->mux_back = NULL;
    if (!h->mux_deferred)
        return;
    h->mux_deferred = 0;
    uint64_t w = atomic_load(&h->slot->word);
    if (PB_WORD_STATE(w) == PB_SLOT_LEASED)
        txn_submit(h, w, atomic_load(&h->slot->req_seq));
}

/* A shareable request of h (not bound): onto a backend in mux use (onto,
 * when txn_offer_backend gives one, else mux_pick's).  Returns 1 if it was
 * taken (or failed: io_error says), 0 if it goes the bound way (not
 * shareable, pinned, or no backend to share). */
static int mux_submit(conn *h, uint64_t word, uint32_t seq, conn *onto)
{
    pool *p = h->pool;
    if (!p->drv->shareable || (atomic_load(&h->slot->client_flags) & (PB_CF_PIN | PB_CF_DIRTY)))
        return 0;
    /* A streamed request is whole only in h->stream (the request buffer
     * holds its last part): it goes the bound way, where conn_submit takes
     * it from there; one that large gains nothing from sharing. */
    if (h->stream_ready || h->stream.len)
        return 0;
    uint32_t len = atomic_load(&h->slot->req_len);   /* read once */
    if (len == 0 || len > h->req_size)
        return 0;                   /* conn_submit rejects it */
    /* Copy first, then judge the copy: the client cannot change it after.
     * One buffer for every handle (the loop is single-threaded, and the
     * request is appended to the backend's mux_out before this returns):
     * a copy per handle would keep 4 KiB or more per handle that ever
     * shared. */
    static drv_buf rq;
    drv_buf *req = &rq;
    req->len = 0;
    if (drv_buf_append(req, h->req, len) != PB_OK) {
        conn_fail_submit(h, PB_ENOMEM, seq);
        return 1;
    }
    int sh = p->drv->shareable(req->p, req->len);
    if (!sh)
        return 0;
    /* Its requests in flight went to a backend that may take no more (a
     * reply there left state behind, or it is to close): this one waits
     * for them (mux_deferred), then goes its own way. */
    if (h->mux_ents && !mux_may_grow(h->mux_back))
        return 0;
    if (p->drv->share_idle_first && owner_in_txn(PB_WORD_OWNER(word)))
        return 0;
    conn *b = h->mux_ents ? h->mux_back : onto ? onto : mux_pick(p, sh == 2);
    if (!b || (onto && b != onto))
        return 0;
    if (!b->mux) {
        b->mux = 1;                 /* onto: a backend that came free, into mux use */
        b->to_sink = 1;
        atomic_fetch_add_explicit(&b->home->uses, 1, memory_order_relaxed);
    }
    uint32_t nrep = 0;
    const char *why = NULL;
    int framed = 0;
    int rc = mq_reserve(b);
    if (rc == PB_OK) {
        rc = p->drv->frame_request(b, req, &nrep, &why);
        framed = rc == PB_OK;
    }
    if (rc == PB_OK && nrep == 0)
        rc = PB_EPROTO;             /* a shareable request is answered */
    if (rc == PB_OK)
        rc = drv_buf_append(&b->mux_out, req->p, req->len);
    if (rc != PB_OK) {
        conn_fail_submit(h, rc == PB_ENOMEM ? PB_ENOMEM : PB_EPROTO, seq);
        if (framed) {
            /* The driver counted a request that will not be sent: what it
             * expects no longer matches the wire (PostgreSQL would judge
             * the next reply as this request's, pgshare.h).  The
             * connection goes, with whatever it had in flight. */
            conn_fail(b, "a request framed for it could not be queued", rc);
        } else if (!onto) {
            mux_settle(b);          /* onto: txn_offer_backend settles it */
        }
        return 1;
    }
    if (!b->mq_len)
        b->cmd_start_ms = B.now_ms;
    b->mq[(b->mq_head + b->mq_len) % b->mq_cap] = (mux_ent){ h, word, nrep, B.now_ms, (uint8_t)(sh == 2) };
    b->mq_len++;
    b->mq_slow += sh != 2;
    conn_expect_add(b, nrep);
    if (h->mux_word != word) {
        h->mux_word = word;
        h->mux_owed = 0;
    }
    h->mux_owed += nrep;
    h->mux_ents++;
    h->mux_back = b;
    /* The backend of the lease's last request (pb_lease_backend_pid), then
     * what we now owe, before the ack (conn_submit does the same). */
    atomic_store(&h->slot->backend_pid, b->backend_pid);
    atomic_store(&h->slot->io_error, 0);
    atomic_store(&h->slot->rep_owed, h->mux_owed);
    h->acked_seq = seq;
    atomic_store(&h->slot->req_ack, seq);
    if (atomic_load(&h->slot->req_waiting))
        broker_wake(&h->slot->rep_futex, &h->slot->rep_sleeping);
    if (!b->mux_listed) {
        b->mux_listed = 1;
        b->mux_next = B.mux_flush;
        B.mux_flush = b;
    }
    return 1;
}

/* Copy n reply bytes into h's ring (room checked) and publish them. */
static void ring_put(conn *h, const uint8_t *p, size_t n)
{
    uint32_t off = (uint32_t)(h->rep_head & (h->rep_size - 1));
    size_t first = n < h->rep_size - off ? n : h->rep_size - off;
    memcpy(h->rep + off, p, first);
    memcpy(h->rep, p + first, n - first);
    h->rep_head += n;
    atomic_store_explicit(&h->slot->rep_head, h->rep_head, memory_order_release);
}

/* Route b->scratch[mux_pos..mux_len) reply by reply to the handles at the
 * head of b->mq; stops (mux_paused) when the head handle's ring is full. */
static void mux_route(conn *b)
{
    const driver *drv = b->pool->drv;
    b->mux_paused = 0;
    while (b->mux_pos < b->mux_len) {
        if (!b->mq_len) {
            conn_io_failed(b, "the server sent a reply nobody asked for");
            return;
        }
        mux_ent *e = &b->mq[b->mq_head];
        conn *h = e->h;
        pb_shm_slot *s = h->slot;
        int live = atomic_load(&s->word) == e->word;
        const uint8_t *p = b->scratch + b->mux_pos;
        size_t n = b->mux_len - b->mux_pos;
        if (live) {
            uint64_t tail = atomic_load_explicit(&s->rep_tail, memory_order_acquire);
            uint64_t used = h->rep_head - tail;
            if (used > h->rep_size) {
                /* The holder wrote an impossible tail: its replies are lost to it. */
                slog(LOG_LVL_WARN, h, "reply ring tail corrupted; replies discarded");
                shm_note_repair(&B);
                atomic_store(&s->io_error, PB_EPROTO);
                broker_wake(&s->rep_futex, &s->rep_sleeping);
                e->word = 0;        /* no lease word: the rest of its replies go nowhere */
                continue;
            }
            if (used == h->rep_size) {
                /* Full: everything behind waits until the holder drains
                 * (txn_drained) or lets go (txn_release). */
                atomic_store(&s->rep_paused, 1);
                if (atomic_load(&s->rep_tail) == tail) {
                    b->mux_paused = 1;
                    broker_wake(&s->rep_futex, &s->rep_sleeping);
                    return;
                }
                atomic_store(&s->rep_paused, 0);
                continue;
            }
            if (n > h->rep_size - used)
                n = (size_t)(h->rep_size - used);
        }
        size_t took = 0;
        drv_reply r = { 0 };
        int rc = drv->scan_reply(b, p, n, &took, &r);
        if (rc == DRV_ERROR || took > n || (rc == DRV_OK && conn_got_reply(b, &r) != PB_OK)) {
            conn_io_failed(b, "protocol error in the server's reply");
            return;
        }
        b->mux_pos += (uint32_t)took;
        if (rc == DRV_OK && (b->sstate || b->txn != 'I') && !b->mux_tainted) {
            b->mux_tainted = 1;
            slog(LOG_LVL_WARN, b, "a shared statement left session state or a transaction open; %u request%s "
                 "already sent behind it; no more join, and the connection is reset when they are answered",
                 b->mq_len - 1, b->mq_len == 2 ? " was" : "s were");
        }
        if (live)
            ring_put(h, p, took);
        if (rc == DRV_OK && live) {
            /* After the bytes: a holder that sees reply_done sees them too. */
            h->reply_done++;
            h->mux_owed--;
            atomic_store(&s->reply_done, h->reply_done);
            atomic_store(&s->rep_owed, h->mux_owed);
        }
        if (live)
            broker_wake(&s->rep_futex, &s->rep_sleeping);
        if (rc == DRV_OK && --e->nrep == 0) {
            b->mq_slow -= !e->quick;
            b->mq_head = (b->mq_head + 1) % b->mq_cap;
            b->mq_len--;
            if (b->mq_len)
                b->cmd_start_ms = b->mq[b->mq_head].sent_ms;
            mux_handle_done(h);
        }
    }
    if (b->expect)
        conn_arm_recv(b);
    else
        mux_settle(b);
}

void txn_mux_recv(conn *b, size_t n)
{
    b->mux_pos = 0;
    b->mux_len = (uint32_t)n;
    mux_route(b);
}

/* h's holder made room in its ring, or let h go: go on routing if its
 * ring is what b waits for. */
static void mux_resume(conn *h)
{
    conn *b = h->mux_back;
    if (b && b->mux_paused && b->mq_len && b->mq[b->mq_head].h == h)
        mux_route(b);
}

void txn_mux_fail(conn *b, int err)
{
    if (!b->mux)
        return;
    b->mux = 0;
    while (b->mq_len) {
        mux_ent e = b->mq[b->mq_head];
        b->mq_head = (b->mq_head + 1) % b->mq_cap;
        b->mq_len--;
        b->mq_slow -= !e.quick;
        conn *h = e.h;
        if (atomic_load(&h->slot->word) == e.word) {
            /* A request the holder is still waiting to hand over (deferred)
             * is acknowledged too: it looks at io_error. */
            atomic_store(&h->slot->io_error, err);
            h->mux_deferred = 0;
            h->mux_owed = 0;
            h->acked_seq = atomic_load(&h->slot->req_seq);
            atomic_store(&h->slot->rep_owed, 0);
            atomic_store_explicit(&h->slot->req_ack, h->acked_seq, memory_order_release);
            broker_wake(&h->slot->rep_futex, &h->slot->rep_sleeping);
        }
        mux_handle_done(h);
        err = PB_EBACKEND;          /* a timeout is the head's; the rest lost their connection */
    }
    b->mux_out.len = 0;
    b->mux_pos = b->mux_len = 0;
    b->mux_paused = 0;
    b->mux_tainted = 0;
    b->mq_slow = 0;
}

/* ------------------------------------------------------ handle operations */

void txn_submit(conn *h, uint64_t lease_word, uint32_t seq)
{
    pool *p = h->pool;
    if (h->bound) {
        conn_submit(h->bound, lease_word, seq);
        return;
    }
    if (seq == h->acked_seq || h->queued)
        return;
    int err = 0;
    if (B.draining)
        err = PB_ESHUTDOWN;
    else if (p->removed && !p->superseded)
        err = PB_ENOPOOL;           /* superseded (pool_mode switch): its held leases go on */
    else if (p->health == PB_HEALTH_DOWN && p->live == 0)
        err = PB_EBACKEND;          /* fail fast, as an acquire would */
    if (err) {
        conn_fail_submit(h, err, seq);
        return;
    }
    h->cmd_word = lease_word;
    if (mux_submit(h, lease_word, seq, NULL))
        return;
    if (h->mux_ents) {
        h->mux_deferred = 1;        /* after its requests in flight (mux_handle_done) */
        return;
    }
    conn *b = p->tq_len ? NULL : take_idle(p);     /* FIFO: nobody overtakes the queue */
    if (b) {
        bind(b, h);
        conn_submit(b, lease_word, seq);
        return;
    }
    if (p->cf->acquire_timeout_ms == 0) {
        /* No waiting at all, as for an acquire with this setting. */
        atomic_fetch_add_explicit(&p->shm->timeouts, 1, memory_order_relaxed);
        conn_fail_submit(h, PB_ETIMEDOUT, seq);
        return;
    }
    tq_push(p, h);
    atomic_fetch_add_explicit(&p->shm->waits, 1, memory_order_relaxed);
    pool_maybe_grow(p);
}

/* Is the bound backend b free to serve someone else? */
static int pinned(const conn *b)
{
    uint32_t cf = atomic_load(&b->slot->client_flags);
    return b->txn != 'I' || b->sstate || b->partial || (cf & (PB_CF_PIN | PB_CF_DIRTY)) || b->watch ||
           (atomic_load(&b->slot->flags) & PB_SF_RESET);
}

/* Called once nothing is owed on a bound backend in PH_READY: unbind it
 * unless the lease is pinned, and offer it to the queue. */
void txn_maybe_unbind(conn *b)
{
    if (!b->bound || b->phase != PH_READY || b->expect || b->sending || b->submit_deferred || b->broken ||
        atomic_load(&b->cancel_inflight) || pinned(b))
        return;
    unbind(b);
    pool_offer(b);
}

/* The holder gave h back (or lost it: reclaim).  word as read. */
void txn_release(conn *h, uint64_t word, int reclaim, const char *why)
{
    pool *p = h->pool;
    if (h->bound) {
        /* The backend's release takes the handle's word and, once the
         * backend is clean, pool_offer unbinds both (the handle's ring may
         * still be the target of a receive until then). */
        if (reclaim)
            conn_take_back(h->bound, word, why);
        else
            conn_release(h->bound, word);
        return;
    }
    if (!slot_take(h, &word, reclaim ? PB_SLOT_RECLAIMING : PB_SLOT_RESETTING))
        return;
    if (reclaim) {
        slog(LOG_LVL_INFO, h, "reclaiming lease: %s", why);
        atomic_fetch_add_explicit(&p->shm->reclaims, 1, memory_order_relaxed);
    }
    if (h->queued)
        tq_remove(p, h);
    /* Replies still coming for it on a shared backend go nowhere now (its
     * word has changed); a ring they filled no longer holds them up. */
    h->mux_deferred = 0;
    pool_offer_handle(h);
    mux_resume(h);
}

void txn_watch(conn *h, uint64_t lease_word)
{
    if (h->bound)
        conn_watch(h->bound, lease_word);
}

void txn_drained(conn *h)
{
    if (h->bound)
        conn_drained(h->bound);
    else if (atomic_exchange(&h->slot->rep_paused, 0))
        mux_resume(h);
}

/* A bound backend is clean again (pool_offer) or about to close: unbind
 * it.  A handle the broker held for the release is offered again; one still
 * leased stays with its holder, unbound (its next statement binds anew). */
void txn_return_handle(conn *b)
{
    unsigned st = PB_WORD_STATE(atomic_load(&b->slot->word));
    conn *h = unbind(b);
    if (h && (st == PB_SLOT_RESETTING || st == PB_SLOT_RECLAIMING))
        pool_offer_handle(h);
}

/* conn_close of a bound backend: a holder still leasing the handle learns
 * from io_error that the statement in flight is lost. */
void txn_unbind_for_close(conn *b)
{
    if (PB_WORD_STATE(atomic_load(&b->slot->word)) == PB_SLOT_LEASED) {
        atomic_store(&b->slot->io_error, PB_EBACKEND);
        b->acked_seq = atomic_load(&b->slot->req_seq);
        atomic_store(&b->slot->rep_owed, 0);
        atomic_store_explicit(&b->slot->req_ack, b->acked_seq, memory_order_release);
        broker_wake(&b->slot->rep_futex, &b->slot->rep_sleeping);
    }
    txn_return_handle(b);
}

/* ------------------------------------------------------------- janitor */

/* Leases of handles: held too long, given back without a RELEASE entry,
 * statements queued past acquire_timeout_ms. */
static void check_handle(broker *b, pool *p, conn *h)
{
    conf_pool *cp = p->cf;
    uint64_t now = b->now_ms;
    uint64_t w = atomic_load(&h->slot->word);
    unsigned st = PB_WORD_STATE(w);

    if (h->queued && cp->acquire_timeout_ms && now - h->queued_ms > cp->acquire_timeout_ms) {
        tq_remove(p, h);
        atomic_fetch_add_explicit(&p->shm->timeouts, 1, memory_order_relaxed);
        conn_fail_submit(h, PB_ETIMEDOUT, atomic_load(&h->slot->req_seq));
    }
    switch (st) {
    case PB_SLOT_FREE:
        return;
    case PB_SLOT_RELEASING:
        if (h->suspect_word == w + 1) {
            h->suspect_word = 0;
            conn_release(h, w);
        } else {
            h->suspect_word = w + 1;
        }
        return;
    case PB_SLOT_LEASED: {
        if (!client_by_id(b, PB_WORD_OWNER(w)))
            break;                  /* nobody: judged below */
        uint64_t since = atomic_load(&h->slot->lease_ms);
        if (cp->max_lease_ms && since && now > since && now - since > cp->max_lease_ms) {
            client *cl = client_by_id(b, PB_WORD_OWNER(w));
            slog(LOG_LVL_WARN, h, "lease held for %llu ms by worker=%d: past max_lease_ms %u, taking it back",
                 (unsigned long long)(now - since), cl ? (int)cl->pid : -1, cp->max_lease_ms);
            conn_take_back(h, w, "max_lease_ms exceeded");
            return;
        }
        if (cp->leak_threshold_ms && since && now > since && now - since > cp->leak_threshold_ms &&
            h->leak_logged_word != w) {
            client *cl = client_by_id(b, PB_WORD_OWNER(w));
            h->leak_logged_word = w;
            atomic_fetch_add_explicit(&p->shm->leaks, 1, memory_order_relaxed);
            slog(LOG_LVL_WARN, h, "lease held for %llu ms by worker=%d (leak_threshold_ms %u)",
                 (unsigned long long)(now - since), cl ? (int)cl->pid : -1, cp->leak_threshold_ms);
        }
        return;
    }
    case PB_SLOT_RESETTING:
    case PB_SLOT_RECLAIMING:
        if (h->bound)
            return;                 /* its backend is being cleaned */
        break;
    case PB_SLOT_CLOSING:
        if (p->removed)
            return;                 /* given back to a removed pool: retired (pool_offer_handle) */
        break;
    default:
        break;
    }
    /* A word no honest party wrote (or a lease of a client that is gone):
     * seen twice, the handle is taken back. */
    if (h->suspect_word != w) {
        h->suspect_word = w;
        return;
    }
    h->suspect_word = 0;
    slog(LOG_LVL_WARN, h, "handle word %016llx is impossible: taking the handle back", (unsigned long long)w);
    shm_note_repair(b);
    if (h->bound) {
        conn_take_back(h->bound, w, "handle word scribbled");
        return;
    }
    if (!slot_take(h, &w, PB_SLOT_RECLAIMING))
        return;
    if (h->queued)
        tq_remove(p, h);
    pool_offer_handle(h);
}

void txn_janitor(broker *b, pool *p)
{
    for (uint32_t k = 0; k < p->nconns; k++)
        check_handle(b, p, &p->conns[k]);
}
