/*
 * pgshare.c — the record of which PostgreSQL query texts may share a
 * backend (pgshare.h says what is learnt and why).
 *
 * The table is open-addressed on a 64-bit FNV-1a hash of the text, probed
 * PROBE slots; each entry keeps a copy of its text, so a hash collision is
 * only a miss.  Entries are never removed (a banned text stays banned), and
 * a full neighbourhood means a new text is not learnt: the cost of an
 * application that puts literals into its SQL is that its statements are
 * not shared, not memory.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "pgshare.h"
#include "pgstmt.h"

#define PROBE 8

enum { LEARNING, PROVEN, BANNED };

typedef struct pgshare_ent {
    uint64_t hash;
    char *text;              /* NULL: the slot is free */
    uint32_t len;
    uint8_t state;
    uint8_t clean;           /* clean executions in a row (LEARNING) */
    uint8_t quick;           /* its last clean execution took at most PGSHARE_QUICK_MS */
} pgshare_ent;

static pgshare_ent table[PGSHARE_SLOTS];

/* The length of the NUL-terminated string at p[0..n), or -1 if there is no NUL. */
static long cstr_len(const uint8_t *p, uint32_t n)
{
    const uint8_t *z = memchr(p, 0, n);
    return z ? (long)(z - p) : -1;
}

/* The query text of req if it is one statement the driver may learn:
 * one whole simple Query ('Q', a NUL-terminated text), or the
 * extended-protocol execution the library sends, as the worker wrote it:
 * Parse of a statement, Bind of that statement to the unnamed portal,
 * Describe and Execute of that portal with no row limit, Sync (five
 * messages, nothing else).  The statement is the unnamed one
 * (pb_pg_exec_params) or a library-named one (pb_pg_exec_prepared:
 * pb_<hash of its text and types>, pgstmt.h, whose Parse the broker may
 * then drop for a backend that has it).  The text is at most
 * PGSHARE_TEXT_MAX bytes; else NULL.  A Parse holds one statement by the
 * protocol; a Query's text may hold several, which the server's answer
 * (two tags) shows. */
static const char *query_text(const uint8_t *req, uint32_t len, uint32_t *tlen)
{
    if (len < 6)
        return NULL;
    uint32_t mlen = pg_be32(req + 1);
    if (mlen < 5 || mlen > len - 1)
        return NULL;
    const uint8_t *body = req + 5;
    uint32_t blen = mlen - 4;
    if (req[0] == 'Q') {
        long n = cstr_len(body, blen);
        if (mlen != len - 1 || n < 0 || (uint32_t)n != blen - 1 || n > PGSHARE_TEXT_MAX)
            return NULL;
        *tlen = (uint32_t)n;
        return (const char *)body;
    }
    if (req[0] != 'P' || blen < 2)
        return NULL;
    /* The statement's name: "" or a library name that is the hash of
     * this text and these types, as pgstmt tracks it (an application's own
     * named statement could be anything, DEALLOCATEd or replaced). */
    long nl = cstr_len(body, blen);
    if (nl < 0 || (nl > 0 && !pgstmt_parse_tracked(body, blen)))
        return NULL;
    const uint8_t *text = body + nl + 1;
    long n = cstr_len(text, blen - (uint32_t)nl - 1);
    if (n < 0 || n > PGSHARE_TEXT_MAX)
        return NULL;
    /* Then B, D, E, S and the end. */
    static const uint8_t follow[] = { 'B', 'D', 'E', 'S' };
    uint32_t off = 1 + mlen;
    for (int i = 0; i < 4; i++) {
        if (len - off < 5 || req[off] != follow[i])
            return NULL;
        uint32_t ml = pg_be32(req + off + 1);
        if (ml < 4 || ml > len - off - 1)
            return NULL;
        const uint8_t *b = req + off + 5;
        uint32_t bl = ml - 4;
        if (follow[i] == 'B' && (bl < (uint32_t)nl + 2 || b[0] != 0 || memcmp(b + 1, body, (size_t)nl + 1) != 0))
            return NULL;            /* the unnamed portal, of the statement just parsed */
        if (follow[i] == 'D' && (bl != 2 || b[0] != 'P' || b[1] != 0))
            return NULL;
        if (follow[i] == 'E' && (bl != 5 || b[0] != 0 || pg_be32(b + 1) != 0))
            return NULL;            /* the unnamed portal, every row */
        if (follow[i] == 'S' && bl != 0)
            return NULL;
        off += 1 + ml;
    }
    if (off != len)
        return NULL;
    *tlen = (uint32_t)n;
    return (const char *)text;
}

static uint64_t fnv1a(const char *p, uint32_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)p[i]) * 0x100000001b3ull;
    return h;
}

