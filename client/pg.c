/*
 * pg.c — PostgreSQL on a lease: simple and parameterised queries, prepared
 * statements that survive pooling, pipelining, COPY in both directions,
 * LISTEN/NOTIFY and notices.
 *
 * Requests are encoded with pgproto.c and handed to the broker through the
 * slot; replies are decoded as they arrive in the slot's reply ring, in
 * pieces as small as the ring makes them (a 100 MB result streams through a
 * 256 KiB ring while the broker pauses the backend socket).
 *
 * Everything that can be outstanding on a lease — pipelined results, a COPY
 * — makes the other calls answer PB_EBUSY until it is finished, so a reply is
 * never read by the wrong call.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int pg_lease(pb_lease *l)
{
    return pbi_lease_usable(l, PB_POOL_POSTGRES);
}

/* A lease free for a new command: nothing outstanding. */
static int pg_idle_lease(pb_lease *l)
{
    int rc = pg_lease(l);
    if (rc == PB_OK && (l->copy || l->pqueued || l->pending || l->held))
        rc = PB_EBUSY;
    return rc;
}

static void on_notify(void *arg, int be_pid, const char *channel, const char *payload)
{
    pb_lease *l = arg;
    pb_notify *n = calloc(1, sizeof *n);
    if (!n)
        return;                     /* dropped: nothing better to do without memory */
    n->be_pid = be_pid;
    n->channel = strdup(channel);
    n->payload = strdup(payload);
    if (!n->channel || !n->payload) {
        pb_notify_free(n);
        return;
    }
    if (l->nq_tail)
        l->nq_tail->next = n;
    else
        l->nq_head = n;
    l->nq_tail = n;
}

/* Feed the decoder what the ring holds (waiting if wait) until it stops at
 * something: PGP_READY, PGP_COPY_IN, PGP_COPY_OUT, PGP_COPY_ROW; or PGP_MORE
 * when not waiting and the ring is empty. */
static int pump(pb_lease *l, int wait)
{
    l->dec.notify = on_notify;
    l->dec.notify_arg = l;
    for (;;) {
        const uint8_t *p;
        size_t n = 0, used = 0;
        int rc = wait ? pbi_reply_wait(l, &p, &n) : pbi_reply_peek(l, &p, &n);
        if (rc != PB_OK) {
            l->desync = 1;          /* what is left of this reply is unknown */
            return rc;
        }
        if (n == 0)
            return PGP_MORE;
        int r = pgp_feed(&l->dec, (const char *)p, n, &used);
        pbi_reply_consume(l, used);
        if (r < 0) {
            l->desync = 1;
            return r;
        }
        if (r != PGP_MORE)
            return r;
    }
}

/* Read replies up to the next ReadyForQuery and return its result. */
static int read_result(pb_lease *l, pb_result **out)
{
    for (;;) {
        int r = pump(l, 1);
        if (r < 0)
            return r;
        if (r == PGP_READY) {
            l->pending--;
            *out = pgp_take_result(&l->dec);
            return *out ? PB_OK : PB_ENOMEM;
        }
        if (r == PGP_COPY_IN) {
            /* A COPY FROM STDIN through a plain exec: refuse it the
             * protocol's way, so the server ends the command with an error. */
            pb_buf *b = &l->c->scratch;
            b->len = 0;
            int rc = pgp_copy_fail(b, "COPY FROM STDIN needs pb_pg_copy_in_begin");
            if (rc == PB_OK)
                rc = pbi_submit(l, b->data, b->len, 0);
            if (rc != PB_OK) {
                l->desync = 1;
                return rc;
            }
        } else if (r == PGP_COPY_ROW) {
            free(l->dec.row);       /* COPY TO STDOUT through a plain exec: rows dropped */
            l->dec.row = NULL;
        }
    }
}

static int run(pb_lease *l, const char *preview, pb_result **out)
{
    pb_buf *b = &l->c->scratch;
    pbi_set_preview(l, preview, strlen(preview));
    uint64_t t0 = pbi_now_us();
    int rc = pbi_submit(l, b->data, b->len, 1);
    if (rc == PB_OK)
        rc = read_result(l, out);
    if (rc == PB_OK)
        pb_shm_hist_add(&l->c->pools[l->pool].command_latency, pbi_now_us() - t0);
    else
        atomic_fetch_add_explicit(&l->c->pools[l->pool].errors, 1, memory_order_relaxed);
    return rc;
}

/* A simple-protocol Query for sql, in the client's scratch buffer, on a
 * lease with nothing else in flight. */
