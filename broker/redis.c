/*
 * redis.c — the Redis driver.
 *
 * hiredis opens the connection (redisConnectNonBlock / redisConnectUnixNonBlock);
 * the broker then sends the session set-up — AUTH, SELECT, CLIENT SETNAME
 * poolbroker:<pool>, PING, CLIENT ID — and checks each answer with an
 * ordinary redisReader (PING answers -LOADING while the server loads its
 * dataset: DRV_NOT_READY).  After that it speaks RESP on the socket itself:
 *
 *   - requests are checked to be RESP arrays of bulk strings (what
 *     redisFormatCommandArgv produces), and counted: one reply per command,
 *     except (P|S)SUBSCRIBE (one per channel) and CLIENT REPLY OFF/SKIP
 *     (which suppress replies — tracked per connection).  Commands refused
 *     by policy (MONITOR, whose replies never end, SHUTDOWN, CLIENT PAUSE...)
 *     are replaced by an unknown command named by the refusal, so Redis
 *     answers each with an error reply in its place.
 *   - replies are counted by a small RESP2/RESP3 skipping scanner that
 *     builds no objects and buffers no payload: a 16 MB bulk string is
 *     skipped as it streams through the reply ring, never copied.
 *
 * Reset: frame_request notes what state each command leaves (the SS_R_*
 * bits of c->sstate, which with c->txn also say the lease is pinned); on
 * release, RESET followed by the same set-up commands in one write undoes
 * SELECT, MULTI, WATCH, SUBSCRIBE, CLIENT TRACKING/REPLY/SETNAME, HELLO,
 * READONLY...; CLIENT NO-EVICT/NO-TOUCH, which RESET keeps on 7.0, get their
 * own "off"; CLIENT SETINFO, which nothing undoes, retires the connection.
 *
 * Past the broker's ~600-line guide on purpose: the handshake, the framing
 * that classifies each command, the session-state table it feeds and the
 * reset built from that table read as one piece; split, each half would
 * need the other's command table.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"
#include "poolbroker.h"

#define RESP_MAX_DEPTH   64
#define RESP_MAX_COUNT   (1ll << 24)     /* elements per aggregate: hiredis allocates them up front */
#define RESP_MAX_BULK    (512ll << 20)      /* Redis's own proto-max-bulk-len default */

enum { RP_TCP = 1, RP_HANDSHAKE };

/* The session state a lease's commands leave is kept in c->sstate, as the
 * SS_R_* bits of driver.h, set as frame_request sees each command go by
 * (every byte a worker sends passes there), so the reset on release is
 * exact: nothing for a clean lease, RESET plus the set-up when RESET clears
 * what was left, explicit undo where it does not (Redis 7.0's RESET keeps
 * CLIENT NO-EVICT), retirement where nothing can undo it.  A MULTI open
 * sets c->txn to 'T' until the reply to its EXEC or DISCARD (or a RESET)
 * has arrived.  docs/protocol.md has the table. */

typedef struct rconn {
    redisContext *ctx;      /* hiredis connection (owns the fd) */
    int phase;              /* RP_TCP, RP_HANDSHAKE */
    redisReader *hs;        /* handshake replies, as objects */
    int hs_expect;          /* handshake replies still to come */
    int reply_mode;         /* 0 on, 1 off, 2 skip-next (CLIENT REPLY) */
    /* reply scanner */
    int line_type;          /* type byte of the line being read, 0 = at a line start */
    char num[24];           /* digits of a count/length line */
    int num_len;
    int num_bad;
    int saw_cr;             /* the last byte of the line so far was '\r' */
    int64_t bulk_left;      /* bytes of bulk payload (+CRLF) still to skip */
    int depth;
    int64_t left[RESP_MAX_DEPTH];   /* elements still due per open aggregate */
    int top_push;           /* the open top-level aggregate is a RESP3 push */
    int top_attr;           /* ... or an attribute (followed by the real reply) */
    int complete;           /* a top-level reply just ended: r_scan_reply returns */
    /* Pub/Sub: which top-level replies are messages (see pubsub_push) */
    int top_array;          /* the open top-level reply is a RESP2 array ... */
    int top_elem;           /* ... and this is the index of its element being read */
    int capture;            /* the bulk payload streaming by is its first element */
    int kind_len;           /* bytes in kind; -1: longer than kind holds */
    char kind[16];          /* its first element, or a top-level simple string's text */
    long long kind_num;     /* its third element when an integer, else -1 */
    uint32_t nsub;          /* channels + patterns subscribed, as the server last said */
    uint32_t nssub;         /* shard channels subscribed, as the server last said */
    int sub_sent;           /* a (P|S)(UN)SUBSCRIBE went out since the last RESET */
    /* MULTI, for c->txn: replies are numbered from the connection's start */
    uint64_t replies_framed;   /* replies the commands framed so far will produce */
    uint64_t replies_seen;     /* replies the scanner has completed */
    uint64_t multi_end;        /* the number of the reply to the EXEC/DISCARD/RESET that ends
                                  the last MULTI framed (the MULTI is open until it is seen) */
    int in_multi;              /* a MULTI framed, its EXEC/DISCARD/RESET not yet */
    char errhead[12];       /* the first bytes of an error line (r_error_head) */
    int errhead_len;
    const char *gone, *readonly; /* what the error replies of this reply said (drv_reply) */
} rconn;

