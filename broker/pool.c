/*
 * pool.c — pools: their shared-memory entry, sizing, and the queue of
 * acquirers waiting for a slot.
 *
 * A waiter is a client whose acquire found no free slot: it set its wait
 * word to WAITING and pushed PB_SQ_WAIT.  pool_offer() gives each connection
 * that comes clean (after connect, release, reset or validation) to the
 * first live waiter, else to the free map; pool_maybe_grow() starts
 * connections when waiters or min_size ask for them.  What a connection does
 * is conn.c's; every slot-word write is slot.c's.
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

#define MAX_CONNECTING    2         /* handshakes in flight per pool */

/* Connections serving or able to serve (live, not mid-handshake): derived
 * from the counters the broker keeps, never counted separately. */
void pool_publish_size(pool *p)
{
    atomic_store(&p->shm->size, p->live - p->connecting);
}

/* The figures clients read from the pool table (sizes, timeouts, policy). */
void pool_publish_limits(pool *p)
{
    conf_pool *cp = p->cf;
    atomic_store(&p->shm->min_size, cp->min_size);
    atomic_store(&p->shm->max_size, cp->max_size);
    atomic_store(&p->shm->max_uses, cp->max_uses);
    atomic_store(&p->shm->validate_after_idle_ms, cp->validate_after_idle_ms);
    atomic_store(&p->shm->acquire_timeout_ms, cp->acquire_timeout_ms);
    atomic_store(&p->shm->reset_policy, (uint32_t)cp->reset_policy);
    atomic_store(&p->shm->max_request_size, cp->max_request_size);
}

/* What clients may do with the pool (accepting) and its health as they see
 * it: a removed pool is REMOVED whatever its connections do (a superseded
 * one still connects for its held leases), a pool_mode switch's new pool
 * PENDING until it takes over (reload.c); clients find neither by name. */
void pool_publish_health(pool *p)
{
    int accepting = !p->removed && !p->replaces && !B.draining;
    atomic_store(&p->shm->accepting, (uint32_t)accepting);
    atomic_store(&p->shm->health, p->removed ? PB_HEALTH_REMOVED : p->replaces ? PB_HEALTH_PENDING : p->health);
}

/* What backend b of a transaction-mode pool is doing, as shmstat shows it. */
static pb_shm_backend backend_row(const conn *b)
{
    pb_shm_backend r = { .handle = UINT32_MAX };
    if (b->phase == PH_EMPTY)
        return r;
    r.state = b->phase == PH_CONNECTING ? PB_BACKEND_CONNECTING
            : b->bound ? PB_BACKEND_BOUND
            : b->mux ? PB_BACKEND_SHARED
            : b->phase == PH_READY && !b->expect && !b->idle_async &&
              PB_WORD_STATE(atomic_load(&b->home->word)) == PB_SLOT_FREE ? PB_BACKEND_IDLE
            : PB_BACKEND_BUSY;
    if (b->bound)
        r.handle = b->bound->index;
    r.backend_pid = b->backend_pid;
    r.created_ms = atomic_load(&b->home->conn_created_ms);
    r.uses = atomic_load(&b->home->uses);
    snprintf(r.server, sizeof r.server, "%s", b->server);
    return r;
}

/* Publish the rows of p's backends (transaction mode) in the backend table,
 * each under its seqlock, writing only rows that changed. */
static void publish_backends(pool *p)
{
    pb_shm_backend *rows = &B.shm_backends[p->first_slot];
    for (uint32_t k = 0; k < p->nconns; k++) {
        pb_shm_backend want = p->backs && k < p->nbacks ? backend_row(&p->backs[k])
                                                        : (pb_shm_backend){ .handle = UINT32_MAX };
        pb_shm_backend *r = &rows[k];
        uint32_t seq = atomic_load_explicit(&r->seq, memory_order_relaxed);
        if (!(seq & 1) && r->state == want.state && r->backend_pid == want.backend_pid &&
            r->handle == want.handle && r->created_ms == want.created_ms && r->uses == want.uses &&
            memcmp(r->server, want.server, sizeof want.server) == 0)
            continue;
        seq |= 1;                   /* odd: readers retry */
        atomic_store_explicit(&r->seq, seq, memory_order_relaxed);
        atomic_thread_fence(memory_order_release);
        r->state = want.state;
        r->backend_pid = want.backend_pid;
        r->handle = want.handle;
        r->created_ms = want.created_ms;
        r->uses = want.uses;
        memcpy(r->server, want.server, sizeof want.server);
        atomic_store_explicit(&r->seq, seq + 1, memory_order_release);
    }
}

