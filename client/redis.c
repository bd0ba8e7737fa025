/*
 * redis.c — Redis commands on a lease.
 *
 * Commands are formatted with hiredis (redisvFormatCommand,
 * redisFormatCommandArgv) into a per-lease queue; pb_redis_get_reply() sends
 * whatever is queued — in as few writes as the slot's request buffer allows —
 * and parses replies with an ordinary hiredis redisReader fed straight from
 * the slot's reply ring, so callers get plain redisReply objects.
 *
 * Session state must not leak to the next holder of the connection.  We
 * formatted every command ourselves, so we know which ones change session
 * state (SELECT, MULTI, WATCH, SUBSCRIBE, CLIENT TRACKING/REPLY/SETNAME, HELLO,
 * READONLY, ...): those mark the slot dirty, and the broker RESETs it on
 * release.  A lease that ran only ordinary commands is released without a
 * round trip.
 *
 * Pub/Sub: after SUBSCRIBE, PSUBSCRIBE or SSUBSCRIBE, messages arrive in the
 * ring unasked.  Every reply the reader produces goes through
 * pbi_redis_sort, which keeps messages on the lease for
 * pb_redis_get_message by the broker's own rule (broker/redis.c), so the
 * two agree on what is a reply.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

static int redis_lease(pb_lease *l)
{
    return pbi_lease_usable(l, PB_POOL_REDIS);
}

/* Argument i of a command we formatted (RESP array of bulk strings). */
static int resp_arg(const char *cmd, size_t len, int want, const char **arg, size_t *alen)
{
    const char *p = cmd, *end = cmd + len;
    if (p >= end || *p != '*')
        return 0;
    long argc = strtol(p + 1, NULL, 10);
    p = memchr(p, '\n', (size_t)(end - p));
    for (long i = 0; p && i < argc && i <= want; i++) {
        p++;
        if (p >= end || *p != '$')
            return 0;
        long n = strtol(p + 1, NULL, 10);
        p = memchr(p, '\n', (size_t)(end - p));
        if (!p || n < 0 || n > end - p - 1)
            return 0;
        if (i == want) {
            *arg = p + 1;
            *alen = (size_t)n;
            return 1;
        }
        p += 1 + n + 1;             /* payload, \r, then at \n */
    }
    return 0;
}

static int word_is(const char *a, size_t n, const char *w)
{
    return n == strlen(w) && strncasecmp(a, w, n) == 0;
}

/* Does this command leave state on the connection that the next holder
 * must not inherit? */
static int changes_session(const char *cmd, size_t len, uint32_t *replies)
{
    const char *a0, *a1;
    size_t n0, n1;
    *replies = 1;
    if (!resp_arg(cmd, len, 0, &a0, &n0))
        return 1;
    /* Not MULTI: the broker counts an open MULTI as a transaction, which
     * its EXEC or DISCARD ends (and a release resets); marking the lease
     * dirty would pin a transaction-mode lease past its EXEC. */
    static const char *const dirty[] = {
        "SELECT", "WATCH", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE",
        "PUNSUBSCRIBE", "SUNSUBSCRIBE", "HELLO", "READONLY", "READWRITE", "AUTH", "ASKING", "RESET",
    };
    for (size_t i = 0; i < sizeof dirty / sizeof dirty[0]; i++) {
        if (word_is(a0, n0, dirty[i])) {
            if (i >= 2 && i <= 7) {
                /* one reply per channel */
                long argc = strtol(cmd + 1, NULL, 10);
                *replies = argc > 1 ? (uint32_t)(argc - 1) : 1;
            }
            return 1;
        }
    }
    if (word_is(a0, n0, "CLIENT")) {
        if (!resp_arg(cmd, len, 1, &a1, &n1))
            return 1;
        /* Read-only subcommands, and those acting on other connections,
         * leave nothing behind; NO-EVICT, NO-TOUCH and SETINFO do, but not
         * what RESET clears: the broker tracks those itself and undoes
         * exactly them (docs/protocol.md), so they need no full reset. */
        return !(word_is(a1, n1, "ID") || word_is(a1, n1, "INFO") || word_is(a1, n1, "LIST") ||
                 word_is(a1, n1, "GETNAME") || word_is(a1, n1, "GETREDIR") || word_is(a1, n1, "TRACKINGINFO") ||
                 word_is(a1, n1, "HELP") || word_is(a1, n1, "KILL") || word_is(a1, n1, "UNBLOCK") ||
                 word_is(a1, n1, "UNPAUSE") || word_is(a1, n1, "NO-EVICT") || word_is(a1, n1, "NO-TOUCH") ||
                 word_is(a1, n1, "SETINFO"));
    }
    return 0;
}