static rconn *R(conn *c)
{
    return c->drv;
}

/* Append the session set-up commands to out; returns how many. */
static int append_setup(conn *c, drv_buf *out)
{
    const conf_pool *cp = c->cset;
    char *cmd = NULL;
    int n = 0, len;
    char name[64], db[16];

    if (cp->password) {
        if (cp->user) {
            const char *av[] = { "AUTH", cp->user, cp->password };
            len = redisFormatCommandArgv(&cmd, 3, av, NULL);
        } else {
            const char *av[] = { "AUTH", cp->password };
            len = redisFormatCommandArgv(&cmd, 2, av, NULL);
        }
        if (len < 0 || drv_buf_append(out, cmd, (uint32_t)len) != PB_OK)
            goto oom;
        free(cmd);
        cmd = NULL;
        n++;
    }
    if (cp->db) {
        snprintf(db, sizeof db, "%d", cp->db);
        const char *av[] = { "SELECT", db };
        len = redisFormatCommandArgv(&cmd, 2, av, NULL);
        if (len < 0 || drv_buf_append(out, cmd, (uint32_t)len) != PB_OK)
            goto oom;
        free(cmd);
        cmd = NULL;
        n++;
    }
    snprintf(name, sizeof name, "poolbroker:%s", cp->name);
    const char *av[] = { "CLIENT", "SETNAME", name };
    len = redisFormatCommandArgv(&cmd, 3, av, NULL);
    if (len < 0 || drv_buf_append(out, cmd, (uint32_t)len) != PB_OK)
        goto oom;
    free(cmd);
    n++;
    return n;
oom:
    free(cmd);
    return -1;
}

/* The handshake failed: c->error says why. */
static int r_fail(conn *c, const char *why)
{
    if (why != c->error)
        snprintf(c->error, sizeof c->error, "%s", why);
    return DRV_ERROR;
}

/* Wait for fd to be ready for events. */
static int r_poll(conn *c, uint32_t events, drv_poll *want)
{
    want->fd = c->fd;
    want->events = events;
    return DRV_AGAIN;
}

static int r_connect_start(conn *c, drv_poll *want)
{
    const conf_pool *cp = c->cset;
    rconn *r = calloc(1, sizeof *r);
    if (!r)
        return r_fail(c, "out of memory");
    c->drv = r;
    if (cp->sentinels) {
        /* Where the sentinels say the server is now (sentinel.c). */
        pool *p = c->pool;
        if (!p->master_host[0])
            return r_fail(c, "Sentinel: no address for the server known yet (see the log)");
        snprintf(c->server, sizeof c->server, SERVER_FMT, p->master_host, p->master_port);
        r->ctx = redisConnectNonBlock(p->master_host, p->master_port);
    } else if (cp->unix_socket) {
        snprintf(c->server, sizeof c->server, "%s", cp->unix_socket);
        r->ctx = redisConnectUnixNonBlock(cp->unix_socket);
    } else {
        snprintf(c->server, sizeof c->server, SERVER_FMT, cp->host ? cp->host : "127.0.0.1", cp->port ? cp->port : 6379);
        r->ctx = redisConnectNonBlock(cp->host ? cp->host : "127.0.0.1", cp->port ? cp->port : 6379);
    }
    if (!r->ctx || r->ctx->err)
        return r_fail(c, r->ctx ? r->ctx->errstr : "out of memory");
    c->fd = r->ctx->fd;
    r->phase = RP_TCP;
    return r_poll(c, POLLOUT, want);
}

int redis_error_not_ready(const char *err)
{
    return err && strncmp(err, "LOADING", 7) == 0 && (err[7] == ' ' || err[7] == 0);
}