/* Rewrite the pool's broker-owned entry from private state (janitor). */
void pool_republish(pool *p)
{
    pb_shm_pool *sp = p->shm;
    pb_shm_pool_ident_publish(sp, p->cf->name, (uint32_t)p->cf->type, p->first_slot, p->nconns);
    pool_publish_limits(p);
    atomic_store(&sp->nwaiters, p->wq_len);
    pool_publish_size(p);
    pool_publish_health(p);
    atomic_store(&sp->consecutive_failures, p->fails);
    atomic_store(&sp->pool_mode, (uint32_t)p->cf->pool_mode);
    atomic_store(&sp->txn_queued, p->tq_len);
    publish_backends(p);
}

/* Set up pool p (table entry index) over slots [first_slot, +slots). */
int pool_setup(broker *b, pool *p, uint32_t index, conf_pool *cp, uint32_t first_slot)
{
    pb_shm_slot *ss = b->shm_slots;
    memset(p, 0, sizeof *p);
    p->index = index;
    p->first_slot = first_slot;
    p->cf = cp;
    p->cset = cp;
    p->drv = cp->type == PB_POOL_REDIS ? &redis_driver : &pg_driver;
    p->shm = &b->shm_pools[index];
    p->nconns = conf_pool_slots(cp);
    p->conns = calloc(p->nconns, sizeof *p->conns);
    p->wq_cap = b->max_clients;
    p->wq = calloc(p->wq_cap, sizeof *p->wq);
    if (!p->conns || !p->wq)
        return -1;
    for (uint32_t k = 0; k < p->nconns; k++) {
        conn *c = &p->conns[k];
        c->pool = p;
        c->index = first_slot + k;
        c->slot = &ss[c->index];
        c->slot->pool = index;
        /* Our own copies of where the buffers are (read once, from a slot
         * no worker could have touched yet): never read back. */
        c->req = (uint8_t *)b->hdr + c->slot->req_off;
        c->rep = (uint8_t *)b->hdr + c->slot->rep_off;
        c->req_size = c->slot->req_size;
        c->rep_size = c->slot->rep_size;
        c->fd = -1;
        c->send_op.cb = conn_on_send;
        c->recv_op.cb = conn_on_recv;
        c->poll_op.cb = conn_on_poll;
        c->send_op.data = c->recv_op.data = c->poll_op.data = c;
        c->txn = 'I';
        b->slots[c->index] = c;
    }
    pb_shm_pool *sp = p->shm;
    memset(sp, 0, sizeof *sp);
    snprintf(sp->name, sizeof sp->name, "%s", cp->name);
    sp->type = (uint32_t)cp->type;
    sp->first_slot = first_slot;
    sp->slot_capacity = p->nconns;
    pool_publish_limits(p);
    atomic_store(&sp->pool_mode, (uint32_t)cp->pool_mode);
    atomic_store(&sp->health, PB_HEALTH_HEALTHY);
    atomic_store(&sp->accepting, 1);
    if (cp->pool_mode == PB_MODE_TRANSACTION) {
        /* Handles need no backend to be leased: all free from the start. */
        if (txn_setup(p) < 0)
            return -1;
        for (uint32_t k = 0; k < p->nconns; k++)
            slot_put_free(&p->conns[k]);
    }
    return 0;
}

int pools_init(broker *b)
{
    conf *cf = b->cf;
    b->pools = calloc(PB_MAX_POOLS, sizeof *b->pools);     /* reloads add in place */
    b->slots = calloc(b->nslots ? b->nslots : 1, sizeof *b->slots);
    if (!b->pools || !b->slots)
        return -1;
    uint32_t first = 0;
    for (int i = 0; i < cf->npools; i++) {
        if (pool_setup(b, &b->pools[i], (uint32_t)i, &cf->pools[i], first) < 0)
            return -1;
        first += conf_pool_slots(&cf->pools[i]);
    }
    b->npools = (uint32_t)cf->npools;
    b->hdr->npools = b->npools;
    return 0;
}

