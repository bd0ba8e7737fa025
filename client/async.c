/*
 * async.c — libpoolbroker's non-blocking API: one pollable fd per pb_client,
 * acquires that queue instead of waiting, and PostgreSQL / Redis commands
 * whose replies are collected without waiting (libpq's PQsocket,
 * PQsendQuery, PQconsumeInput, PQisBusy, PQgetResult).
 *
 * Why an io_uring of FUTEX_WAIT requests.  A worker waits today on shared
 * futex words: rec->wait_futex (the broker bumps it after it granted or
 * refused a slot) and slot->rep_futex (bumped after reply bytes, a request
 * taken, an error); the broker pays for FUTEX_WAKE only when the matching
 * "sleeping" word is set.  A futex is not pollable.  The options were:
 *
 *   - an eventfd per client handed to the broker (SCM_RIGHTS at attach),
 *     which the broker writes next to each wake_futex for clients that asked:
 *     exact, but it needs a broker change in every wake path (pool.c is being
 *     split into a state machine as this is written) and a new attach
 *     message, and an older broker would silently never write it;
 *   - a pidfd or timerfd poll: no broker change, but a timer is polling —
 *     CPU while idle, latency of a tick;
 *   - io_uring IORING_OP_FUTEX_WAIT (opcode 51, Linux 6.7): the client
 *     queues one FUTEX_WAIT per armed word on a private ring; the broker's
 *     existing FUTEX_WAKE completes it; the ring's fd is readable while a
 *     completion is unreaped.  Exactly one wake-up per broker event, no
 *     broker change, and the same words and "sleeping" protocol the blocking
 *     calls use, so blocking and non-blocking clients mix on one broker.
 *
 * We take the third.  A broker that dies wakes nobody, so the ring also
 * holds a POLL_ADD on the control socket (its hang-up is the broker's
 * death).  The ring is driven with raw syscalls: liburing 2.3's headers have
 * no futex helpers, and the library stays free of that dependency.
 *
 * The honest fallback, when io_uring or its FUTEX_WAIT is unavailable
 * (older kernel, seccomp, io_uring_disabled) or POOLBROKER_ASYNC_NOTIFY=timer
 * is set: a one-shot timerfd of PB_NB_TICK_MS, armed whenever an operation
 * is armed.  It is correct but it polls; pb_client_fd_polls() says so.
 *
 * Arming ("not yet" answers): read the futex word, look at the state, and
 * if nothing is ready set "sleeping" and queue FUTEX_WAIT for the value
 * read.  A broker that changed the word after we read it makes the wait
 * complete at once (EAGAIN); one that changes it later sees "sleeping"
 * (seq_cst on both sides) and wakes the ring.  Nothing is missed, nothing
 * spins.
 *
 * Acquires: a client record has one wait word, so only the oldest of this
 * client's pending acquires is queued with the broker; the others wait here,
 * in order, and each tries the free map when its turn comes (consume and
 * every poll move the queue along).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "internal.h"

#ifndef IORING_OP_FUTEX_WAIT
#define IORING_OP_FUTEX_WAIT 51     /* Linux 6.7; not in older uapi headers */
#endif
#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02        /* futex2 flags: a 32-bit, shared futex */
#endif

#define NB_RING_ENTRIES 256

enum { NB_URING = 1, NB_TIMER = 2 };
/* user_data: kind:8 | a:24 | b:32 */
enum { UD_PROBE = 1, UD_WAIT, UD_REP, UD_CTRL, UD_CANCEL };
#define UD(kind, a, b) (((uint64_t)(kind) << 56) | ((uint64_t)((a) & 0xFFFFFFu) << 32) | (uint64_t)(uint32_t)(b))
#define UD_KIND(u) ((unsigned)((u) >> 56))
#define UD_A(u)    ((uint32_t)(((u) >> 32) & 0xFFFFFFu))
#define UD_B(u)    ((uint32_t)(u))

enum { OP_QUEUED = 0, OP_BROKER, OP_DONE };

struct pb_acquiring {
    pb_client *c;
    char pool[PB_NAME_MAX];          /* the caller's pool name */
    int state;                       /* OP_QUEUED (here), OP_BROKER (its ticket is in the
                                        wait word), OP_DONE (err and lease are final) */
    int err;                         /* when done: PB_OK or what ended it */
    pb_lease *lease;                 /* when done with PB_OK */
    uint32_t pi;                     /* pool index, valid for epoch */
    uint32_t epoch;                  /* attachment the pool index / ticket belong to */
    uint32_t ticket;                 /* when OP_BROKER */
    uint64_t t0_us;                  /* when started (acquire_wait histogram) */
    pb_acquiring *prev, *next;       /* live operations, oldest first */
};