/* Is this command one of (P|S)(UN)SUBSCRIBE? */
static int subscription_command(const char *cmd, size_t len)
{
    static const char *const sub[] = { "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
                                       "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE" };
    const char *a0;
    size_t n0;
    if (!resp_arg(cmd, len, 0, &a0, &n0))
        return 0;
    for (size_t i = 0; i < sizeof sub / sizeof sub[0]; i++)
        if (word_is(a0, n0, sub[i]))
            return 1;
    return 0;
}

static int append_formatted(pb_lease *l, char *cmd, int len)
{
    if (len < 0 || !cmd) {
        free(cmd);
        return len == -2 ? PB_ENOMEM : PB_EINVAL;
    }
    int fits = pbi_request_fits(l, (size_t)len);
    if (fits != PB_OK) {
        free(cmd);
        return fits;
    }
    uint32_t replies;
    if (changes_session(cmd, (size_t)len, &replies))
        atomic_fetch_or_explicit(&l->s->client_flags, PB_CF_DIRTY, memory_order_relaxed);
    if (subscription_command(cmd, (size_t)len))
        l->rsub_sent = 1;
    if (l->rqueue.len == 0)
        pbi_set_preview(l, cmd, (size_t)len);
    uint32_t end = (uint32_t)(l->rqueue.len + (size_t)len);
    int rc = pb_buf_append(&l->rqueue, cmd, (size_t)len);
    free(cmd);
    if (rc == PB_OK)
        rc = pb_buf_append(&l->rends, &end, sizeof end);
    if (rc == PB_OK)
        rc = pb_buf_append(&l->rends, &replies, sizeof replies);
    if (rc != PB_OK)
        return rc;
    l->rqueued++;
    return PB_OK;
}

PB_API int pb_redis_append_command(pb_lease *l, const char *fmt, ...)
{
    int rc = redis_lease(l);
    if (rc != PB_OK)
        return rc;
    if (!fmt)
        return PB_EINVAL;
    char *cmd = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    return append_formatted(l, cmd, len);
}

PB_API int pb_redis_append_command_argv(pb_lease *l, int argc, const char **argv, const size_t *argvlen)
{
    int rc = redis_lease(l);
    if (rc != PB_OK)
        return rc;
    if (argc < 1 || !argv)
        return PB_EINVAL;
    for (int i = 0; i < argc; i++)
        if (!argv[i])
            return PB_EINVAL;
    char *cmd = NULL;
    int len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    return append_formatted(l, cmd, len);
}

/* Send every queued command, as many per write as fit the request buffer
 * (and max_request_size);
 * one that does not fit alone goes by itself, streamed in parts. */
static int flush_queue(pb_lease *l)
{
    const uint32_t *ends = (const uint32_t *)l->rends.data;
    uint32_t start = 0, i = 0, lim = pbi_group_limit(l);
    int rc = PB_OK;
    while (i < l->rqueued) {
        uint32_t nrep = 0, j = i;
        while (j < l->rqueued && ends[2 * j] - start <= lim) {
            nrep += ends[2 * j + 1];
            j++;
        }
        if (j == i)
            nrep = ends[2 * j++ + 1];
        rc = pbi_submit(l, l->rqueue.data + start, ends[2 * (j - 1)] - start, nrep);
        if (rc != PB_OK)
            break;
        start = ends[2 * (j - 1)];
        i = j;
    }
    l->rqueue.len = 0;
    l->rends.len = 0;
    l->rqueued = 0;
    if (rc != PB_OK)
        l->desync = 1;              /* part of the pipeline went, part did not */
    return rc;
}

