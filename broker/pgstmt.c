/*
 * pgstmt.c — which library-named prepared statements (pb_<hash of text and
 * types>, include/pb_shm.h) a PostgreSQL backend has, as the server
 * confirmed them, and the request rewrite built on it (pgstmt.h).
 *
 * The library sends Parse with every execution of a pb_pg_prepare
 * statement.  For each such Parse whose name is the hash of its own text
 * and types (recomputed here: any other Parse goes through untouched):
 * the backend has it and nothing before it in the stream can have dropped
 * it — the Parse is removed from the request, in place; otherwise a Close
 * of the same name goes before it (closing a statement that does not
 * exist is no error, so a name the record is unsure of is always safe).
 * A name is known only once the server's ParseComplete for that very Parse
 * arrives: each forwarded Parse and Sync is queued in order, and the reply
 * stream's ParseComplete and ReadyForQuery messages are matched to them.
 * The DEALLOCATE and DISCARD ALL tags (pg.c) make every name unknown; an
 * error in a request whose Parse was dropped makes that one unknown, so a
 * record made wrong by what no tag reports (a DEALLOCATE inside a
 * function) costs one failed execution, not every later one.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pb_shm.h"
#include "pgstmt.h"
#include "poolbroker.h"

#define PG_CLOSE_LEN   (1 + 4 + 1 + PB_STMT_NAME_LEN + 1)  /* a Close of a library name */

/* What the parse queue holds, per message of a request whose answer matters
 * to the registry, in order: */
enum {
    PQ_SYNC = 0,             /* a Sync or Query: its ReadyForQuery ends the group */
    PQ_OTHER = 1,            /* a Parse the registry does not track: one ParseComplete */
    PQ_DROP = 2,             /* a Parse dropped (no ParseComplete); the next entry is its hash */
                             /* any other value: a tracked Parse, by its statement hash */
};

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

static pgstmt *stmt_find(pgstmts *s, uint64_t h)
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
void pgstmt_forget_all(pgstmts *s)
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
static void stmt_answered(pgstmts *s, uint64_t h, int ok)
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
static int q_reserve(pgstmts *s, uint32_t n)
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
int pgstmt_own_queries(pgstmts *s, uint32_t n)
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
static void q_take_drop(pgstmts *s)
{
    if (s->q_head + 1 < s->q_len && s->ndrops < PG_DROPS_MAX + 1) {
        if (s->ndrops < PG_DROPS_MAX)
            s->drops[s->ndrops] = s->stmtq[s->q_head + 1];
        s->ndrops++;
    }
    s->q_head += s->q_head + 1 < s->q_len ? 2 : 1;
}

/* A ParseComplete arrived: it answers the first queued Parse. */
void pgstmt_parse_complete(pgstmts *s)
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
void pgstmt_ready(pgstmts *s, uint32_t errors)
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
    if (errors && s->ndrops > PG_DROPS_MAX) {
        pgstmt_forget_all(s);
    } else if (errors) {
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
uint64_t pgstmt_lib_name(const uint8_t *name, uint32_t room)
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

uint64_t pgstmt_parse_tracked(const uint8_t *b, uint32_t n)
{
    uint64_t named = pgstmt_lib_name(b, n);
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
        h = PB_STMT_HASH_TYPE(h, pg_be32(t + 2 + 4 * i));
    h = pb_stmt_hash_end(h, nt);
    return h == named ? h : 0;
}

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
static pgstmt *stmt_alloc(pgstmts *s, uint64_t h, uint64_t *evicted)
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
static int rw_parse(pgstmts *s, rewrite *x, const uint8_t *m, uint32_t n, int may_drop, int queued)
{
    uint64_t h = pgstmt_parse_tracked(m + 5, n);
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
static int rewrite_request(pgstmts *s, drv_buf *rq, uint32_t nparse, uint32_t nsync, int queued, int idle)
{
    if (queued && q_reserve(s, 2 * nparse + nsync) != PB_OK)
        return PB_ENOMEM;
    uint32_t q_len0 = s->q_len;
    s->req_stamp++;
    rewrite x = { .rq = rq, .reserve = 2 * PG_CLOSE_LEN * nparse };
    /* A Parse can be dropped only if nothing before it in the stream can
     * have deallocated the statement: no replies owed for earlier
     * requests, no Query or Execute earlier in this one. */
    int may_drop = idle;
    uint32_t len = rq->len, off = 0;
    int rc = PB_OK;
    while (off < len && rc == PB_OK) {
        const uint8_t *m = rq->p + off;
        uint32_t mlen = pg_be32(m + 1);
        const uint8_t *b = m + 5;
        uint32_t n = mlen - 4;
        switch (m[0]) {
        case 'P':
            rc = rw_parse(s, &x, m, n, may_drop, queued);
            break;
        case 'C': {
            /* The client closes a library statement itself: not known from
             * here on (nor when a Parse still pending completes). */
            pgstmt *e = n > 1 && b[0] == 'S' ? stmt_find(s, pgstmt_lib_name(b + 1, n - 1)) : NULL;
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

int pgstmt_frame(pgstmts *s, drv_buf *rq, uint32_t nparse, uint32_t ntracked, uint32_t nclose, uint32_t nsync,
                 int parse_open, int idle)
{
    /* Queue the request's Parses and Syncs when a tracked Parse may be in
     * it or in flight, or a ParseComplete of it may come after its last
     * ReadyForQuery; otherwise its ReadyForQuery only need counting. */
    int queued = ntracked || parse_open || s->q_head != s->q_len;
    if (!queued)
        s->q_lead += nsync;
    if (!queued && !nclose)
        return PB_OK;
    return rewrite_request(s, rq, nparse, nsync, queued, idle);
}

void pgstmt_free(pgstmts *s)
{
    free(s->stmtq);
    free(s->stmts);
    s->stmtq = NULL;
    s->stmts = NULL;
}