struct pb_nb {
    int kind;                        /* NB_URING | NB_TIMER; 0 before setup */
    int fd;                          /* ring fd or timerfd; -1 before setup */
    unsigned fork_gen;               /* pb_fork_gen when fd was made */
    /* io_uring, mapped from fd */
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned sq_entries;
    int timer_armed;                 /* NB_TIMER: the timerfd is running */
    uint32_t wait_armed;             /* epoch with a FUTEX_WAIT on rec->wait_futex; 0 none */
    uint32_t ctrl_armed;             /* epoch with a POLL_ADD on the control socket; 0 none */
    pb_acquiring *ops_head, *ops_tail;
    pb_acquiring *at_broker;         /* the operation whose ticket is in the wait word */
};

/* ------------------------------------------------------------------ the ring */

static void nb_close_fd(struct pb_nb *nb)
{
    if (nb->sqes)
        munmap(nb->sqes, nb->sqes_len);
    if (nb->cq_map && nb->cq_map != nb->sq_map)
        munmap(nb->cq_map, nb->cq_map_len);
    if (nb->sq_map)
        munmap(nb->sq_map, nb->sq_map_len);
    if (nb->fd >= 0)
        close(nb->fd);
    nb->sqes = NULL;
    nb->sq_map = nb->cq_map = NULL;
    nb->fd = -1;
    nb->kind = 0;
    nb->timer_armed = 0;
    nb->wait_armed = nb->ctrl_armed = 0;
}

static int ring_enter(int fd, unsigned submit, unsigned wait)
{
    for (;;) {
        long r = syscall(__NR_io_uring_enter, fd, submit, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
        if (r >= 0)
            return (int)r;
        if (errno != EINTR)
            return -errno;
    }
}

/* Queue one SQE and submit it.  PB_OK, or PB_ENOMEM when the kernel would
 * not take it (the entry stays queued and goes with the next submission). */
static int ring_submit(struct pb_nb *nb, const struct io_uring_sqe *e, unsigned wait)
{
    unsigned tail = *nb->sq_tail;
    unsigned head = __atomic_load_n(nb->sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= nb->sq_entries)
        return PB_ENOMEM;
    unsigned idx = tail & *nb->sq_mask;
    nb->sqes[idx] = *e;
    nb->sq_array[idx] = idx;
    __atomic_store_n(nb->sq_tail, tail + 1, __ATOMIC_RELEASE);
    int r = ring_enter(nb->fd, 1, wait);
    return r < 0 ? PB_ENOMEM : PB_OK;
}

static void futex_sqe(struct io_uring_sqe *e, _Atomic uint32_t *word, uint32_t seen, uint64_t ud)
{
    memset(e, 0, sizeof *e);
    e->opcode = IORING_OP_FUTEX_WAIT;
    e->fd = FUTEX2_SIZE_U32;        /* not FUTEX2_PRIVATE: the word is in a shared mapping */
    e->addr = (uint64_t)(uintptr_t)word;
    e->addr2 = seen;
    e->addr3 = FUTEX_BITSET_MATCH_ANY;  /* the broker wakes with plain FUTEX_WAKE */
    e->user_data = ud;
}

/* Cancel the request with user_data ud (all of them: any_ud), so that a
 * futex wait nobody will look at does not stay armed.  wait: until the
 * cancellation is done (the requests' file references are gone). */
static void ring_cancel(struct pb_nb *nb, uint64_t ud, int any_ud, unsigned wait)
{
    struct io_uring_sqe e;
    memset(&e, 0, sizeof e);
    e.opcode = IORING_OP_ASYNC_CANCEL;
    e.fd = -1;
    e.addr = ud;
    e.cancel_flags = any_ud ? IORING_ASYNC_CANCEL_ANY : 0;
    e.user_data = UD(UD_CANCEL, 0, 0);
    (void)ring_submit(nb, &e, wait);
}

/* Make the ring and check that FUTEX_WAIT works on it: a wait for a value
 * the word does not hold must complete at once with -EAGAIN. */
static int ring_setup(struct pb_nb *nb)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    long fd = syscall(__NR_io_uring_setup, NB_RING_ENTRIES, &p);
    if (fd < 0)
        return PB_ENOMEM;
    nb->fd = (int)fd;
    nb->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    nb->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && nb->cq_map_len > nb->sq_map_len)
        nb->sq_map_len = nb->cq_map_len;
    nb->sq_map = mmap(NULL, nb->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, nb->fd,
                      IORING_OFF_SQ_RING);
    if (nb->sq_map == MAP_FAILED) {
        nb->sq_map = NULL;
        goto fail;
    }
    if (single) {
        nb->cq_map = nb->sq_map;
    } else {
        nb->cq_map = mmap(NULL, nb->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, nb->fd,
                          IORING_OFF_CQ_RING);
        if (nb->cq_map == MAP_FAILED) {
            nb->cq_map = NULL;
            goto fail;
        }
    }
    nb->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    nb->sqes = mmap(NULL, nb->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, nb->fd, IORING_OFF_SQES);
    if (nb->sqes == MAP_FAILED) {
        nb->sqes = NULL;
        goto fail;
    }
    char *sq = nb->sq_map, *cq = nb->cq_map;
    nb->sq_head = (unsigned *)(sq + p.sq_off.head);
    nb->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    nb->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    nb->sq_array = (unsigned *)(sq + p.sq_off.array);
    nb->cq_head = (unsigned *)(cq + p.cq_off.head);
    nb->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    nb->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    nb->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    nb->sq_entries = p.sq_entries;
    nb->kind = NB_URING;

    /* The probe. */
    _Atomic uint32_t word = 7;
    struct io_uring_sqe e;
    futex_sqe(&e, &word, 8, UD(UD_PROBE, 0, 0));
    if (ring_submit(nb, &e, 1) != PB_OK)
        goto fail;
    unsigned head = *nb->cq_head;
    if (__atomic_load_n(nb->cq_tail, __ATOMIC_ACQUIRE) == head)
        goto fail;
    struct io_uring_cqe *cqe = &nb->cqes[head & *nb->cq_mask];
    int ok = cqe->user_data == UD(UD_PROBE, 0, 0) && cqe->res == -EAGAIN;
    __atomic_store_n(nb->cq_head, head + 1, __ATOMIC_RELEASE);
    if (!ok)
        goto fail;                  /* -EINVAL: no FUTEX_WAIT in this kernel */
    return PB_OK;
