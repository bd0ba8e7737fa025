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
 * a Parse with every execution.  The driver keeps, per connection, which of
 * those names the backend has — added when the server's ParseComplete for
 * that very Parse arrives, forgotten on the DEALLOCATE and DISCARD ALL tags —
 * and drops from the request a Parse the backend already has, or puts a Close
 * of the same name before one it may have.  No round trip is added: a hit
 * makes the request shorter (in place), a miss 26 bytes longer.
 *
 * Its state per connection (c->drv) is a pgconn: the libpq handle, the reply
 * scanner's position, the statement registry and the queue that says which
 * ParseComplete answers which Parse.  An error in a request whose Parse was
 * dropped makes that statement unknown again, so a record made wrong by
 * what no tag reports (a DEALLOCATE inside a function) costs one failed
 * execution, not every later one.
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
#define PG_TAG_MAX     24           /* CommandComplete tag bytes kept (NUL included): the
                                       longest tag acted on whole is "CLOSE CURSOR ALL" */
#define PG_STMT_MAX    128          /* library-named statements remembered per connection
                                       (PgBouncer's max_prepared_statements default is 200);
                                       the least recently used one is closed to make room */
#define PG_CLOSE_LEN   (1 + 4 + 1 + PB_STMT_NAME_LEN + 1)  /* a Close of a library name */

/* What the parse queue holds, per message of a request whose answer matters
 * to the registry, in order: */
enum {
    PQ_SYNC = 0,             /* a Sync or Query: its ReadyForQuery ends the group */
    PQ_OTHER = 1,            /* a Parse the registry does not track: one ParseComplete */
    PQ_DROP = 2,             /* a Parse dropped (no ParseComplete); the next entry is its hash */
                             /* any other value: a tracked Parse, by its statement hash */
};
#define PG_DROPS_MAX 8       /* dropped Parses remembered per group, for the error rule */

/* One library-named statement of this connection. */
typedef struct pgstmt {
    uint64_t hash;           /* pb_stmt_hash of its text and types; 0: a free entry */
    uint64_t used;           /* stmt_clock when last used (the least recently used goes) */
    uint32_t pending;        /* Parses of it sent whose ParseComplete or error is to come */
    uint32_t stamp;          /* req_stamp of the last request that used it */
    uint8_t known;           /* the server confirmed it and nothing since can have dropped it */
    uint8_t doubt;           /* the client's own Close went out behind a pending Parse: not
                                known even when that Parse completes */
} pgstmt;

typedef struct pgconn {
    PGconn *pg;              /* libpq: the handshake, cancel keys, PQfinish */
    /* reply scanner, carried across receives */
    uint8_t hdr[5];          /* type byte + length, as collected so far */
    uint32_t hdr_have;
    uint64_t body_left;      /* bytes left of the current message's body */
    uint32_t errors;         /* ErrorResponses since the last ReadyForQuery */
    int in_tag;              /* the body being read is a CommandComplete's */
    uint32_t tag_have;       /* bytes of it in tag */
    char tag[PG_TAG_MAX];    /* its first bytes (a longer tag is cut) */
    uint32_t quiet;          /* ReadyForQuery still to come for the broker's own reset or
                                check: their tags may clear state, never set it */
    /* The parse queue, stmtq[q_head..q_len): PQ_* or a statement hash per
     * Parse and Sync forwarded, kept only while tracked Parses may be in
     * flight; q_lead counts the ReadyForQuery of requests not queued, which
     * all come before the queue's first entry. */
    uint64_t *stmtq;
    uint32_t q_head, q_len, q_cap;
    uint32_t q_lead;
    /* Statements whose Parse was dropped in the group being answered: an
     * error in the group makes them unknown again (the record may have
     * been wrong: a DEALLOCATE no tag reported), so the next execution
     * sends Parse.  More than PG_DROPS_MAX: all of them. */
    uint64_t drops[PG_DROPS_MAX];
    uint32_t ndrops;
    pgstmt *stmts;           /* the registry: PG_STMT_MAX entries, NULL until first needed */
    uint64_t stmt_clock;     /* bumped per use */
    uint32_t req_stamp;      /* bumped per request framed */
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

static uint32_t rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
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

/* ------------------------------------------------------ statement registry */

static pgstmt *stmt_find(pgconn *s, uint64_t h)
{
    if (!s->stmts)
        return NULL;
    for (int i = 0; i < PG_STMT_MAX; i++)
        if (s->stmts[i].hash == h)
            return &s->stmts[i];
    return NULL;
}

/* The server may no longer have any statement (tags DEALLOCATE, DEALLOCATE
 * ALL, DISCARD ALL: the tag of a single DEALLOCATE does not say which).
 * Parses still pending come after the tag in the stream: their
 * ParseComplete will make them known again. */
static void stmts_forget_all(pgconn *s)
{
    if (!s->stmts)
        return;
    for (int i = 0; i < PG_STMT_MAX; i++) {
        pgstmt *e = &s->stmts[i];
        e->known = 0;
        if (!e->pending)
            memset(e, 0, sizeof *e);
    }
}

/* The server answered a tracked Parse (ok: ParseComplete; else an error, or
 * it skipped the Parse after an earlier error). */
static void stmt_answered(pgconn *s, uint64_t h, int ok)
{
    pgstmt *e = stmt_find(s, h);
    if (!e || !e->pending)
        return;                     /* forgotten meanwhile: unknown is always safe */
    e->pending--;
    if (ok && !e->doubt)
        e->known = 1;
    if (!e->pending)
        e->doubt = 0;
    if (!e->known && !e->pending)
        memset(e, 0, sizeof *e);
}

/* Room for n more queue entries; PB_OK or PB_ENOMEM (nothing changed). */
static int q_reserve(pgconn *s, uint32_t n)
{
    if (s->q_head && s->q_head == s->q_len)
        s->q_head = s->q_len = 0;
    if (s->q_cap - s->q_len >= n)
        return PB_OK;
    if (s->q_head) {
        memmove(s->stmtq, s->stmtq + s->q_head, (size_t)(s->q_len - s->q_head) * sizeof *s->stmtq);
        s->q_len -= s->q_head;
        s->q_head = 0;
        if (s->q_cap - s->q_len >= n)
            return PB_OK;
    }
    uint64_t want = (uint64_t)s->q_len + n;
    uint64_t cap = s->q_cap ? s->q_cap : 64;
    while (cap < want)
        cap *= 2;
    if (cap > UINT32_MAX / sizeof *s->stmtq)
        return PB_ENOMEM;
    uint64_t *q = realloc(s->stmtq, (size_t)cap * sizeof *q);
    if (!q)
        return PB_ENOMEM;
    s->stmtq = q;
    s->q_cap = (uint32_t)cap;
    return PB_OK;
}

/* n ReadyForQuery to come that no tracked Parse waits for (the broker's own
 * reset and check); PB_OK or PB_ENOMEM. */
static int q_syncs(pgconn *s, uint32_t n)
{
    if (s->q_head == s->q_len) {
        s->q_lead += n;
        return PB_OK;
    }
    if (q_reserve(s, n) != PB_OK)
        return PB_ENOMEM;
    while (n--)
        s->stmtq[s->q_len++] = PQ_SYNC;
    return PB_OK;
}

/* Take a PQ_DROP entry (and its hash) off the queue's front. */
static void q_take_drop(pgconn *s)
{
    if (s->q_head + 1 < s->q_len && s->ndrops < PG_DROPS_MAX + 1) {
        if (s->ndrops < PG_DROPS_MAX)
            s->drops[s->ndrops] = s->stmtq[s->q_head + 1];
        s->ndrops++;
    }
    s->q_head += s->q_head + 1 < s->q_len ? 2 : 1;
}

/* A ParseComplete arrived: it answers the first queued Parse. */
static void q_parse_complete(pgconn *s)
{
    while (!s->q_lead && s->q_head < s->q_len && s->stmtq[s->q_head] == PQ_DROP)
        q_take_drop(s);
    if (s->q_lead || s->q_head == s->q_len || s->stmtq[s->q_head] == PQ_SYNC)
        return;                     /* a Parse of a request that was not queued */
    uint64_t v = s->stmtq[s->q_head++];
    if (v != PQ_OTHER)
        stmt_answered(s, v, 1);
}

/* A ReadyForQuery arrived: Parses of its group with no ParseComplete were
 * skipped (an error came first). */
static void q_ready(pgconn *s)
{
    if (s->q_lead) {
        s->q_lead--;
        return;
    }
    while (s->q_head < s->q_len) {
        uint64_t v = s->stmtq[s->q_head];
        if (v == PQ_DROP) {
            q_take_drop(s);
            continue;
        }
        s->q_head++;
        if (v == PQ_SYNC)
            break;
        if (v != PQ_OTHER)
            stmt_answered(s, v, 0);
    }
    if (s->q_head == s->q_len)
        s->q_head = s->q_len = 0;
    if (s->errors && s->ndrops > PG_DROPS_MAX) {
        stmts_forget_all(s);
    } else if (s->errors) {
        for (uint32_t i = 0; i < s->ndrops; i++) {
            pgstmt *e = stmt_find(s, s->drops[i]);
            if (e) {
                e->known = 0;
                if (!e->pending)
                    memset(e, 0, sizeof *e);
            }
        }
    }
    s->ndrops = 0;
}

/* A library statement name ("pb_" + 16 lowercase hex digits, the NUL
 * after it at name[PB_STMT_NAME_LEN]): its hash, else 0. */
static uint64_t lib_name_hash(const uint8_t *name, uint32_t room)
{
    if (room <= PB_STMT_NAME_LEN || name[PB_STMT_NAME_LEN] != 0 ||
        memcmp(name, PB_STMT_PREFIX, sizeof PB_STMT_PREFIX - 1) != 0)
        return 0;
    uint64_t h = 0;
    for (int i = (int)sizeof PB_STMT_PREFIX - 1; i < PB_STMT_NAME_LEN; i++) {
        uint8_t d = name[i];
        if (d >= '0' && d <= '9')
            h = h << 4 | (uint64_t)(d - '0');
        else if (d >= 'a' && d <= 'f')
            h = h << 4 | (uint64_t)(d - 'a' + 10);
        else
            return 0;
    }
    return h > PQ_DROP ? h : 0;
}

/* The hash a Parse's body (name, query, types) names, if it is a library
 * statement whose name matches its text and types; else 0. */
static uint64_t parse_tracked(const uint8_t *b, uint32_t n)
{
    uint64_t named = lib_name_hash(b, n);
    if (!named)
        return 0;
    const uint8_t *q = b + PB_STMT_NAME_LEN + 1;
    uint32_t left = n - PB_STMT_NAME_LEN - 1;
    const uint8_t *qend = memchr(q, 0, left);
    if (!qend)
        return 0;
    left -= (uint32_t)(qend - q) + 1;
    if (left < 2)
        return 0;
    const uint8_t *t = qend + 1;
    uint32_t nt = ((uint32_t)t[0] << 8) | t[1];
    if (left != 2 + 4 * nt)
        return 0;
    uint64_t h = pb_stmt_hash_bytes(PB_STMT_HASH_INIT, q, (size_t)(qend - q));
    for (uint32_t i = 0; i < nt; i++)
        h = PB_STMT_HASH_TYPE(h, rd32(t + 2 + 4 * i));
    h = pb_stmt_hash_end(h, nt);
    return h == named ? h : 0;
}

/* ---------------------------------------------------------------- requests */

/* The request being rewritten: in place while only Parses are dropped
 * (w <= the read offset), into out from the first Close put in. */
typedef struct rewrite {
    drv_buf *rq;
    uint32_t w;              /* in place: bytes kept so far */
    drv_buf out;             /* after the first insertion: the whole request */
    uint32_t reserve;        /* bytes the insertions can add at most */
    int moved;
} rewrite;

static int rw_emit(rewrite *x, const uint8_t *p, uint32_t n)
{
    if (x->moved)
        return drv_buf_append(&x->out, p, n);
    if (x->rq->p + x->w != p)
        memmove(x->rq->p + x->w, p, n);
    x->w += n;
    return PB_OK;
}

/* Put a Close of library statement h in the request. */
static int rw_close(rewrite *x, uint64_t h)
{
    if (!x->moved) {
        uint64_t cap = (uint64_t)x->rq->len + x->reserve;
        if (cap > UINT32_MAX || !(x->out.p = malloc((size_t)cap)))
            return PB_ENOMEM;
        x->out.cap = (uint32_t)cap;
        memcpy(x->out.p, x->rq->p, x->w);
        x->out.len = x->w;
        x->moved = 1;
    }
    uint8_t m[PG_CLOSE_LEN];
    uint32_t len = PG_CLOSE_LEN - 1;
    m[0] = 'C';
    m[1] = (uint8_t)(len >> 24);
    m[2] = (uint8_t)(len >> 16);
    m[3] = (uint8_t)(len >> 8);
    m[4] = (uint8_t)len;
    m[5] = 'S';
    snprintf((char *)m + 6, PB_STMT_NAME_LEN + 1, PB_STMT_PREFIX "%016llx", (unsigned long long)h);
    return drv_buf_append(&x->out, m, sizeof m);
}

/* A registry entry for h: a free one, else the least recently used known
 * one this request has not used, closed in the request (*evicted).  NULL:
 * none can go now (the statement is then sent untracked). */
static pgstmt *stmt_alloc(pgconn *s, uint64_t h, uint64_t *evicted)
{
    *evicted = 0;
    if (!s->stmts && !(s->stmts = calloc(PG_STMT_MAX, sizeof *s->stmts)))
        return NULL;
    pgstmt *victim = NULL;
    for (int i = 0; i < PG_STMT_MAX; i++) {
        pgstmt *e = &s->stmts[i];
        if (!e->hash) {
            victim = e;
            break;
        }
        if (e->known && !e->pending && e->stamp != s->req_stamp && (!victim || e->used < victim->used))
            victim = e;
    }
    if (!victim)
        return NULL;
    *evicted = victim->hash;
    memset(victim, 0, sizeof *victim);
    victim->hash = h;
    return victim;
}

/* One Parse of the request: the message m[0..5 + n), its body m + 5. */
static int rw_parse(conn *c, rewrite *x, const uint8_t *m, uint32_t n, int may_drop, int queued)
{
    pgconn *s = PG(c);
    uint64_t h = parse_tracked(m + 5, n);
    uint32_t size = 5 + n;
    if (!h) {
        if (queued)
            s->stmtq[s->q_len++] = PQ_OTHER;
        return rw_emit(x, m, size);
    }
    pgstmt *e = stmt_find(s, h);
    if (e && e->known && !e->pending && may_drop) {
        e->used = ++s->stmt_clock;  /* the backend has it: the Parse is dropped */
        e->stamp = s->req_stamp;
        s->stmtq[s->q_len++] = PQ_DROP;
        s->stmtq[s->q_len++] = h;
        return PB_OK;
    }
    uint64_t evicted = 0;
    if (!e)
        e = stmt_alloc(s, h, &evicted);
    if (evicted && evicted != h && rw_close(x, evicted) != PB_OK)
        return PB_ENOMEM;
    /* It may exist already (a Parse whose answer is still to come, one
     * the registry forgot): closing one that does not is no error. */
    if (rw_close(x, h) != PB_OK)
        return PB_ENOMEM;
    if (e) {
        e->known = 0;
        e->pending++;
        e->used = ++s->stmt_clock;
        e->stamp = s->req_stamp;
    }
    s->stmtq[s->q_len++] = e ? h : PQ_OTHER;
    return rw_emit(x, m, size);
}

/* Track, drop or precede with a Close the library-named Parses of a valid
 * request (pass 2 of pg_frame_request); nparse, nsync: its Parse and
 * Sync/Query messages; queued: record them in the parse queue. */
static int rewrite_request(conn *c, drv_buf *rq, uint32_t nparse, uint32_t nsync, int queued)
{
    pgconn *s = PG(c);
    if (queued && q_reserve(s, 2 * nparse + nsync) != PB_OK)
        return PB_ENOMEM;
    uint32_t q_len0 = s->q_len;
    s->req_stamp++;
    rewrite x = { .rq = rq, .reserve = 2 * PG_CLOSE_LEN * nparse };
    /* A Parse can be dropped only if nothing before it in the stream can
     * have deallocated the statement: no replies owed for earlier
     * requests, no Query or Execute earlier in this one. */
    int may_drop = c->expect == 0;
    uint32_t len = rq->len, off = 0;
    int rc = PB_OK;
    while (off < len && rc == PB_OK) {
        const uint8_t *m = rq->p + off;
        uint32_t mlen = rd32(m + 1);
        const uint8_t *b = m + 5;
        uint32_t n = mlen - 4;
        switch (m[0]) {
        case 'P':
            rc = rw_parse(c, &x, m, n, may_drop, queued);
            break;
        case 'C': {
            /* The client closes a library statement itself: not known from
             * here on (nor when a Parse still pending completes). */
            pgstmt *e = n > 1 && b[0] == 'S' ? stmt_find(s, lib_name_hash(b + 1, n - 1)) : NULL;
            if (e && e->hash) {
                e->known = 0;
                if (e->pending)
                    e->doubt = 1;
                else
                    memset(e, 0, sizeof *e);
            }
            rc = rw_emit(&x, m, mlen + 1);
            break;
        }
        case 'Q': case 'S':
            if (m[0] == 'Q')
                may_drop = 0;
            if (queued)
                s->stmtq[s->q_len++] = PQ_SYNC;
            rc = rw_emit(&x, m, mlen + 1);
            break;
        case 'E':
            may_drop = 0;
            rc = rw_emit(&x, m, mlen + 1);
            break;
        default:
            rc = rw_emit(&x, m, mlen + 1);
        }
        off += 1 + mlen;
    }
    if (rc != PB_OK) {
        /* Nothing is sent: take this request's entries off the queue and
         * forget every statement (answers still to come for earlier
         * requests then find none).  A later Parse goes with its Close:
         * always safe. */
        free(x.out.p);
        s->q_len = q_len0;
        if (s->stmts)
            memset(s->stmts, 0, PG_STMT_MAX * sizeof *s->stmts);
        return rc;
    }
    if (x.moved) {
        free(rq->p);
        *rq = x.out;
    } else {
        rq->len = x.w;
    }
    return PB_OK;
}

static int pg_frame_request(conn *c, drv_buf *rq, uint32_t *nreplies, const char **why)
{
    pgconn *s = PG(c);
    const uint8_t *req = rq->p;
    uint32_t len = rq->len, off = 0, n = 0, nparse = 0, ntracked = 0, nclose = 0;
    int parse_open = 0;             /* a Parse after the last Sync or Query */
    *why = NULL;
    while (off < len) {
        if (len - off < 5) {
            *why = "truncated message header";
            return PB_EPROTO;
        }
        uint8_t t = req[off];
        uint32_t mlen = rd32(req + off + 1);
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
            if (lib_name_hash(req + off + 5, mlen - 4))
                ntracked++;
        } else if (t == 'C' && mlen > 5 && req[off + 5] == 'S' && lib_name_hash(req + off + 6, mlen - 5)) {
            nclose++;
        }
        off += 1 + mlen;
    }
    /* Queue the request's Parses and Syncs when a tracked Parse may be in
     * it or in flight, or a ParseComplete of it may come after its last
     * ReadyForQuery; otherwise its ReadyForQuery only need counting. */
    int queued = ntracked || parse_open || s->q_head != s->q_len;
    if (!queued)
        s->q_lead += n;
    if (queued || nclose) {
        int rc = rewrite_request(c, rq, nparse, n, queued);
        if (rc != PB_OK) {
            *why = "out of memory";
            return rc;
        }
    }
    *nreplies = n;
    return PB_OK;
}

/* ----------------------------------------------------------------- replies */

/* A CommandComplete tag (cut to PG_TAG_MAX - 1 bytes): what it leaves on the
 * session, or takes off it.  Spellings as PostgreSQL 15 sends them. */
static void on_tag(conn *c, const char *tag)
{
    pgconn *s = PG(c);
    if (strcmp(tag, "SET") == 0 || strcmp(tag, "RESET") == 0)
        ss_set(c, SS_GUC);
    else if (strcmp(tag, "PREPARE") == 0)
        ss_set(c, SS_PREPARED);
    else if (strcmp(tag, "DEALLOCATE ALL") == 0) {
        ss_clear(c, SS_PREPARED);
        stmts_forget_all(s);
    } else if (strcmp(tag, "DEALLOCATE") == 0)
        stmts_forget_all(s);        /* which one, the tag does not say */
    else if (strcmp(tag, "LISTEN") == 0)
        ss_set(c, SS_LISTEN);
    else if (strcmp(tag, "DECLARE CURSOR") == 0)
        ss_set(c, SS_CURSOR);
    else if (strcmp(tag, "CLOSE CURSOR ALL") == 0)
        ss_clear(c, SS_CURSOR);
    else if (strcmp(tag, "DISCARD ALL") == 0) {
        ss_clear(c, SS_GUC | SS_PREPARED | SS_LISTEN | SS_CURSOR | SS_TEMP);
        stmts_forget_all(s);
    } else if (strcmp(tag, "DISCARD TEMP") == 0)
        ss_clear(c, SS_TEMP);
    else if (strncmp(tag, "CREATE ", 7) == 0)
        ss_set(c, SS_TEMP);         /* TEMP or pg_temp: the tag does not say */
    else if (strcmp(tag, "LOAD") == 0)
        ss_set(c, SS_RETIRE);
}

/* Walk the reply stream: headers are collected byte by byte across calls (a
 * header can straddle two receives); bodies are skipped, except the status
 * byte of ReadyForQuery and the first bytes of a CommandComplete tag. */
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
            i += k;
            s->body_left -= k;
            if (!s->body_left && s->in_tag) {
                s->tag[s->tag_have] = 0;  /* the body's own NUL ends it sooner */
                s->in_tag = 0;
                on_tag(c, s->tag);
            }
            continue;
        }
        if (s->hdr_have < 5) {
            s->hdr[s->hdr_have++] = p[i++];
            if (s->hdr_have < 5)
                continue;
            uint32_t mlen = rd32(s->hdr + 1);
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
            case 'S':
                ss_set(c, SS_GUC);  /* a reported setting changed (libpq read the startup ones) */
                break;
            case '1':
                q_parse_complete(s);
                break;
            }
            s->hdr_have = 0;
            s->body_left = mlen - 4;
            continue;
        }
        /* ReadyForQuery's status byte */
        uint8_t st = p[i++];
        s->hdr_have = 0;
        if (st != 'I' && st != 'T' && st != 'E')
            return DRV_ERROR;
        q_ready(s);
        if (s->quiet)
            s->quiet--;
        out->txn = (char)st;
        out->errors = s->errors;
        s->errors = 0;
        *used = i;
        return DRV_OK;
    }
    *used = n;
    return DRV_AGAIN;
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
    if (n > 0 && q_syncs(s, (uint32_t)n) != PB_OK)
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

static void pg_close(conn *c)
{
    pgconn *st = PG(c);
    if (st && st->pg)
        PQfinish(st->pg);       /* sends Terminate and closes the socket */
    if (st) {
        free(st->stmtq);
        free(st->stmts);
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
    .build_reset = pg_build_reset,
    .build_ping = pg_build_ping,
    .cancel = pg_cancel,
    .close = pg_close,
};
