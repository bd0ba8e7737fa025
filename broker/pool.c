/*
 * pool.c — slots and the lifecycle of the connections behind them.
 *
 * The slot word in shared memory says who holds a slot; struct conn says what
 * the broker is doing with the connection.  The broker touches the slot word
 * only by CAS, and only in these transitions:
 *
 *   EMPTY ─connect─▶ CONNECTING ─ok─▶ (make_available) ─▶ FREE or LEASED(waiter)
 *   LEASED(c) ─client─▶ RELEASING(c) ─RELEASE─▶ RESETTING ─▶ make_available
 *   LEASED(c) ─c died / overstayed─▶ RESETTING (a reclaim) ─▶ make_available
 *   FREE ─janitor─▶ RESETTING (validate) or CLOSING (retire) ─▶ EMPTY
 *
 * Clients do FREE→LEASED(self) and LEASED(self)→FREE themselves (the fast
 * paths) and LEASED(self)→RELEASING(self) when the broker has work to do.
 *
 * Replies go into the slot's reply ring only while the lease that submitted
 * the command still holds the slot; otherwise (the holder released early or
 * died) they go to a private sink, and the connection is handed to nobody
 * until every reply it owes has arrived.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"
#include "poolbroker.h"

#define SCRATCH_SIZE      65536
#define MAX_CONNECTING    2         /* handshakes in flight per pool */
#define BACKOFF_MIN_MS    50
#define BACKOFF_MAX_MS    1000

static void on_send(ev_op *op, int res);
static void on_recv(ev_op *op, int res);
static void on_poll(ev_op *op, int res);
static void conn_arm_recv(conn *c);
static void conn_finish_close(conn *c);
static void make_available(conn *c);
static void conn_io_failed(conn *c, const char *why);
static void idle_readable(conn *c);