fail:
    nb_close_fd(nb);
    return PB_ENOMEM;
}

static int timer_setup(struct pb_nb *nb)
{
    nb->fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (nb->fd < 0)
        return errno == EMFILE || errno == ENFILE || errno == ENOMEM ? PB_ENOMEM : PB_EINVAL;
    nb->kind = NB_TIMER;
    return PB_OK;
}

static int timer_arm(struct pb_nb *nb)
{
    if (nb->timer_armed)
        return PB_OK;
    struct itimerspec its = { .it_value = { .tv_sec = 0, .tv_nsec = PB_NB_TICK_MS * 1000000L } };
    if (timerfd_settime(nb->fd, 0, &its, NULL) < 0)
        return PB_ENOMEM;
    nb->timer_armed = 1;
    return PB_OK;
}

static void op_finish(pb_acquiring *op, int err, pb_lease *l);

/* The client's state, made on first use; a new fd in a forked child. */
static struct pb_nb *nb_get(pb_client *c)
{
    struct pb_nb *nb = c->nb;
    if (!nb) {
        nb = calloc(1, sizeof *nb);
        if (!nb)
            return NULL;
        nb->fd = -1;
        c->nb = nb;
    }
    if (nb->fd >= 0 && nb->fork_gen != pb_fork_gen) {
        /* Inherited: the ring (and the waits in it) are the parent's, and so
         * are the pending acquires. */
        nb_close_fd(nb);
        for (pb_acquiring *op = nb->ops_head; op; op = op->next)
            if (op->state != OP_DONE)
                op_finish(op, PB_ESTALE, NULL);
        nb->at_broker = NULL;
    }
    if (nb->fd < 0) {
        const char *mode = getenv("POOLBROKER_ASYNC_NOTIFY");
        int rc = PB_ENOMEM;
        if (!mode || strcmp(mode, "timer") != 0)
            rc = ring_setup(nb);
        if (rc != PB_OK)
            rc = timer_setup(nb);
        if (rc != PB_OK)
            return NULL;
        nb->fork_gen = pb_fork_gen;
    }
    return nb;
}

/* Watch the control socket for the broker's death (once per attachment). */
static int arm_ctrl(pb_client *c, struct pb_nb *nb)
{
    if (nb->kind != NB_URING || nb->ctrl_armed == c->epoch || !c->attached)
        return PB_OK;
    struct io_uring_sqe e;
    memset(&e, 0, sizeof e);
    e.opcode = IORING_OP_POLL_ADD;
    e.fd = c->ctrl_fd;
    e.poll32_events = POLLRDHUP;    /* POLLHUP and POLLERR come anyway; data does not wake us */
    e.user_data = UD(UD_CTRL, 0, c->epoch);
    int rc = ring_submit(nb, &e, 0);
    if (rc == PB_OK)
        nb->ctrl_armed = c->epoch;
    return rc;
}

/* Be told when rec->wait_futex moves from seen. */
static int arm_wait(pb_client *c, uint32_t seen)
{
    struct pb_nb *nb = nb_get(c);
    if (!nb)
        return PB_ENOMEM;
    if (nb->kind == NB_TIMER) {
        nb->wait_armed = c->epoch;
        return timer_arm(nb);
    }
    if (nb->wait_armed != c->epoch) {
        atomic_store(&c->rec->wait_sleeping, 1);
        struct io_uring_sqe e;
        futex_sqe(&e, &c->rec->wait_futex, seen, UD(UD_WAIT, 0, c->epoch));
        int rc = ring_submit(nb, &e, 0);
        if (rc != PB_OK)
            return rc;
        nb->wait_armed = c->epoch;
    }
    return arm_ctrl(c, nb);
}

