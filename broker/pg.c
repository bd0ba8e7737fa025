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
 * Session state: the scanner reads the first bytes of every CommandComplete
 * tag and notes ParameterStatus messages, and sets the SS_* bits of
 * c->sstate (driver.h) from them; build_reset undoes exactly those
 * (docs/pooling.md).
 *
 * Library-named prepared statements (pb_<hash>, pb_shm.h): the library sends
 * a Parse with every execution; the record of which ones the backend has,
 * and the request rewrite that drops a Parse it has (or closes first one it
 * may have), are pgstmt.c's.  This file feeds it the request's counts, the
 * ParseComplete and ReadyForQuery messages and the tags that deallocate.
 *
 * Its state per connection (c->drv) is a pgconn: the libpq handle, the reply
 * scanner's position, and the statement record.
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
#include "pgshare.h"
#include "pgstmt.h"
#include "poolbroker.h"

#define PG_MAX_MESSAGE (1u << 30)   /* the server's own limit on a message */
#define PG_TAG_MAX     24           /* CommandComplete tag bytes kept (NUL included): the
                                       longest tag acted on whole is "CLOSE CURSOR ALL" */

typedef struct pgconn {
    PGconn *pg;              /* libpq: the handshake, cancel keys, PQfinish */
    /* reply scanner, carried across receives */
    uint8_t hdr[5];          /* type byte + length, as collected so far */
    uint32_t hdr_have;
    uint64_t body_left;      /* bytes left of the current message's body */
    uint32_t errors;         /* ErrorResponses since the last ReadyForQuery */
    int in_tag;              /* the body being read is a CommandComplete's */
    int rows_seen;           /* a RowDescription or DataRow since the last CommandComplete */
    uint32_t tag_have;       /* bytes of it in tag */
    char tag[PG_TAG_MAX];    /* its first bytes (a longer tag is cut) */
    uint32_t quiet;          /* ReadyForQuery still to come for the broker's own reset or
                                check: their tags may clear state, never set it */
    pgstmts stmts;           /* library-named statements the backend has (pgstmt.c) */
    pgshare_conn share;      /* requests in flight, for learning which texts may share (pgshare.c) */
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

void pg_error_flatten(const char *msg, char *out, size_t n)
{
    size_t o = 0;
    int cut = 0;
    for (const char *s = msg ? msg : "unknown error"; *s; s++) {
        const char *piece;
        char one[2] = { *s, 0 };
        if (*s == '\n') {
            while (s[1] == '\n')
                s++;
            if (s[1] == 0)
                break;              /* the trailing newline */
            if (s[1] == '\t') {
                s++;                /* libpq's hint: the same host's */
                piece = " ";
            } else {
                piece = "; ";
            }
        } else {
            piece = (unsigned char)*s < ' ' ? " " : one;
        }
        size_t k = strlen(piece);
        if (o + k >= n) {
            cut = 1;
            break;
        }
        memcpy(out + o, piece, k);
        o += k;
    }
    while (o && (out[o - 1] == ' ' || out[o - 1] == ';'))
        o--;
    if (cut && n >= 4) {
        if (o > n - 4)
            o = n - 4;
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o < n ? o : n - 1] = 0;
}

static void set_error(conn *c, const char *msg)
{
    pg_error_flatten(msg, c->error, sizeof c->error);
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
    st->pg = PQconnectStart(c->cset->conninfo);
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

/* ------------------------------------------------------------ session state */

/* The server reported state the next lease must not see: note it, and make
 * the holder release through the broker.  Called while scanning, so
 * PB_SF_RESET is stored before connio.c publishes the bytes that reported
 * it.  The broker's own reset and check never set state. */
static void ss_set(conn *c, uint32_t bits)
{
    if (PG(c)->quiet)
        return;
    pgshare_state(&PG(c)->share);
    c->sstate |= bits;
    if (c->slot)
        atomic_fetch_or(&c->slot->flags, PB_SF_RESET);
}

static void ss_clear(conn *c, uint32_t bits)
{
    c->sstate &= ~bits;
    if (!c->sstate && c->slot)
        atomic_fetch_and(&c->slot->flags, ~PB_SF_RESET);
}

static int pg_frame_request(conn *c, drv_buf *rq, uint32_t *nreplies, const char **why)
{
    pgconn *s = PG(c);
    const uint8_t *req = rq->p;
    uint32_t len = rq->len, off = 0, n = 0, nparse = 0, ntracked = 0, nclose = 0;
    int parse_open = 0;             /* a Parse after the last Sync or Query */
    uint8_t last = 0;
    *why = NULL;
    while (off < len) {
        if (len - off < 5) {
            *why = "truncated message header";
            return PB_EPROTO;
        }
        uint8_t t = req[off];
        uint32_t mlen = pg_be32(req + off + 1);
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
        if (t == 'Q' || t == 'S') {
            n++;                    /* each ends in exactly one ReadyForQuery */
            parse_open = 0;
        } else if (t == 'P') {
            nparse++;
            parse_open = 1;
            if (pgstmt_lib_name(req + off + 5, mlen - 4))
                ntracked++;
        } else if (t == 'C' && mlen > 5 && req[off + 5] == 'S' && pgstmt_lib_name(req + off + 6, mlen - 5)) {
            nclose++;
        }
        last = t;
        off += 1 + mlen;
    }
    /* Its text before the rewrite, which may drop the Parse that holds it. */
    struct pgshare_ent *text = n == 1 ? pgshare_learn(rq->p, rq->len) : NULL;
    /* A Parse may be dropped when nothing in flight can have deallocated
     * its statement: nothing is in flight, or only shared statements are
     * (c->mux: texts proven to be one SELECT/INSERT/UPDATE/DELETE/MERGE,
     * pgshare.h).  A DEALLOCATE run inside a function is the case no tag
     * shows, as on any connection: the executions framed behind it whose
     * Parse was dropped fail with 26000 (on a shared backend, up to
     * share_depth of them, of different leases), and the record forgets
     * the statement, so the next ones send their Parse. */
    int idle = c->expect == 0 || c->mux;
    if (pgstmt_frame(&s->stmts, rq, nparse, ntracked, nclose, n, parse_open, idle) != PB_OK) {
        *why = "out of memory";
        return PB_ENOMEM;
    }
    pgshare_framed(&s->share, text, n, c->txn, B.now_ms);
    *nreplies = n;
    /* Extended-query messages after the last Sync: the next piece of the
     * pipeline must reach the same backend (COPY data is covered by the
     * ReadyForQuery still owed). */
    c->partial = last == 'P' || last == 'B' || last == 'D' || last == 'E' || last == 'C' || last == 'H';
    return PB_OK;
}

/* ----------------------------------------------------------------- replies */

/* A CommandComplete tag (cut to PG_TAG_MAX - 1 bytes): what it leaves on the
 * session, or takes off it.  Spellings as PostgreSQL 15 sends them. */
static void on_tag(conn *c, const char *tag)
{
    pgconn *s = PG(c);
    if (!s->quiet)
        pgshare_tag(&s->share, tag);
    if (strcmp(tag, "SET") == 0 || strcmp(tag, "RESET") == 0)
        ss_set(c, SS_GUC);
    else if (strcmp(tag, "PREPARE") == 0)
        ss_set(c, SS_PREPARED);
    else if (strcmp(tag, "DEALLOCATE ALL") == 0) {
        ss_clear(c, SS_PREPARED);
        pgstmt_forget_all(&s->stmts);
    } else if (strcmp(tag, "DEALLOCATE") == 0)
        pgstmt_forget_all(&s->stmts);        /* which one, the tag does not say */
    else if (strcmp(tag, "LISTEN") == 0)
        ss_set(c, SS_LISTEN);
    else if (strcmp(tag, "DECLARE CURSOR") == 0)
        ss_set(c, SS_CURSOR);
    else if (strcmp(tag, "CLOSE CURSOR ALL") == 0)
        ss_clear(c, SS_CURSOR);
    else if (strcmp(tag, "DISCARD ALL") == 0) {
        ss_clear(c, SS_GUC | SS_PREPARED | SS_LISTEN | SS_CURSOR | SS_TEMP);
        pgstmt_forget_all(&s->stmts);
    } else if (strcmp(tag, "DISCARD TEMP") == 0)
        ss_clear(c, SS_TEMP);
    else if (strncmp(tag, "CREATE ", 7) == 0)
        ss_set(c, SS_TEMP);         /* TEMP or pg_temp: the tag does not say */
    else if (strncmp(tag, "SELECT ", 7) == 0 && !s->rows_seen)
        /* CREATE TABLE ... AS and SELECT ... INTO report "SELECT n" but
         * return no rows: no RowDescription (a simple Query's SELECT always
         * sends one, and the library's extended queries Describe their
         * portal, which answers NoData here) and no DataRow.  Maybe TEMP. */
        ss_set(c, SS_TEMP);
    else if (strcmp(tag, "EXPLAIN") == 0)
        ss_set(c, SS_TEMP);         /* EXPLAIN ANALYZE runs what it explains: CREATE TEMP TABLE ... AS too */
    else if (strcmp(tag, "LOAD") == 0)
        ss_set(c, SS_RETIRE);
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
 * header can straddle two receives); bodies are skipped, except the status
 * byte of ReadyForQuery, the first bytes of a CommandComplete tag and the
 * fields of an ErrorResponse (pg_scan_error). */
static int pg_scan_reply(conn *c, const uint8_t *p, size_t n, size_t *used, drv_reply *out)
{
    pgconn *s = PG(c);
    size_t i = 0;
    while (i < n) {
        if (s->body_left) {
            size_t k = n - i < s->body_left ? n - i : (size_t)s->body_left;
            if (s->in_tag && s->tag_have < PG_TAG_MAX - 1) {
                size_t room = PG_TAG_MAX - 1 - s->tag_have;
                memcpy(s->tag + s->tag_have, p + i, k < room ? k : room);
                s->tag_have += (uint32_t)(k < room ? k : room);
            }
            if (s->in_error)
                pg_scan_error(s, p + i, k);
            i += k;
            s->body_left -= k;
            if (!s->body_left && s->in_tag) {
                s->tag[s->tag_have] = 0;  /* the body's own NUL ends it sooner */
                s->in_tag = 0;
                on_tag(c, s->tag);
                s->rows_seen = 0;
            }
            continue;
        }
        if (s->hdr_have < 5) {
            s->hdr[s->hdr_have++] = p[i++];
            if (s->hdr_have < 5)
                continue;
            uint32_t mlen = pg_be32(s->hdr + 1);
            if (mlen < 4 || mlen > PG_MAX_MESSAGE)
                return DRV_ERROR;
            switch (s->hdr[0]) {
            case 'Z':
                if (mlen != 5)
                    return DRV_ERROR;
                continue;           /* hdr_have stays 5: the status byte is next */
            case 'E':
                s->errors++;
                break;
            case 'C':
                s->in_tag = mlen > 4;
                s->tag_have = 0;
                break;
            case 'T':               /* RowDescription */
            case 'D':               /* DataRow */
                s->rows_seen = 1;
                break;
            case 's':               /* PortalSuspended: the rows so far were that Execute's */
                s->rows_seen = 0;
                break;
            case 'S':
                ss_set(c, SS_GUC);  /* a reported setting changed (libpq read the startup ones) */
                break;
            case '1':
                pgstmt_parse_complete(&s->stmts);
                break;
            case 'G':               /* CopyInResponse */
            case 'W':               /* CopyBothResponse */
                pgshare_copy(&s->share);
                break;
            }
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
        pgstmt_ready(&s->stmts, s->errors);
        s->rows_seen = 0;
        if (s->quiet)
            s->quiet--;
        else
            pgshare_ready(&s->share, (char)st, s->errors, B.now_ms);
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

/* Asynchronous messages on an idle connection ("Asynchronous Operations"
 * in the PostgreSQL protocol docs): headers are collected across calls in
 * the reply scanner's hdr (idle, it is at a message boundary), bodies are
 * skipped. */
static int pg_idle_data(conn *c, const uint8_t *p, size_t n)
{
    pgconn *s = PG(c);
    size_t i = 0;
    while (i < n) {
        if (s->body_left) {
            size_t k = n - i < s->body_left ? n - i : (size_t)s->body_left;
            i += k;
            s->body_left -= k;
            continue;
        }
        s->hdr[s->hdr_have++] = p[i++];
        if (s->hdr_have < 5)
            continue;
        s->hdr_have = 0;
        uint32_t mlen = pg_be32(s->hdr + 1);
        const char *what = s->hdr[0] == 'S' ? "ParameterStatus" : s->hdr[0] == 'N' ? "NoticeResponse"
                         : s->hdr[0] == 'A' ? "NotificationResponse" : NULL;
        if (!what || mlen < 4 || mlen > PG_MAX_MESSAGE) {
            snprintf(c->error, sizeof c->error, "unsolicited data on an idle connection (message type 0x%02x, "
                     "%u bytes)", s->hdr[0], mlen);
            return DRV_ERROR;
        }
        slog(LOG_LVL_DEBUG, c, "%s (%u bytes) absorbed on an idle connection", what, mlen - 4);
        s->body_left = mlen - 4;
    }
    return s->hdr_have || s->body_left ? DRV_AGAIN : DRV_OK;
}

/* ------------------------------------------------------------------- reset */

static int append_query(drv_buf *out, const char *sql)
{
    uint32_t len = (uint32_t)strlen(sql) + 1 + 4;
    uint8_t h[5] = { 'Q', (uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len };
    if (drv_buf_append(out, h, 5) != PB_OK || drv_buf_append(out, sql, len - 4) != PB_OK)
        return -1;
    return 1;
}

/* Queue the broker's own n queries (already in out): their replies set no
 * state.  n, or -1. */
static int own_queries(conn *c, int n)
{
    pgconn *s = PG(c);
    if (n > 0 && pgstmt_own_queries(&s->stmts, (uint32_t)n) != PB_OK)
        return -1;
    s->quiet += (uint32_t)n;
    return n;
}

/* The reset: ROLLBACK an open transaction, then, per policy, what undoes
 * the state the server reported (reset = auto), all of it (discard_all),
 * or the pool's SQL (custom) or nothing (rollback, the opt-out) plus
 * UNLISTEN * after a LISTEN.  pb_pin (SS_PIN) gets DISCARD ALL whatever the
 * policy.  Each command is its own Query: several
 * statements in one Query run as one implicit transaction, in which DISCARD
 * ALL refuses to run; all go in one write, one round trip. */
static int pg_build_reset(conn *c, int dirty, drv_buf *out)
{
    (void)dirty;                    /* the server's reports decide, not the library's guess */
    conf_pool *cp = c->pool->cf;
    uint32_t st = c->sstate;
    c->sstate = 0;
    if (c->slot)
        atomic_fetch_and(&c->slot->flags, ~PB_SF_RESET);
    if (st & SS_RETIRE) {
        slog(LOG_LVL_INFO, c, "lease ran LOAD, which nothing undoes: connection retired");
        return -1;
    }
    const char *q[8];
    int n = 0;
    if (c->txn != 'I')
        q[n++] = "ROLLBACK";
    switch (cp->reset_policy) {
    case PB_RESET_DISCARD_ALL:
        q[n++] = "DISCARD ALL";
        break;
    case PB_RESET_CUSTOM:
    case PB_RESET_ROLLBACK:
        if (cp->reset_policy == PB_RESET_CUSTOM && cp->reset_sql)
            q[n++] = cp->reset_sql;
        if (st & SS_PIN)
            q[n++] = "DISCARD ALL";
        else if (st & SS_LISTEN)
            q[n++] = "UNLISTEN *";
        break;
    default:                        /* PB_RESET_AUTO */
        if (st & SS_PIN) {
            q[n++] = "DISCARD ALL";
            break;
        }
        if (st & SS_GUC) {
            q[n++] = "SET SESSION AUTHORIZATION DEFAULT";   /* also ends SET ROLE */
            q[n++] = "RESET ALL";
        }
        if (st & SS_PREPARED)
            q[n++] = "DEALLOCATE ALL";
        if (st & SS_LISTEN)
            q[n++] = "UNLISTEN *";
        if (st & SS_CURSOR)
            q[n++] = "CLOSE ALL";
        if (st & SS_TEMP)
            q[n++] = "DISCARD TEMP";
        break;
    }
    for (int i = 0; i < n; i++)
        if (append_query(out, q[i]) < 0)
            return -1;
    return own_queries(c, n);
}

static int pg_build_ping(conn *c, drv_buf *out)
{
    if (append_query(out, "") < 0)
        return -1;
    return own_queries(c, 1);
}

/* driver.shareable: a statement whose text the server has shown to leave
 * nothing behind, 2 if its last run took at most a millisecond (pgshare.h). */
static int pg_shareable(const uint8_t *req, uint32_t len)
{
    return pgshare_ok(req, len);
}

static void pg_close(conn *c)
{
    pgconn *st = PG(c);
    if (st && st->pg)
        PQfinish(st->pg);       /* sends Terminate and closes the socket */
    if (st) {
        pgstmt_free(&st->stmts);
    }
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
    .shareable = pg_shareable,
    .share_depth = 4,
    .share_idle_first = 1,
    .idle_data = pg_idle_data,
    .build_reset = pg_build_reset,
    .build_ping = pg_build_ping,
    .cancel = pg_cancel,
    .close = pg_close,
};
