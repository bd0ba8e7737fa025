/*
 * driver.h — what differs between PostgreSQL (pg.c) and Redis (redis.c),
 * below the pool.
 *
 * A driver never calls into the pool, the connection machine or the event
 * loop.  Each operation answers with a code (nginx's NGX_OK / NGX_AGAIN /
 * NGX_ERROR are the model) and fills what the caller hands it: the poll it
 * wants next, the reply it just found, a send buffer.  conn.c and connio.c
 * decide what follows.  A driver's per-connection state is c->drv, which
 * only the driver looks inside; it connects with c->cset (the connection
 * settings: a reload's new ones may be on trial while the pool's c->pool->cf
 * already has them; and where Sentinel says the server is:
 * c->pool->master_host/master_port), reads the pool's other settings from
 * c->pool->cf, and writes what it learns to c->error, c->fd, c->backend_pid,
 * c->ssl and c->server (the "host:port" it reached)
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
/* libpq's error message msg as one line in out[0..n) (n > 0): one host's
 * reason after another, separated by "; " (libpq puts each on its own line,
 * its hint on the next line after a tab: that joins its host's with a
 * space); trailing blanks dropped; cut to fit with "..." at the end.  pg.c;
 * pure, for the unit test. */
void pg_error_flatten(const char *msg, char *out, size_t n);
/* Does this Redis error reply (without its '-') say the server is not ready
 * yet (LOADING its dataset)?  redis.c. */
int redis_error_not_ready(const char *err);

/* Session state a backend can carry past a transaction (conn.sstate).  The
 * driver sets these from what the server reports (PostgreSQL: CommandComplete
 * tags and ParameterStatus messages, pg.c; Redis: the commands it frames,
 * redis.c) and build_reset undoes exactly them.  docs/pooling.md has the
 * table of what is detected, what is reset and what needs pb_pin. */