/* Be told when the lease's slot->rep_futex moves from seen. */
static int arm_lease(pb_lease *l, uint32_t seen)
{
    pb_client *c = l->c;
    struct pb_nb *nb = nb_get(c);
    if (!nb)
        return PB_ENOMEM;
    if (nb->kind == NB_TIMER) {
        l->nb_armed = 1;
        return timer_arm(nb);
    }
    if (!l->nb_armed) {
        atomic_store(&l->s->rep_sleeping, 1);
        struct io_uring_sqe e;
        futex_sqe(&e, &l->s->rep_futex, seen, UD(UD_REP, l->slot, (uint32_t)l->word));
        int rc = ring_submit(nb, &e, 0);
        if (rc != PB_OK)
            return rc;
        l->nb_armed = 1;
    }
    return arm_ctrl(c, nb);
}

/* ---------------------------------------------------------------- acquires */

static void op_finish(pb_acquiring *op, int err, pb_lease *l)
{
    struct pb_nb *nb = op->c->nb;
    if (nb->at_broker == op)
        nb->at_broker = NULL;
    op->state = OP_DONE;
    op->err = err;
    op->lease = l;
}

static void op_unlink_free(pb_acquiring *op)
{
    struct pb_nb *nb = op->c->nb;
    if (op->prev)
        op->prev->next = op->next;
    else
        nb->ops_head = op->next;
    if (op->next)
        op->next->prev = op->prev;
    else
        nb->ops_tail = op->prev;
    if (nb->at_broker == op)
        nb->at_broker = NULL;
    free(op);
}

/* Give a slot we hold but cannot use back through the broker. */
static void give_back(pb_client *c, uint32_t s, uint64_t w)
{
    uint64_t rel = PB_WORD_NEXT(w, PB_SLOT_RELEASING, c->id);
    if (atomic_compare_exchange_strong(&c->slots[s].word, &w, rel))
        pbi_sq_push(c, PB_SQE(PB_SQ_RELEASE, s, PB_WORD_GEN(rel)));
}

/* Lease without queuing, as pb_acquire's fast path.  PB_OK (*out set),
 * PB_EINPROGRESS (no slot now: queue; *pi is the pool), or an error. */
static int try_now(pb_client *c, const char *pool, uint32_t *pi, pb_lease **out)
{
    int rc = pbi_ensure_attached(c);
    if (rc != PB_OK)
        return rc;
    pb_shm_pool *p = NULL;
    /* A pool removed under us may have a successor of the same name (a
     * reload switched its pool_mode): look the name up again (pb_acquire). */
    for (int lookups = 0;; lookups++) {
        if ((rc = pbi_find_pool(c, pool, pi)) != PB_OK)
            return rc;
        p = &c->pools[*pi];
        if (atomic_load_explicit(&p->accepting, memory_order_relaxed))
            break;
        if (atomic_load(&c->hdr->state) == PB_BROKER_DRAINING)
            return PB_ESHUTDOWN;
        if (atomic_load(&p->health) != PB_HEALTH_REMOVED || lookups == 3)
            return PB_ENOPOOL;
    }
    uint32_t s;
    uint64_t w;
    if (atomic_load(&p->nwaiters) != 0 || !pbi_try_take_free(c, *pi, &s, &w))
        return PB_EINPROGRESS;
    pb_shm_slot *sl = &c->slots[s];
    /* Idle too long to trust: the broker checks it first (as pb_acquire). */
    uint32_t vlimit = atomic_load_explicit(&p->validate_after_idle_ms, memory_order_relaxed);
    uint64_t idle = atomic_load_explicit(&sl->idle_ms, memory_order_relaxed);
    uint64_t now = pbi_coarse_ms();
    if (vlimit && now > idle && now - idle > vlimit) {
        give_back(c, s, w);
        return PB_EINPROGRESS;
    }
    atomic_store_explicit(&sl->lease_ms, now, memory_order_relaxed);
    atomic_store_explicit(&sl->client_flags, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&sl->uses, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->acquires, 1, memory_order_relaxed);
    rc = pbi_make_lease(c, *pi, s, w, out);
    if (rc != PB_OK)
        give_back(c, s, w);
    return rc;
}

/* Put op's ticket in the wait word and queue it with the broker. */
static void queue_at_broker(pb_client *c, pb_acquiring *op, uint32_t pi)
{
    uint32_t ticket = ++c->ticket;
    atomic_store(&c->rec->wait_word, PB_WAITW(PB_WAIT_WAITING, 0, ticket));
    op->state = OP_BROKER;
    op->pi = pi;
    op->epoch = c->epoch;
    op->ticket = ticket;
    c->nb->at_broker = op;
    int rc = pbi_sq_push(c, PB_SQE(PB_SQ_WAIT, pi, ticket));
    if (rc != PB_OK)
        op_finish(op, rc, NULL);
}

/* What the broker decided for the operation queued with it: PB_EINPROGRESS
 * while it waits, else the operation is finished. */
