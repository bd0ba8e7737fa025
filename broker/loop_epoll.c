/*
 * loop_epoll.c — the epoll backend of the event loop (see loop.h).
 *
 * Completion semantics on a readiness API: an operation is first tried with
 * a non-blocking syscall at the start of the next loop_run(); if it would
 * block, its fd is registered for the matching readiness and the syscall is
 * retried when epoll says so.  Callbacks therefore run only from loop_run(),
 * exactly as with io_uring.  Each fd keeps two lists of waiting operations:
 * "in" (accept, recv, read, poll for POLLIN) and "out" (send, poll for
 * POLLOUT); readiness moves a whole list to the ready list, where each
 * operation is simply tried again.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "loop.h"

typedef struct fdent {
    ev_op *in, *out;         /* operations waiting for readiness (lists via ->next) */
    uint32_t mask;           /* events registered with epoll */
} fdent;

typedef struct epoll_loop {
    loop base;
    int epfd;
    fdent *fds;
    int nfds;
    ev_op *ready_head, *ready_tail;   /* to try (or complete) in the next run */
} epoll_loop;

static void ready_push(epoll_loop *e, ev_op *op)
{
    op->next = NULL;
    if (e->ready_tail)
        e->ready_tail->next = op;
    else
        e->ready_head = op;
    e->ready_tail = op;
}

static fdent *ent(epoll_loop *e, int fd)
{
    if (fd < 0)
        return NULL;
    if (fd >= e->nfds) {
        int n = e->nfds ? e->nfds : 64;
        while (n <= fd)
            n *= 2;
        fdent *p = realloc(e->fds, (size_t)n * sizeof *p);
        if (!p)
            return NULL;
        memset(p + e->nfds, 0, (size_t)(n - e->nfds) * sizeof *p);
        e->fds = p;
        e->nfds = n;
    }
    return &e->fds[fd];
}

static void update_mask(epoll_loop *e, int fd, fdent *f)
{
    uint32_t want = (f->in ? EPOLLIN : 0) | (f->out ? EPOLLOUT : 0);
    if (want == f->mask)
        return;
    struct epoll_event ev = { .events = want, .data.fd = fd };
    int r;
    if (!want) {
        r = epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
        (void)r;            /* the fd may already be closed: nothing to undo */
    } else if (!f->mask) {
        r = epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev);
        if (r < 0 && errno == EEXIST)
            r = epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev);
        if (r < 0)
            log_errno(LOG_LVL_ERROR, errno, "epoll_ctl add fd %d", fd);
    } else {
        r = epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev);
        if (r < 0 && errno == ENOENT)
            r = epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev);
        if (r < 0)
            log_errno(LOG_LVL_ERROR, errno, "epoll_ctl mod fd %d", fd);
    }
    f->mask = want;
}

static void epoll_submit(loop *l, ev_op *op)
{
    ready_push((epoll_loop *)l, op);
}

/* Try the syscall of op now.  Returns 1 and sets *res when it completed, 0
 * when it would block. */
static int attempt(ev_op *op, int *res)
{
    ssize_t n;
    switch (op->kind) {
    case EV_ACCEPT:
        n = accept4(op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        break;
    case EV_RECV:
        n = recv(op->fd, op->buf, op->len, MSG_DONTWAIT);
        break;
    case EV_SEND:
        n = send(op->fd, op->buf, op->len, MSG_DONTWAIT | MSG_NOSIGNAL);
        break;
    case EV_READ:
        n = read(op->fd, op->buf, op->len);
        break;
    case EV_POLL: {
        struct pollfd p = { .fd = op->fd, .events = (short)op->events };
        int r = poll(&p, 1, 0);
        if (r == 0)
            return 0;
        *res = r < 0 ? -errno : p.revents;
        return 1;
    }
    default:
        *res = -EINVAL;
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    *res = n < 0 ? -errno : (int)n;
    return 1;
}

static int is_out(const ev_op *op)
{
    return op->kind == EV_SEND || (op->kind == EV_POLL && (op->events & POLLOUT));
}

/* Remove op from list *head; 1 if it was there. */
static int list_remove(ev_op **head, ev_op *op)
{
    for (ev_op **pp = head; *pp; pp = &(*pp)->next) {
        if (*pp == op) {
            *pp = op->next;
            op->next = NULL;
            return 1;
        }
    }
    return 0;
}

static void complete(ev_op *op, int res)
{
    op->pending = 0;
    op->cb(op, res);
}

static void epoll_cancel(loop *l, ev_op *op)
{
    epoll_loop *e = (epoll_loop *)l;
    /* Waiting for readiness: take it out and complete it as cancelled. */
    fdent *f = ent(e, op->fd);
    if (f && (list_remove(&f->in, op) || list_remove(&f->out, op))) {
        update_mask(e, op->fd, f);
        ready_push(e, op);
    }
    /* Already on the ready list: it will see op->cancelled there. */
}

static int run_ready(epoll_loop *e)
{
    ev_op *list = e->ready_head;
    int n = 0;
    e->ready_head = e->ready_tail = NULL;
    while (list) {
        ev_op *op = list;
        int res;
        list = op->next;
        if (op->cancelled) {
            complete(op, -ECANCELED);
            n++;
        } else if (attempt(op, &res)) {
            complete(op, res);
            n++;
        } else {
            fdent *f = ent(e, op->fd);
            if (!f) {
                complete(op, -ENOMEM);
                n++;
                continue;
            }
            ev_op **head = is_out(op) ? &f->out : &f->in;
            op->next = *head;
            *head = op;
            update_mask(e, op->fd, f);
        }
    }
    return n;
}

static int epoll_run(loop *l, int timeout_ms)
{
    epoll_loop *e = (epoll_loop *)l;
    struct epoll_event evs[256];
    int n = run_ready(e);

    int nev = epoll_wait(e->epfd, evs, 256, (n > 0 || e->ready_head) ? 0 : timeout_ms);
    if (nev < 0 && errno != EINTR)
        return -errno;
    for (int i = 0; i < nev; i++) {
        fdent *f = ent(e, evs[i].data.fd);
        if (!f)
            continue;
        uint32_t ev = evs[i].events;
        if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
            ev_op *op = f->in;
            f->in = NULL;
            while (op) {
                ev_op *next = op->next;
                ready_push(e, op);
                op = next;
            }
        }
        if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
            ev_op *op = f->out;
            f->out = NULL;
            while (op) {
                ev_op *next = op->next;
                ready_push(e, op);
                op = next;
            }
        }
        update_mask(e, evs[i].data.fd, f);
    }
    return n + run_ready(e);
}

static void epoll_destroy(loop *l)
{
    epoll_loop *e = (epoll_loop *)l;
    close(e->epfd);
    free(e->fds);
    free(e);
}

static const struct loop_ops epoll_ops = {
    .name = "epoll",
    .submit = epoll_submit,
    .cancel = epoll_cancel,
    .run = epoll_run,
    .destroy = epoll_destroy,
};

loop *loop_epoll_new(void)
{
    epoll_loop *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0) {
        free(e);
        return NULL;
    }
    e->base.ops = &epoll_ops;
    e->base.backend = LOOP_EPOLL;
    return &e->base;
}