static int r_connect_step(conn *c, int revents, drv_poll *want)
{
    rconn *r = R(c);
    if (r->phase == RP_TCP) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err || (revents & (POLLERR | POLLHUP))) {
            snprintf(c->error, sizeof c->error, "connect: %s", strerror(err ? err : ECONNREFUSED));
            return DRV_ERROR;
        }
        /* The set-up, then PING (AUTH, SELECT and CLIENT work while the
         * server loads its dataset; PING answers -LOADING: the connection
         * is not ready until it answers PONG), plus CLIENT ID to learn what
         * shmstat calls its pid. */
        drv_buf setup = { 0 };
        int n = append_setup(c, &setup);
        static const char ping_id[] = "*1\r\n$4\r\nPING\r\n*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n";
        if (n < 0 || drv_buf_append(&setup, ping_id, sizeof ping_id - 1) != PB_OK) {
            free(setup.p);
            return r_fail(c, "out of memory");
        }
        /* A fresh socket takes these few hundred bytes at once. */
        ssize_t w = send(c->fd, setup.p, setup.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        int send_err = errno;
        int short_write = w >= 0 && (uint32_t)w != setup.len;
        free(setup.p);
        if (w < 0 || short_write) {
            snprintf(c->error, sizeof c->error, "send: %s", w < 0 ? strerror(send_err) : "short write");
            return DRV_ERROR;
        }
        r->hs = redisReaderCreate();
        if (!r->hs)
            return r_fail(c, "out of memory");
        r->hs_expect = n + 2;
        r->phase = RP_HANDSHAKE;
        return r_poll(c, POLLIN, want);
    }

    /* RP_HANDSHAKE: read what is there, check each answer. */
    char buf[4096];
    ssize_t got = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
    if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
        snprintf(c->error, sizeof c->error, "set-up: %s", got == 0 ? "server closed the connection" : strerror(errno));
        return DRV_ERROR;
    }
    if (got > 0 && redisReaderFeed(r->hs, buf, (size_t)got) != REDIS_OK)
        return r_fail(c, "set-up: protocol error");
    for (;;) {
        void *rep = NULL;
        if (redisReaderGetReply(r->hs, &rep) != REDIS_OK)
            return r_fail(c, "set-up: protocol error");
        if (!rep)
            break;
        redisReply *rr = rep;
        if (rr->type == REDIS_REPLY_ERROR) {
            /* AUTH and SELECT errors name no secret; pass them on. */
            snprintf(c->error, sizeof c->error, "set-up: %s", rr->str);
            int not_ready = redis_error_not_ready(rr->str);
            freeReplyObject(rr);
            return not_ready ? DRV_NOT_READY : DRV_ERROR;
        }
        if (rr->type == REDIS_REPLY_INTEGER && r->hs_expect == 1)
            c->backend_pid = (int)rr->integer;      /* CLIENT ID */
        freeReplyObject(rr);
        if (--r->hs_expect == 0) {
            redisReaderFree(r->hs);
            r->hs = NULL;
            memset(&r->line_type, 0, sizeof *r - offsetof(rconn, line_type));
            return DRV_OK;
        }
    }
    return r_poll(c, POLLIN, want);
}

/* --------------------------------------------------------------- requests */

/* Parse "<prefix><digits>\r\n" at p[*off..len); returns the number or -1. */
static long long resp_num(const uint8_t *p, uint32_t len, uint32_t *off, char prefix)
{
    uint32_t i = *off;
    if (i >= len || p[i] != (uint8_t)prefix)
        return -1;
    i++;
    long long v = 0;
    uint32_t start = i;
    while (i < len && p[i] >= '0' && p[i] <= '9') {
        v = v * 10 + (p[i] - '0');
        if (v > RESP_MAX_BULK)
            return -1;
        i++;
    }
    if (i == start || i + 1 >= len || p[i] != '\r' || p[i + 1] != '\n')
        return -1;
    *off = i + 2;
    return v;
}

static int arg_is(const uint8_t *a, long long alen, const char *word)
{
    return (size_t)alen == strlen(word) && strncasecmp((const char *)a, word, (size_t)alen) == 0;
}

/* The SS_R_* bits one command leaves on the connection (argc arguments,
 * the first two in a0, a1). */
static unsigned command_state(long long argc, const uint8_t *a0, long long l0, const uint8_t *a1, long long l1)
{
    static const char *const session[] = {
        /* Not MULTI: an open MULTI is a transaction (c->txn 'T'), over with
         * its EXEC or DISCARD; it pins a transaction-mode lease only until then. */
        "SELECT", "WATCH", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
        "SUNSUBSCRIBE", "HELLO", "AUTH", "READONLY", "READWRITE", "ASKING", "RESET",
    };
    for (size_t i = 0; i < sizeof session / sizeof session[0]; i++)
        if (arg_is(a0, l0, session[i]))
            return SS_R_SESSION;
    if (!arg_is(a0, l0, "CLIENT"))
        return 0;
    if (argc < 2)
        return 0;                   /* an error reply, nothing else */
    /* Subcommands that read, or act on other connections, leave nothing here. */
    static const char *const harmless[] = {
        "ID", "INFO", "LIST", "GETNAME", "GETREDIR", "TRACKINGINFO", "HELP", "KILL", "UNBLOCK", "UNPAUSE",
    };
    for (size_t i = 0; i < sizeof harmless / sizeof harmless[0]; i++)
        if (arg_is(a1, l1, harmless[i]))
            return 0;
    if (arg_is(a1, l1, "NO-EVICT"))
        return SS_R_NOEVICT;
    if (arg_is(a1, l1, "NO-TOUCH"))
        return SS_R_NOTOUCH;
    if (arg_is(a1, l1, "SETINFO"))
        return SS_R_RETIRE;
    return SS_R_SESSION;              /* SETNAME, TRACKING, CACHING, REPLY, and what we do not know */
}

