/*
 * sentinel.c — Redis pools behind Sentinel (sentinels = host:port,...,
 * sentinel_master = NAME): where the server is now.
 *
 * One thread per Sentinel pool does all the talking to the sentinels, with
 * blocking hiredis calls under short timeouts, so that a sentinel that does
 * not answer never stalls the event loop:
 *
 *   - it asks them in turn, until one answers, for the master
 *     (SENTINEL get-master-addr-by-name NAME) or, for a sentinel_role =
 *     replica pool, for a healthy replica (SENTINEL replicas NAME: the one
 *     in use while it stays healthy, else the first without s_down/o_down/
 *     disconnected flags and with its master link up);
 *   - it stays subscribed to +switch-master on one sentinel and takes the
 *     new address from the message (a replica pool asks again);
 *   - it asks again when the loop says so (a connection lost, -READONLY,
 *     -MASTERDOWN: failover.c sets pool.sentinel_reask), when its
 *     subscription breaks (a message may have been missed), and every
 *     REASK_MS anyway.
 *
 * It publishes what it learnt under its mutex (address, a change count, the
 * reason; or why nobody answered).  The loop looks at it from the janitor
 * (sentinel_tick, every 100 ms): a new address goes to pool.master_host and
 * master_port, where the Redis driver connects, and the connections to the
 * old one are drained (failover.c).  The thread never logs (log.c is the
 * loop's); the loop logs what it published.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"

#define SENTINEL_MAX      16        /* entries of a sentinels list (conf.c checks) */
#define SENTINEL_IO_MS    500       /* connect and reply timeout per sentinel */
#define REASK_MS          5000      /* ask again at least this often */
#define START_WAIT_MS     2000      /* at broker start: wait this long for the first answer */

typedef struct sentinel {
    /* the configuration it was started with (copies: a reload frees confs) */
    char *host[SENTINEL_MAX];
    int port[SENTINEL_MAX];
    int n;
    char *list;                     /* the sentinels key as given (to compare after a reload) */
    char *master;                   /* sentinel_master */
    char *password;                 /* from sentinel_password_file, or NULL */
    int replica;                    /* sentinel_role = replica */
    pthread_t thread;
    int wake_fd;                    /* eventfd: the loop wants a re-ask or a stop */

    pthread_mutex_t mu;             /* guards everything down to err_seq */
    pthread_cond_t cv;              /* signalled after each round of asking */
    int stop;                       /* loop: the thread must exit */
    int reask;                      /* loop: ask again now */
    uint32_t rounds;                /* thread: rounds of asking done */
    char addr_host[256];            /* thread: the address it learnt; "" none */
    int addr_port;
    uint32_t seq;                   /* thread: bumped when the address changes */
    char why[200];                  /* thread: how it learnt it */
    char err[200];                  /* thread: why the last round learnt nothing */
    uint32_t err_seq;               /* thread: bumped with each new err */

    /* the loop's own */
    uint32_t seen_seq, seen_err_seq;
} sentinel;

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* -------------------------------------------------------- the thread's side */

static void publish_addr(sentinel *s, const char *host, int port, const char *why)
{
    pthread_mutex_lock(&s->mu);
    if (strcmp(s->addr_host, host) != 0 || s->addr_port != port) {
        snprintf(s->addr_host, sizeof s->addr_host, "%s", host);
        s->addr_port = port;
        snprintf(s->why, sizeof s->why, "%s", why);
        s->seq++;
    }
    pthread_mutex_unlock(&s->mu);
}

static void publish_err(sentinel *s, const char *err)
{
    pthread_mutex_lock(&s->mu);
    if (strcmp(s->err, err) != 0) {
        snprintf(s->err, sizeof s->err, "%s", err);
        s->err_seq++;
    }
    pthread_mutex_unlock(&s->mu);
}

static int stopping(sentinel *s)
{
    pthread_mutex_lock(&s->mu);
    int st = s->stop;
    pthread_mutex_unlock(&s->mu);
    return st;
}