/* The start of a call that answers a reply in *out: *out NULL, the lease
 * usable for Redis, out not NULL. */
static int reply_call(pb_lease *l, redisReply **out)
{
    if (out)
        *out = NULL;
    int rc = redis_lease(l);
    return rc != PB_OK ? rc : out ? PB_OK : PB_EINVAL;
}

PB_API int pb_redis_get_reply(pb_lease *l, redisReply **out)
{
    int rc = reply_call(l, out);
    if (rc != PB_OK)
        return rc;
    if (l->rheld) {                 /* parsed by pb_is_busy (async.c) */
        *out = l->rheld;
        l->rheld = NULL;
        if (l->pending)
            l->pending--;
        return PB_OK;
    }
    if (l->rqueued && (rc = flush_queue(l)) != PB_OK)
        return rc;
    uint64_t t0 = pbi_now_us();
    if ((rc = pbi_redis_next(l, 1, out)) != PB_OK)
        return rc;
    if (!*out)
        return PB_EINVAL;           /* nothing was asked */
    if (l->pending)
        l->pending--;
    pb_shm_hist_add(&l->c->pools[l->pool].command_latency, pbi_now_us() - t0);
    return PB_OK;
}

int pbi_redis_next(pb_lease *l, int wait, redisReply **out)
{
    *out = NULL;
    if (!l->rreader && !(l->rreader = redisReaderCreate()))
        return PB_ENOMEM;
    for (;;) {
        void *rep = NULL;
        if (redisReaderGetReply(l->rreader, &rep) != REDIS_OK) {
            l->desync = 1;
            return PB_EPROTO;
        }
        if (rep) {
            int m = pbi_redis_sort(l, rep);
            if (m < 0)
                return m;
            if (m)
                continue;           /* a Pub/Sub message, kept for pb_redis_get_message */
            *out = rep;
            return PB_OK;
        }
        if (wait && l->pending == 0)
            return PB_OK;           /* none owed: do not wait for one */
        const uint8_t *p;
        size_t n = 0;
        int rc = wait ? pbi_reply_wait(l, &p, &n) : pbi_reply_peek(l, &p, &n);
        if (rc != PB_OK) {
            l->desync = 1;
            atomic_fetch_add_explicit(&l->c->pools[l->pool].errors, 1, memory_order_relaxed);
            return rc;
        }
        if (n == 0)
            return PB_OK;
        if (redisReaderFeed(l->rreader, (const char *)p, n) != REDIS_OK) {
            l->desync = 1;
            return PB_ENOMEM;
        }
        pbi_reply_consume(l, n);
    }
}

PB_API int pb_redis_command(pb_lease *l, redisReply **out, const char *fmt, ...)
{
    if (out)
        *out = NULL;
    int rc = redis_lease(l);
    if (rc != PB_OK)
        return rc;
    if (!fmt || !out)
        return PB_EINVAL;
    char *cmd = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if ((rc = append_formatted(l, cmd, len)) != PB_OK)
        return rc;
    return pb_redis_get_reply(l, out);
}

PB_API int pb_redis_command_argv(pb_lease *l, int argc, const char **argv, const size_t *argvlen, redisReply **out)
{
    if (out)
        *out = NULL;
    if (!out)
        return PB_EINVAL;
    int rc = pb_redis_append_command_argv(l, argc, argv, argvlen);
    if (rc != PB_OK)
        return rc;
    return pb_redis_get_reply(l, out);
}

/* ------------------------------------------------------------------ Pub/Sub */

static int str_is(const redisReply *e, const char *w)
{
    return e && (e->type == REDIS_REPLY_STRING || e->type == REDIS_REPLY_STATUS) && e->len == strlen(w) &&
           strncasecmp(e->str, w, e->len) == 0;
}

/* The broker's rule (broker/redis.c, "Pub/Sub"): while the server counts
 * subscriptions, an array beginning with "message", "pmessage" or
 * "smessage" is a message; each (p|s)(un)subscribe reply sets its kind's
 * count, once such a command went out; "+RESET" clears them. */