/* Why the broker does not let this command through (argc arguments, the
 * first two in a0, a1), or NULL when it does.  Each text names the command
 * and stays under the 128 bytes Redis quotes of an unknown command's name. */
static const char *refusal(long long argc, const uint8_t *a0, long long l0, const uint8_t *a1, long long l1)
{
    if (arg_is(a0, l0, "MONITOR"))
        return "poolbroker: MONITOR is not allowed through a pooled connection (its replies never end)";
    if (arg_is(a0, l0, "SYNC") || arg_is(a0, l0, "PSYNC"))
        return arg_is(a0, l0, "SYNC")
                   ? "poolbroker: SYNC is not allowed through a pooled connection (replication never ends)"
                   : "poolbroker: PSYNC is not allowed through a pooled connection (replication never ends)";
    if (arg_is(a0, l0, "QUIT"))
        return "poolbroker: QUIT is not allowed through a pooled connection (release the lease instead)";
    if (arg_is(a0, l0, "SHUTDOWN"))
        return "poolbroker: SHUTDOWN is not allowed through a pooled connection (it stops the server)";
    if (arg_is(a0, l0, "HELLO") && argc >= 2 && !arg_is(a1, l1, "2"))
        /* RESP3: pushes would break reply counting, and the client's
         * hiredis parser speaks RESP2 */
        return "poolbroker: HELLO with a protocol other than 2 is not allowed through a pooled connection";
    if (arg_is(a0, l0, "CLIENT") && argc >= 2 && arg_is(a1, l1, "PAUSE"))
        return "poolbroker: CLIENT PAUSE is not allowed through a pooled connection (it stops every client)";
    /* without channels, the reply count would depend on server state the
     * broker cannot see */
    if (arg_is(a0, l0, "UNSUBSCRIBE") && argc == 1)
        return "poolbroker: UNSUBSCRIBE without channels is not allowed through a pooled connection (name them)";
    if (arg_is(a0, l0, "PUNSUBSCRIBE") && argc == 1)
        return "poolbroker: PUNSUBSCRIBE without patterns is not allowed through a pooled connection (name them)";
    if (arg_is(a0, l0, "SUNSUBSCRIBE") && argc == 1)
        return "poolbroker: SUNSUBSCRIBE without channels is not allowed through a pooled connection (name them)";
    return NULL;
}

/* Append to out the command that stands in for a refused one: an unknown
 * command named by the refusal text, so that Redis itself answers
 *   -ERR unknown command 'poolbroker: MONITOR is not allowed ...', with args beginning with:
 * in the command's place: one error reply, in order within a pipeline, an
 * EXECABORT inside MULTI (as Redis treats its own refusals), nothing else
 * touched, and the lease goes on. */
static int append_refusal(drv_buf *out, const char *why)
{
    char head[32];
    int k = snprintf(head, sizeof head, "*1\r\n$%zu\r\n", strlen(why));
    if (drv_buf_append(out, head, (uint32_t)k) != PB_OK || drv_buf_append(out, why, (uint32_t)strlen(why)) != PB_OK ||
        drv_buf_append(out, "\r\n", 2) != PB_OK)
        return PB_ENOMEM;
    return PB_OK;
}

/* One command of a request: its argument count and first three arguments
 * (NULL, 0 past argc). */
typedef struct rcmd {
    long long argc;
    const uint8_t *a0, *a1, *a2;
    long long l0, l1, l2;
} rcmd;

/* Parse the command at req[*off..len) (a RESP array of bulk strings) and
 * step *off past it.  PB_OK, or PB_EPROTO when it is malformed. */
static int next_command(const uint8_t *req, uint32_t len, uint32_t *off, rcmd *cmd)
{
    memset(cmd, 0, sizeof *cmd);
    cmd->argc = resp_num(req, len, off, '*');
    if (cmd->argc < 1 || cmd->argc > 1024 * 1024)
        return PB_EPROTO;
    for (long long i = 0; i < cmd->argc; i++) {
        long long alen = resp_num(req, len, off, '$');
        if (alen < 0 || (uint64_t)alen + 2 > (uint64_t)(len - *off))
            return PB_EPROTO;
        if (req[*off + alen] != '\r' || req[*off + alen + 1] != '\n')
            return PB_EPROTO;
        if (i == 0) { cmd->a0 = req + *off; cmd->l0 = alen; }
        if (i == 1) { cmd->a1 = req + *off; cmd->l1 = alen; }
        if (i == 2) { cmd->a2 = req + *off; cmd->l2 = alen; }
        *off += (uint32_t)alen + 2;
    }
    return PB_OK;
}

