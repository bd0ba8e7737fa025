/*
 * prefork_http.c — a small prefork HTTP/1.1 server whose workers lease their
 * PostgreSQL and Redis connections from poolbroker.
 *
 * The parent opens the listening socket and forks --workers processes; each
 * worker accepts connections and serves them one request at a time.  For
 * `GET /` a worker leases a connection from pool "main" (PostgreSQL), runs
 * --query (default `SELECT count(*) FROM pg_class`), releases it, leases one
 * from pool "cache" (Redis), runs `INCR hits`, releases it, and answers with a
 * small text body.  With --direct it instead opens a libpq connection and a
 * hiredis connection per request and closes them afterwards — what prefork
 * applications without a pool do.  Keep-alive (HTTP/1.1 default, or
 * `Connection: keep-alive` on 1.0) and pipelined requests are supported, so
 * load generators such as wrk can reuse connections; a worker watches all its
 * connections with epoll (the listening socket with EPOLLEXCLUSIVE, so one
 * worker wakes per new connection) and closes idle ones after
 * --keepalive-timeout seconds.  Workers publish how many connections they
 * hold in a small shared table; one holding more than the least loaded
 * worker + 1 stops watching the listening socket until the others catch up,
 * so persistent connections spread evenly over the workers.
 *
 * SIGTERM or SIGINT: the parent stops its workers (each finishes the request
 * it is serving, closes its connections and detaches), waits for them and
 * exits 0.  A worker that dies is replaced.
 *
 *   build/examples/prefork_http --port 8080 --workers 16 --socket /run/poolbroker/poolbroker.sock
 *   build/examples/prefork_http --port 8080 --workers 16 --direct \
 *       --pg-conninfo 'host=/var/run/postgresql dbname=app' --redis-host 127.0.0.1 --redis-port 6379
 *   curl http://127.0.0.1:8080/
 */
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <poolbroker.h>

#define REQ_BUF      8192
#define MAX_CONNS    1024     /* per worker */

struct config {
    const char *listen_addr;
    int port;
    int workers;
    const char *socket;       /* poolbroker control socket; NULL: $POOLBROKER_SOCKET / default */
    const char *pg_pool;
    const char *redis_pool;
    const char *query;
    int direct;
    const char *pg_conninfo;
    const char *redis_host;
    int redis_port;
    int keepalive_timeout_s;
};

static struct config cfg = {
    .listen_addr = "127.0.0.1", .port = 8080, .workers = 4, .pg_pool = "main",
    .redis_pool = "cache", .query = "SELECT count(*) FROM pg_class", .pg_conninfo = "",
    .redis_host = "127.0.0.1", .redis_port = 6379, .keepalive_timeout_s = 15,
};

static volatile sig_atomic_t stopping;
static volatile sig_atomic_t child_exited;

static void on_stop(int sig)
{
    (void)sig;
    stopping = 1;
}

static void on_child(int sig)
{
    (void)sig;
    child_exited = 1;
}

static void set_handler(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;          /* no SA_RESTART: let accept/epoll_wait see EINTR */
    sigaction(sig, &sa, NULL);
}

static time_t mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

/* ------------------------------------------------------------ application */

struct app {
    pb_client *pb;            /* pooled mode */
};