static int check_broker_op(pb_client *c, pb_acquiring *op)
{
    if (op->epoch != c->epoch || !c->attached || c->broken) {
        op_finish(op, PB_EBROKER, NULL);
        return PB_EBROKER;
    }
    uint64_t w = atomic_load(&c->rec->wait_word);
    unsigned st = PB_WAITW_STATE(w);
    if (PB_WAITW_TICKET(w) != op->ticket) {
        op_finish(op, PB_EPROTO, NULL);     /* someone scribbled on our record */
        return PB_EPROTO;
    }
    if (st == PB_WAIT_WAITING)
        return PB_EINPROGRESS;
    if (st == PB_WAIT_FAILED) {
        int err = -(int)PB_WAITW_SLOT(w);
        err = err < 0 && err >= PB_ESERVER ? err : PB_EBACKEND;
        if (err == PB_ENOPOOL && atomic_load(&c->pools[op->pi].health) == PB_HEALTH_REMOVED) {
            /* Removed while we waited: queue here again; drive() looks the
             * name up anew (a pool_mode switch has a successor). */
            op->state = OP_QUEUED;
            c->nb->at_broker = NULL;
            return PB_EINPROGRESS;
        }
        atomic_fetch_add_explicit(&c->pools[op->pi].errors, 1, memory_order_relaxed);
        op_finish(op, err, NULL);
        return err;
    }
    if (st != PB_WAIT_GRANTED) {
        op_finish(op, PB_EPROTO, NULL);
        return PB_EPROTO;
    }
    uint32_t s = PB_WAITW_SLOT(w);
    uint64_t sw = s < c->nslots ? atomic_load(&c->slots[s].word) : 0;
    if (s >= c->nslots || PB_WORD_STATE(sw) != PB_SLOT_LEASED || PB_WORD_OWNER(sw) != c->id) {
        op_finish(op, PB_EPROTO, NULL);
        return PB_EPROTO;
    }
    pb_shm_pool *p = &c->pools[op->pi];
    atomic_fetch_add_explicit(&p->acquires, 1, memory_order_relaxed);
    pb_shm_hist_add(&p->acquire_wait, pbi_now_us() - op->t0_us);
    pb_lease *l = NULL;
    int rc = pbi_make_lease(c, op->pi, s, sw, &l);
    if (rc != PB_OK)
        give_back(c, s, sw);
    op_finish(op, rc, l);
    return rc;
}

/* Move the queue along: settle the broker's operation, let queued ones take
 * free slots, and queue the oldest that found none with the broker. */
static void drive(pb_client *c)
{
    struct pb_nb *nb = c->nb;
    if (!nb)
        return;
    if (nb->at_broker)
        check_broker_op(c, nb->at_broker);
    uint64_t full[PB_MAX_POOLS / 64] = { 0 };     /* pools found without a free slot */
    for (pb_acquiring *op = nb->ops_head; op; op = op->next) {
        if (op->state != OP_QUEUED)
            continue;
        if (op->epoch == c->epoch && op->pi < PB_MAX_POOLS && (full[op->pi / 64] & (1ull << (op->pi % 64))) &&
            nb->at_broker)
            continue;               /* an older one of ours found none: keep the order */
        uint32_t pi = 0;
        pb_lease *l = NULL;
        int rc = try_now(c, op->pool, &pi, &l);
        if (rc == PB_EINPROGRESS) {
            op->pi = pi;
            op->epoch = c->epoch;
            if (pi < PB_MAX_POOLS)
                full[pi / 64] |= 1ull << (pi % 64);
            if (!nb->at_broker)
                queue_at_broker(c, op, pi);
        } else {
            op_finish(op, rc, l);
        }
    }
}

static void fail_pending(pb_client *c, int err)
{
    for (pb_acquiring *op = c->nb->ops_head; op; op = op->next)
        if (op->state != OP_DONE)
            op_finish(op, err, NULL);
    c->nb->at_broker = NULL;
}

void pbi_nb_lease_gone(pb_lease *l)
{
    struct pb_nb *nb = l->c->nb;
    if (l->nb_armed && nb && nb->kind == NB_URING && nb->fd >= 0 && nb->fork_gen == pb_fork_gen)
        ring_cancel(nb, UD(UD_REP, l->slot, (uint32_t)l->word), 0, 0);
    l->nb_armed = 0;
}

int pbi_nb_waiting(const pb_client *c)
{
    return c->nb && c->nb->at_broker != NULL;
}

PB_API int pb_acquire_start(pb_client *c, const char *pool, pb_acquiring **op, pb_lease **out)
{
    if (op)
        *op = NULL;
    if (out)
        *out = NULL;
    if (!c || !pool || !op || !out)
        return PB_EINVAL;
    struct pb_nb *nb = nb_get(c);
    if (!nb)
        return PB_ENOMEM;
    uint32_t pi;
    int rc;
    int queued = 0;
    for (pb_acquiring *o = nb->ops_head; o; o = o->next)
        queued |= o->state != OP_DONE;
    if (!queued) {
        rc = try_now(c, pool, &pi, out);
        if (rc != PB_EINPROGRESS)
            return rc;
    } else if ((rc = pbi_ensure_attached(c)) != PB_OK || (rc = pbi_find_pool(c, pool, &pi)) != PB_OK) {
        return rc;                  /* a bad name fails now, not in the queue */
    }
    pb_acquiring *o = calloc(1, sizeof *o);
    if (!o)
        return PB_ENOMEM;
    o->c = c;
    memcpy(o->pool, pool, strlen(pool) + 1);    /* find_pool checked it is < PB_NAME_MAX */
    o->state = OP_QUEUED;
    o->t0_us = pbi_now_us();
    o->prev = nb->ops_tail;
    if (nb->ops_tail)
        nb->ops_tail->next = o;
    else
        nb->ops_head = o;
    nb->ops_tail = o;
    rc = pb_acquire_poll(o, out);
    if (rc == PB_EINPROGRESS)
        *op = o;
    return rc;
}