void wake_futex(_Atomic uint32_t *word, _Atomic uint32_t *sleeping)
{
    atomic_fetch_add(word, 1);
    if (atomic_load(sleeping))
        syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void freemap_set(pool *p, uint32_t local)
{
    pb_freemap_put(p->shm, local);
}

void freemap_clear(pool *p, uint32_t local)
{
    atomic_fetch_and(&p->shm->freemap[local / 64], ~(1ull << (local % 64)));
}

/* Replies owed by the backend; B.inflight counts connections owing any, so
 * the main loop knows whether a completion may be on its way. */
static void expect_add(conn *c, uint32_t n)
{
    if (n && c->expect == 0)
        B.inflight++;
    c->expect += n;
}

static void expect_clear(conn *c)
{
    if (c->expect)
        B.inflight--;
    c->expect = 0;
}

/* Connections serving or able to serve (live, not mid-handshake): derived
 * from the counters the broker keeps, never counted separately. */
static void publish_size(pool *p)
{
    atomic_store(&p->shm->size, p->live - p->connecting);
}

static uint32_t local_index(const conn *c)
{
    return c->index - c->pool->first_slot;
}

/* I/O on the backend socket: io_uring (or epoll) directly, or through
 * OpenSSL for a TLS connection. */
static void io_recv(conn *c, void *buf, size_t len)
{
    if (c->ssl)
        tls_recv(c, buf, len);
    else
        loop_recv(B.lp, &c->recv_op, c->fd, buf, len);
}

static void io_send(conn *c, const void *buf, size_t len)
{
    if (c->ssl)
        tls_send(c, buf, len);
    else
        loop_send(B.lp, &c->send_op, c->fd, buf, len);
}

static void io_cancel(conn *c, ev_op *op)
{
    if (c->ssl)
        tls_cancel(c, op);
    else
        loop_cancel(B.lp, op);
}

/* Replace the slot word: only ever from a word the broker knows it holds. */
static int slot_cas(conn *c, uint64_t *expect, uint64_t desired)
{
    return atomic_compare_exchange_strong(&c->slot->word, expect, desired);
}

/* Move a broker-held slot (CONNECTING/RESETTING/CLOSING) to a new state. */
static void slot_set(conn *c, unsigned state, uint32_t owner)
{
    uint64_t w = atomic_load(&c->slot->word);
    atomic_store(&c->slot->word, PB_WORD_NEXT(w, state, owner));
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
}

/* Rewrite the pool's broker-owned entry from private state (janitor). */
void pool_republish(pool *p)
{
    pb_shm_pool *sp = p->shm;
    pb_shm_pool_ident_publish(sp, p->cf->name, (uint32_t)p->cf->type, p->first_slot, p->nconns);
    pool_publish_limits(p);
    atomic_store(&sp->nwaiters, p->wq_len);
    publish_size(p);
    int accepting = !p->removed && !B.draining;
    atomic_store(&sp->accepting, (uint32_t)accepting);
    atomic_store(&sp->health, p->removed ? PB_HEALTH_REMOVED : p->health);
    atomic_store(&sp->consecutive_failures, p->fails);
}

/* Set up pool p (table entry index) over slots [first_slot, +slots). */
int pool_setup(broker *b, pool *p, uint32_t index, conf_pool *cp, uint32_t first_slot)
{
    pb_shm_slot *ss = b->shm_slots;
    memset(p, 0, sizeof *p);
    p->index = index;
    p->first_slot = first_slot;
    p->cf = cp;
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
        c->send_op.cb = on_send;
        c->recv_op.cb = on_recv;
        c->poll_op.cb = on_poll;
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
    atomic_store(&sp->health, PB_HEALTH_HEALTHY);
    atomic_store(&sp->accepting, 1);
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
            if (c->state != CS_EMPTY)
                p->drv->close(c);
            free(c->sbuf);
            free(c->scratch);
        }
        free(p->conns);
        free(p->wq);
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
            wake_futex(&sc->wait_futex, &sc->wait_sleeping);
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

/* Fail every queued waiter with err (backend down, shutdown). */
void pool_fail_waiters(pool *p, int err)
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
            wake_futex(&sc->wait_futex, &sc->wait_sleeping);
    }
    atomic_store(&p->shm->nwaiters, 0);
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

        uint64_t held = atomic_load(&c->slot->word);
        uint64_t leased = PB_WORD_NEXT(held, PB_SLOT_LEASED, w.client_id);
        atomic_store(&c->slot->lease_ms, B.now_ms);
        atomic_store(&c->slot->client_flags, 0);
        atomic_store(&c->slot->rep_tail, c->rep_head);
        atomic_fetch_add(&c->slot->uses, 1);
        if (!slot_cas(c, &held, leased))
            return 0;               /* cannot happen: we hold it */
        if (atomic_compare_exchange_strong(&sc->wait_word, &ww, PB_WAITW(PB_WAIT_GRANTED, c->index, w.ticket))) {
            atomic_fetch_add_explicit(&p->shm->handoffs, 1, memory_order_relaxed);
            if (atomic_load(&sc->wait_sleeping))
                atomic_fetch_add_explicit(&p->shm->wakeups, 1, memory_order_relaxed);
            wake_futex(&sc->wait_futex, &sc->wait_sleeping);
            return 1;
        }
        /* It cancelled between our two CASes: take the slot back, try the next. */
        uint64_t back = PB_WORD_NEXT(leased, PB_SLOT_RESETTING, 0);
        slot_cas(c, &leased, back);
    }
    return 0;
}

/* A broker-held, clean, connected slot: to a waiter, else to the free map. */
static void make_available(conn *c)
{
    pool *p = c->pool;

    c->to_sink = 0;
    c->submit_deferred = 0;
    /* A request the previous holder left unacknowledged must not make the
     * next one wait for its buffer. */
    c->acked_seq = atomic_load(&c->slot->req_seq);
    atomic_store(&c->slot->req_ack, c->acked_seq);
    if (p->removed) {
        conn_close(c, "pool removed");
        return;
    }
    if (hand_to_waiter(c))
        return;
    atomic_store(&c->slot->idle_ms, B.now_ms);
    conn_watch_idle(c);
    slot_set(c, PB_SLOT_FREE, 0);
    freemap_set(p, local_index(c));
    /* A waiter may have queued between our look at the queue and now. */
    if (p->wq_len)
        pool_serve_waiters(p);
}

/* Pop a FREE slot of p for the broker itself (state RESETTING). */
static conn *take_free(pool *p)
{
    uint64_t w;
    int local = pb_freemap_take(p->shm, p->conns[0].slot, p->nconns, PB_SLOT_RESETTING, 0, &w);
    return local < 0 ? NULL : &p->conns[local];
}