/* Commands that block the connection until something happens elsewhere:
 * on a connection shared by several leases (transaction mode) they would
 * hold up everyone's replies, so they take a connection of their own. */
static int blocking(const rcmd *m)
{
    static const char *const words[] = {
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "XREAD", "XREADGROUP", "WAIT", "WAITAOF", "DEBUG",
    };
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (arg_is(m->a0, m->l0, words[i]))
            return 1;
    return 0;
}

/* driver.shareable: 1 if every command in req is plain — one reply each, no
 * session state (command_state), not refused, not MULTI/EXEC/DISCARD, no
 * CLIENT subcommand, not blocking — so that it can go out on a connection
 * between other leases' commands (txn.c pipelines them); 0 otherwise,
 * malformed included (frame_request says what is wrong with it). */
static int r_shareable(const uint8_t *req, uint32_t len)
{
    uint32_t off = 0;
    while (off < len) {
        rcmd m;
        if (next_command(req, len, &off, &m) != PB_OK)
            return 0;
        if (refusal(m.argc, m.a0, m.l0, m.a1, m.l1) || command_state(m.argc, m.a0, m.l0, m.a1, m.l1) ||
            arg_is(m.a0, m.l0, "MULTI") || arg_is(m.a0, m.l0, "EXEC") || arg_is(m.a0, m.l0, "DISCARD") ||
            arg_is(m.a0, m.l0, "CLIENT") || blocking(&m))
            return 0;
    }
    return len > 0;
}

static int r_frame_request(conn *c, drv_buf *rq, uint32_t *nreplies, const char **why)
{
    rconn *r = R(c);
    const uint8_t *req = rq->p;
    uint32_t len = rq->len, off = 0, n = 0;
    int mode = r->reply_mode;
    unsigned state = 0;
    drv_buf out = { 0 };            /* the request with refused commands replaced, once one is */
    const char *first = NULL;       /* the first refusal, for the log */
    int in_multi = r->in_multi;
    uint64_t multi_end = r->multi_end;
    *why = "not a RESP array of bulk strings";
    while (off < len) {
        uint32_t cmd_start = off;
        rcmd m;
        if (next_command(req, len, &off, &m) != PB_OK)
            goto malformed;
        long long argc = m.argc;
        const uint8_t *a0 = m.a0, *a1 = m.a1, *a2 = m.a2;
        long long l0 = m.l0, l1 = m.l1, l2 = m.l2;
        /* How many replies this command produces. */
        long long replies = 1;
        const char *no = refusal(argc, a0, l0, a1, l1);
        if (no) {
            if (!first) {
                first = no;
                if (drv_buf_append(&out, req, cmd_start) != PB_OK)
                    goto oom;
            }
            if (append_refusal(&out, no) != PB_OK)
                goto oom;
            a0 = a1 = a2 = NULL;    /* what is sent is one unknown command */
            l0 = l1 = l2 = 0;
            argc = 1;
        } else if (first && drv_buf_append(&out, req + cmd_start, off - cmd_start) != PB_OK) {
            goto oom;
        }
        if (arg_is(a0, l0, "SUBSCRIBE") || arg_is(a0, l0, "PSUBSCRIBE") || arg_is(a0, l0, "SSUBSCRIBE") ||
            arg_is(a0, l0, "UNSUBSCRIBE") || arg_is(a0, l0, "PUNSUBSCRIBE") || arg_is(a0, l0, "SUNSUBSCRIBE")) {
            replies = argc - 1;     /* one per channel (a bare UNSUBSCRIBE was refused) */
            r->sub_sent = 1;        /* the scanner follows the subscription counts */
        }
        int next_mode;
        if (arg_is(a0, l0, "CLIENT") && argc == 3 && arg_is(a1, l1, "REPLY") && arg_is(a2, l2, "ON")) {
            next_mode = 0;          /* answered, whatever the mode was */
        } else if (arg_is(a0, l0, "CLIENT") && argc == 3 && arg_is(a1, l1, "REPLY") && arg_is(a2, l2, "OFF")) {
            replies = 0;
            next_mode = 1;
        } else if (arg_is(a0, l0, "CLIENT") && argc == 3 && arg_is(a1, l1, "REPLY") && arg_is(a2, l2, "SKIP")) {
            replies = 0;
            next_mode = mode == 1 ? 1 : 2;
        } else {
            if (mode != 0)
                replies = 0;        /* replies off, or this one skipped */
            next_mode = mode == 2 ? 0 : mode;
        }
        mode = next_mode;
        n += (uint32_t)replies;
        if (a0)
            state |= command_state(argc, a0, l0, a1, l1);
        if (arg_is(a0, l0, "MULTI")) {
            in_multi = 1;
        } else if (in_multi && (arg_is(a0, l0, "EXEC") || arg_is(a0, l0, "DISCARD") || arg_is(a0, l0, "RESET"))) {
            in_multi = 0;
            multi_end = r->replies_framed + n;      /* the number of this command's reply */
        }
    }
    if (first) {
        free(rq->p);
        *rq = out;
    }
    r->reply_mode = mode;
    c->sstate |= state;
    /* The holder must release through the broker for the reset to run: its
     * library's own dirty flag is a courtesy the broker does not rely on.
     * (c->slot is NULL only under the fuzzer.) */
    if (state && c->slot)
        atomic_fetch_or(&c->slot->flags, PB_SF_RESET);
    /* Nothing owed: the reply count is exact again (Pub/Sub messages,
     * which nobody asked for, may have run it ahead). */
    if (c->expect == 0)
        r->replies_seen = r->replies_framed;
    r->replies_framed += n;
    r->in_multi = in_multi;
    r->multi_end = multi_end;
    if (in_multi || r->replies_seen < multi_end)
        c->txn = 'T';               /* pinned from the moment MULTI is sent */
    *nreplies = n;
    *why = first;
    return PB_OK;
malformed:
    free(out.p);
    return PB_EPROTO;
oom:
    free(out.p);
    *why = "out of memory";
    return PB_ENOMEM;
}