/* The entry of text t, or NULL; with add, a new one in a free slot when
 * there is none yet (NULL if the neighbourhood is full or out of memory). */
static pgshare_ent *lookup(const char *t, uint32_t n, int add)
{
    uint64_t h = fnv1a(t, n);
    for (uint32_t i = 0; i < PROBE; i++) {
        pgshare_ent *e = &table[(h + i) & (PGSHARE_SLOTS - 1)];
        if (!e->text) {
            if (!add)
                return NULL;
            char *copy = malloc(n + 1);
            if (!copy)
                return NULL;
            memcpy(copy, t, n + 1);
            *e = (pgshare_ent){ .hash = h, .text = copy, .len = n, .state = LEARNING };
            return e;
        }
        if (e->hash == h && e->len == n && memcmp(e->text, t, n) == 0)
            return e;
    }
    return NULL;
}

int pgshare_ok(const uint8_t *req, uint32_t len)
{
    uint32_t n;
    const char *t = query_text(req, len, &n);
    const pgshare_ent *e = t ? lookup(t, n, 0) : NULL;
    return e && e->state == PROVEN ? 1 + e->quick : 0;
}

void pgshare_copy(pgshare_conn *s)
{
    s->no_proof = 1;
}

pgshare_ent *pgshare_learn(const uint8_t *req, uint32_t len)
{
    uint32_t n;
    const char *t = query_text(req, len, &n);
    return t ? lookup(t, n, 1) : NULL;
}

void pgshare_framed(pgshare_conn *s, pgshare_ent *e, uint32_t nready, char txn, uint64_t now_ms)
{
    if (nready == 0)
        return;
    uint8_t alone = s->len == 0 && txn == 'I' && !s->no_proof, in_txn = txn != 'I';
    if (nready != 1)
        e = NULL;
    if (s->len > 0) {
        uint32_t last = (s->head + s->len - 1) % PGSHARE_RUNS;
        if (!e && !s->run[last].ent) {
            s->run[last].n += nready;   /* runs of unlearnt requests merge */
            return;
        }
        /* Behind another request: status 'I' at framing says nothing of
         * the status this one will run in. */
        if (s->len == PGSHARE_RUNS) {
            /* Full (a client pipelining many requests): this one is not
             * judged, and neither is the last one, which it joins. */
            s->run[last].ent = NULL;
            s->run[last].n += nready;
            return;
        }
    }
    uint32_t k = (s->head + s->len) % PGSHARE_RUNS;
    s->run[k].ent = e;
    s->run[k].n = nready;
    s->run[k].sent_ms = now_ms;
    s->run[k].alone = alone;
    s->run[k].in_txn = in_txn;
    s->len++;
}

void pgshare_tag(pgshare_conn *s, const char *tag)
{
    s->tags++;
    if (strncmp(tag, "SELECT ", 7) && strncmp(tag, "INSERT ", 7) && strncmp(tag, "UPDATE ", 7) &&
        strncmp(tag, "DELETE ", 7) && strncmp(tag, "MERGE ", 6))
        s->other = 1;
}

void pgshare_state(pgshare_conn *s)
{
    s->other = 1;
}

void pgshare_ready(pgshare_conn *s, char st, uint32_t errors, uint64_t now_ms)
{
    uint32_t tags = s->tags;
    int other = s->other;
    s->tags = 0;
    s->other = 0;
    uint64_t began = s->last_ready_ms;
    s->last_ready_ms = now_ms;
    if (s->len == 0)
        return;                     /* not ours to judge (cannot happen: pg.c counts) */
    pgshare_ent *e = s->run[s->head].ent;
    int alone = s->run[s->head].alone, in_txn = s->run[s->head].in_txn;
    if (s->run[s->head].sent_ms > began)
        began = s->run[s->head].sent_ms;   /* it reached an idle server */
    if (--s->run[s->head].n == 0) {
        s->head = (s->head + 1) % PGSHARE_RUNS;
        s->len--;
    }
    if (!e || e->state == BANNED || in_txn)
        return;                     /* inside a transaction, any text may leave it open */
    if (other || st != 'I' || tags > 1) {
        if (e->state == PROVEN)
            log_warn("a shared statement (query text of %u bytes, hash %016llx) left session state or a "
                     "transaction behind: it is never shared again", e->len, (unsigned long long)e->hash);
        e->state = BANNED;
        return;
    }
    if (errors || tags == 0)
        return;                     /* failed, or empty: proves nothing */
    if (now_ms - began > PGSHARE_SLOW_MS) {
        e->state = LEARNING;
        e->clean = 0;
        e->quick = 0;
        return;
    }
    e->quick = now_ms - began <= PGSHARE_QUICK_MS;
    if (e->state == LEARNING && alone && ++e->clean >= PGSHARE_PROVEN)
        e->state = PROVEN;
}