static int simple_query(pb_lease *l, const char *sql, pb_buf **out)
{
    int rc = pg_idle_lease(l);
    if (rc != PB_OK)
        return rc;
    pb_buf *b = &l->c->scratch;
    b->len = 0;
    if ((rc = pgp_query(b, sql)) != PB_OK)
        return rc;
    *out = b;
    return PB_OK;
}

PB_API int pb_pg_exec(pb_lease *l, const char *sql, pb_result **out)
{
    if (!sql || !out)
        return PB_EINVAL;
    *out = NULL;
    pb_buf *b;
    int rc = simple_query(l, sql, &b);
    if (rc != PB_OK)
        return rc;
    return run(l, sql, out);
}

/* Parse (unnamed) + Bind + Describe + Execute + Sync for one statement. */
static int encode_params(pb_buf *b, const char *stmt, const char *sql, int nparams, const unsigned int *types,
                         const char *const *values, const int *lengths, const int *formats, int result_format)
{
    int rc;
    if (sql && (rc = pgp_parse(b, stmt, sql, nparams, types)) != PB_OK)
        return rc;
    if ((rc = pgp_bind(b, "", stmt, nparams, values, lengths, formats, result_format)) != PB_OK ||
        (rc = pgp_describe(b, 'P', "")) != PB_OK || (rc = pgp_execute(b, "", 0)) != PB_OK ||
        (rc = pgp_sync(b)) != PB_OK)
        return rc;
    return PB_OK;
}

static int check_params(const char *sql, int nparams, const char *const *values, int result_format)
{
    if (!sql || nparams < 0 || nparams > 65535 || (nparams > 0 && !values) ||
        (result_format != 0 && result_format != 1))
        return PB_EINVAL;
    return PB_OK;
}

PB_API int pb_pg_exec_params(pb_lease *l, const char *sql, int nparams, const unsigned int *param_types,
                             const char *const *values, const int *lengths, const int *formats,
                             int result_format, pb_result **out)
{
    if (!out || check_params(sql, nparams, values, result_format) != PB_OK)
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_idle_lease(l);
    if (rc != PB_OK)
        return rc;
    pb_buf *b = &l->c->scratch;
    b->len = 0;
    if ((rc = encode_params(b, "", sql, nparams, param_types, values, lengths, formats, result_format)) != PB_OK)
        return rc;
    return run(l, sql, out);
}

/* ------------------------------------------------------ prepared statements */

/* The statement's hash, as the broker recomputes it from the Parse
 * (pb_shm.h): the text, then the parameter types the Parse carries. */
static uint64_t stmt_hash(const char *sql, int ntypes, const unsigned int *types)
{
    uint64_t h = pb_stmt_hash_bytes(PB_STMT_HASH_INIT, sql, strlen(sql));
    for (int i = 0; i < ntypes; i++)
        h = PB_STMT_HASH_TYPE(h, types[i]);
    return pb_stmt_hash_end(h, (uint32_t)ntypes);
}

static pb_stmt *find_stmt(pb_client *c, const char *name)
{
    for (pb_stmt *st = c->stmts; st; st = st->next)
        if (strcmp(st->name, name) == 0)
            return st;
    return NULL;
}

/* Parse the statement under its library name (pb_shm.h) and, unless
 * parse_only, run it: Parse + Bind + Describe + Execute + Sync in one
 * request, every time.  The broker drops the Parse when the connection has
 * the statement already (and puts a Close before it when it may have it),
 * so this works on whichever connection the request lands, after any
 * DEALLOCATE ALL, with no round trip of its own. */
static int run_prepared(pb_lease *l, pb_stmt *st, int nparams, const char *const *values, const int *lengths,
                        const int *formats, int result_format, int parse_only, pb_result **out)
{
    char name[PB_STMT_NAME_LEN + 1];
    pb_buf *b = &l->c->scratch;
    int rc;
    snprintf(name, sizeof name, PB_STMT_PREFIX "%016llx", (unsigned long long)st->hash);
    b->len = 0;
    if ((rc = pgp_parse(b, name, st->sql, st->nparams, st->types)) != PB_OK)
        return rc;
    if (parse_only)
        rc = pgp_sync(b);
    else
        rc = encode_params(b, name, NULL, nparams, NULL, values, lengths, formats, result_format);
    if (rc != PB_OK)
        return rc;
    return run(l, st->sql, out);
}