/* ------------------------------------------------------------------ replies */

/* ---------------------------------------------------------------- Pub/Sub
 * A subscribed connection receives messages nobody asked for, between and
 * after the replies: in RESP2, arrays whose first element is "message",
 * "pmessage" or "smessage".  They are not replies (expect does not count
 * them); they stream into the holder's ring like replies when it watches
 * (pb_redis_get_message pushes PB_SQ_WATCH), and into the sink once it has
 * released.  The client library applies the same rule to the same bytes
 * (client/redis.c), so both sides count the same replies.
 *
 * Whether the connection is subscribed is what the server last said: each
 * (p|s)(un)subscribe reply carries the count of subscriptions left of its
 * kind (channels and patterns together; shard channels apart), and "+RESET"
 * clears them.  While subscribed, RESP2 Redis answers nothing but those
 * commands, PING and RESET, so an array beginning with "message" is a
 * message; unsubscribed, no message can come.  Counts are taken only after
 * a (P|S)(UN)SUBSCRIBE went out (sub_sent), so an ordinary reply shaped
 * like ["subscribe", x, 5] on a connection that never subscribed is just a
 * reply. */

static int kind_is(const rconn *r, const char *w)
{
    return r->kind_len == (int)strlen(w) && strncasecmp(r->kind, w, (size_t)r->kind_len) == 0;
}

/* Is the top-level reply that just ended a message (not a reply)? */
static int pubsub_push(const rconn *r)
{
    return r->top_array && (r->nsub || r->nssub) &&
           (kind_is(r, "message") || kind_is(r, "pmessage") || kind_is(r, "smessage"));
}

/* A top-level reply ended: what it says of the subscriptions. */
static void pubsub_note(rconn *r)
{
    if (!r->top_array) {
        if (kind_is(r, "RESET"))
            r->nsub = r->nssub = 0, r->sub_sent = 0;
        return;
    }
    if (!r->sub_sent || r->kind_num < 0 || r->kind_num > UINT32_MAX)
        return;
    if (kind_is(r, "subscribe") || kind_is(r, "unsubscribe") || kind_is(r, "psubscribe") ||
        kind_is(r, "punsubscribe"))
        r->nsub = (uint32_t)r->kind_num;
    else if (kind_is(r, "ssubscribe") || kind_is(r, "sunsubscribe"))
        r->nssub = (uint32_t)r->kind_num;
}

/* Bytes p[0..k) of a bulk string go by with bulk_left (payload + CRLF) still
 * due: keep what fits of the payload when it is a top-level array's first
 * element. */
static void pubsub_capture(rconn *r, const uint8_t *p, size_t k)
{
    int64_t payload = r->bulk_left - 2;
    size_t take = payload <= 0 ? 0 : k < (size_t)payload ? k : (size_t)payload;
    if (r->kind_len < 0 || take > sizeof r->kind - 1 - (size_t)r->kind_len) {
        r->kind_len = -1;
        return;
    }
    memcpy(r->kind + r->kind_len, p, take);
    r->kind_len += (int)take;
}

/* Part p[0..k) of a top-level simple string's line ('\r' dropped). */
static void pubsub_capture_line(rconn *r, const uint8_t *p, size_t k)
{
    for (size_t i = 0; i < k && r->kind_len >= 0; i++) {
        if (p[i] == '\r')
            continue;
        if ((size_t)r->kind_len >= sizeof r->kind - 1)
            r->kind_len = -1;
        else
            r->kind[r->kind_len++] = (char)p[i];
    }
}

/* Collect the first bytes of an error line (k more at p) and, once the line
 * ends (done), say whether the server is not the one it was: a replica
 * where a master was (-READONLY) or a replica that lost its master
 * (-MASTERDOWN).  failover.c decides what that means for the pool. */
