/*
 * pg.c — the PostgreSQL driver.
 *
 * libpq opens and authenticates each connection (PQconnectStart and
 * PQconnectPoll, driven by our loop), so SCRAM, multi-host conninfo and
 * target_session_attrs come for free.  Once the connection is up the broker
 * speaks the v3 protocol on the socket itself: it forwards client requests
 * after checking their framing against a whitelist of frontend message types,
 * and counts ReadyForQuery messages in the reply stream (remembering their
 * transaction status) without building anything.  The libpq handle is kept
 * for PQfinish and PQgetCancel.
 *
 * Its state per connection (c->drv) is a pgconn: the libpq handle and the
 * reply scanner's position.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker.h"
#include "log.h"
#include "poolbroker.h"

#define PG_MAX_MESSAGE (1u << 30)   /* the server's own limit on a message */

typedef struct pgconn {
    PGconn *pg;              /* libpq: the handshake, cancel keys, PQfinish */
    /* reply scanner, carried across receives */
    uint8_t hdr[5];          /* type byte + length, as collected so far */
    uint32_t hdr_have;
    uint64_t body_left;      /* bytes left of the current message's body */
    uint32_t errors;         /* ErrorResponses since the last ReadyForQuery */
    /* the SQLSTATE of an ErrorResponse, read as its body streams by
     * (pg_scan_error); only failover.c's codes are kept */
    int in_error;            /* the body being skipped is an ErrorResponse's */
    int err_field;           /* 0: at a field type byte; 1: in a field; 2: in the 'C' field */
    char code[6];            /* SQLSTATE collected so far */
    uint32_t code_len;
    const char *gone, *readonly; /* what the codes since the last ReadyForQuery said (drv_reply) */
} pgconn;

static pgconn *PG(conn *c)
{
    return c->drv;
}

static void set_error(conn *c, const char *msg)
{
    snprintf(c->error, sizeof c->error, "%s", msg ? msg : "unknown error");
    /* libpq messages end in a newline; logs and shmstat do not want it. */
    size_t n = strlen(c->error);
    while (n && (c->error[n - 1] == '\n' || c->error[n - 1] == ' '))
        c->error[--n] = 0;
}

/* The poll libpq asked for: DRV_AGAIN with *want filled, or DRV_ERROR. */
static int pg_poll_for(conn *c, PostgresPollingStatusType st, drv_poll *want)
{
    int fd = PQsocket(PG(c)->pg);   /* may change between hosts of a multi-host conninfo */
    if (fd < 0) {
        set_error(c, "libpq has no socket");
        return DRV_ERROR;
    }
    want->fd = fd;
    want->events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT;
    return DRV_AGAIN;
}

static int pg_connect_start(conn *c, drv_poll *want)
{
    pgconn *st = calloc(1, sizeof *st);
    if (!st) {
        set_error(c, "out of memory");
        return DRV_ERROR;
    }
    c->drv = st;
    st->pg = PQconnectStart(c->pool->cf->conninfo);
    if (!st->pg) {
        set_error(c, "out of memory");
        return DRV_ERROR;
    }
    if (PQstatus(st->pg) == CONNECTION_BAD) {
        set_error(c, PQerrorMessage(st->pg));
        return DRV_ERROR;
    }
    /* As the libpq manual says: start as if PQconnectPoll asked to write. */
    return pg_poll_for(c, PGRES_POLLING_WRITING, want);
}

/* libpq has no SQLSTATE for a failed connection, only the message; these
 * are the server's 57P03 (cannot connect now) messages that mean "wait",
 * in English: a server whose lc_messages translates them is taken as
 * failing, which differs only in what is logged.  "shutting down" is 57P03
 * too, but is a server going away, not one coming up. */
int pg_error_not_ready(const char *msg)
{
    static const char *const not_ready[] = {
        "the database system is starting up",
        "the database system is not yet accepting connections",
        "the database system is not accepting connections",
        "the database system is in recovery mode",
    };
    if (!msg)
        return 0;
    for (size_t i = 0; i < sizeof not_ready / sizeof *not_ready; i++)
        if (strstr(msg, not_ready[i]))
            return 1;
    return 0;
}

