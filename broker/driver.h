/*
 * driver.h — what differs between PostgreSQL (pg.c) and Redis (redis.c),
 * below the pool.
 *
 * A driver never calls into the pool, the connection machine or the event
 * loop.  Each operation answers with a code (nginx's NGX_OK / NGX_AGAIN /
 * NGX_ERROR are the model) and fills what the caller hands it: the poll it
 * wants next, the reply it just found, a send buffer.  conn.c and connio.c
 * decide what follows.  A driver's per-connection state is c->drv, which
 * only the driver looks inside; it reads the pool's settings (c->pool->cf,
 * and where Sentinel says the server is: c->pool->master_host/master_port)
 * and writes what it learns to c->error, c->fd, c->backend_pid, c->ssl and
 * c->server (the "host:port" it reached)
 * (and PB_SF_RESET in c->slot->flags: see frame_request).
 */
#ifndef PB_DRIVER_H
#define PB_DRIVER_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "poolbroker.h"

struct conn;

/* What a driver operation says happened. */
enum {
    DRV_OK = 0,              /* done (connected; a reply complete) */
    DRV_AGAIN = 1,           /* not yet: wait (poll), or feed more bytes */
    DRV_ERROR = -1,          /* failed: c->error says why (connect), or protocol error */
    DRV_NOT_READY = 2,       /* connect: the server answered but does not serve yet (Redis
                                LOADING, PostgreSQL 57P03 starting up): c->error says why;
                                try again later, like a failed connect */
};

/* Does this connect failure (libpq's error message) say the server is not
 * ready yet (SQLSTATE 57P03: starting up, not yet accepting connections, in
 * recovery)?  pg.c; a pure function, for the unit test. */
int pg_error_not_ready(const char *msg);
/* Does this Redis error reply (without its '-') say the server is not ready
 * yet (LOADING its dataset)?  redis.c. */
int redis_error_not_ready(const char *err);

/* Session state a backend can carry past a transaction (conn.sstate).  The
 * driver sets these from what the server reports and undoes them in
 * build_reset. */
enum {
    SS_PIN = 1u << 0,        /* the lease pinned itself (pb_pin): a full reset */
};

/* A growable byte buffer the caller owns (a connection's send buffer). */
typedef struct drv_buf {
    uint8_t *p;
    uint32_t len, cap;
} drv_buf;

/* Append n bytes; PB_OK or PB_ENOMEM (the buffer is unchanged then). */
static inline int drv_buf_append(drv_buf *b, const void *p, uint32_t n)
{
    if (n == 0)
        return PB_OK;               /* b->p may be NULL: no pointer arithmetic on it */
    if (n > UINT32_MAX - b->len)
        return PB_ENOMEM;
    if (b->len + n > b->cap) {
        uint32_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap = cap > UINT32_MAX / 2 ? b->len + n : cap * 2;
        uint8_t *nb = realloc(b->p, cap);
        if (!nb)
            return PB_ENOMEM;
        b->p = nb;
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
    return PB_OK;
}

/* The poll a handshake waits for before its next step. */
typedef struct drv_poll {
    int fd;
    uint32_t events;         /* POLLIN / POLLOUT */
} drv_poll;

/* One complete reply, as the scanner found it. */
typedef struct drv_reply {
    char txn;                /* PostgreSQL: its ReadyForQuery status ('I','T','E'); 0: none */
    uint32_t errors;         /* PostgreSQL: ErrorResponses since the previous reply */
    /* The server said, in this reply, that it is not the server it was
     * (failover.c decides what that means for the pool): static text for
     * the log, or NULL. */
    const char *server_gone;     /* going away: SQLSTATE 57P01/57P02/57P03, -MASTERDOWN */
    const char *server_readonly; /* read-only: SQLSTATE 25006, -READONLY */
} drv_reply;

typedef struct driver {
    const char *name;
    /* Start connecting c.  DRV_AGAIN: poll want->fd for want->events, then
     * call connect_step; DRV_OK: connected already; DRV_ERROR: c->error
     * says why.  The driver state (c->drv) exists from here on, whatever
     * the answer: close() frees it. */
    int (*connect_start)(struct conn *c, drv_poll *want);
    /* Go on after that poll fired (revents).  DRV_AGAIN: poll again (want);
     * DRV_OK: connected (c->fd, c->backend_pid and c->ssl are set);
     * DRV_ERROR: c->error says why. */
    int (*connect_step)(struct conn *c, int revents, drv_poll *want);
    /* Check a client request (req->p[0..req->len)) and count the replies it
     * will produce into *nreplies.  PB_OK: send req, which the driver may
     * have rewritten (Redis replaces a command it refuses by policy with one
     * the server answers with an error naming it); *why is then NULL, or the
     * first such refusal, for the log.  PB_EPERM: refused by policy, nothing
     * to send (PostgreSQL); PB_EPROTO: malformed; PB_ENOMEM.  *why says
     * what, in words for the log.  A request that leaves session state
     * the driver tracks sets PB_SF_RESET in c->slot->flags, so the holder
     * releases through the broker and build_reset runs (which clears it). */
    int (*frame_request)(struct conn *c, drv_buf *req, uint32_t *nreplies, const char **why);
    /* Scan reply bytes p[0..n).  DRV_OK: a reply ends at p[*used - 1] (*out
     * says what it was): call again with the rest.  DRV_AGAIN: all n bytes
     * taken (*used == n), no reply completed.  DRV_ERROR: protocol error.
     * The scanner's state carries over calls: a reply may straddle receives. */
    int (*scan_reply)(struct conn *c, const uint8_t *p, size_t n, size_t *used, drv_reply *out);
    /* Append to out the commands that reset the session (dirty: the lease
     * changed session state, PB_CF_DIRTY; a driver may also track what
     * state the lease left itself); returns how many replies they produce
     * (0: nothing needed), or -1: out of memory, or state no command can
     * undo (Redis: CLIENT SETINFO) — the caller closes the connection. */
    int (*build_reset)(struct conn *c, int dirty, drv_buf *out);
    /* Append a cheap liveness check (empty query / PING); returns replies,
     * or -1. */
    int (*build_ping)(struct conn *c, drv_buf *out);
    /* Ask the server to cancel the command in flight, off the loop: PB_OK
     * once queued (the count in *inflight drops when it has been delivered,
     * and wake_fd is written), else a PB_E* code.  NULL: the protocol cannot
     * cancel a command (Redis). */
    int (*cancel)(struct conn *c, _Atomic int *inflight, int wake_fd);
    /* Free the driver state (libpq handle, hiredis context) and close the
     * socket; c->drv is NULL and c->fd -1 after. */
    void (*close)(struct conn *c);
} driver;

extern const driver pg_driver;
extern const driver redis_driver;

#endif /* PB_DRIVER_H */