/* Run the page's two queries; on success fill body, else fill err. */
static int app_pooled(struct app *a, char *body, size_t bodylen, char *err, size_t errlen)
{
    pb_lease *l;
    pb_result *r = NULL;
    char pgval[64] = "";
    long long hits = 0;

    int rc = pb_acquire(a->pb, cfg.pg_pool, -1, &l);
    if (rc != PB_OK) {
        snprintf(err, errlen, "acquire %s: %s", cfg.pg_pool, pb_strerror(rc));
        return -1;
    }
    rc = pb_pg_exec(l, cfg.query, &r);
    if (rc != PB_OK || pb_result_status(r) == PB_RES_ERROR) {
        snprintf(err, errlen, "query: %s", rc != PB_OK ? pb_strerror(rc) : pb_error_message(r));
        pb_result_free(r);
        pb_release(l);
        return -1;
    }
    if (pb_ntuples(r) > 0)
        snprintf(pgval, sizeof pgval, "%s", pb_getvalue(r, 0, 0));
    pb_result_free(r);
    pb_release(l);

    redisReply *rep = NULL;
    rc = pb_acquire(a->pb, cfg.redis_pool, -1, &l);
    if (rc != PB_OK) {
        snprintf(err, errlen, "acquire %s: %s", cfg.redis_pool, pb_strerror(rc));
        return -1;
    }
    rc = pb_redis_command(l, &rep, "INCR %s", "hits");
    pb_release(l);
    if (rc != PB_OK || rep->type != REDIS_REPLY_INTEGER) {
        snprintf(err, errlen, "INCR: %s",
                 rc != PB_OK ? pb_strerror(rc) : rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
        freeReplyObject(rep);
        return -1;
    }
    hits = rep->integer;
    freeReplyObject(rep);
    snprintf(body, bodylen, "result: %s\nhits: %lld\nworker: %d\n", pgval, hits, (int)getpid());
    return 0;
}

static int app_direct(char *body, size_t bodylen, char *err, size_t errlen)
{
    char pgval[64] = "";
    PGconn *pg = PQconnectdb(cfg.pg_conninfo);
    if (PQstatus(pg) != CONNECTION_OK) {
        snprintf(err, errlen, "PostgreSQL connect: %s", PQerrorMessage(pg));
        PQfinish(pg);
        return -1;
    }
    PGresult *res = PQexec(pg, cfg.query);
    if (PQresultStatus(res) != PGRES_TUPLES_OK && PQresultStatus(res) != PGRES_COMMAND_OK) {
        snprintf(err, errlen, "query: %s", PQerrorMessage(pg));
        PQclear(res);
        PQfinish(pg);
        return -1;
    }
    if (PQntuples(res) > 0)
        snprintf(pgval, sizeof pgval, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    PQfinish(pg);

    struct timeval tv = { 5, 0 };
    redisContext *rc = redisConnectWithTimeout(cfg.redis_host, cfg.redis_port, tv);
    if (rc == NULL || rc->err) {
        snprintf(err, errlen, "Redis connect: %s", rc ? rc->errstr : "out of memory");
        if (rc)
            redisFree(rc);
        return -1;
    }
    redisReply *rep = redisCommand(rc, "INCR %s", "hits");
    if (rep == NULL || rep->type != REDIS_REPLY_INTEGER) {
        snprintf(err, errlen, "INCR: %s", rep == NULL ? rc->errstr : rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
        freeReplyObject(rep);
        redisFree(rc);
        return -1;
    }
    long long hits = rep->integer;
    freeReplyObject(rep);
    redisFree(rc);
    snprintf(body, bodylen, "result: %s\nhits: %lld\nworker: %d\n", pgval, hits, (int)getpid());
    return 0;
}

/* ------------------------------------------------------------------- HTTP */

struct conn {
    int fd;
    size_t len;
    time_t last_active;
    struct conn *prev, *next;
    char buf[REQ_BUF];
};

static struct conn *conns;
static int nconns;

/* Connections held per worker, shared by all workers (-1: no worker). */
static _Atomic int *load_table;
static int my_slot;

static void publish_load(void)
{
    atomic_store_explicit(&load_table[my_slot], nconns, memory_order_relaxed);
}

/* Should this worker accept more connections now? */
static int want_accept(void)
{
    int min = nconns;
    for (int i = 0; i < cfg.workers; i++) {
        int v = atomic_load_explicit(&load_table[i], memory_order_relaxed);
        if (v >= 0 && v < min)
            min = v;
    }
    return nconns < MAX_CONNS && nconns <= min + 1;
}

static void conn_close(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    nconns--;
    publish_load();
    free(c);
}

/* Write all of buf; the socket is non-blocking, so wait for room (10 s). */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            if (poll(&p, 1, 10000) <= 0)
                return -1;
            continue;
        }
        return -1;
    }
    return 0;
}

static int respond(int fd, int status, const char *reason, int keep_alive, int head_only, const char *body)
{
    char hdr[512];
    size_t blen = strlen(body);
    int n = snprintf(hdr, sizeof hdr,
                     "HTTP/1.1 %d %s\r\nServer: prefork_http\r\nContent-Type: text/plain\r\n"
                     "Content-Length: %zu\r\nConnection: %s\r\n\r\n",
                     status, reason, blen, keep_alive ? "keep-alive" : "close");
    if (n < 0 || (size_t)n >= sizeof hdr)
        return -1;
    if (head_only || blen == 0)
        return write_all(fd, hdr, (size_t)n);
    char out[4096];
    if ((size_t)n + blen <= sizeof out) {   /* one write: one segment */
        memcpy(out, hdr, (size_t)n);
        memcpy(out + n, body, blen);
        return write_all(fd, out, (size_t)n + blen);
    }
    if (write_all(fd, hdr, (size_t)n) != 0)
        return -1;
    return write_all(fd, body, blen);
}

