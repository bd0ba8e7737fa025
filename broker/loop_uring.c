/*
 * loop_uring.c — the io_uring backend of the event loop (see loop.h).
 *
 * One ring, set up SINGLE_ISSUER | DEFER_TASKRUN where the kernel has them
 * (completions are then processed only inside our own io_uring_enter, which is
 * exactly when we want them).  Every operation is one SQE whose user_data is
 * the ev_op; all SQEs queued during an iteration go to the kernel in the same
 * io_uring_enter that waits for completions.  So do the broker's futex wakes
 * (IORING_OP_FUTEX_WAKE, Linux 6.7), filled by hand: liburing 2.3 has no
 * helper for them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "log.h"
#include "loop.h"

#define RING_ENTRIES 4096
#define CANCEL_TAG   1              /* user_data of cancel SQEs: never a valid pointer */
/* user_data of a futex wake: the word's address | WAKE_TAG (ev_ops and
 * futex words are aligned, so the low bit tells them apart).  Posted only
 * on failure (IOSQE_CQE_SKIP_SUCCESS). */
#define WAKE_TAG     1ull

#ifndef IORING_OP_FUTEX_WAKE
#define IORING_OP_FUTEX_WAKE 52     /* Linux 6.7; not in liburing 2.3's headers */
#endif
#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02        /* futex2 flags: a 32-bit word; no FUTEX2_PRIVATE (shared mapping) */
#endif

typedef struct uring_loop {
    loop base;
    struct io_uring ring;
    int futex_ok;            /* the kernel has IORING_OP_FUTEX_WAKE (probed, then 0 on -EINVAL) */
    unsigned wakes_queued;   /* FUTEX_WAKE SQEs not yet handed to the kernel */
} uring_loop;

static struct io_uring_sqe *get_sqe(uring_loop *u)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe) {
        /* SQ full: hand what we have to the kernel and try again. */
        io_uring_submit(&u->ring);
        sqe = io_uring_get_sqe(&u->ring);
    }
    return sqe;
}