void pool_serve_waiters(pool *p)
{
    while (p->wq_len) {
        conn *c = take_free(p);
        if (!c)
            break;
        if (!hand_to_waiter(c)) {
            slot_set(c, PB_SLOT_FREE, 0);
            freemap_set(p, local_index(c));
            break;
        }
    }
}

/* ------------------------------------------------------------ connecting */

void pool_maybe_grow(pool *p)
{
    if (p->removed || B.draining)
        return;
    /* Our own configuration, not the figures published in the segment (a
     * worker can write those). */
    uint32_t min = p->cf->min_size;
    uint32_t max = p->cf->max_size;
    if (max > p->nconns)
        max = p->nconns;
    uint32_t target = min;
    /* A pool known down must keep probing (with backoff) even when
     * min_size is 0: acquires fail fast without queueing, so nothing else
     * would ever try the backend again. */
    if (target == 0 && p->live == 0 && p->health == PB_HEALTH_DOWN)
        target = 1;
    /* Grow for waiters, but not past what they can use. */
    if (p->wq_len && p->live + p->wq_len > target)
        target = p->live + p->wq_len;
    if (target > max)
        target = max;
    if (B.now_ms < p->backoff_until_ms)
        return;
    for (uint32_t k = 0; k < p->nconns && p->live < target && p->connecting < MAX_CONNECTING; k++) {
        conn *c = &p->conns[k];
        /* A cancelled operation of the previous connection may still be on
         * its way back: ops are reused only once their callback has run. */
        if (c->state == CS_EMPTY && !c->poll_op.pending && !c->send_op.pending && !c->recv_op.pending &&
            !c->tls_poll_op.pending && !c->tls_queued &&
            PB_WORD_STATE(atomic_load(&c->slot->word)) == PB_SLOT_EMPTY)
            conn_start_connect(c);
    }
}

void conn_start_connect(conn *c)
{
    pool *p = c->pool;
    slot_set(c, PB_SLOT_CONNECTING, 0);
    c->state = CS_CONNECTING;
    c->broken = 0;
    expect_clear(c);
    c->txn = 'I';
    c->resetting = c->validating = c->release_pending = c->submit_deferred = c->watch = 0;
    c->to_sink = 0;
    c->error[0] = 0;
    c->created_ms = B.now_ms;
    c->settings_gen = p->settings_gen;
    memset(&c->scan, 0, sizeof c->scan);
    p->connecting++;
    p->live++;
    atomic_fetch_add_explicit(&p->shm->connects, 1, memory_order_relaxed);
    if (p->drv->connect_start(c) != PB_OK)
        conn_connect_failed(c, c->error[0] ? c->error : "connect failed");
}

void conn_connected(conn *c)
{
    pool *p = c->pool;
    uint64_t life = (uint64_t)p->cf->max_lifetime_s * 1000;

    p->connecting--;
    c->state = CS_READY;
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
    for (int i = 0; i < PB_SLOT_STMTS; i++)
        atomic_store(&c->slot->stmts[i], 0);
    /* Our ring position runs on across connections of this slot; the one
     * in the segment is only ever a copy of it (a worker may have written
     * anything there). */
    atomic_store(&c->slot->rep_head, c->rep_head);
    c->reply_done = 0;
    atomic_store(&c->slot->reply_done, 0);
    publish_size(p);
    p->fails = 0;
    p->health = PB_HEALTH_HEALTHY;
    atomic_store(&p->shm->consecutive_failures, 0);
    atomic_store(&p->shm->health, PB_HEALTH_HEALTHY);
    p->backoff_ms = 0;
    p->backoff_until_ms = 0;
    slog(LOG_LVL_DEBUG, c, "connected");
    if (c->settings_gen != p->settings_gen) {
        /* A reload changed the connection settings while this handshake
         * ran on the old ones: nobody gets it. */
        atomic_fetch_add_explicit(&p->shm->retired, 1, memory_order_relaxed);
        conn_close(c, "connection settings changed during its handshake");
        pool_maybe_grow(p);
        return;
    }
    make_available(c);
    pool_maybe_grow(p);
}