/* Case-insensitive search for a header token within the header block. */
static const char *find_header(const char *hdrs, const char *end, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = hdrs; p && p < end;) {
        if ((size_t)(end - p) > nl && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            p += nl + 1;
            while (p < end && (*p == ' ' || *p == '\t'))
                p++;
            return p;
        }
        p = memchr(p, '\n', (size_t)(end - p));
        if (p)
            p++;
    }
    return NULL;
}

static int header_has_token(const char *v, const char *end, const char *token)
{
    if (!v)
        return 0;
    const char *eol = memchr(v, '\r', (size_t)(end - v));
    if (!eol)
        eol = end;
    size_t tl = strlen(token);
    for (const char *p = v; p + tl <= eol; p++)
        if (strncasecmp(p, token, tl) == 0)
            return 1;
    return 0;
}

/* Serve every complete request in c->buf.  Returns 0 to keep the connection,
 * -1 to close it. */
static int serve_requests(struct app *a, struct conn *c)
{
    for (;;) {
        char *hend = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!hend) {
            if (c->len == sizeof c->buf) {
                respond(c->fd, 431, "Request Header Fields Too Large", 0, 0, "request header too large\n");
                return -1;
            }
            return 0;
        }
        size_t hlen = (size_t)(hend - c->buf) + 4;
        char *end = c->buf + hlen;

        /* Request line: METHOD SP TARGET SP HTTP/1.x */
        char method[16], target[256], version[16];
        char *eol = memchr(c->buf, '\r', hlen);
        size_t rl = (size_t)(eol - c->buf);
        char line[300];
        if (rl >= sizeof line) {
            respond(c->fd, 414, "URI Too Long", 0, 0, "request line too long\n");
            return -1;
        }
        memcpy(line, c->buf, rl);
        line[rl] = '\0';
        if (sscanf(line, "%15s %255s %15s", method, target, version) != 3 || strncmp(version, "HTTP/1.", 7) != 0) {
            respond(c->fd, 400, "Bad Request", 0, 0, "bad request\n");
            return -1;
        }
        const char *hdrs = eol + 2;
        int http11 = strcmp(version, "HTTP/1.0") != 0;
        const char *connv = find_header(hdrs, end, "Connection");
        int keep_alive = http11 ? !header_has_token(connv, end, "close") : header_has_token(connv, end, "keep-alive");
        if (stopping)
            keep_alive = 0;

        /* A body (we need none) must be skipped to stay in sync. */
        size_t body_len = 0;
        const char *clv = find_header(hdrs, end, "Content-Length");
        if (clv)
            body_len = strtoul(clv, NULL, 10);
        if (find_header(hdrs, end, "Transfer-Encoding")) {
            respond(c->fd, 501, "Not Implemented", 0, 0, "chunked request bodies are not supported\n");
            return -1;
        }
        if (body_len > sizeof c->buf - hlen) {
            respond(c->fd, 413, "Content Too Large", 0, 0, "request body too large\n");
            return -1;
        }
        if (c->len < hlen + body_len)
            return 0;                     /* wait for the rest of the body */

        int head = strcmp(method, "HEAD") == 0;
        int rc;
        if (strcmp(method, "GET") != 0 && !head) {
            rc = respond(c->fd, 405, "Method Not Allowed", keep_alive, 0, "only GET and HEAD\n");
        } else if (strcmp(target, "/") != 0) {
            rc = respond(c->fd, 404, "Not Found", keep_alive, head, "not found\n");
        } else {
            char body[512], err[400];
            int ok = cfg.direct ? app_direct(body, sizeof body, err, sizeof err)
                                : app_pooled(a, body, sizeof body, err, sizeof err);
            if (ok == 0) {
                rc = respond(c->fd, 200, "OK", keep_alive, head, body);
            } else {
                size_t el = strlen(err);
                if (el + 1 < sizeof err && (el == 0 || err[el - 1] != '\n'))
                    strcat(err, "\n");
                rc = respond(c->fd, 503, "Service Unavailable", keep_alive, head, err);
            }
        }
        if (rc != 0 || !keep_alive)
            return -1;
        size_t used = hlen + body_len;
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
    }
}

static int conn_readable(struct app *a, struct conn *c)
{
    for (;;) {
        if (c->len == sizeof c->buf)
            return serve_requests(a, c);
        ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
        if (n > 0) {
            c->len += (size_t)n;
            c->last_active = mono_s();
            if (serve_requests(a, c) != 0)
                return -1;
            continue;
        }
        if (n == 0)
            return -1;                    /* peer closed */
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -1;
    }
}