void pools_free(broker *b)
{
    for (uint32_t i = 0; i < b->npools; i++) {
        pool *p = &b->pools[i];
        for (uint32_t k = 0; k < p->nconns; k++) {
            conn *c = &p->conns[k];
            conn_shutdown(c);
            free(c->sbuf.p);
            free(c->stream.p);
            free(c->scratch);
        }
        free(p->conns);
        free(p->wq);
        if (p->backs)
            txn_free(p);
    }
    free(b->pools);
    free(b->slots);
}

/* ----------------------------------------------------------------- waiters */

void pool_enqueue_waiter(pool *p, client *cl, uint32_t ticket)
{
    pb_shm_client *sc = &B.shm_clients[cl->idx];
    uint64_t ww = PB_WAITW(PB_WAIT_WAITING, 0, ticket);

    if (atomic_load(&sc->wait_word) != ww)
        return;                     /* already cancelled */
    int err = 0;
    if (B.draining)
        err = PB_ESHUTDOWN;
    else if (p->removed)
        err = PB_ENOPOOL;
    else if (p->health == PB_HEALTH_DOWN && p->live == 0)
        err = PB_EBACKEND;          /* fail fast: the backend is known down */
    else if (p->wq_len == p->wq_cap)
        err = PB_EBUSY;
    if (err) {
        if (atomic_compare_exchange_strong(&sc->wait_word, &ww, PB_WAITW(PB_WAIT_FAILED, (uint32_t)-err, ticket)))
            broker_wake(&sc->wait_futex, &sc->wait_sleeping);
        return;
    }
    p->wq[(p->wq_head + p->wq_len) % p->wq_cap] = (waiter){ cl->idx, cl->id, ticket };
    p->wq_len++;
    /* Publish the waiter before looking at the free map: a client that
     * frees a slot sets its bit first and looks at nwaiters second, so one of
     * us sees the other (see pb_release). */
    atomic_store(&p->shm->nwaiters, p->wq_len);
    atomic_fetch_add_explicit(&p->shm->waits, 1, memory_order_relaxed);
    pool_serve_waiters(p);
    pool_maybe_grow(p);
}

static void wq_remove_at(pool *p, uint32_t pos)
{
    /* pos is relative to wq_head; shift the later entries down one. */
    for (uint32_t i = pos; i + 1 < p->wq_len; i++)
        p->wq[(p->wq_head + i) % p->wq_cap] = p->wq[(p->wq_head + i + 1) % p->wq_cap];
    p->wq_len--;
    atomic_store(&p->shm->nwaiters, p->wq_len);
}

void pool_cancel_waiter(pool *p, client *cl, uint32_t ticket)
{
    for (uint32_t i = 0; i < p->wq_len; i++) {
        waiter *w = &p->wq[(p->wq_head + i) % p->wq_cap];
        if (w->client_id == cl->id && w->ticket == ticket) {
            wq_remove_at(p, i);
            return;
        }
    }
}

void pool_drop_client_waiters(broker *b, client *cl)
{
    for (uint32_t k = 0; k < b->npools; k++) {
        pool *p = &b->pools[k];
        for (uint32_t i = 0; i < p->wq_len;) {
            if (p->wq[(p->wq_head + i) % p->wq_cap].client_id == cl->id)
                wq_remove_at(p, i);
            else
                i++;
        }
    }
}

/* Fail the acquirers queued for a slot of p with err; statements queued
 * for a transaction-mode backend stay (pool_fail_waiters fails both). */
void pool_fail_acquirers(pool *p, int err)
{
    pb_shm_client *recs = B.shm_clients;
    while (p->wq_len) {
        waiter w = p->wq[p->wq_head];
        p->wq_head = (p->wq_head + 1) % p->wq_cap;
        p->wq_len--;
        pb_shm_client *sc = &recs[w.client_idx];
        uint64_t ww = PB_WAITW(PB_WAIT_WAITING, 0, w.ticket);
        if (atomic_load(&sc->id) == w.client_id &&
            atomic_compare_exchange_strong(&sc->wait_word, &ww, PB_WAITW(PB_WAIT_FAILED, (uint32_t)-err, w.ticket)))
            broker_wake(&sc->wait_futex, &sc->wait_sleeping);
    }
    atomic_store(&p->shm->nwaiters, 0);
}