PB_API int pb_pg_prepare(pb_lease *l, const char *name, const char *sql, int nparams,
                         const unsigned int *param_types, pb_result **out)
{
    if (!name || !sql || !out || nparams < 0 || nparams > 65535)
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_idle_lease(l);
    if (rc != PB_OK)
        return rc;
    pb_client *c = l->c;
    pb_stmt *st = find_stmt(c, name);
    uint64_t h = stmt_hash(sql, param_types ? nparams : 0, param_types);
    if (!st) {
        if (!(st = calloc(1, sizeof *st)) || !(st->name = strdup(name))) {
            free(st);
            return PB_ENOMEM;
        }
        st->next = c->stmts;
        c->stmts = st;
    }
    if (!st->sql || st->hash != h) {
        char *s2 = strdup(sql);
        unsigned int *t2 = NULL;
        if (nparams && param_types) {
            t2 = malloc((size_t)nparams * sizeof *t2);
            if (t2)
                memcpy(t2, param_types, (size_t)nparams * sizeof *t2);
        }
        if (!s2 || (nparams && param_types && !t2)) {
            free(s2);
            free(t2);
            return PB_ENOMEM;
        }
        free(st->sql);
        free(st->types);
        st->sql = s2;
        st->types = t2;
        st->nparams = param_types ? nparams : 0;
        st->hash = h;
    }
    /* Parse now, on this connection, so SQL errors show at prepare time
     * (unless the connection has it already: then there is nothing to
     * check). */
    return run_prepared(l, st, 0, NULL, NULL, NULL, 0, 1, out);
}

PB_API int pb_pg_exec_prepared(pb_lease *l, const char *name, int nparams, const char *const *values,
                               const int *lengths, const int *formats, int result_format, pb_result **out)
{
    if (!name || !out || check_params("", nparams, values, result_format) != PB_OK)
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_idle_lease(l);
    if (rc != PB_OK)
        return rc;
    pb_stmt *st = find_stmt(l->c, name);
    if (!st || !st->sql)
        return PB_EINVAL;
    return run_prepared(l, st, nparams, values, lengths, formats, result_format, 0, out);
}

/* -------------------------------------------------------------- pipelining */

PB_API int pb_pg_send_params(pb_lease *l, const char *sql, int nparams, const unsigned int *param_types,
                             const char *const *values, const int *lengths, const int *formats,
                             int result_format)
{
    if (check_params(sql, nparams, values, result_format) != PB_OK)
        return PB_EINVAL;
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    if (l->copy || l->held)
        return PB_EBUSY;
    size_t before = l->pipe.len;
    rc = encode_params(&l->pipe, "", sql, nparams, param_types, values, lengths, formats, result_format);
    if (rc == PB_OK)
        rc = pbi_request_fits(l, l->pipe.len - before);
    uint32_t end = (uint32_t)l->pipe.len;
    if (rc == PB_OK)
        rc = pb_buf_append(&l->pends, &end, sizeof end);
    if (rc != PB_OK) {
        l->pipe.len = before;
        return rc;
    }
    if (l->pqueued == 0)
        pbi_set_preview(l, sql, strlen(sql));
    l->pqueued++;
    return PB_OK;
}

/* Submit as many whole queued statements as fit, if the request buffer is
 * free; never waits.  A statement larger than the buffer goes by itself,
 * streamed: a part each time the buffer is free, the queue unchanged until
 * its last part is in. */
static int pipe_flush_some(pb_lease *l)
{
    if (!l->pqueued)
        return PB_OK;
    const uint32_t *ends = (const uint32_t *)l->pends.data;
    uint32_t n = 0, lim = pbi_group_limit(l);
    while (n < l->pqueued && ends[n] <= lim)
        n++;
    if (n == 0)
        n = 1;
    int rc = pbi_submit_nowait(l, l->pipe.data, ends[n - 1], n);
    if (rc == PB_EBUSY)
        return PB_OK;
    if (rc != PB_OK)
        return rc;
    /* Drop what went from the front of the queue. */
    uint32_t sent = ends[n - 1];
    memmove(l->pipe.data, l->pipe.data + sent, l->pipe.len - sent);
    l->pipe.len -= sent;
    uint32_t *e = (uint32_t *)l->pends.data;
    for (uint32_t i = n; i < l->pqueued; i++)
        e[i - n] = e[i] - sent;
    l->pqueued -= n;
    l->pends.len = l->pqueued * sizeof(uint32_t);
    return PB_OK;
}