static void accept_one(int ep, int lfd)
{
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;                           /* EAGAIN: another worker took it */
    if (nconns >= MAX_CONNS) {
        close(fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = malloc(sizeof *c);
    if (!c) {
        close(fd);
        return;
    }
    c->fd = fd;
    c->len = 0;
    c->last_active = mono_s();
    c->prev = NULL;
    c->next = conns;
    if (conns)
        conns->prev = c;
    conns = c;
    nconns++;
    publish_load();
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0)
        conn_close(ep, c);
}

static int worker_main(int lfd, int slot)
{
    struct app a = { 0 };
    my_slot = slot;
    publish_load();
    set_handler(SIGTERM, on_stop);
    set_handler(SIGINT, on_stop);
    signal(SIGCHLD, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);

    if (!cfg.direct) {
        int rc = pb_connect(cfg.socket, &a.pb);
        if (rc != PB_OK) {
            fprintf(stderr, "prefork_http[%d]: pb_connect: %s\n", (int)getpid(), pb_strerror(rc));
            return 2;
        }
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("prefork_http: epoll_create1");
        return 1;
    }
    /* data.ptr NULL marks the listening socket. */
    int listening = 0;
    time_t last_sweep = mono_s();
    struct epoll_event evs[64];
    while (!stopping) {
        int want = want_accept();
        if (want != listening) {
            struct epoll_event lev = { .events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = NULL };
            if (epoll_ctl(ep, want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, lfd, &lev) != 0) {
                perror("prefork_http: epoll_ctl(listen)");
                return 1;
            }
            listening = want;
        }
        /* Not listening: look again soon, the others may have caught up. */
        int n = epoll_wait(ep, evs, 64, listening ? 1000 : 5);
        if (n < 0 && errno != EINTR) {
            perror("prefork_http: epoll_wait");
            break;
        }
        for (int i = 0; i < n && !stopping; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                if (listening)
                    accept_one(ep, lfd);
                continue;
            }
            if (conn_readable(&a, c) != 0)
                conn_close(ep, c);
        }
        time_t now = mono_s();
        if (now != last_sweep) {          /* close idle keep-alive connections */
            last_sweep = now;
            for (struct conn *c = conns, *next; c; c = next) {
                next = c->next;
                if (now - c->last_active >= cfg.keepalive_timeout_s)
                    conn_close(ep, c);
            }
        }
    }
    while (conns)
        conn_close(ep, conns);
    close(ep);
    close(lfd);
    pb_disconnect(a.pb);
    return 0;
}

/* ----------------------------------------------------------------- parent */

static sigset_t parent_mask;     /* the mask to restore in workers */