static void r_error_head(rconn *r, const uint8_t *p, size_t k, int done)
{
    for (size_t i = 0; i < k && r->errhead_len < (int)sizeof r->errhead - 1; i++)
        r->errhead[r->errhead_len++] = (char)p[i];
    if (!done)
        return;
    r->errhead[r->errhead_len] = 0;
    if (strncmp(r->errhead, "READONLY ", 9) == 0)
        r->readonly = "-READONLY reply (a replica)";
    else if (strncmp(r->errhead, "MASTERDOWN ", 11) == 0)
        r->gone = "-MASTERDOWN reply (a replica without its master)";
}

/* One complete element at the current depth; a complete top-level reply
 * sets r->complete (the scanner returns it). */
static int element_done(conn *c)
{
    rconn *r = R(c);
    for (;;) {
        if (r->depth == 0) {
            if (r->top_attr) {
                r->top_attr = 0;    /* the attribute's map; its reply follows */
            } else if (r->top_push) {
                r->top_push = 0;    /* out-of-band push: not a reply */
            } else if (pubsub_push(r)) {
                r->top_array = 0;   /* a Pub/Sub message: not a reply */
            } else {
                pubsub_note(r);
                r->complete = 1;
            }
            return PB_OK;
        }
        if (r->depth == 1)
            r->top_elem++;
        if (--r->left[r->depth - 1] > 0)
            return PB_OK;
        r->depth--;                 /* the aggregate itself is now complete */
    }
}

static int begin_aggregate(conn *c, char type, long long count)
{
    rconn *r = R(c);
    if (r->depth == 0) {
        r->top_push = type == '>';
        r->top_attr = type == '|';
        r->top_array = type == '*';
        r->top_elem = 0;
        r->kind_num = -1;
    }
    if (type == '%' || type == '|')
        count *= 2;
    if (count <= 0)                 /* empty, or null (-1) */
        return element_done(c);
    if (r->depth == RESP_MAX_DEPTH)
        return PB_EPROTO;
    r->left[r->depth++] = count;
    return PB_OK;
}

/* A header line is complete: act on it. */
static int line_done(conn *c)
{
    rconn *r = R(c);
    char t = (char)r->line_type;
    r->line_type = 0;
    switch (t) {
    case ':':
        if (r->top_array && r->depth == 1 && r->top_elem == 2 && !r->num_bad && r->num_len) {
            r->num[r->num_len] = 0;
            r->kind_num = strtoll(r->num, NULL, 10);
        }
        return element_done(c);
    case '+': case '-': case ',': case '#': case '_': case '(':
        return element_done(c);
    }
    /* counted types: the number was collected in r->num */
    if (r->num_bad || r->num_len == 0)
        return PB_EPROTO;
    r->num[r->num_len] = 0;
    char *end;
    long long v = strtoll(r->num, &end, 10);
    if (*end || v < -1 || v > RESP_MAX_COUNT)
        return PB_EPROTO;
    switch (t) {
    case '$': case '!': case '=':
        if (v < 0)                  /* null bulk */
            return element_done(c);
        if (v > RESP_MAX_BULK)
            return PB_EPROTO;
        r->bulk_left = v + 2;
        r->capture = r->top_array && r->depth == 1 && r->top_elem == 0;
        return PB_OK;
    case '*': case '%': case '~': case '>': case '|':
        return begin_aggregate(c, t, v);
    }
    return PB_EPROTO;
}

/* A reply is complete: number it, and say whether a MULTI is open after it. */
static int reply_done(conn *c, size_t *used, size_t i, drv_reply *out)
{
    rconn *r = R(c);
    out->server_gone = r->gone;
    out->server_readonly = r->readonly;
    r->gone = r->readonly = NULL;
    r->replies_seen++;
    out->txn = r->in_multi || r->replies_seen < r->multi_end ? 'T' : 'I';
    *used = i;
    return DRV_OK;
}