/* Fail every queued waiter with err (backend down, shutdown): acquirers
 * and statements queued for a backend. */
void pool_fail_waiters(pool *p, int err)
{
    pool_fail_acquirers(p, err);
    txn_fail_queue(p, err);
}

/* Give the broker-held slot of c to the first live waiter.  Returns 1 if it
 * went to someone. */
static int hand_to_waiter(conn *c)
{
    pool *p = c->pool;
    pb_shm_client *recs = B.shm_clients;

    while (p->wq_len) {
        waiter w = p->wq[p->wq_head];
        p->wq_head = (p->wq_head + 1) % p->wq_cap;
        p->wq_len--;
        atomic_store(&p->shm->nwaiters, p->wq_len);

        pb_shm_client *sc = &recs[w.client_idx];
        uint64_t ww = PB_WAITW(PB_WAIT_WAITING, 0, w.ticket);
        if (atomic_load(&sc->id) != w.client_id || atomic_load(&sc->wait_word) != ww)
            continue;               /* gave up or died */

        uint64_t leased;
        if (!slot_grant(c, w.client_id, &leased))
            return 0;               /* a worker scribbled the word we hold */
        if (atomic_compare_exchange_strong(&sc->wait_word, &ww, PB_WAITW(PB_WAIT_GRANTED, c->index, w.ticket))) {
            atomic_fetch_add_explicit(&p->shm->handoffs, 1, memory_order_relaxed);
            if (atomic_load(&sc->wait_sleeping))
                atomic_fetch_add_explicit(&p->shm->wakeups, 1, memory_order_relaxed);
            broker_wake(&sc->wait_futex, &sc->wait_sleeping);
            return 1;
        }
        /* It cancelled between our two CASes: take the slot back, try the next. */
        slot_take(c, &leased, PB_SLOT_RESETTING);
    }
    return 0;
}

int pool_over_max(const pool *p)
{
    /* Our own configuration (a worker can write the published max_size). */
    return p->live > p->cf->max_size;
}

/* A broker-held, clean, connected slot: enter PH_READY, then to a waiter,
 * else to the free map.  Every path that hands a connection on comes
 * through here (connect, release, reset, validation), so this is where a
 * pool above its max_size (a reload lowered it) sheds connections, waiters
 * or not: a hand-off would keep the excess busy for ever. */
void pool_offer(conn *c)
{
    pool *p = c->pool;

    if (c->phase != PH_READY && conn_set_phase(c, PH_READY) != PB_OK)
        return;
    c->to_sink = 0;                 /* the last lease's replies are over */
    c->submit_deferred = 0;
    /* A request the previous holder left unacknowledged must not make the
     * next one wait for its buffer. */
    c->acked_seq = atomic_load(&c->slot->req_seq);
    atomic_store(&c->slot->req_ack, c->acked_seq);
    /* The reset's replies went to the sink: say what it left ('I'), or the
     * next holder would see the last lease's status and skip its fast
     * release. */
    atomic_store(&c->slot->txn_status, (uint32_t)(unsigned char)c->txn);
    if (c->bound)
        txn_return_handle(c);       /* transaction mode: the release is done */
    if (pool_gone(p)) {
        conn_close(c, "pool removed");
        return;
    }
    int expired = c->retire_at_ms && B.now_ms >= c->retire_at_ms;
    if (pool_over_max(p) || expired || c->suspect) {
        atomic_fetch_add_explicit(&p->shm->retired, 1, memory_order_relaxed);
        conn_close(c, c->suspect ? "its server failed" : expired ? "max_lifetime reached" : "above max_size");
        return;
    }
    /* Kept: whatever flagged it to come back through the broker (the
     * janitor, while the pool was above max_size) is over; a lifetime or a
     * settings change would have closed it just now. */
    atomic_fetch_and(&c->slot->flags, ~PB_SF_RETIRE);
    if (c->home ? txn_offer_backend(c) : hand_to_waiter(c))
        return;
    atomic_store(&c->slot->idle_ms, B.now_ms);
    conn_watch_idle(c);
    slot_put_free(c);
    /* A waiter may have queued between our look at the queue and now. */
    if (!c->home && p->wq_len)
        pool_serve_waiters(p);
}