static pid_t spawn_worker(int lfd, int slot)
{
    pid_t p = fork();
    if (p == 0) {
        sigprocmask(SIG_SETMASK, &parent_mask, NULL);
        _exit(worker_main(lfd, slot));
    }
    if (p < 0)
        perror("prefork_http: fork");
    return p;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: prefork_http [--port N] [--listen ADDR] [--workers N] [--socket PATH]\n"
            "                    [--pg-pool NAME] [--redis-pool NAME] [--query SQL]\n"
            "                    [--direct --pg-conninfo STR --redis-host H --redis-port N]\n"
            "                    [--keepalive-timeout S]\n"
            "  pooled (default): lease from poolbroker pools main/cache via --socket\n"
            "                    (default $POOLBROKER_SOCKET, else the library default)\n"
            "  --direct:         connect to PostgreSQL and Redis per request\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },        { "listen", required_argument, NULL, 'l' },
        { "workers", required_argument, NULL, 'w' },     { "socket", required_argument, NULL, 's' },
        { "pg-pool", required_argument, NULL, 'P' },     { "redis-pool", required_argument, NULL, 'R' },
        { "query", required_argument, NULL, 'q' },       { "direct", no_argument, NULL, 'd' },
        { "pg-conninfo", required_argument, NULL, 'c' }, { "redis-host", required_argument, NULL, 'H' },
        { "redis-port", required_argument, NULL, 'r' },  { "keepalive-timeout", required_argument, NULL, 'k' },
        { "help", no_argument, NULL, 'h' },              { NULL, 0, NULL, 0 },
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (ch) {
        case 'p': cfg.port = atoi(optarg); break;
        case 'l': cfg.listen_addr = optarg; break;
        case 'w': cfg.workers = atoi(optarg); break;
        case 's': cfg.socket = optarg; break;
        case 'P': cfg.pg_pool = optarg; break;
        case 'R': cfg.redis_pool = optarg; break;
        case 'q': cfg.query = optarg; break;
        case 'd': cfg.direct = 1; break;
        case 'c': cfg.pg_conninfo = optarg; break;
        case 'H': cfg.redis_host = optarg; break;
        case 'r': cfg.redis_port = atoi(optarg); break;
        case 'k': cfg.keepalive_timeout_s = atoi(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || cfg.port < 0 || cfg.port > 65535 || cfg.workers < 1 || cfg.workers > 4096 ||
        cfg.keepalive_timeout_s < 1) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    /* Fail fast, before forking, when the broker is not there. */
    if (!cfg.direct) {
        pb_client *probe;
        int rc = pb_connect(cfg.socket, &probe);
        if (rc != PB_OK) {
            fprintf(stderr, "prefork_http: pb_connect(%s): %s\n", cfg.socket ? cfg.socket : "default",
                    pb_strerror(rc));
            return 1;
        }
        pb_disconnect(probe);
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        perror("prefork_http: socket");
        return 1;
    }
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)cfg.port) };
    if (inet_pton(AF_INET, cfg.listen_addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "prefork_http: bad --listen address %s\n", cfg.listen_addr);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(lfd, 1024) != 0) {
        fprintf(stderr, "prefork_http: cannot listen on %s:%d: %s\n", cfg.listen_addr, cfg.port, strerror(errno));
        return 1;
    }

    /* Signals arrive only inside sigsuspend(), so no wakeup is lost. */
    sigset_t block;
    sigset_t *old = &parent_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGCHLD);
    sigprocmask(SIG_BLOCK, &block, old);
    set_handler(SIGTERM, on_stop);
    set_handler(SIGINT, on_stop);
    set_handler(SIGCHLD, on_child);

    load_table = mmap(NULL, (size_t)cfg.workers * sizeof *load_table, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (load_table == MAP_FAILED) {
        perror("prefork_http: mmap");
        return 1;
    }
    for (int i = 0; i < cfg.workers; i++)
        atomic_store(&load_table[i], -1);
    pid_t *pids = calloc((size_t)cfg.workers, sizeof *pids);
    time_t *started = calloc((size_t)cfg.workers, sizeof *started);
    if (!pids || !started)
        return 1;
    for (int i = 0; i < cfg.workers; i++) {
        pid_t p = spawn_worker(lfd, i);
        if (p < 0) {
            stopping = 1;
            break;
        }
        pids[i] = p;
        started[i] = mono_s();
    }
    fprintf(stderr, "prefork_http: listening on %s:%d, %d workers, %s\n", cfg.listen_addr, cfg.port,
            cfg.workers, cfg.direct ? "direct (connect per request)" : "poolbroker");

    int status = 0;
    while (!stopping) {
        sigsuspend(old);
        if (!child_exited)
            continue;
        child_exited = 0;
        int st;
        pid_t p;
        while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
            for (int i = 0; i < cfg.workers; i++) {
                if (pids[i] != p)
                    continue;
                pids[i] = 0;
                atomic_store(&load_table[i], -1);
                if (stopping)
                    break;
                if (WIFEXITED(st) && WEXITSTATUS(st) == 2) {
                    fprintf(stderr, "prefork_http: worker %d could not attach; stopping\n", (int)p);
                    stopping = 1;
                    status = 1;
                    break;
                }
                fprintf(stderr, "prefork_http: worker %d died (%s %d); replacing it\n", (int)p,
                        WIFSIGNALED(st) ? "signal" : "status", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
                if (mono_s() - started[i] < 1)
                    sleep(1);             /* do not fork-loop on a crashing worker */
                pid_t np = spawn_worker(lfd, i);
                if (np > 0) {
                    pids[i] = np;
                    started[i] = mono_s();
                }
                break;
            }
        }
    }

    /* Shut down: TERM the workers, wait up to 10 s, then KILL. */
    close(lfd);
    for (int i = 0; i < cfg.workers; i++)
        if (pids[i] > 0)
            kill(pids[i], SIGTERM);
    sigprocmask(SIG_SETMASK, old, NULL);
    time_t deadline = mono_s() + 10;
    int left;
    do {
        left = 0;
        int st;
        pid_t p;
        while ((p = waitpid(-1, &st, WNOHANG)) > 0)
            for (int i = 0; i < cfg.workers; i++)
                if (pids[i] == p)
                    pids[i] = 0;
        for (int i = 0; i < cfg.workers; i++)
            if (pids[i] > 0)
                left++;
        if (left && mono_s() >= deadline) {
            for (int i = 0; i < cfg.workers; i++)
                if (pids[i] > 0)
                    kill(pids[i], SIGKILL);
            deadline = mono_s() + 3600;
        }
        if (left)
            usleep(10000);
    } while (left);
    fprintf(stderr, "prefork_http: stopped\n");
    free(pids);
    free(started);
    return status;
}