int pbi_redis_sort(pb_lease *l, void *rep)
{
    redisReply *r = rep;
    if (r->type == REDIS_REPLY_STATUS) {
        if (str_is(r, "RESET"))
            l->rnsub = l->rnssub = 0, l->rsub_sent = 0;
        return 0;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0 || r->element[0]->type != REDIS_REPLY_STRING)
        return 0;
    const redisReply *k = r->element[0];
    if (l->rnsub || l->rnssub) {
        if (str_is(k, "message") || str_is(k, "pmessage") || str_is(k, "smessage")) {
            if (pb_buf_append(&l->rmsgs, &rep, sizeof rep) != PB_OK) {
                freeReplyObject(rep);
                return PB_ENOMEM;
            }
            return 1;
        }
    }
    if (!l->rsub_sent || r->elements < 3 || r->element[2]->type != REDIS_REPLY_INTEGER ||
        r->element[2]->integer < 0 || r->element[2]->integer > UINT32_MAX)
        return 0;
    uint32_t n = (uint32_t)r->element[2]->integer;
    if (str_is(k, "subscribe") || str_is(k, "unsubscribe") || str_is(k, "psubscribe") || str_is(k, "punsubscribe"))
        l->rnsub = n;
    else if (str_is(k, "ssubscribe") || str_is(k, "sunsubscribe"))
        l->rnssub = n;
    return 0;
}

void pbi_redis_free_messages(pb_lease *l)
{
    redisReply **m = (redisReply **)l->rmsgs.data;
    for (size_t i = l->rmsg_head; i < l->rmsgs.len / sizeof *m; i++)
        freeReplyObject(m[i]);
    pb_buf_free(&l->rmsgs);
    l->rmsg_head = 0;
    l->rnsub = l->rnssub = 0;
    l->rsub_sent = 0;
}

/* The oldest queued message, or NULL. */
static redisReply *take_message(pb_lease *l)
{
    redisReply **m = (redisReply **)l->rmsgs.data;
    size_t n = l->rmsgs.len / sizeof *m;
    if (l->rmsg_head == n)
        return NULL;
    redisReply *r = m[l->rmsg_head++];
    if (l->rmsg_head == n) {
        l->rmsgs.len = 0;
        l->rmsg_head = 0;
    }
    return r;
}

/* Parse what is in the ring without waiting: messages go to the queue.  A
 * reply here would be one nobody asked for: PB_EPROTO. */
static int read_messages(pb_lease *l)
{
    redisReply *rep;
    int rc = pbi_redis_next(l, 0, &rep);
    if (rc == PB_OK && rep) {
        freeReplyObject(rep);
        l->desync = 1;
        return PB_EPROTO;
    }
    return rc;
}

PB_API int pb_redis_get_message(pb_lease *l, int timeout_ms, redisReply **out)
{
    int rc = reply_call(l, out);
    if (rc != PB_OK)
        return rc;
    if ((*out = take_message(l)))
        return PB_OK;
    if (l->pending || l->rqueued || l->rheld)
        return PB_EBUSY;
    if (!l->rnsub && !l->rnssub)
        return PB_EINVAL;           /* nothing subscribed: nothing will come */
    uint64_t deadline = timeout_ms < 0 ? 0 : pbi_now_us() * 1000 + (uint64_t)timeout_ms * 1000000ull;
    int last_look = timeout_ms == 0;
    for (;;) {
        uint32_t seen = atomic_load(&l->s->rep_futex);
        if ((rc = read_messages(l)) != PB_OK)
            return rc;
        if ((*out = take_message(l)))
            return PB_OK;
        /* Ask the broker to read the socket although no reply is due. */
        if ((rc = pbi_push_watch(l)) != PB_OK)
            return rc;
        if (last_look)
            return PB_ETIMEDOUT;
        if ((rc = pbi_lease_check(l)) != PB_OK)
            return rc;
        rc = pbi_wait(l, seen, deadline);
        if (rc == PB_ETIMEDOUT)
            last_look = 1;          /* what came with the deadline still counts */
        else if (rc != PB_OK)
            return rc;
    }
}