/* A transaction-mode handle the broker holds (released, reclaimed, or
 * unbound from a backend that came clean): to the first live waiter for a
 * handle, else to the free map. */
void pool_offer_handle(conn *h)
{
    pool *p = h->pool;
    h->acked_seq = atomic_load(&h->slot->req_seq);
    atomic_store(&h->slot->req_ack, h->acked_seq);
    atomic_store(&h->slot->io_error, 0);
    atomic_store(&h->slot->rep_owed, 0);
    atomic_store(&h->slot->flags, 0);
    atomic_store(&h->slot->txn_status, 'I');
    atomic_store(&h->slot->backend_pid, 0);
    if (p->removed) {
        slot_set(h, PB_SLOT_CLOSING);
        return;
    }
    if (hand_to_waiter(h))
        return;
    atomic_store(&h->slot->idle_ms, B.now_ms);
    slot_put_free(h);
    if (p->wq_len)
        pool_serve_waiters(p);
}

void pool_serve_waiters(pool *p)
{
    while (p->wq_len) {
        conn *c = slot_pop_free(p);
        if (!c)
            break;
        if (c->phase != PH_READY && !c->handle) {
            /* A worker wrote FREE (and its bit) over a slot the broker is
             * busy with: the pop took the word back, the broker goes on. */
            slog(LOG_LVL_WARN, c, "free slot in phase %s: taken back", conn_phase_name(c->phase));
            shm_note_repair(&B);
            continue;
        }
        if (!hand_to_waiter(c)) {
            slot_put_free(c);
            break;
        }
    }
}

/* ------------------------------------------------------------------ sizing */

uint32_t pool_leases_held(const pool *p)
{
    uint32_t n = 0;
    for (uint32_t k = 0; k < p->nconns; k++) {
        unsigned st = PB_WORD_STATE(atomic_load(&p->conns[k].slot->word));
        n += st == PB_SLOT_LEASED || st == PB_SLOT_RELEASING;
    }
    return n;
}

int pool_gone(const pool *p)
{
    return p->removed && !(p->superseded && p->backs && pool_leases_held(p));
}

void pool_maybe_grow(pool *p)
{
    if (pool_gone(p) || B.draining)
        return;
    /* Our own configuration, not the figures published in the segment (a
     * worker can write those).  A removed pool that still serves held
     * leases (superseded) grows only for their queued statements. */
    uint32_t min = p->removed ? 0 : p->cf->min_size;
    uint32_t max = p->cf->max_size;
    if (max > POOL_NBACKENDS(p))
        max = POOL_NBACKENDS(p);
    uint32_t target = min;
    /* A pool known down must keep probing (with backoff) even when
     * min_size is 0: acquires fail fast without queueing, so nothing else
     * would ever try the backend again. */
    if (target == 0 && p->live == 0 && p->health == PB_HEALTH_DOWN && !p->removed)
        target = 1;
    /* A pool_mode switch's new pool takes over once it has a connection:
     * make one even when min_size is 0 (reload.c). */
    if (target == 0 && p->replaces)
        target = 1;
    /* Grow for waiters, but not past what they can use. */
    uint32_t want = p->backs ? p->tq_len : p->wq_len;    /* statements / acquirers waiting */
    if (want && p->live + want > target)
        target = p->live + want;
    if (target > max)
        target = max;
    if (B.now_ms < p->backoff_until_ms)
        return;
    conn *backs = POOL_BACKENDS(p);
    for (uint32_t k = 0; k < POOL_NBACKENDS(p) && p->live < target && p->connecting < MAX_CONNECTING; k++) {
        conn *c = &backs[k];
        /* A cancelled operation of the previous connection may still be on
         * its way back: ops are reused only once their callback has run. */
        if (c->phase == PH_EMPTY && !c->poll_op.pending && !c->send_op.pending && !c->recv_op.pending &&
            !c->tls_poll_op.pending && !c->tls_queued &&
            PB_WORD_STATE(atomic_load(&c->slot->word)) == PB_SLOT_EMPTY)
            conn_start_connect(c);
    }
}