PB_API int pb_acquire_poll(pb_acquiring *op, pb_lease **out)
{
    if (!op || !out)
        return PB_EINVAL;
    *out = NULL;
    pb_client *c = op->c;
    struct pb_nb *nb = nb_get(c);   /* a forked child finishes inherited operations here */
    if (!nb && op->state != OP_DONE)
        op_finish(op, PB_ENOMEM, NULL);
    if (nb && op->state != OP_DONE) {
        uint32_t seen = c->attached ? atomic_load(&c->rec->wait_futex) : 0;
        drive(c);
        if (op->state != OP_DONE) {
            int rc = nb->at_broker ? arm_wait(c, seen) : PB_EPROTO;
            if (rc == PB_OK)
                return PB_EINPROGRESS;
            if (op->state == OP_BROKER) {
                uint64_t ww = PB_WAITW(PB_WAIT_WAITING, 0, op->ticket);
                if (!atomic_compare_exchange_strong(&c->rec->wait_word, &ww,
                                                    PB_WAITW(PB_WAIT_CANCELLED, 0, op->ticket))) {
                    check_broker_op(c, op);     /* decided just now: take what it is */
                    goto done;
                }
                pbi_sq_push(c, PB_SQE(PB_SQ_CANCEL_WAIT, op->pi, op->ticket));
            }
            op_finish(op, rc, NULL);
        }
    }
done:;
    int rc = op->err;
    *out = op->lease;
    op_unlink_free(op);
    return rc;
}

PB_API void pb_acquire_cancel(pb_acquiring *op)
{
    if (!op)
        return;
    pb_client *c = op->c;
    if (op->state == OP_BROKER && op->epoch == c->epoch && c->attached && op->c->nb->fork_gen == pb_fork_gen) {
        uint64_t ww = PB_WAITW(PB_WAIT_WAITING, 0, op->ticket);
        if (atomic_compare_exchange_strong(&c->rec->wait_word, &ww, PB_WAITW(PB_WAIT_CANCELLED, 0, op->ticket))) {
            pbi_sq_push(c, PB_SQE(PB_SQ_CANCEL_WAIT, op->pi, op->ticket));
            atomic_fetch_add_explicit(&c->pools[op->pi].timeouts, 1, memory_order_relaxed);
            op_finish(op, PB_ETIMEDOUT, NULL);
        } else {
            check_broker_op(c, op);     /* granted or refused meanwhile */
        }
    }
    if (op->state == OP_DONE && op->lease)
        pb_release(op->lease);
    op_unlink_free(op);
    /* The next one of ours takes the place with the broker. */
    if (c->nb->ops_head && c->attached && !c->broken && c->nb->fork_gen == pb_fork_gen)
        drive(c);
}

/* ------------------------------------------------------------- the client fd */

PB_API int pb_client_fd(pb_client *c)
{
    if (!c)
        return PB_EINVAL;
    struct pb_nb *nb = nb_get(c);
    return nb ? nb->fd : PB_ENOMEM;
}

PB_API int pb_client_fd_polls(pb_client *c)
{
    if (!c)
        return PB_EINVAL;
    struct pb_nb *nb = nb_get(c);
    return nb ? nb->kind == NB_TIMER : PB_ENOMEM;
}

static void lease_disarm(pb_client *c, uint32_t slot, uint32_t gen)
{
    for (pb_lease *l = c->leases; l; l = l->next)
        if (l->slot == slot && (uint32_t)l->word == gen)
            l->nb_armed = 0;
}