void conn_connect_failed(conn *c, const char *why)
{
    pool *p = c->pool;

    if (c->poll_op.pending)
        loop_cancel(B.lp, &c->poll_op);
    p->drv->close(c);
    p->connecting--;
    p->live--;
    c->state = CS_EMPTY;
    slot_set(c, PB_SLOT_EMPTY, 0);
    atomic_fetch_add_explicit(&p->shm->connect_failures, 1, memory_order_relaxed);
    uint32_t fails = ++p->fails;
    atomic_store(&p->shm->consecutive_failures, fails);
    snprintf(p->shm->last_error, sizeof p->shm->last_error, "%s", why);
    /* Exponential backoff with jitter, capped. */
    p->backoff_ms = p->backoff_ms ? p->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (p->backoff_ms > BACKOFF_MAX_MS)
        p->backoff_ms = BACKOFF_MAX_MS;
    p->backoff_until_ms = B.now_ms + p->backoff_ms / 2 + (uint64_t)(random() % (p->backoff_ms / 2 + 1));
    if (fails == 1 || fails % 20 == 0)
        log_warn("pool %s: connect failed (%u in a row): %s", p->cf->name, fails, why);
    p->health = p->live == 0 ? PB_HEALTH_DOWN : PB_HEALTH_DEGRADED;
    atomic_store(&p->shm->health, p->health);
    if (p->live == 0) {
        /* Nobody will get a connection soon: fail fast rather than time out. */
        pool_fail_waiters(p, PB_EBACKEND);
    }
}

static void on_poll(ev_op *op, int res)
{
    conn *c = op->data;
    if (c->state == CS_CLOSING) {
        conn_finish_close(c);
        return;
    }
    if (op->cancelled)
        return;
    if (c->state == CS_READY) {
        if (res > 0)
            idle_readable(c);
        return;
    }
    if (c->state != CS_CONNECTING)
        return;
    if (res < 0) {
        conn_connect_failed(c, strerror(-res));
        return;
    }
    c->pool->drv->connect_step(c, res);
}

/* ------------------------------------------------------------ idle watch
 * A free connection has nothing to say.  If its socket becomes readable the
 * server has closed it (pg_terminate_backend, CLIENT KILL, a restart) or sent
 * something unasked: the broker takes the slot and replaces the connection
 * before a worker can lease it and see its first command fail.  The poll
 * stays armed while a worker holds the slot; it then fires on the worker's
 * first reply and is simply ignored (the janitor re-arms it once free). */
void conn_watch_idle(conn *c)
{
    if (c->state == CS_READY && !c->broken && !c->poll_op.pending && c->fd >= 0)
        loop_poll(B.lp, &c->poll_op, c->fd, POLLIN);
}

static void idle_readable(conn *c)
{
    uint64_t w = atomic_load(&c->slot->word);
    if (PB_WORD_STATE(w) != PB_SLOT_FREE || c->expect)
        return;                     /* leased: the data is its reply */
    if (!slot_cas(c, &w, PB_WORD_NEXT(w, PB_SLOT_RESETTING, 0)))
        return;
    freemap_clear(c->pool, local_index(c));
    char b;
    ssize_t n = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        make_available(c);          /* nothing after all */
        return;
    }
    conn_io_failed(c, n == 0 ? "server closed the idle connection"
                             : n > 0 ? "unsolicited data on an idle connection" : strerror(errno));
}

/* ----------------------------------------------------------------- closing */

/* Close the connection behind a slot the broker holds (or that is EMPTY'd by
 * it now).  Waits for in-flight operations, then frees the driver state. */
void conn_close(conn *c, const char *why)
{
    pool *p = c->pool;
    if (c->state == CS_EMPTY || c->state == CS_CLOSING)
        return;
    slog(LOG_LVL_DEBUG, c, "closing: %s", why);
    if (c->state == CS_CONNECTING) {
        conn_connect_failed(c, why);
        return;
    }
    c->state = CS_CLOSING;
    p->live--;                      /* no longer READY: the janitor and
                                       pool_maybe_grow must not count it */
    publish_size(p);
    slot_set(c, PB_SLOT_CLOSING, 0);
    freemap_clear(p, local_index(c));
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    if (c->send_op.pending)
        io_cancel(c, &c->send_op);
    if (c->recv_op.pending)
        io_cancel(c, &c->recv_op);
    if (c->poll_op.pending)
        loop_cancel(B.lp, &c->poll_op);
    if (c->tls_poll_op.pending)
        loop_cancel(B.lp, &c->tls_poll_op);
    conn_finish_close(c);
}