static int pg_connect_step(conn *c, int revents, drv_poll *want)
{
    (void)revents;
    PGconn *pg = PG(c)->pg;
    PostgresPollingStatusType st = PQconnectPoll(pg);
    switch (st) {
    case PGRES_POLLING_READING:
    case PGRES_POLLING_WRITING:
        return pg_poll_for(c, st, want);
    case PGRES_POLLING_OK:
        break;
    default:
        set_error(c, PQerrorMessage(pg));
        return pg_error_not_ready(c->error) ? DRV_NOT_READY : DRV_ERROR;
    }
    /* TLS: from now on the broker reads and writes through libpq's SSL*
     * (tls.c), never the raw socket. */
    c->ssl = PQsslInUse(pg) ? PQsslStruct(pg, "OpenSSL") : NULL;
    if (PQsslInUse(pg) && !c->ssl) {
        set_error(c, "TLS connection without an OpenSSL handle");
        return DRV_ERROR;
    }
    if (PQtransactionStatus(pg) != PQTRANS_IDLE) {
        set_error(c, "connection not idle after startup");
        return DRV_ERROR;
    }
    c->fd = PQsocket(pg);
    c->backend_pid = PQbackendPID(pg);
    /* Which host of a multi-host conninfo libpq settled on (failover.c). */
    const char *h = PQhost(pg), *port = PQport(pg);
    snprintf(c->server, sizeof c->server, "%s:%s", h ? h : "?", port && *port ? port : "5432");
    c->txn = 'I';
    return DRV_OK;
}

/* Frontend message types a client may send: the extended and simple query
 * protocols and COPY data.  Never Terminate ('X'), startup, password or
 * SASL messages, function calls. */
static int allowed_type(uint8_t t)
{
    switch (t) {
    case 'Q': case 'P': case 'B': case 'D': case 'E': case 'S': case 'C': case 'H':
    case 'd': case 'c': case 'f':
        return 1;
    }
    return 0;
}

/* Why a well-framed message of type t is refused by policy, or NULL. */
static const char *refused_type(uint8_t t)
{
    switch (t) {
    case 'X':
        return "Terminate ('X') would close the shared connection: release the lease instead";
    case 'p':
        return "password/SASL message ('p'): the broker authenticated the connection";
    case 'F':
        return "FunctionCall ('F') is not allowed through a pooled connection";
    }
    return NULL;
}

static int pg_frame_request(conn *c, drv_buf *rq, uint32_t *nreplies, const char **why)
{
    const uint8_t *req = rq->p;
    uint32_t len = rq->len, off = 0, n = 0;
    uint8_t last = 0;
    *why = NULL;
    while (off < len) {
        if (len - off < 5) {
            *why = "truncated message header";
            return PB_EPROTO;
        }
        uint8_t t = req[off];
        uint32_t mlen = ((uint32_t)req[off + 1] << 24) | ((uint32_t)req[off + 2] << 16) |
                        ((uint32_t)req[off + 3] << 8) | (uint32_t)req[off + 4];
        if (mlen < 4 || mlen > len - off - 1) {
            *why = "message length out of bounds";
            return PB_EPROTO;
        }
        if (!allowed_type(t)) {
            *why = refused_type(t);
            if (*why)
                return PB_EPERM;
            *why = "unknown frontend message type (a startup packet?)";
            return PB_EPROTO;
        }
        if (t == 'Q' || t == 'S')
            n++;                    /* each ends in exactly one ReadyForQuery */
        last = t;
        off += 1 + mlen;
    }
    *nreplies = n;
    /* Extended-query messages after the last Sync: the next piece of the
     * pipeline must reach the same backend (COPY data is covered by the
     * ReadyForQuery still owed). */
    c->partial = last == 'P' || last == 'B' || last == 'D' || last == 'E' || last == 'C' || last == 'H';
    return PB_OK;
}

/* SQLSTATEs that say the server is not what it was for this pool
 * (failover.c): going away, or read-only. */
static void pg_error_code(pgconn *s)
{
    if (s->code_len != 5)
        return;
    if (memcmp(s->code, "25006", 5) == 0)
        s->readonly = "SQLSTATE 25006 (read-only transaction)";
    else if (memcmp(s->code, "57P01", 5) == 0)
        s->gone = "SQLSTATE 57P01 (admin shutdown)";
    else if (memcmp(s->code, "57P02", 5) == 0)
        s->gone = "SQLSTATE 57P02 (crash shutdown)";
    else if (memcmp(s->code, "57P03", 5) == 0)
        s->gone = "SQLSTATE 57P03 (cannot connect now)";
}

/* Read the fields of an ErrorResponse body, k bytes of it at a time, for
 * its SQLSTATE: a body is (type byte, NUL-terminated text)* then a NUL;
 * the code is the 'C' field. */
static void pg_scan_error(pgconn *s, const uint8_t *p, size_t k)
{
    for (size_t i = 0; i < k; i++) {
        uint8_t b = p[i];
        if (s->err_field == 0) {
            if (b == 0)
                continue;           /* the body's terminator */
            s->err_field = b == 'C' ? 2 : 1;
            s->code_len = 0;
        } else if (b == 0) {
            if (s->err_field == 2)
                pg_error_code(s);
            s->err_field = 0;
        } else if (s->err_field == 2 && s->code_len < 5) {
            s->code[s->code_len++] = (char)b;
        } else if (s->err_field == 2) {
            s->code_len = 6;        /* longer than a SQLSTATE: not one */
        }
    }
}