PB_API int pb_client_consume(pb_client *c)
{
    if (!c)
        return PB_EINVAL;
    struct pb_nb *nb = c->nb;
    if (!nb)
        return 0;
    if (nb->fd >= 0 && nb->fork_gen != pb_fork_gen)
        nb = nb_get(c);
    if (!nb || nb->fd < 0)
        return 0;
    int n = 0, check_broker = 0;
    if (nb->kind == NB_URING) {
        unsigned head = *nb->cq_head;
        unsigned tail = __atomic_load_n(nb->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++, n++) {
            const struct io_uring_cqe *cqe = &nb->cqes[head & *nb->cq_mask];
            uint64_t ud = cqe->user_data;
            switch (UD_KIND(ud)) {
            case UD_WAIT:
                if (nb->wait_armed == UD_B(ud))
                    nb->wait_armed = 0;
                break;
            case UD_REP:
                lease_disarm(c, UD_A(ud), UD_B(ud));
                break;
            case UD_CTRL:
                if (nb->ctrl_armed == UD_B(ud)) {
                    nb->ctrl_armed = 0;
                    if (c->epoch == UD_B(ud))
                        check_broker = 1;
                }
                break;
            default:
                break;
            }
        }
        __atomic_store_n(nb->cq_head, head, __ATOMIC_RELEASE);
    } else {
        uint64_t ticks;
        if (read(nb->fd, &ticks, sizeof ticks) == (ssize_t)sizeof ticks) {
            n = 1;
            nb->timer_armed = 0;
            nb->wait_armed = 0;
            for (pb_lease *l = c->leases; l; l = l->next)
                l->nb_armed = 0;
            check_broker = 1;       /* nothing else tells us it died */
        }
    }
    if (check_broker && c->attached && !c->broken && c->fork_gen == pb_fork_gen && !pbi_broker_alive(c))
        c->broken = 1;
    if (c->broken || !c->attached) {
        fail_pending(c, PB_EBROKER);
    } else if (nb->ops_head) {
        uint32_t seen = atomic_load(&c->rec->wait_futex);
        drive(c);
        if (nb->at_broker)
            arm_wait(c, seen);      /* a failure here shows at the next pb_acquire_poll */
    }
    return n;
}

void pbi_nb_free(pb_client *c)
{
    struct pb_nb *nb = c->nb;
    if (!nb)
        return;
    /* Called after detach: the segment is gone; the broker drops the
     * waiters of a client that detaches. */
    while (nb->ops_head) {
        pb_acquiring *op = nb->ops_head;
        nb->ops_head = op->next;
        free(op);
    }
    /* Our own ring: cancel what is in it first, so that nothing completes
     * into this process after it is closed and the control socket's last
     * reference (the poll's) goes now, not when the ring is torn down. */
    if (nb->fd >= 0 && nb->kind == NB_URING && nb->fork_gen == pb_fork_gen)
        ring_cancel(nb, 0, 1, 1);
    nb_close_fd(nb);                /* in a forked child: our copy only */
    free(nb);
    c->nb = NULL;
}

/* ------------------------------------------------------------ lease replies */

/* PostgreSQL: submit what is queued, feed the decoder; 0 when a result (or
 * the end) is ready, 1 when not yet, or a negative code. */
static int pg_consume(pb_lease *l)
{
    if (l->held)
        return 0;
    if (l->copy)
        return PB_EBUSY;
    for (;;) {
        int rc = pbi_pg_flush(l);
        if (rc != PB_OK) {
            l->desync = 1;
            return rc;
        }
        if (l->pending == 0)
            return l->pqueued ? 1 : 0;
        int r = pbi_pg_pump(l);
        if (r < 0)
            return r;
        if (r == PGP_READY) {
            l->pending--;
            l->held = pgp_take_result(&l->dec);
            return l->held ? 0 : PB_ENOMEM;
        }
        if (r == PGP_MORE)
            return 1;
        if (r == PGP_COPY_ROW) {
            free(l->dec.row);       /* COPY TO STDOUT through a plain query: rows dropped */
            l->dec.row = NULL;
        } else if (r == PGP_COPY_IN) {
            /* Refused the protocol's way, as pb_pg_exec does. */
            pb_buf *b = &l->c->scratch;
            b->len = 0;
            rc = pgp_copy_fail(b, "COPY FROM STDIN needs pb_pg_copy_in_begin");
            if (rc == PB_OK)
                rc = pbi_submit_nowait(l, b->data, b->len, 0);
            if (rc != PB_OK) {
                l->desync = 1;
                return rc == PB_EBUSY ? PB_EPROTO : rc;
            }
        }
    }
}

/* Redis: submit what fits of the appended commands, without waiting. */
static int redis_flush(pb_lease *l)
{
    if (!l->rqueued)
        return PB_OK;
    uint32_t *e = (uint32_t *)l->rends.data;
    uint32_t n = 0, nrep = 0;
    uint32_t lim = pbi_group_limit(l);
    while (n < l->rqueued && e[2 * n] <= lim) {
        nrep += e[2 * n + 1];
        n++;
    }
    if (n == 0)
        nrep = e[2 * n++ + 1];      /* larger than the buffer: by itself, streamed */
    uint32_t sent = e[2 * (n - 1)];
    int rc = pbi_submit_nowait(l, l->rqueue.data, sent, nrep);
    if (rc == PB_EBUSY)
        return PB_OK;               /* the buffer is not free yet: its ack wakes us */
    if (rc != PB_OK)
        return rc;
    memmove(l->rqueue.data, l->rqueue.data + sent, l->rqueue.len - sent);
    l->rqueue.len -= sent;
    for (uint32_t i = n; i < l->rqueued; i++) {
        e[2 * (i - n)] = e[2 * i] - sent;
        e[2 * (i - n) + 1] = e[2 * i + 1];
    }
    l->rqueued -= n;
    l->rends.len = (size_t)l->rqueued * 2 * sizeof(uint32_t);
    return PB_OK;
}