static void uring_submit(loop *l, ev_op *op)
{
    uring_loop *u = (uring_loop *)l;
    struct io_uring_sqe *sqe = get_sqe(u);

    if (!sqe) {
        /* Cannot happen after a submit frees the SQ; fail the op loudly. */
        log_error("io_uring: no SQE available");
        op->pending = 0;
        op->cb(op, -EBUSY);
        return;
    }
    switch (op->kind) {
    case EV_ACCEPT:
        io_uring_prep_accept(sqe, op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        break;
    case EV_RECV:
        io_uring_prep_recv(sqe, op->fd, op->buf, op->len, 0);
        break;
    case EV_SEND:
        io_uring_prep_send(sqe, op->fd, op->buf, op->len, MSG_NOSIGNAL);
        break;
    case EV_READ:
        io_uring_prep_read(sqe, op->fd, op->buf, (unsigned)op->len, 0);
        break;
    case EV_POLL:
        io_uring_prep_poll_add(sqe, op->fd, op->events);
        break;
    }
    io_uring_sqe_set_data(sqe, op);
}

static void uring_cancel(loop *l, ev_op *op)
{
    uring_loop *u = (uring_loop *)l;
    struct io_uring_sqe *sqe = get_sqe(u);
    if (!sqe)
        return;
    io_uring_prep_cancel(sqe, op, 0);
    io_uring_sqe_set_data64(sqe, CANCEL_TAG);
}

static int uring_futex_wake(loop *l, _Atomic uint32_t *word)
{
    uring_loop *u = (uring_loop *)l;
    if (!u->futex_ok)
        return -1;
    struct io_uring_sqe *sqe = get_sqe(u);
    if (!sqe)
        return -1;
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_FUTEX_WAKE;
    sqe->fd = FUTEX2_SIZE_U32;              /* futex2 flags */
    sqe->addr = (uint64_t)(uintptr_t)word;
    sqe->addr2 = INT_MAX;                   /* how many to wake */
    sqe->addr3 = FUTEX_BITSET_MATCH_ANY;    /* the sleepers wait with FUTEX_WAIT / futex_waitv */
    sqe->flags = IOSQE_CQE_SKIP_SUCCESS;
    sqe->user_data = (uint64_t)(uintptr_t)word | WAKE_TAG;
    u->wakes_queued++;
    return 0;
}

static int uring_queued(loop *l)
{
    uring_loop *u = (uring_loop *)l;
    return u->wakes_queued > 0;
}

/* A futex wake the kernel refused: wake with the syscall, and stop queueing
 * them if the kernel does not know the operation after all. */
static void wake_failed(uring_loop *u, uint64_t ud, int res)
{
    _Atomic uint32_t *word = (_Atomic uint32_t *)(uintptr_t)(ud & ~WAKE_TAG);
    if (res == -EINVAL || res == -EOPNOTSUPP) {
        if (u->futex_ok)
            log_warn("io_uring FUTEX_WAKE refused (%s): waking with the futex syscall", strerror(-res));
        u->futex_ok = 0;
    }
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static int uring_run(loop *l, int timeout_ms)
{
    uring_loop *u = (uring_loop *)l;
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts;
    int ret;

    if (timeout_ms == 0) {
        ret = io_uring_submit_and_get_events(&u->ring);
    } else if (timeout_ms < 0) {
        ret = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long long)(timeout_ms % 1000) * 1000000;
        ret = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
        return ret;
    if (!io_uring_sq_ready(&u->ring))
        u->wakes_queued = 0;        /* every queued SQE, the wakes with them, went in */

    int n = 0;
    unsigned head;
    unsigned seen = 0;
    /* Callbacks may queue new SQEs; they do not touch the CQ, so iterating
     * and advancing once at the end is safe. */
    io_uring_for_each_cqe(&u->ring, head, cqe) {
        seen++;
        if (cqe->user_data == CANCEL_TAG || cqe->user_data == 0)
            continue;
        if (cqe->user_data & WAKE_TAG) {
            wake_failed(u, cqe->user_data, cqe->res);
            continue;
        }
        ev_op *op = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        op->pending = 0;
        op->cb(op, res);
        n++;
    }
    io_uring_cq_advance(&u->ring, seen);
    return n;
}

static void uring_destroy(loop *l)
{
    uring_loop *u = (uring_loop *)l;
    io_uring_queue_exit(&u->ring);
    free(u);
}

static const struct loop_ops uring_ops = {
    .name = "io_uring",
    .submit = uring_submit,
    .cancel = uring_cancel,
    .run = uring_run,
    .destroy = uring_destroy,
    .futex_wake = uring_futex_wake,
    .queued = uring_queued,
};

loop *loop_uring_new(void)
{
    uring_loop *u = calloc(1, sizeof *u);
    if (!u)
        return NULL;
    struct io_uring_params p;
    unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int ret = -EINVAL;
    for (size_t i = 0; i < sizeof flag_sets / sizeof flag_sets[0]; i++) {
        memset(&p, 0, sizeof p);
        p.flags = flag_sets[i];
        ret = io_uring_queue_init_params(RING_ENTRIES, &u->ring, &p);
        if (ret == 0)
            break;
        if (ret != -EINVAL)     /* EPERM, ENOSYS, ENOMEM: no point in other flags */
            break;
    }
    if (ret < 0) {
        free(u);
        errno = -ret;
        return NULL;
    }
    struct io_uring_probe *probe = io_uring_get_probe_ring(&u->ring);
    u->futex_ok = probe && io_uring_opcode_supported(probe, IORING_OP_FUTEX_WAKE);
    if (probe)
        io_uring_free_probe(probe);
    if (!u->futex_ok)
        log_info("io_uring has no FUTEX_WAKE (Linux < 6.7): the broker wakes workers with the futex syscall");
    u->base.ops = &uring_ops;
    u->base.backend = LOOP_URING;
    return &u->base;
}