/* A connection to sentinel i, authenticated; NULL with err filled. */
static redisContext *open_sentinel(sentinel *s, int i, char *err, size_t n)
{
    struct timeval tv = { 0, SENTINEL_IO_MS * 1000 };
    redisContext *ctx = redisConnectWithTimeout(s->host[i], s->port[i], tv);
    if (!ctx || ctx->err) {
        snprintf(err, n, "sentinel %s:%d: %s", s->host[i], s->port[i], ctx ? ctx->errstr : "out of memory");
        redisFree(ctx);
        return NULL;
    }
    redisSetTimeout(ctx, tv);
    if (s->password) {
        redisReply *r = redisCommand(ctx, "AUTH %s", s->password);
        int ok = r && r->type == REDIS_REPLY_STATUS;
        snprintf(err, n, "sentinel %s:%d: AUTH: %s", s->host[i], s->port[i],
                 r && r->type == REDIS_REPLY_ERROR ? r->str : ctx->err ? ctx->errstr : "unexpected reply");
        freeReplyObject(r);
        if (!ok) {
            redisFree(ctx);
            return NULL;
        }
    }
    return ctx;
}

/* The value of key in a flat key/value array (SENTINEL replicas entries). */
static const char *kv(const redisReply *e, const char *key)
{
    if (e->type != REDIS_REPLY_ARRAY)
        return NULL;
    for (size_t i = 0; i + 1 < e->elements; i += 2)
        if (e->element[i]->type == REDIS_REPLY_STRING && e->element[i + 1]->type == REDIS_REPLY_STRING &&
            strcmp(e->element[i]->str, key) == 0)
            return e->element[i + 1]->str;
    return NULL;
}

/* Is this SENTINEL replicas entry one to use? */
static int replica_healthy(const redisReply *e)
{
    const char *flags = kv(e, "flags"), *link = kv(e, "master-link-status");
    return flags && !strstr(flags, "s_down") && !strstr(flags, "o_down") && !strstr(flags, "disconnected") &&
           link && strcmp(link, "ok") == 0 && kv(e, "ip") && kv(e, "port");
}

/* Ask sentinel i.  1: *host / *port filled; 0: err says why. */
static int ask_one(sentinel *s, int i, char *host, size_t hn, int *port, char *err, size_t en)
{
    redisContext *ctx = open_sentinel(s, i, err, en);
    if (!ctx)
        return 0;
    redisReply *r = s->replica ? redisCommand(ctx, "SENTINEL replicas %s", s->master)
                               : redisCommand(ctx, "SENTINEL get-master-addr-by-name %s", s->master);
    int ok = 0;
    if (!r) {
        snprintf(err, en, "sentinel %s:%d: %s", s->host[i], s->port[i], ctx->errstr);
    } else if (r->type == REDIS_REPLY_ERROR) {
        snprintf(err, en, "sentinel %s:%d: %s", s->host[i], s->port[i], r->str);
    } else if (!s->replica) {
        if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[0]->type == REDIS_REPLY_STRING &&
            r->element[1]->type == REDIS_REPLY_STRING) {
            snprintf(host, hn, "%s", r->element[0]->str);
            *port = atoi(r->element[1]->str);
            ok = *port > 0 && *port < 65536;
        }
        if (!ok)
            snprintf(err, en, "sentinel %s:%d: no master called '%s'", s->host[i], s->port[i], s->master);
    } else if (r->type == REDIS_REPLY_ARRAY) {
        /* Keep the replica in use while it is healthy; else the first healthy one. */
        const redisReply *pick = NULL;
        char cur[300];
        pthread_mutex_lock(&s->mu);
        snprintf(cur, sizeof cur, "%s:%d", s->addr_host, s->addr_port);
        pthread_mutex_unlock(&s->mu);
        for (size_t k = 0; k < r->elements; k++) {
            const redisReply *e = r->element[k];
            if (!replica_healthy(e))
                continue;
            char a[300];
            snprintf(a, sizeof a, "%s:%s", kv(e, "ip"), kv(e, "port"));
            if (!pick || strcmp(a, cur) == 0)
                pick = e;
        }
        if (pick) {
            snprintf(host, hn, "%s", kv(pick, "ip"));
            *port = atoi(kv(pick, "port"));
            ok = *port > 0 && *port < 65536;
        }
        if (!ok)
            snprintf(err, en, "sentinel %s:%d: no healthy replica of '%s'", s->host[i], s->port[i], s->master);
    } else {
        snprintf(err, en, "sentinel %s:%d: unexpected reply", s->host[i], s->port[i]);
    }
    freeReplyObject(r);
    redisFree(ctx);
    return ok;
}

