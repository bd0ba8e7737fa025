/*
 * loop.h — the broker's event loop: one interface, two backends.
 *
 * The broker is written against completion semantics (io_uring's model): it
 * asks for an operation on a file descriptor and is called back once with the
 * result.  loop_uring.c implements it with one io_uring (one io_uring_enter
 * per iteration); loop_epoll.c implements the same contract with epoll and
 * non-blocking syscalls for systems where io_uring is unavailable (Docker's
 * default seccomp profile, kernel.io_uring_disabled).
 *
 * Rules for users of an ev_op:
 *   - an ev_op has at most one operation in flight (op->pending says so);
 *   - its callback runs exactly once per operation, from loop_run(), with
 *     res = bytes, a new fd, poll revents, or -errno (-ECANCELED after
 *     loop_cancel);
 *   - its memory must stay valid until that callback has run.
 */
#ifndef PB_LOOP_H
#define PB_LOOP_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct ev_op ev_op;
typedef void (*ev_cb)(ev_op *op, int res);

enum ev_kind { EV_NONE = 0, EV_ACCEPT, EV_RECV, EV_SEND, EV_READ, EV_POLL };

struct ev_op {
    ev_cb cb;                /* called once per completed operation */
    void *data;              /* owner's context */
    int fd;
    uint8_t kind;            /* enum ev_kind of the operation in flight */
    uint8_t pending;         /* 1 from submission until the callback runs */
    uint8_t cancelled;       /* loop_cancel() was called */
    uint32_t events;         /* EV_POLL: POLLIN/POLLOUT mask */
    void *buf;               /* EV_RECV/EV_SEND/EV_READ */
    size_t len;
    struct ev_op *next;      /* backend's private list link */
};

typedef struct loop loop;

enum { LOOP_AUTO = 0, LOOP_URING, LOOP_EPOLL };

/* Create a loop.  want: LOOP_AUTO tries io_uring, then epoll.  On success
 * *chosen is LOOP_URING or LOOP_EPOLL.  Returns NULL with errno set. */
loop *loop_new(int want, int *chosen);
void loop_free(loop *l);
const char *loop_backend_name(const loop *l);

void loop_accept(loop *l, ev_op *op, int fd);
void loop_recv(loop *l, ev_op *op, int fd, void *buf, size_t len);
void loop_send(loop *l, ev_op *op, int fd, const void *buf, size_t len);
void loop_read(loop *l, ev_op *op, int fd, void *buf, size_t len);
void loop_poll(loop *l, ev_op *op, int fd, uint32_t events);
/* Ask for the operation in flight on op to end early; its callback still runs. */
void loop_cancel(loop *l, ev_op *op);

/* Wake every thread asleep on the shared futex *word (FUTEX_WAKE, not
 * private: the word is in a shared mapping).  The io_uring backend queues it
 * as an IORING_OP_FUTEX_WAKE that goes to the kernel with the iteration's one
 * io_uring_enter, so a pass that wakes ten workers makes one system call;
 * where the kernel lacks the opcode (before 6.7), and on epoll, it is the
 * futex syscall at once. */
void loop_futex_wake(loop *l, _Atomic uint32_t *word);
/* Whether futex wakes are queued for the next loop_run (the broker does not
 * spin before sleeping then: a woken worker would wait out the spin). */
int loop_queued(loop *l);

/* Submit what was queued, wait up to timeout_ms (0: do not wait, <0: forever)
 * for at least one completion, and run the callbacks of all completions.
 * Returns the number of callbacks run, or -errno. */
int loop_run(loop *l, int timeout_ms);

/* Backends (internal). */
loop *loop_uring_new(void);
loop *loop_epoll_new(void);

struct loop_ops {
    const char *name;
    void (*submit)(loop *l, ev_op *op);
    void (*cancel)(loop *l, ev_op *op);
    int (*run)(loop *l, int timeout_ms);
    void (*destroy)(loop *l);
    /* Optional (NULL: the futex syscall at once; nothing ever queued). */
    int (*futex_wake)(loop *l, _Atomic uint32_t *word);  /* 0 queued, -1 not supported */
    int (*queued)(loop *l);                              /* futex wakes not yet submitted */
};

struct loop {
    const struct loop_ops *ops;
    int backend;             /* LOOP_URING | LOOP_EPOLL */
};

#endif /* PB_LOOP_H */