static void conn_finish_close(conn *c)
{
    pool *p = c->pool;
    if (c->state != CS_CLOSING || c->send_op.pending || c->recv_op.pending || c->poll_op.pending ||
        c->tls_poll_op.pending || c->tls_queued)
        return;
    p->drv->close(c);
    c->ssl = NULL;
    c->fd = -1;
    c->state = CS_EMPTY;
    expect_clear(c);
    c->sending = 0;
    c->backend_pid = 0;
    atomic_store(&c->slot->backend_pid, 0);
    slot_set(c, PB_SLOT_EMPTY, 0);
    pool_maybe_grow(p);
}

/* The connection failed under I/O (or is given up on: err says how the
 * lease holder learns it).  Tell the holder, and close it as soon as nobody
 * holds it. */
static void conn_fail(conn *c, const char *why, int err)
{
    if (c->broken)
        return;
    c->broken = 1;
    slog(LOG_LVL_WARN, c, "connection lost: %s", why);
    atomic_fetch_add_explicit(&c->pool->shm->errors, 1, memory_order_relaxed);
    snprintf(c->pool->shm->last_error, sizeof c->pool->shm->last_error, "%s", why);
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
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
        wake_futex(&c->slot->rep_futex, &c->slot->rep_sleeping);
        return;
    }
    if (st == PB_SLOT_FREE && !slot_cas(c, &w, PB_WORD_NEXT(w, PB_SLOT_RESETTING, 0)))
        return;                     /* someone leased it this instant: they will see io_error */
    st = PB_WORD_STATE(atomic_load(&c->slot->word));
    if (st == PB_SLOT_RESETTING || st == PB_SLOT_RECLAIMING)
        conn_close(c, why);
}

static void conn_io_failed(conn *c, const char *why)
{
    conn_fail(c, why, PB_EBACKEND);
}

/* The command in flight has run past command_timeout_ms.  PostgreSQL gets a
 * cancel request first (the holder then sees SQLSTATE 57014) and the
 * connection is closed only if that does not end the command within the
 * grace period; a Redis command cannot be cancelled, so its connection is
 * closed and replaced at once. */
#define CANCEL_GRACE_MS 2000
void conn_command_timeout(conn *c)
{
    if (c->broken || c->state != CS_READY || !c->expect)
        return;
    if (c->pool->cf->type == PB_POOL_POSTGRES && !c->cancel_sent) {
        c->cancel_sent = 1;
        c->cancel_deadline_ms = B.now_ms + CANCEL_GRACE_MS;
        slog(LOG_LVL_WARN, c, "command running for %llu ms (command_timeout_ms %u): cancelling",
             (unsigned long long)(B.now_ms - c->cmd_start_ms), c->pool->cf->command_timeout_ms);
        if (cancel_request(c->pg, c->backend_pid, &c->cancel_inflight, B.doorbell_fd) == 0)
            return;
    } else if (c->cancel_sent && B.now_ms < c->cancel_deadline_ms) {
        return;
    }
    conn_fail(c, "command timed out", PB_ETIMEDOUT);
}

/* ------------------------------------------------------------------ sending */

int conn_sbuf_append(conn *c, const void *p, uint32_t n)
{
    if (c->slen + n > c->scap) {
        uint32_t cap = c->scap ? c->scap : 4096;
        while (cap < c->slen + n)
            cap *= 2;
        uint8_t *nb = realloc(c->sbuf, cap);
        if (!nb)
            return PB_ENOMEM;
        c->sbuf = nb;
        c->scap = cap;
    }
    memcpy(c->sbuf + c->slen, p, n);
    c->slen += n;
    return PB_OK;
}

/* Send sbuf[soff..slen) and arm the receive. */
void conn_send_private(conn *c)
{
    if (!c->sending && c->soff < c->slen) {
        c->sending = 1;
        io_send(c, c->sbuf + c->soff, c->slen - c->soff);
    }
    conn_arm_recv(c);
}