/* Walk the reply stream: headers are collected byte by byte across calls (a
 * header can straddle two receives); bodies are skipped, except the one
 * status byte of ReadyForQuery and the fields of an ErrorResponse
 * (pg_scan_error). */
static int pg_scan_reply(conn *c, const uint8_t *p, size_t n, size_t *used, drv_reply *out)
{
    pgconn *s = PG(c);
    size_t i = 0;
    while (i < n) {
        if (s->body_left) {
            size_t k = n - i < s->body_left ? n - i : (size_t)s->body_left;
            if (s->in_error)
                pg_scan_error(s, p + i, k);
            i += k;
            s->body_left -= k;
            continue;
        }
        if (s->hdr_have < 5) {
            s->hdr[s->hdr_have++] = p[i++];
            if (s->hdr_have < 5)
                continue;
            uint32_t mlen = ((uint32_t)s->hdr[1] << 24) | ((uint32_t)s->hdr[2] << 16) |
                            ((uint32_t)s->hdr[3] << 8) | (uint32_t)s->hdr[4];
            if (mlen < 4 || mlen > PG_MAX_MESSAGE)
                return DRV_ERROR;
            if (s->hdr[0] == 'Z') {
                if (mlen != 5)
                    return DRV_ERROR;
                continue;           /* hdr_have stays 5: the status byte is next */
            }
            if (s->hdr[0] == 'E')
                s->errors++;
            s->in_error = s->hdr[0] == 'E';
            s->err_field = 0;
            s->hdr_have = 0;
            s->body_left = mlen - 4;
            continue;
        }
        /* ReadyForQuery's status byte */
        uint8_t st = p[i++];
        s->hdr_have = 0;
        if (st != 'I' && st != 'T' && st != 'E')
            return DRV_ERROR;
        out->txn = (char)st;
        out->errors = s->errors;
        out->server_gone = s->gone;
        out->server_readonly = s->readonly;
        s->errors = 0;
        s->gone = s->readonly = NULL;
        *used = i;
        return DRV_OK;
    }
    *used = n;
    return DRV_AGAIN;
}

static int append_query(drv_buf *out, const char *sql)
{
    uint32_t len = (uint32_t)strlen(sql) + 1 + 4;
    uint8_t h[5] = { 'Q', (uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len };
    if (drv_buf_append(out, h, 5) != PB_OK || drv_buf_append(out, sql, len - 4) != PB_OK)
        return -1;
    return 1;
}

static int pg_build_reset(conn *c, int dirty, drv_buf *out)
{
    int n = 0;
    conf_pool *cp = c->pool->cf;
    if (c->txn != 'I') {
        if (append_query(out, "ROLLBACK") < 0)
            return -1;
        n++;
    }
    if (cp->reset_policy == PB_RESET_DISCARD_ALL) {
        if (append_query(out, "DISCARD ALL") < 0)
            return -1;
        n++;
    } else if (cp->reset_policy == PB_RESET_CUSTOM && cp->reset_sql) {
        if (append_query(out, cp->reset_sql) < 0)
            return -1;
        n++;
    }
    if (dirty && cp->reset_policy != PB_RESET_DISCARD_ALL) {
        /* The lease ran LISTEN (DISCARD ALL would include UNLISTEN). */
        if (append_query(out, "UNLISTEN *") < 0)
            return -1;
        n++;
    }
    return n;
}

static int pg_build_ping(conn *c, drv_buf *out)
{
    (void)c;
    return append_query(out, "");
}

static void pg_close(conn *c)
{
    pgconn *st = PG(c);
    if (st && st->pg)
        PQfinish(st->pg);       /* sends Terminate and closes the socket */
    free(st);
    c->drv = NULL;
    c->fd = -1;
}

/* cancel.c sends it from its own thread (PQcancel blocks). */
static int pg_cancel(conn *c, _Atomic int *inflight, int wake_fd)
{
    if (!PG(c) || !PG(c)->pg || cancel_request(PG(c)->pg, c->backend_pid, inflight, wake_fd) != 0)
        return PB_ENOMEM;       /* no PGcancel, or no memory or thread for the request */
    return PB_OK;
}

const driver pg_driver = {
    .name = "postgres",
    .connect_start = pg_connect_start,
    .connect_step = pg_connect_step,
    .frame_request = pg_frame_request,
    .scan_reply = pg_scan_reply,
    .build_reset = pg_build_reset,
    .build_ping = pg_build_ping,
    .cancel = pg_cancel,
    .close = pg_close,
};