/* One round: the sentinels in turn, from the one that answered last. */
static void ask_round(sentinel *s, int *first, const char *because)
{
    char host[256], err[200] = "no sentinel configured", why[200];
    int port = 0;
    for (int k = 0; k < s->n && !stopping(s); k++) {
        int i = (*first + k) % s->n;
        if (ask_one(s, i, host, sizeof host, &port, err, sizeof err)) {
            *first = i;
            snprintf(why, sizeof why, "sentinel %s:%d said so (%s)", s->host[i], s->port[i], because);
            publish_addr(s, host, port, why);
            goto done;
        }
    }
    publish_err(s, err);
done:
    pthread_mutex_lock(&s->mu);
    s->rounds++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* A subscription to +switch-master on some sentinel, from *first on. */
static redisContext *subscribe(sentinel *s, int *first)
{
    char err[200];
    for (int k = 0; k < s->n; k++) {
        int i = (*first + k) % s->n;
        redisContext *ctx = open_sentinel(s, i, err, sizeof err);
        if (!ctx)
            continue;
        redisReply *r = redisCommand(ctx, "SUBSCRIBE +switch-master");
        int ok = r && r->type == REDIS_REPLY_ARRAY;
        freeReplyObject(r);
        if (ok) {
            *first = i;
            return ctx;
        }
        redisFree(ctx);
    }
    return NULL;
}

/* A +switch-master message: "NAME old-ip old-port new-ip new-port".  1 if
 * it is about our master (*host, *port: where it is now). */
static int switch_message(sentinel *s, const redisReply *r, char *host, size_t hn, int *port)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 || r->element[0]->type != REDIS_REPLY_STRING ||
        strcmp(r->element[0]->str, "message") != 0 || r->element[2]->type != REDIS_REPLY_STRING)
        return 0;
    char name[256], oh[256], nh[256];
    int op, np;
    if (sscanf(r->element[2]->str, "%255s %255s %d %255s %d", name, oh, &op, nh, &np) != 5 ||
        strcmp(name, s->master) != 0 || np <= 0 || np > 65535)
        return 0;
    snprintf(host, hn, "%s", nh);
    *port = np;
    return 1;
}

