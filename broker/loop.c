/*
 * loop.c — the backend-independent half of the event loop: argument capture
 * and backend selection.  See loop.h.
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "log.h"
#include "loop.h"

loop *loop_new(int want, int *chosen)
{
    loop *l = NULL;

    if (want == LOOP_AUTO || want == LOOP_URING) {
        l = loop_uring_new();
        if (!l && want == LOOP_URING)
            return NULL;
        if (!l)
            log_errno(LOG_LVL_WARN, errno, "io_uring unavailable, falling back to epoll");
    }
    if (!l)
        l = loop_epoll_new();
    if (l && chosen)
        *chosen = l->backend;
    return l;
}

void loop_free(loop *l)
{
    if (l)
        l->ops->destroy(l);
}

const char *loop_backend_name(const loop *l)
{
    return l->ops->name;
}

static void submit(loop *l, ev_op *op, int kind, int fd, void *buf, size_t len, uint32_t events)
{
    op->kind = (uint8_t)kind;
    op->fd = fd;
    op->buf = buf;
    op->len = len;
    op->events = events;
    op->pending = 1;
    op->cancelled = 0;
    l->ops->submit(l, op);
}

void loop_accept(loop *l, ev_op *op, int fd) { submit(l, op, EV_ACCEPT, fd, NULL, 0, 0); }
void loop_recv(loop *l, ev_op *op, int fd, void *buf, size_t len) { submit(l, op, EV_RECV, fd, buf, len, 0); }
void loop_send(loop *l, ev_op *op, int fd, const void *buf, size_t len)
{
    submit(l, op, EV_SEND, fd, (void *)buf, len, 0);
}
void loop_read(loop *l, ev_op *op, int fd, void *buf, size_t len) { submit(l, op, EV_READ, fd, buf, len, 0); }
void loop_poll(loop *l, ev_op *op, int fd, uint32_t events) { submit(l, op, EV_POLL, fd, NULL, 0, events); }

void loop_cancel(loop *l, ev_op *op)
{
    if (!op->pending || op->cancelled)
        return;
    op->cancelled = 1;
    l->ops->cancel(l, op);
}

int loop_run(loop *l, int timeout_ms)
{
    return l->ops->run(l, timeout_ms);
}

void loop_futex_wake(loop *l, _Atomic uint32_t *word)
{
    if (l && l->ops->futex_wake && l->ops->futex_wake(l, word) == 0)
        return;
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

int loop_queued(loop *l)
{
    return l && l->ops->queued ? l->ops->queued(l) : 0;
}