static void retry_deferred(conn *c)
{
    if (c->submit_deferred && c->broken) {
        /* It will never be sent: conn_submit fails it (PB_EBACKEND). */
        c->submit_deferred = 0;
        uint64_t w = atomic_load(&c->slot->word);
        if (PB_WORD_STATE(w) == PB_SLOT_LEASED)
            conn_submit(c, w, atomic_load(&c->slot->req_seq));
        return;
    }
    if (!c->submit_deferred || c->sending || c->resetting)
        return;
    uint64_t w = atomic_load(&c->slot->word);
    if (c->expect && w != c->cmd_word)
        return;
    c->submit_deferred = 0;
    if (PB_WORD_STATE(w) == PB_SLOT_LEASED)
        conn_submit(c, w, atomic_load(&c->slot->req_seq));
}

static void on_send(ev_op *op, int res)
{
    conn *c = op->data;
    c->sending = 0;
    if (c->state == CS_CLOSING) {
        conn_finish_close(c);
        return;
    }
    if (res < 0) {
        conn_io_failed(c, strerror(-res));
        return;
    }
    c->soff += (uint32_t)res;
    if (c->soff < c->slen) {
        conn_send_private(c);
        return;
    }
    c->soff = c->slen = 0;
    if (c->release_pending && !c->expect) {
        /* A release (or reclaim) waited for this send, and no reply is owed. */
        if (atomic_load(&c->cancel_inflight)) {
            c->await_cancel = 1;
            return;
        }
        c->release_pending = 0;
        conn_release(c, atomic_load(&c->slot->word), 2);
        return;
    }
    retry_deferred(c);
}

/* Fail the command the lease holder just submitted (nothing was sent). */
static void fail_submit(conn *c, int err, uint32_t seq)
{
    atomic_store(&c->slot->io_error, err);
    c->acked_seq = seq;
    atomic_store_explicit(&c->slot->req_ack, seq, memory_order_release);
    wake_futex(&c->slot->rep_futex, &c->slot->rep_sleeping);
}

void conn_submit(conn *c, uint64_t lease_word, uint32_t seq)
{
    if (seq == c->acked_seq)
        return;                     /* nothing new */
    if (c->broken || c->state != CS_READY) {
        fail_submit(c, PB_EBACKEND, seq);
        return;
    }
    /* One request in the private buffer at a time, never while replies
     * owed to somebody else are still coming, and never while a cancel
     * request for an earlier command may still land. */
    if (c->sending || c->resetting || c->validating || (c->expect && c->cmd_word != lease_word) ||
        atomic_load(&c->cancel_inflight)) {
        c->submit_deferred = 1;
        return;
    }
    uint32_t len = atomic_load(&c->slot->req_len);   /* read once */
    if (len == 0 || len > c->req_size) {
        slog(LOG_LVL_WARN, c, "request length %u impossible (buffer %u): rejected", len, c->req_size);
        shm_note_repair(&B);
        fail_submit(c, PB_EPROTO, seq);
        return;
    }
    c->slen = c->soff = 0;
    /* Copy first, then validate the copy: the client cannot change what we
     * checked after we checked it. */
    if (conn_sbuf_append(c, c->req, len) != PB_OK) {
        fail_submit(c, PB_ENOMEM, seq);
        return;
    }
    uint32_t nrep = 0;
    if (c->pool->drv->frame_request(c, c->sbuf, len, &nrep) != PB_OK) {
        c->slen = 0;
        slog(LOG_LVL_WARN, c, "malformed request rejected");
        shm_note_repair(&B);
        fail_submit(c, PB_EPROTO, seq);
        return;
    }
    atomic_store(&c->slot->io_error, 0);
    if (c->expect == 0) {
        c->cmd_start_ms = B.now_ms;
        c->cancel_sent = 0;
    }
    expect_add(c, nrep);
    /* What we now owe, before the ack: a holder that sees the ack sees it. */
    atomic_store(&c->slot->rep_owed, c->expect);
    c->acked_seq = seq;
    atomic_store_explicit(&c->slot->req_ack, seq, memory_order_release);
    /* The holder may be waiting for its request buffer (pipelining, COPY). */
    wake_futex(&c->slot->rep_futex, &c->slot->rep_sleeping);
    c->cmd_word = lease_word;
    c->to_sink = 0;
    conn_send_private(c);
}

/* ---------------------------------------------------------------- receiving */

static void conn_arm_recv(conn *c)
{
    if (c->recv_op.pending || c->state != CS_READY || c->broken || (c->expect == 0 && !c->watch))
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
    io_recv(c, buf, len);
}