static void *sentinel_main(void *arg)
{
    sentinel *s = arg;
    int ask_at = 0, sub_at = 0;     /* the sentinel to try first */
    redisContext *sub = NULL;
    uint64_t last_ask = 0;
    int reask = 1;
    const char *because = "start";
    while (!stopping(s)) {
        pthread_mutex_lock(&s->mu);
        if (s->reask) {
            s->reask = 0;
            reask = 1;
            because = "the broker asked: a connection failed or the server refused";
        }
        pthread_mutex_unlock(&s->mu);
        if (reask || mono_ms() - last_ask >= REASK_MS) {
            ask_round(s, &ask_at, reask ? because : "periodic check");
            last_ask = mono_ms();
            reask = 0;
        }
        if (!sub && !stopping(s) && (sub = subscribe(s, &sub_at)) != NULL) {
            reask = 1;              /* a switch may have happened while nobody listened */
            because = "subscribed to +switch-master";
            continue;
        }
        struct pollfd pf[2] = { { s->wake_fd, POLLIN, 0 }, { sub ? sub->fd : -1, POLLIN, 0 } };
        int rc = poll(pf, 2, sub ? REASK_MS : 1000);
        if (rc < 0 && errno != EINTR)
            break;
        if (pf[0].revents & POLLIN) {
            uint64_t v;
            ssize_t n = read(s->wake_fd, &v, sizeof v);
            (void)n;
        }
        if (sub && (pf[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            void *rep = NULL;
            int broken = redisBufferRead(sub) != REDIS_OK;
            while (!broken && redisGetReplyFromReader(sub, &rep) == REDIS_OK && rep) {
                char host[256], why[300];
                int port;
                if (switch_message(s, rep, host, sizeof host, &port)) {
                    if (s->replica) {
                        reask = 1;  /* the replicas changed too */
                        because = "+switch-master";
                    } else {
                        snprintf(why, sizeof why, "+switch-master from sentinel %s:%d", s->host[sub_at],
                                 s->port[sub_at]);
                        publish_addr(s, host, port, why);
                    }
                }
                freeReplyObject(rep);
                rep = NULL;
            }
            if (broken || sub->err) {
                redisFree(sub);
                sub = NULL;
                sub_at = (sub_at + 1) % s->n;
                reask = 1;
                because = "lost the +switch-master subscription";
            }
        }
    }
    redisFree(sub);
    return NULL;
}

/* ---------------------------------------------------------- the loop's side */

static void sentinel_free(sentinel *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        free(s->host[i]);
    free(s->list);
    free(s->master);
    if (s->password) {
        explicit_bzero(s->password, strlen(s->password));
        free(s->password);
    }
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

static void wake(sentinel *s)
{
    uint64_t one = 1;
    ssize_t n = write(s->wake_fd, &one, sizeof one);
    (void)n;                        /* a full counter wakes it just the same */
}

static void sentinel_stop(sentinel *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_mutex_unlock(&s->mu);
    wake(s);
    pthread_join(s->thread, NULL);
    sentinel_free(s);
}

/* Start the thread for cp; wait up to wait_ms for its first round.  NULL
 * (logged) when it cannot start. */
static sentinel *sentinel_start(const conf_pool *cp, int wait_ms)
{
    sentinel *s = calloc(1, sizeof *s);
    if (!s)
        goto oom;
    s->wake_fd = -1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    for (const char *p = cp->sentinels; *p && s->n < SENTINEL_MAX;) {
        size_t len = strcspn(p, ",");
        char one[300];
        snprintf(one, sizeof one, "%.*s", (int)(len < sizeof one - 1 ? len : sizeof one - 1), p);
        char *h = one;
        while (*h == ' ' || *h == '\t')
            h++;
        char *colon = strrchr(h, ':');
        if (colon) {
            *colon = 0;
            s->port[s->n] = atoi(colon + 1);
            size_t hl = strlen(h);
            while (hl && (h[hl - 1] == ' ' || h[hl - 1] == '\t'))
                h[--hl] = 0;
            if (h[0] == '[' && hl > 1 && h[hl - 1] == ']') {   /* [::1] */
                h[hl - 1] = 0;
                h++;
            }
            if (!(s->host[s->n] = strdup(h)))
                goto oom;
            s->n++;
        }
        p += len;
        if (*p == ',')
            p++;
    }
    s->list = strdup(cp->sentinels);
    s->master = strdup(cp->sentinel_master);
    s->password = cp->sentinel_password ? strdup(cp->sentinel_password) : NULL;
    s->replica = cp->sentinel_replica;
    if (!s->list || !s->master || (cp->sentinel_password && !s->password) || s->n == 0)
        goto oom;
    if ((s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        log_errno(LOG_LVL_ERROR, errno, "pool %s: Sentinel: eventfd", cp->name);
        sentinel_free(s);
        return NULL;
    }
    int rc = pthread_create(&s->thread, NULL, sentinel_main, s);
    if (rc != 0) {
        log_errno(LOG_LVL_ERROR, rc, "pool %s: Sentinel: cannot start its thread", cp->name);
        sentinel_free(s);
        return NULL;
    }
    if (wait_ms > 0) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += wait_ms / 1000;
        until.tv_nsec += (long)(wait_ms % 1000) * 1000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
        pthread_mutex_lock(&s->mu);
        while (s->rounds == 0 && pthread_cond_timedwait(&s->cv, &s->mu, &until) == 0)
            ;
        pthread_mutex_unlock(&s->mu);
    }
    return s;
oom:
    log_error("pool %s: Sentinel: out of memory", cp->name);
    sentinel_free(s);
    return NULL;
}

static int same(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Does the running thread s still fit cp (after a reload)? */
static int fits(const sentinel *s, const conf_pool *cp)
{
    return same(s->list, cp->sentinels) && same(s->master, cp->sentinel_master) &&
           same(s->password, cp->sentinel_password) && s->replica == cp->sentinel_replica;
}

void sentinel_tick(pool *p, int starting)
{
    conf_pool *cp = p->cf;
    sentinel *s = p->sentinel;
    int want = cp->sentinels && !p->removed;
    if (s && (!want || !fits(s, cp))) {
        sentinel_stop(s);
        p->sentinel = s = NULL;
        p->master_host[0] = 0;      /* other sentinels: what the old ones said is void */
    }
    if (!want)
        return;
    if (!s) {
        if (!(s = sentinel_start(cp, starting ? START_WAIT_MS : 0)))
            return;
        p->sentinel = s;
    }
    if (p->sentinel_reask) {
        p->sentinel_reask = 0;
        pthread_mutex_lock(&s->mu);
        s->reask = 1;
        pthread_mutex_unlock(&s->mu);
        wake(s);
    }
    char host[256], why[200], err[200];
    int port;
    pthread_mutex_lock(&s->mu);
    uint32_t seq = s->seq, err_seq = s->err_seq;
    snprintf(host, sizeof host, "%s", s->addr_host);
    port = s->addr_port;
    snprintf(why, sizeof why, "%s", s->why);
    snprintf(err, sizeof err, "%s", s->err);
    pthread_mutex_unlock(&s->mu);
    if (err_seq != s->seen_err_seq) {
        s->seen_err_seq = err_seq;
        log_warn("pool %s: Sentinel: cannot learn where %s '%s' is: %s", cp->name,
                 s->replica ? "a replica of" : "master", s->master, err);
    }
    if (seq == s->seen_seq)
        return;
    s->seen_seq = seq;
    if (strcmp(host, p->master_host) == 0 && port == p->master_port)
        return;
    char old[PB_SERVER_MAX] = "";
    if (p->master_host[0])
        snprintf(old, sizeof old, SERVER_FMT, p->master_host, p->master_port);
    char was[PB_SERVER_MAX + 8] = "";
    if (old[0])
        snprintf(was, sizeof was, " (was %s)", old);
    log_msg(old[0] ? LOG_LVL_WARN : LOG_LVL_INFO, __FILE__, __LINE__, 0, "pool %s: Sentinel: %s '%s' is at %s:%d%s: %s",
            cp->name, s->replica ? "a replica of" : "master", s->master, host, port, was, why);
    snprintf(p->master_host, sizeof p->master_host, "%s", host);
    p->master_port = port;
    if (old[0])
        failover_drain(p, old, "Sentinel moved the server");
    /* Go there now, not after a backoff earned on the old address. */
    p->backoff_ms = 0;
    p->backoff_until_ms = 0;
    pool_maybe_grow(p);
}

void sentinel_shutdown(broker *b)
{
    for (uint32_t i = 0; i < b->npools; i++) {
        sentinel_stop(b->pools[i].sentinel);
        b->pools[i].sentinel = NULL;
    }
}
