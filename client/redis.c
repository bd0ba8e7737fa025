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

static int append_formatted(pb_lease *l, char *cmd, int len)
{
    if (len < 0 || !cmd) {
        free(cmd);
        return len == -2 ? PB_ENOMEM : PB_EINVAL;
    }
    if ((uint32_t)len > l->req_size) {
        free(cmd);
        return PB_ETOOBIG;
    }
    uint32_t replies;
    if (changes_session(cmd, (size_t)len, &replies))
        atomic_fetch_or_explicit(&l->s->client_flags, PB_CF_DIRTY, memory_order_relaxed);
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

/* Send every queued command, as many per write as fit the request buffer. */
static int flush_queue(pb_lease *l)
{
    const uint32_t *ends = (const uint32_t *)l->rends.data;
    uint32_t start = 0, i = 0;
    int rc = PB_OK;
    while (i < l->rqueued) {
        uint32_t nrep = 0, j = i;
        while (j < l->rqueued && ends[2 * j] - start <= l->req_size) {
            nrep += ends[2 * j + 1];
            j++;
        }
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

PB_API int pb_redis_get_reply(pb_lease *l, redisReply **out)
{
    if (out)
        *out = NULL;
    int rc = redis_lease(l);
    if (rc != PB_OK)
        return rc;
    if (!out)
        return PB_EINVAL;
    if (l->rheld) {                 /* parsed by pb_is_busy (async.c) */
        *out = l->rheld;
        l->rheld = NULL;
        if (l->pending)
            l->pending--;
        return PB_OK;
    }
    if (!l->rreader && !(l->rreader = redisReaderCreate()))
        return PB_ENOMEM;
    if (l->rqueued && (rc = flush_queue(l)) != PB_OK)
        return rc;
    uint64_t t0 = pbi_now_us();
    for (;;) {
        void *rep = NULL;
        if (redisReaderGetReply(l->rreader, &rep) != REDIS_OK) {
            l->desync = 1;
            return PB_EPROTO;
        }
        if (rep) {
            if (l->pending)
                l->pending--;
            *out = rep;
            pb_shm_hist_add(&l->c->pools[l->pool].command_latency, pbi_now_us() - t0);
            return PB_OK;
        }
        if (l->pending == 0)
            return PB_EINVAL;       /* nothing was asked */
        const uint8_t *p;
        size_t n;
        if ((rc = pbi_reply_wait(l, &p, &n)) != PB_OK) {
            l->desync = 1;
            atomic_fetch_add_explicit(&l->c->pools[l->pool].errors, 1, memory_order_relaxed);
            return rc;
        }
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