enum {
    SS_PIN = 1u << 0,        /* the lease pinned itself (pb_pin, PB_CF_PIN, set by release.c):
                                PostgreSQL DISCARD ALL, Redis RESET + set-up */
    /* PostgreSQL */
    SS_GUC = 1u << 1,        /* tag SET or RESET, or a ParameterStatus message (a GUC_REPORT
                                setting changed, set_config() included): SET SESSION
                                AUTHORIZATION DEFAULT (which also undoes SET ROLE; RESET ALL
                                does not) + RESET ALL */
    SS_PREPARED = 1u << 2,   /* tag PREPARE (SQL-level): DEALLOCATE ALL; tag DEALLOCATE ALL or
                                DISCARD ALL clears it (DEALLOCATE <name> does not: others may
                                remain) */
    SS_LISTEN = 1u << 3,     /* tag LISTEN: UNLISTEN *; tag UNLISTEN does not clear it (it does
                                not say whether it was UNLISTEN *) */
    SS_CURSOR = 1u << 4,     /* tag DECLARE CURSOR (a WITH HOLD cursor outlives its transaction;
                                the tag does not say which): CLOSE ALL; tag CLOSE CURSOR ALL
                                clears it */
    SS_TEMP = 1u << 5,       /* any tag CREATE <object> (a temporary table, sequence, view, or
                                an object in pg_temp): DISCARD TEMP; tag DISCARD TEMP clears it.
                                CREATE TABLE AS / SELECT INTO report SELECT n: not seen */
    SS_RETIRE = 1u << 6,     /* tag LOAD: a loaded library stays loaded; nothing undoes it, the
                                connection is closed on release (build_reset returns -1) */
    /* Redis (redis.c; each set by the command as framed) */
    SS_R_SESSION = 1u << 8,  /* SELECT, MULTI, WATCH, (P|S)SUBSCRIBE, AUTH, HELLO, READONLY,
                                READWRITE, ASKING, RESET, CLIENT SETNAME/TRACKING/CACHING/REPLY,
                                unknown CLIENT subcommands: RESET + set-up */
    SS_R_NOEVICT = 1u << 9,  /* CLIENT NO-EVICT: RESET keeps it (7.0): CLIENT NO-EVICT off */
    SS_R_NOTOUCH = 1u << 10, /* CLIENT NO-TOUCH (7.2+; RESET clears it there): CLIENT NO-TOUCH off */
    SS_R_RETIRE = 1u << 11,  /* CLIENT SETINFO (7.2+): RESET keeps lib-name/lib-ver: retire */
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
    char txn;                /* PostgreSQL: its ReadyForQuery status ('I','T','E'); Redis: 'T'
                                while a MULTI is open after this reply, else 'I'; 0: none */
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
     * what, in words for the log.  PostgreSQL rewrites a request that
     * carries a Parse of a library-named statement (pb_<hash>, pb_shm.h):
     * dropped when the backend has it, preceded by a Close when it may
     * not (docs/protocol.md).  Whenever c->sstate is nonzero the driver
     * keeps PB_SF_RESET set in c->slot->flags (Redis from here, PostgreSQL
     * from scan_reply, before the reply's bytes are published), so the
     * holder releases through the broker and build_reset runs (which
     * clears both). */
    int (*frame_request)(struct conn *c, drv_buf *req, uint32_t *nreplies, const char **why);
    /* 1 if the request req[0..len) may share a connection with other
     * leases' requests in flight (transaction mode pipelines such requests
     * of several handles on one connection, txn.c): it leaves no session
     * state, pins nothing, never blocks, and produces one reply per
     * command.  Redis: plain commands, by name.  PostgreSQL: a simple
     * Query whose text the server's replies have shown to be one quick
     * SELECT/INSERT/UPDATE/DELETE/MERGE leaving nothing behind (pgshare.h),
     * 2 when its last run was quick; a BEGIN would capture the next lease's
     * statements.  NULL: never. */
    int (*shareable)(const uint8_t *req, uint32_t len);
    /* Requests in flight on one shared connection below which another
     * joins it (Redis 8: a deeper pipeline costs the server less per
     * command; PostgreSQL 4).  share_idle_first (PostgreSQL): only a quick
     * request (shareable 2) joins a busy connection, and only behind quick
     * ones; any other takes an idle connection first (a statement behind
     * another waits for it, a Redis command hardly at all). */
    uint32_t share_depth;
    uint8_t share_idle_first;
    /* Scan reply bytes p[0..n).  DRV_OK: a reply ends at p[*used - 1] (*out
     * says what it was): call again with the rest.  DRV_AGAIN: all n bytes
     * taken (*used == n), no reply completed.  DRV_ERROR: protocol error.
     * The scanner's state carries over calls: a reply may straddle receives. */
    int (*scan_reply)(struct conn *c, const uint8_t *p, size_t n, size_t *used, drv_reply *out);
    /* Bytes p[0..n) the server sent on an idle connection (no command in
     * flight, nobody holding it; conn.c's idle watch).  The protocol's
     * asynchronous messages are absorbed (PostgreSQL: ParameterStatus,
     * NoticeResponse, NotificationResponse; logged at debug, setting no
     * session state: nobody's session made them).  DRV_OK: all absorbed, at
     * a message boundary; DRV_AGAIN: all absorbed so far, a message is not
     * complete yet (call again with what follows); DRV_ERROR: anything else
     * (c->error says what): the connection is closed.  NULL: nothing is
     * legal on an idle connection (Redis, RESP2): any byte closes it. */
    int (*idle_data)(struct conn *c, const uint8_t *p, size_t n);
    /* Append to out the commands that undo c->sstate (the session state the
     * driver saw the server report, plus SS_PIN when the lease pinned
     * itself) and the open transaction (c->txn), as the pool's reset policy
     * says, then clear c->sstate and PB_SF_RESET.  dirty: the client
     * library marked the lease PB_CF_DIRTY (Redis: a fuller reset;
     * PostgreSQL ignores it, the server's reports decide).  Returns how many
     * replies the commands produce (0: nothing needed), or -1: out of
     * memory, or state no command can undo (Redis CLIENT SETINFO,
     * PostgreSQL LOAD) — the caller closes the connection. */
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