PB_API int pb_pg_get_result(pb_lease *l, pb_result **out)
{
    if (!out)
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    if (l->held) {
        *out = l->held;
        l->held = NULL;
        return PB_OK;
    }
    if (l->copy)
        return PB_EBUSY;
    for (;;) {
        uint32_t seen = atomic_load(&l->s->rep_futex);
        if ((rc = pipe_flush_some(l)) != PB_OK) {
            l->desync = 1;
            return rc;
        }
        if (l->pending == 0 && l->pqueued == 0)
            return PB_OK;           /* all results returned */
        int r = l->pending ? pump(l, 0) : PGP_MORE;
        if (r < 0)
            return r;
        if (r == PGP_READY) {
            l->pending--;
            *out = pgp_take_result(&l->dec);
            return *out ? PB_OK : PB_ENOMEM;
        }
        if (r != PGP_MORE)
            continue;               /* COPY inside a pipeline: not ours to handle */
        if ((rc = pbi_lease_check(l)) != PB_OK || (rc = pbi_wait(l, seen, 0)) != PB_OK)
            return rc;
    }
}

/* For the non-blocking API (async.c): the static helpers above. */
int pbi_pg_flush(pb_lease *l) { return pipe_flush_some(l); }
int pbi_pg_pump(pb_lease *l) { return pump(l, 0); }

/* -------------------------------------------------------------------- COPY */

/* Start a COPY: send sql, read until the server says which way it goes. */
static int copy_begin(pb_lease *l, const char *sql, int want)
{
    if (!sql)
        return PB_EINVAL;
    pb_buf *b;
    int rc = simple_query(l, sql, &b);
    if (rc != PB_OK)
        return rc;
    pbi_set_preview(l, sql, strlen(sql));
    if ((rc = pbi_submit(l, b->data, b->len, 1)) != PB_OK)
        return rc;
    for (;;) {
        int r = pump(l, 1);
        if (r < 0)
            return r;
        if (r == PGP_READY) {       /* refused (or not a COPY at all) */
            l->pending--;
            l->held = pgp_take_result(&l->dec);
            return l->held ? PB_ESERVER : PB_ENOMEM;
        }
        if ((r == PGP_COPY_IN && want == LC_IN) || (r == PGP_COPY_OUT && want == LC_OUT)) {
            l->copy = want;
            return PB_OK;
        }
        /* The other direction: end it the way the protocol allows. */
        if (r == PGP_COPY_IN) {
            b->len = 0;
            if ((rc = pgp_copy_fail(b, "COPY direction does not match the call")) != PB_OK ||
                (rc = pbi_submit(l, b->data, b->len, 0)) != PB_OK)
                return rc;
        } else if (r == PGP_COPY_ROW) {
            free(l->dec.row);
            l->dec.row = NULL;
        }
    }
}

PB_API int pb_pg_copy_in_begin(pb_lease *l, const char *sql)
{
    return copy_begin(l, sql, LC_IN);
}

PB_API int pb_pg_copy_out_begin(pb_lease *l, const char *sql)
{
    return copy_begin(l, sql, LC_OUT);
}

/* Submit the buffered COPY data. */
static int copy_flush(pb_lease *l)
{
    if (!l->cbuf.len)
        return PB_OK;
    int rc = pbi_submit(l, l->cbuf.data, l->cbuf.len, 0);
    l->cbuf.len = 0;
    return rc;
}

/* The server may end a COPY IN early with an error: look without waiting. */
static int copy_in_check(pb_lease *l)
{
    int r = pump(l, 0);
    if (r < 0)
        return r;
    if (r == PGP_READY) {
        l->pending--;
        l->held = pgp_take_result(&l->dec);
        l->copy = LC_NONE;
        l->cbuf.len = 0;
        return PB_ESERVER;
    }
    return PB_OK;
}

PB_API int pb_pg_put_copy_data(pb_lease *l, const void *buf, size_t len)
{
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    if (l->copy != LC_IN)
        return l->held ? PB_ESERVER : PB_EBUSY;
    if (!buf && len)
        return PB_EINVAL;
    const char *p = buf;
    size_t lim = pbi_group_limit(l);          /* one request's worth of CopyData */
    size_t chunk_max = lim > 64 ? lim - 5 : 1;
    while (len) {
        size_t room = lim > l->cbuf.len ? lim - l->cbuf.len : 0;
        if (room <= 5) {
            if ((rc = copy_in_check(l)) != PB_OK || (rc = copy_flush(l)) != PB_OK)
                return rc;
            continue;
        }
        size_t n = len < room - 5 ? len : room - 5;
        if (n > chunk_max)
            n = chunk_max;
        if ((rc = pgp_copy_data(&l->cbuf, p, n)) != PB_OK)
            return rc;
        p += n;
        len -= n;
    }
    return PB_OK;
}