static int r_scan_reply(conn *c, const uint8_t *p, size_t n, size_t *used, drv_reply *out)
{
    rconn *r = R(c);
    size_t i = 0;
    out->txn = 0;
    out->errors = 0;
    out->server_gone = out->server_readonly = NULL;
    r->complete = 0;
    while (i < n) {
        if (r->bulk_left) {
            size_t k = n - i < (size_t)r->bulk_left ? n - i : (size_t)r->bulk_left;
            if (r->capture)
                pubsub_capture(r, p + i, k);
            i += k;
            r->bulk_left -= (int64_t)k;
            if (r->bulk_left == 0)
                r->capture = 0;
            if (r->bulk_left == 0 && element_done(c) != PB_OK)
                return DRV_ERROR;
            if (r->complete)
                return reply_done(c, used, i, out);
            continue;
        }
        if (r->line_type == 0) {
            uint8_t t = p[i++];
            if (!strchr("+-:$*,#_(!=%~>|", t) || t == 0)
                return DRV_ERROR;
            r->line_type = t;
            r->num_len = 0;
            r->num_bad = 0;
            if (r->depth == 0) {
                r->top_array = 0;   /* begin_aggregate sets it for an array */
                r->kind_len = 0;
            }
            r->errhead_len = 0;
            continue;
        }
        /* Inside a header line: until "\r\n" (a bare '\n' is a protocol error:
         * the client's parser would not see a line end there). */
        const uint8_t *nl = memchr(p + i, '\n', n - i);
        size_t end = nl ? (size_t)(nl - p) : n;
        if (nl && !(end > i ? p[end - 1] == '\r' : r->saw_cr))
            return DRV_ERROR;
        if (end > i)
            r->saw_cr = p[end - 1] == '\r';
        if (r->line_type == '+' && r->depth == 0)
            pubsub_capture_line(r, p + i, end - i);
        if (strchr("$*!=%~>|:", r->line_type)) {
            for (size_t k = i; k < end; k++) {
                if (p[k] == '\r')
                    continue;
                if (r->num_len >= (int)sizeof r->num - 1 || !((p[k] >= '0' && p[k] <= '9') || p[k] == '-'))
                    r->num_bad = 1;
                else
                    r->num[r->num_len++] = (char)p[k];
            }
        }
        if (r->line_type == '-')
            r_error_head(r, p + i, end - i, nl != NULL);
        i = end;
        if (nl) {
            i++;
            r->saw_cr = 0;
            if (line_done(c) != PB_OK)
                return DRV_ERROR;
            if (r->complete)
                return reply_done(c, used, i, out);
        }
    }
    *used = n;
    return DRV_AGAIN;
}

/* ------------------------------------------------------------------- reset */

/* The reset for what the lease left (c->sstate), or for a lease the client
 * library marked dirty or pinned (pb_pin: SS_PIN), which can only make the
 * reset fuller.  RESET clears the session but not CLIENT NO-EVICT on 7.0,
 * so that gets its own undo; a clean lease costs nothing. */
static int r_build_reset(conn *c, int dirty, drv_buf *out)
{
    rconn *r = R(c);
    unsigned st = c->sstate | (dirty || (c->sstate & SS_PIN) || c->txn != 'I' ? SS_R_SESSION : 0);
    c->sstate = 0;
    if (c->slot)
        atomic_fetch_and(&c->slot->flags, ~PB_SF_RESET);
    if (st & SS_R_RETIRE) {
        slog(LOG_LVL_INFO, c, "lease set CLIENT SETINFO, which RESET does not clear: connection retired");
        return -1;
    }
    int n = 0;
    if (st & SS_R_SESSION) {
        static const char reset[] = "*1\r\n$5\r\nRESET\r\n";
        if (drv_buf_append(out, reset, sizeof reset - 1) != PB_OK)
            return -1;
        r->reply_mode = 0;          /* RESET turns replies back on */
        r->in_multi = 0;            /* ... and ends a MULTI */
        r->multi_end = 0;
        c->txn = 'I';
        int k = append_setup(c, out);
        if (k < 0)
            return -1;
        n += 1 + k;
    }
    if (st & SS_R_NOEVICT) {
        static const char noevict[] = "*3\r\n$6\r\nCLIENT\r\n$8\r\nNO-EVICT\r\n$3\r\nOFF\r\n";
        if (drv_buf_append(out, noevict, sizeof noevict - 1) != PB_OK)
            return -1;
        n++;
    }
    if (st & SS_R_NOTOUCH) {
        /* An error reply on servers before 7.2, where NO-TOUCH left nothing. */
        static const char notouch[] = "*3\r\n$6\r\nCLIENT\r\n$8\r\nNO-TOUCH\r\n$3\r\nOFF\r\n";
        if (drv_buf_append(out, notouch, sizeof notouch - 1) != PB_OK)
            return -1;
        n++;
    }
    r->replies_framed += (uint64_t)n;
    return n;
}

static int r_build_ping(conn *c, drv_buf *out)
{
    static const char ping[] = "*1\r\n$4\r\nPING\r\n";
    if (drv_buf_append(out, ping, sizeof ping - 1) != PB_OK)
        return -1;
    R(c)->replies_framed++;
    return 1;
}

static void r_close(conn *c)
{
    rconn *r = R(c);
    if (r) {
        if (r->hs)
            redisReaderFree(r->hs);
        if (r->ctx)
            redisFree(r->ctx);      /* closes the socket */
        free(r);
    }
    c->drv = NULL;
    c->fd = -1;
}

const driver redis_driver = {
    .name = "redis",
    .connect_start = r_connect_start,
    .connect_step = r_connect_step,
    .frame_request = r_frame_request,
    .shareable = r_shareable,
    .share_depth = 8,
    .share_idle_first = 0,
    .scan_reply = r_scan_reply,
    .build_reset = r_build_reset,
    .build_ping = r_build_ping,
    .close = r_close,
};