/* Redis: as pg_consume; a complete reply is kept in l->rheld. */
static int redis_consume(pb_lease *l)
{
    if (l->rheld)
        return 0;
    int rc = redis_flush(l);
    if (rc != PB_OK) {
        l->desync = 1;
        return rc;
    }
    redisReply *rep;
    if ((rc = pbi_redis_next(l, 0, &rep)) != PB_OK)
        return rc;
    if (rep) {
        l->rheld = rep;
        return 0;
    }
    return l->pending == 0 && !l->rqueued ? 0 : 1;
}

static int consume(pb_lease *l)
{
    return l->type == PB_POOL_POSTGRES ? pg_consume(l) : redis_consume(l);
}

PB_API int pb_consume_input(pb_lease *l)
{
    int rc = pbi_lease_usable(l, 0);
    if (rc != PB_OK)
        return rc;
    rc = consume(l);
    return rc < 0 ? rc : PB_OK;
}

PB_API int pb_is_busy(pb_lease *l)
{
    int rc = pbi_lease_usable(l, 0);
    if (rc != PB_OK)
        return rc;
    uint32_t seen = atomic_load(&l->s->rep_futex);     /* before looking: see the file comment */
    rc = consume(l);
    if (rc == 1) {
        int arc = arm_lease(l, seen);
        if (arc != PB_OK)
            return arc;
    }
    return rc;
}

PB_API int pb_pg_send_query(pb_lease *l, const char *sql)
{
    if (!sql)
        return PB_EINVAL;
    int rc = pbi_lease_usable(l, PB_POOL_POSTGRES);
    if (rc != PB_OK)
        return rc;
    if (l->copy)
        return PB_EBUSY;
    size_t before = l->pipe.len;
    rc = pgp_query(&l->pipe, sql);
    if (rc == PB_OK)
        rc = pbi_request_fits(l, l->pipe.len - before);
    uint32_t end = (uint32_t)l->pipe.len;
    if (rc == PB_OK)
        rc = pb_buf_append(&l->pends, &end, sizeof end);
    if (rc != PB_OK) {
        l->pipe.len = before;
        return rc;
    }
    if (l->pqueued == 0 && l->pending == 0)
        pbi_set_preview(l, sql, strlen(sql));
    l->pqueued++;
    if ((rc = pbi_pg_flush(l)) != PB_OK)
        l->desync = 1;
    return rc;
}

PB_API int pb_redis_send_argv(pb_lease *l, int argc, const char **argv, const size_t *argvlen)
{
    int rc = pb_redis_append_command_argv(l, argc, argv, argvlen);
    if (rc != PB_OK)
        return rc;
    if ((rc = redis_flush(l)) != PB_OK)
        l->desync = 1;
    return rc;
}

PB_API int pb_redis_poll_reply(pb_lease *l, redisReply **out)
{
    if (out)
        *out = NULL;
    int rc = pbi_lease_usable(l, PB_POOL_REDIS);
    if (rc != PB_OK)
        return rc;
    if (!out)
        return PB_EINVAL;
    uint32_t seen = atomic_load(&l->s->rep_futex);
    rc = redis_consume(l);
    if (rc < 0)
        return rc;
    if (l->rheld) {
        *out = l->rheld;
        l->rheld = NULL;
        if (l->pending)
            l->pending--;
        return PB_OK;
    }
    if (rc == 0)
        return PB_EINVAL;           /* nothing was asked */
    rc = arm_lease(l, seen);
    return rc == PB_OK ? PB_EINPROGRESS : rc;
}

/* ------------------------------------------------- notifications, messages
 *
 * LISTEN/NOTIFY and Pub/Sub without waiting: the blocking calls with a zero
 * timeout (which also ask the broker to watch the socket, PB_SQ_WATCH), and
 * on "none yet" a notification armed on the lease's reply word, read before
 * looking so that a delivery between the look and the arming still wakes
 * the fd. */

PB_API int pb_pg_poll_notify(pb_lease *l, pb_notify **out)
{
    if (out)
        *out = NULL;
    int rc = pbi_lease_usable(l, PB_POOL_POSTGRES);
    if (rc != PB_OK)
        return rc;
    if (!out)
        return PB_EINVAL;
    uint32_t seen = atomic_load(&l->s->rep_futex);
    rc = pb_pg_wait_notify(l, 0, out);
    if (rc != PB_ETIMEDOUT)
        return rc;
    rc = arm_lease(l, seen);
    return rc == PB_OK ? PB_EINPROGRESS : rc;
}

PB_API int pb_redis_poll_message(pb_lease *l, redisReply **out)
{
    if (out)
        *out = NULL;
    int rc = pbi_lease_usable(l, PB_POOL_REDIS);
    if (rc != PB_OK)
        return rc;
    if (!out)
        return PB_EINVAL;
    uint32_t seen = atomic_load(&l->s->rep_futex);
    rc = pb_redis_get_message(l, 0, out);
    if (rc != PB_ETIMEDOUT)
        return rc;
    rc = arm_lease(l, seen);
    return rc == PB_OK ? PB_EINPROGRESS : rc;
}