/* The holder wants what the server sends unasked (LISTEN). */
void conn_watch(conn *c, uint64_t lease_word)
{
    if (c->broken || c->state != CS_READY)
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
    if (atomic_exchange(&c->slot->rep_paused, 0))
        conn_arm_recv(c);
}

/* The scanner saw one complete reply. */
void conn_got_reply(conn *c, char txn)
{
    if (c->expect == 0) {
        /* More replies than requests: the stream is out of step. */
        c->broken = 2;
        return;
    }
    c->expect--;
    if (c->expect == 0)
        B.inflight--;
    if (txn)
        c->txn = txn;
    if (!c->to_sink) {
        atomic_store(&c->slot->txn_status, (uint32_t)(unsigned char)c->txn);
        c->unpublished++;           /* counted in reply_done once its bytes are published */
    }
}

static void finish_reset(conn *c);

static void on_recv(ev_op *op, int res)
{
    conn *c = op->data;
    if (c->state == CS_CLOSING) {
        conn_finish_close(c);
        return;
    }
    if (res <= 0) {
        conn_io_failed(c, res == 0 ? "server closed the connection" : strerror(-res));
        return;
    }
    /* Where this recv was pointed when it was armed (to_sink may have
     * changed since: the holder released meanwhile). */
    int sink = c->recv_sink;
    const uint8_t *p = sink ? c->scratch : c->rep + (c->rep_head & (c->rep_size - 1));
    if (c->pool->drv->scan_reply(c, p, (size_t)res) != PB_OK || c->broken == 2) {
        c->broken = 0;
        conn_io_failed(c, "protocol error in the server's reply");
        return;
    }
    if (!sink) {
        if (atomic_load(&c->slot->word) == c->cmd_word) {
            c->rep_head += (uint64_t)res;
            atomic_store_explicit(&c->slot->rep_head, c->rep_head, memory_order_release);
            /* After the bytes: a holder that sees reply_done sees them too. */
            c->reply_done += c->unpublished;
            atomic_store(&c->slot->reply_done, c->reply_done);
            atomic_store(&c->slot->rep_owed, c->expect);
            wake_futex(&c->slot->rep_futex, &c->slot->rep_sleeping);
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
    /* Everything owed has arrived. */
    if (c->resetting) {
        c->resetting = 0;
        finish_reset(c);
    } else if (c->validating) {
        c->validating = 0;
        finish_reset(c);
    } else if (c->release_pending) {
        if (atomic_load(&c->cancel_inflight)) {
            c->await_cancel = 1;    /* conn_settle resumes once it is delivered */
            return;
        }
        c->release_pending = 0;
        conn_release(c, atomic_load(&c->slot->word), 2);
    } else {
        retry_deferred(c);
    }
}

/* Called when a cancel request was delivered (doorbell) and by the
 * janitor: resume what waited for the connection to be quiet. */
void conn_settle(conn *c)
{
    if (c->state != CS_READY || atomic_load(&c->cancel_inflight))
        return;
    if (c->await_cancel && !c->expect && !c->sending) {
        c->await_cancel = 0;
        c->release_pending = 0;
        conn_release(c, atomic_load(&c->slot->word), 2);
    } else if (c->submit_deferred) {
        retry_deferred(c);
    }
}

/* ---------------------------------------------------------------- releasing */

static int should_retire(conn *c, const char **why)
{
    pool *p = c->pool;
    if (c->broken) {
        *why = "broken";
        return 1;
    }
    if (p->cf->max_uses && atomic_load(&c->slot->uses) >= p->cf->max_uses) {
        *why = "max_uses reached";
        return 1;
    }
    if (c->retire_at_ms && B.now_ms >= c->retire_at_ms) {
        *why = "max_lifetime reached";
        return 1;
    }
    if (p->removed) {
        *why = "pool removed";
        return 1;
    }
    return 0;
}

/* The broker holds c (RESETTING) and nothing is in flight: reset, retire or
 * hand out. */
static void release_clean(conn *c)
{
    const char *why;
    if (should_retire(c, &why)) {
        atomic_fetch_add_explicit(&c->pool->shm->retired, 1, memory_order_relaxed);
        conn_close(c, why);
        return;
    }
    uint32_t dirty = atomic_load(&c->slot->client_flags) & PB_CF_DIRTY;
    c->slen = c->soff = 0;
    int n = c->pool->drv->build_reset(c, dirty);
    if (n < 0) {
        conn_close(c, "cannot build reset");
        return;
    }
    if (n == 0) {
        conn_validate_or_offer(c);
        return;
    }
    atomic_fetch_add_explicit(&c->pool->shm->resets, 1, memory_order_relaxed);
    c->cmd_start_ms = B.now_ms;
    c->cancel_sent = 0;
    c->scan.errors = 0;
    c->resetting = 1;
    c->to_sink = 1;
    expect_add(c, (uint32_t)n);
    conn_send_private(c);
}

/* Our reset (or validation) commands have all answered. */
static void finish_reset(conn *c)
{
    /* A reset the server refused (a custom reset SQL that fails) left the
     * session as the last holder had it: the next one must not get that.
     * A failing statement aborts the whole reset string, so nothing of it
     * took effect.  Only PostgreSQL counts errors: a Redis reset may draw
     * an error reply that means nothing (DISCARD without MULTI). */
    if (c->scan.errors) {
        slog(LOG_LVL_WARN, c, "reset failed on the server (%u error%s): connection closed", c->scan.errors,
             c->scan.errors == 1 ? "" : "s");
        c->scan.errors = 0;
        conn_close(c, "reset failed");
        return;
    }
    if (c->txn != 'I') {
        conn_close(c, "still in a transaction after reset");
        return;
    }
    /* DISCARD ALL (or a custom reset, which may DEALLOCATE) dropped the
     * connection's prepared statements. */
    if (c->pool->cf->reset_policy != PB_RESET_ROLLBACK)
        for (int i = 0; i < PB_SLOT_STMTS; i++)
            atomic_store(&c->slot->stmts[i], 0);
    make_available(c);
}

/* A broker-held, clean connection: if it sat idle past
 * validate_after_idle_ms, check it is alive (empty query / PING) before
 * anyone gets it; otherwise hand it out. */
void conn_validate_or_offer(conn *c)
{
    uint32_t limit = c->pool->cf->validate_after_idle_ms;
    uint64_t idle = atomic_load(&c->slot->idle_ms);
    if (!limit || c->broken || B.now_ms < idle || B.now_ms - idle <= limit) {
        make_available(c);
        return;
    }
    c->slen = c->soff = 0;
    int n = c->pool->drv->build_ping(c);
    if (n <= 0) {
        make_available(c);
        return;
    }
    c->validating = 1;
    c->scan.errors = 0;
    c->to_sink = 1;
    c->cmd_start_ms = B.now_ms;
    c->cancel_sent = 0;
    expect_add(c, (uint32_t)n);
    conn_send_private(c);
}

/* Take the slot from whoever holds it (word as read) into the broker's hands
 * and clean it.  how: 0 = the holder released it, 1 = reclaim (holder died or
 * overstayed), 2 = continuing a release that waited for replies. */
void conn_release(conn *c, uint64_t word, int how)
{
    c->watch = 0;
    if (how != 2) {
        unsigned st = how == 1 ? PB_SLOT_RECLAIMING : PB_SLOT_RESETTING;
        if (!slot_cas(c, &word, PB_WORD_NEXT(word, st, 0)))
            return;
        if (how == 1)
            atomic_fetch_add_explicit(&c->pool->shm->reclaims, 1, memory_order_relaxed);
    }
    if (c->state != CS_READY || c->broken) {
        if (c->state == CS_READY || c->state == CS_CONNECTING)
            conn_close(c, "broken");
        else if (c->state == CS_EMPTY)
            slot_set(c, PB_SLOT_EMPTY, 0);
        return;
    }
    if (c->expect || c->sending) {
        /* Replies still owed: they go to the sink, the slot waits for them.
         * Nobody will read them, so do not wait out a long query: cancel it
         * (PostgreSQL), or give the connection up (Redis). */
        c->release_pending = 1;
        c->to_sink = 1;
        c->submit_deferred = 0;
        conn_arm_recv(c);
        if (how == 1 || how == 0)
            conn_command_timeout(c);
        return;
    }
    release_clean(c);
}

void conn_take_back(conn *c, uint64_t word, const char *why)
{
    slog(LOG_LVL_INFO, c, "reclaiming lease: %s", why);
    conn_release(c, word, 1);
}