PB_API int pb_pg_put_copy_end(pb_lease *l, const char *errmsg, pb_result **out)
{
    if (!out)
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    if (l->copy != LC_IN) {
        if (l->held) {              /* it already ended with an error */
            *out = l->held;
            l->held = NULL;
            return PB_OK;
        }
        return PB_EBUSY;
    }
    pb_buf tail = { 0 };
    rc = errmsg ? pgp_copy_fail(&tail, errmsg) : pgp_copy_done(&tail);
    if (rc == PB_OK && l->cbuf.len + tail.len > pbi_group_limit(l))
        rc = copy_flush(l);
    if (rc == PB_OK)
        rc = pb_buf_append(&l->cbuf, tail.data, tail.len);
    pb_buf_free(&tail);
    if (rc == PB_OK)
        rc = copy_flush(l);
    l->copy = LC_NONE;
    if (rc != PB_OK) {
        l->desync = 1;
        return rc;
    }
    return read_result(l, out);
}

PB_API int pb_pg_get_copy_data(pb_lease *l, char **buf)
{
    if (!buf)
        return PB_EINVAL;
    *buf = NULL;
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    if (l->copy != LC_OUT)
        return l->held ? 0 : PB_EBUSY;
    for (;;) {
        int r = pump(l, 1);
        if (r < 0)
            return r;
        if (r == PGP_COPY_ROW) {
            if (l->dec.row_len > 0x7fffffff) {
                l->desync = 1;
                return PB_ETOOBIG;
            }
            *buf = l->dec.row;
            l->dec.row = NULL;
            return (int)l->dec.row_len;
        }
        if (r == PGP_READY) {
            l->pending--;
            l->copy = LC_NONE;
            l->held = pgp_take_result(&l->dec);
            return l->held ? 0 : PB_ENOMEM;
        }
    }
}

PB_API void pb_freemem(void *p)
{
    free(p);
}

/* ----------------------------------------------------------- LISTEN/NOTIFY */

PB_API int pb_pg_wait_notify(pb_lease *l, int timeout_ms, pb_notify **out)
{
    if (!out)
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    uint64_t deadline = timeout_ms < 0 ? 0 : pbi_now_us() * 1000 + (uint64_t)timeout_ms * 1000000ull;
    int watched = 0;
    for (;;) {
        uint32_t seen = atomic_load(&l->s->rep_futex);
        if (!l->nq_head && !l->pending && !l->copy) {
            int r = pump(l, 0);     /* notifications already in the ring */
            if (r < 0)
                return r;
        }
        if (l->nq_head) {
            pb_notify *n = l->nq_head;
            l->nq_head = n->next;
            if (!l->nq_head)
                l->nq_tail = NULL;
            n->next = NULL;
            *out = n;
            return PB_OK;
        }
        if (l->pending || l->copy || l->pqueued)
            return PB_EBUSY;
        if (!watched) {
            /* Ask the broker to read the socket although no reply is due. */
            if ((rc = pbi_push_watch(l)) != PB_OK)
                return rc;
            watched = 1;
            continue;
        }
        if (timeout_ms == 0)
            return PB_ETIMEDOUT;
        if ((rc = pbi_lease_check(l)) != PB_OK)
            return rc;
        rc = pbi_wait(l, seen, deadline);
        if (rc == PB_ETIMEDOUT) {
            if (pump(l, 0) >= 0 && l->nq_head)
                continue;
            return PB_ETIMEDOUT;
        }
        if (rc != PB_OK)
            return rc;
    }
}

PB_API const char *pb_notify_channel(const pb_notify *n)
{
    return n ? n->channel : NULL;
}

PB_API const char *pb_notify_payload(const pb_notify *n)
{
    return n ? n->payload : NULL;
}

PB_API int pb_notify_be_pid(const pb_notify *n)
{
    return n ? n->be_pid : 0;
}

PB_API void pb_notify_free(pb_notify *n)
{
    if (!n)
        return;
    free(n->channel);
    free(n->payload);
    free(n);
}

/* ------------------------------------------------------------------ notices */

PB_API void pb_set_notice_handler(pb_client *c, pb_notice_handler fn, void *arg)
{
    if (!c)
        return;
    c->notice_fn = fn;
    c->notice_arg = arg;
    for (pb_lease *l = c->leases; l; l = l->next) {
        l->dec.notice = fn;
        l->dec.notice_arg = arg;
    }
}
