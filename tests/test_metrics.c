/*
 * test_metrics.c — the broker's metrics_listen endpoint on a real broker and
 * a real PostgreSQL: GET /metrics is valid Prometheus text with the pool's
 * gauges, counters and histograms (every family shmstat --prometheus prints,
 * plus poolbroker_uptime_seconds); GET /health is 200 "ok" while the pool is
 * healthy and 503 naming a pool that is down; unknown paths 404, other
 * methods 405, malformed requests 400 (or a closed connection) and never a
 * dead broker; more connections than the limit are refused, then served
 * again; an address that cannot be bound stops the broker at startup; an
 * IPv6 address works.  The HTTP client is hand-written on purpose: the test
 * sends exactly the bytes it means to, broken ones included.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "poolbroker.h"

#define HTTP_TIMEOUT_MS 10000       /* bound on one exchange (the server's idle timeout is 10 s) */
#define RESP_MAX        (256 * 1024)

#define PG_POOL "[pool main]\ntype = postgres\n" \
                "conninfo = host=@PGHOST@ port=@PGPORT@ user=postgres dbname=postgres sslmode=disable\n" \
                "min_size = 1\nmax_size = 4\n"
/* Nothing listens on port 1: every connect is refused, so the pool is down
 * after its first attempt. */
#define DEAD_POOL "[pool dead]\ntype = postgres\n" \
                  "conninfo = host=127.0.0.1 port=1 user=postgres dbname=postgres sslmode=disable " \
                  "connect_timeout=1\nmin_size = 1\nmax_size = 2\n"

static th_env env;
static int port;                    /* metrics port of the running broker */
static int family = AF_INET;        /* and its address family */
static char resp[RESP_MAX];

static int group_setup(void **state)
{
    (void)state;
    return th_setup(&env, 1, 0);
}

static int group_teardown(void **state)
{
    (void)state;
    return th_teardown(&env);
}

/* Write the whole config (metrics on listen, then pools) and start a fresh
 * broker on it; a running one is stopped first and must exit 0.  Returns
 * th_broker_start_raw's result. */
static int start_broker(const char *listen, const char *pools)
{
    if (env.broker_pid > 0) {
        int st = th_broker_stop(&env, SIGTERM);
        assert_true(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    const char *io = getenv("PB_IO_BACKEND");
    char conf[4096];
    snprintf(conf, sizeof conf,
             "[broker]\nsocket = @SOCK@\nshm_name = @SHM@\nlog_level = debug\nmetrics_listen = %s\n%s%s%s\n%s",
             listen, io && *io ? "io_backend = " : "", io && *io ? io : "", io && *io ? "\n" : "", pools);
    return th_broker_start_raw(&env, conf);
}

/* Start a broker with metrics on 127.0.0.1 at a free port. */
static void start_broker_v4(const char *pools)
{
    port = th_free_port();
    family = AF_INET;
    assert_true(port > 0);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    assert_int_equal(start_broker(listen, pools), 0);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int connect_metrics(void)
{
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t len;
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        a->sin6_addr = in6addr_loopback;
        len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof *a;
    }
    if (connect(fd, (struct sockaddr *)&ss, len) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/*
 * Send len bytes of req and read what comes back until the server closes
 * (bounded by HTTP_TIMEOUT_MS) into resp (NUL-terminated).  Returns the
 * status code of the answer, 0 when the server closed without answering, or
 * -1 when the connection failed or the exchange timed out.  *body, when not
 * NULL, is set to the body (or to "" without one).
 */
static int http_raw(const char *req, size_t len, const char **body)
{
    resp[0] = '\0';
    if (body)
        *body = "";
    int fd = connect_metrics();
    if (fd < 0) {
        print_message("connect to the metrics port %d: %s\n", port, strerror(errno));
        return -1;
    }
    for (size_t off = 0; off < len;) {
        ssize_t w = send(fd, req + off, len - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;                  /* the server may close early on garbage */
        off += (size_t)w;
    }
    size_t got = 0;
    int64_t deadline = mono_ms() + HTTP_TIMEOUT_MS;
    int rc = -1;
    for (;;) {
        int64_t left = deadline - mono_ms();
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        if (left <= 0 || poll(&pfd, 1, (int)left) <= 0) {
            print_message("HTTP exchange timed out after %d ms\n", HTTP_TIMEOUT_MS);
            break;
        }
        ssize_t r = recv(fd, resp + got, sizeof resp - 1 - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0 || (r < 0 && errno == ECONNRESET)) {
            rc = 0;                 /* closed (reset, when it left our bytes unread) */
            break;
        }
        if (r < 0)
            break;
        got += (size_t)r;
        if (got == sizeof resp - 1)
            break;
    }
    close(fd);
    resp[got] = '\0';
    if (rc < 0 || got == 0)
        return rc;
    int status;
    if (sscanf(resp, "HTTP/1.%*d %d", &status) != 1)
        return -1;
    char *end = strstr(resp, "\r\n\r\n");
    if (body && end)
        *body = end + 4;
    return status;
}

/* METHOD path HTTP/1.1 with Host and Connection: close. */
static int http(const char *method, const char *path, const char **body)
{
    char req[512];
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", method, path);
    return http_raw(req, (size_t)n, body);
}

/* The value of response header name (case-insensitive), copied into out. */
static const char *header(const char *name, char *out, size_t n)
{
    size_t nl = strlen(name);
    const char *end = strstr(resp, "\r\n\r\n");
    for (const char *p = strstr(resp, "\r\n"); p && (!end || p < end); p = strstr(p + 2, "\r\n")) {
        if (strncasecmp(p + 2, name, nl) == 0 && p[2 + nl] == ':') {
            const char *v = p + 3 + nl;
            while (*v == ' ')
                v++;
            size_t vl = strcspn(v, "\r\n");
            snprintf(out, n, "%.*s", (int)vl, v);
            return out;
        }
    }
    out[0] = '\0';
    return NULL;
}

/* ---------------------------------------------------------------- Prometheus text */

static const char *types[256];      /* metric families with a # TYPE line */
static const char *type_of[256];
static int ntypes;

static const char *family_type(const char *name, size_t len)
{
    for (int i = 0; i < ntypes; i++)
        if (strlen(types[i]) == len && strncmp(types[i], name, len) == 0)
            return type_of[i];
    return NULL;
}

static int is_name_char(char c, int first)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' || (!first && c >= '0' && c <= '9');
}

/*
 * Check text against the Prometheus text exposition format 0.0.4: every
 * line "# HELP name text", "# TYPE name type" or "name{label="value",...}
 * value"; a family's TYPE comes once and before its samples; every sample
 * belongs to a declared family (histogram samples through _bucket, _sum,
 * _count); no series twice; the text ends with a newline.  Returns NULL, or
 * what is wrong (a static buffer).  text is modified (lines split).
 */
static const char *check_prometheus(char *text)
{
    static char why[512];
    static char *series[4096];
    int nseries = 0;
    for (int i = 0; i < ntypes; i++) {
        free((char *)types[i]);
        free((char *)type_of[i]);
    }
    ntypes = 0;
    size_t tl = strlen(text);
    if (tl == 0 || text[tl - 1] != '\n')
        return "empty, or no newline at the end";
    int lineno = 0;
    for (char *line = text, *next; *line; line = next) {
        char *nl = strchr(line, '\n');
        *nl = '\0';
        next = nl + 1;
        lineno++;
        char copy[512];
        snprintf(copy, sizeof copy, "%s", line);
#define BAD(msg) do { snprintf(why, sizeof why, "line %d: %s: %.300s", lineno, (msg), copy); return why; } while (0)
        if (*line == '\0')
            continue;
        if (*line == '#') {
            char kw[8], name[200], rest[200];
            if (sscanf(line, "# %7s %199s %199s", kw, name, rest) < 2)
                continue;           /* a plain comment */
            if (strcmp(kw, "TYPE") == 0) {
                if (strcmp(rest, "counter") && strcmp(rest, "gauge") && strcmp(rest, "histogram") &&
                    strcmp(rest, "summary") && strcmp(rest, "untyped"))
                    BAD("unknown type");
                if (family_type(name, strlen(name)))
                    BAD("second TYPE line for the family");
                if (ntypes == 256)
                    BAD("too many families for this checker");
                types[ntypes] = strdup(name);
                type_of[ntypes++] = strdup(rest);
            }
            continue;
        }
        char *p = line;
        if (!is_name_char(*p, 1))
            BAD("sample does not start with a metric name");
        while (is_name_char(*p, 0))
            p++;
        size_t nlen = (size_t)(p - line);
        const char *t = family_type(line, nlen);
        if (!t) {
            static const char *const suffixes[] = { "_bucket", "_sum", "_count" };
            for (int i = 0; i < 3 && !t; i++) {
                size_t sl = strlen(suffixes[i]);
                if (nlen > sl && strncmp(line + nlen - sl, suffixes[i], sl) == 0) {
                    t = family_type(line, nlen - sl);
                    if (t && strcmp(t, "histogram") && strcmp(t, "summary"))
                        t = NULL;
                }
            }
        }
        if (!t)
            BAD("sample of a family with no TYPE line before it");
        if (*p == '{') {
            p++;
            while (*p != '}') {
                if (!is_name_char(*p, 1))
                    BAD("bad label name");
                while (is_name_char(*p, 0))
                    p++;
                if (p[0] != '=' || p[1] != '"')
                    BAD("label without =\"value\"");
                p += 2;
                while (*p && *p != '"') {
                    if (*p == '\\') {
                        if (p[1] != '\\' && p[1] != '"' && p[1] != 'n')
                            BAD("bad escape in a label value");
                        p++;
                    }
                    p++;
                }
                if (*p != '"')
                    BAD("unterminated label value");
                p++;
                if (*p == ',')
                    p++;
                else if (*p != '}')
                    BAD("labels not separated by ','");
            }
            p++;
        }
        if (*p != ' ')
            BAD("no space before the value");
        *p++ = '\0';
        for (int i = 0; i < nseries; i++)
            if (strcmp(series[i], line) == 0)
                BAD("series appears twice");
        if (nseries < 4096)
            series[nseries++] = line;
        char *end;
        if (strcmp(p, "+Inf") && strcmp(p, "-Inf") && strcmp(p, "NaN")) {
            errno = 0;
            strtod(p, &end);
            if (end == p || errno || (*end != '\0' && *end != ' '))
                BAD("value is not a number");
        }
#undef BAD
    }
    return NULL;
}

/* The value of the series "name{labels}" (exactly as printed) in text, or -1. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; (p = strstr(p, series)) != NULL; p += n)
        if ((p == text || p[-1] == '\n') && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    return -1;
}

/* ---------------------------------------------------------------- tests */

/* /metrics after a lease: valid Prometheus text with the pool's figures and
 * every family shmstat prints; /health: 200 ok. */
static void test_metrics_and_health(void **state)
{
    (void)state;
    start_broker_v4(PG_POOL);

    pb_client *c;
    pb_lease *l;
    pb_result *r;
    assert_int_equal(pb_connect(env.sock_path, &c), PB_OK);
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT 1", &r), PB_OK);
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);

    const char *body;
    char h[256];
    assert_int_equal(http("GET", "/metrics", &body), 200);
    assert_non_null(header("Content-Type", h, sizeof h));
    assert_non_null(strstr(h, "text/plain; version=0.0.4"));
    static char metrics[RESP_MAX], checked[RESP_MAX];
    snprintf(metrics, sizeof metrics, "%s", body);
    snprintf(checked, sizeof checked, "%s", body);
    const char *bad = check_prometheus(checked);
    if (bad)
        fail_msg("/metrics is not Prometheus text: %s", bad);

    static const char *const gauges[] = {
        "poolbroker_pool_size{pool=\"main\"}", "poolbroker_pool_free{pool=\"main\"}",
        "poolbroker_pool_leased{pool=\"main\"}", "poolbroker_pool_waiting{pool=\"main\"}",
        "poolbroker_pool_broken{pool=\"main\"}", "poolbroker_pool_timeouts_total{pool=\"main\"}",
        "poolbroker_pool_acquire_wait_seconds_bucket{pool=\"main\",le=\"+Inf\"}",
        "poolbroker_pool_acquire_wait_seconds_sum{pool=\"main\"}", "poolbroker_broker_clients_attached",
        "poolbroker_uptime_seconds", "poolbroker_broker_up", "poolbroker_segment_repairs_total",
    };
    for (size_t i = 0; i < sizeof gauges / sizeof gauges[0]; i++)
        if (sample(metrics, gauges[i]) < 0)
            fail_msg("/metrics has no sample %s", gauges[i]);
    assert_true(sample(metrics, "poolbroker_pool_size{pool=\"main\"}") >= 1);
    assert_true(sample(metrics, "poolbroker_pool_acquires_total{pool=\"main\"}") >= 1);
    assert_true(sample(metrics, "poolbroker_pool_command_latency_seconds_count{pool=\"main\"}") >= 1);
    assert_true(sample(metrics, "poolbroker_broker_clients_attached") >= 1);
    assert_true(sample(metrics, "poolbroker_broker_up") == 1);
    /* Nobody scribbled: nothing to repair. */
    assert_true(sample(metrics, "poolbroker_segment_repairs_total") == 0);
    const char *io = getenv("PB_IO_BACKEND");
    if (io && *io) {
        char info[128];
        snprintf(info, sizeof info, "poolbroker_broker_info{state=\"running\",io_backend=\"%s\"}", io);
        assert_true(sample(metrics, info) == 1);
    }
    pb_disconnect(c);

    /* Every family shmstat --prometheus prints is there too. */
    const char *build = getenv("PB_BUILD") ? getenv("PB_BUILD") : "build";
    char shmstat[512];
    static char prom[RESP_MAX];
    snprintf(shmstat, sizeof shmstat, "%s/shmstat", build);
    char *argv[] = { shmstat, "-s", env.shm_name, "--prometheus", NULL };
    assert_int_equal(th_run(argv, prom, sizeof prom, 5000), 0);
    int families = 0;
    for (char *p = prom; (p = strstr(p, "# TYPE ")) != NULL; p++, families++) {
        char line[256];
        snprintf(line, sizeof line, "%.*s", (int)strcspn(p, "\n"), p);
        if (!strstr(metrics, line))
            fail_msg("/metrics lacks \"%s\" that shmstat --prometheus has", line);
    }
    assert_true(families >= 20);

    assert_int_equal(http("GET", "/health", &body), 200);
    assert_non_null(header("Content-Type", h, sizeof h));
    assert_string_equal(h, "application/json");
    assert_non_null(strstr(body, "\"status\": \"ok\""));
    assert_non_null(strstr(body, "{\"name\": \"main\", \"type\": \"postgres\", \"health\": \"healthy\""));
    assert_non_null(strstr(body, "\"reasons\": []"));
    /* HEAD: the same answer without a body. */
    assert_int_equal(http("HEAD", "/health", &body), 200);
    assert_string_equal(body, "");
}

/* Wrong paths, methods and bytes get answers (or a closed connection), and
 * the broker goes on serving both HTTP and its workers. */
static void test_bad_requests(void **state)
{
    (void)state;
    start_broker_v4(PG_POOL);
    const char *body;
    char h[64];

    assert_int_equal(http("GET", "/nope", NULL), 404);
    assert_int_equal(http("GET", "/", NULL), 404);
    assert_int_equal(http("GET", "/metrics/../health", NULL), 404);
    assert_int_equal(http("DELETE", "/metrics", NULL), 405);
    static const char post[] = "POST /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                               "Content-Length: 5\r\n\r\nhello";
    assert_int_equal(http_raw(post, sizeof post - 1, NULL), 405);
    assert_non_null(header("Allow", h, sizeof h));
    assert_non_null(strstr(h, "GET"));

    /* A header line without a colon, and HTTP/1.1 without Host: 400. */
    static const char badhdr[] = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n";
    assert_int_equal(http_raw(badhdr, sizeof badhdr - 1, NULL), 400);
    static const char nohost[] = "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n";
    assert_int_equal(http_raw(nohost, sizeof nohost - 1, NULL), 400);
    /* A request line that is no request line: libmicrohttpd 0.9.75 closes the
     * connection without an answer; newer versions answer 400.  Either is
     * fine; what matters is what follows. */
    static const char garbage[] = "GARBAGE\r\n\r\n";
    int st = http_raw(garbage, sizeof garbage - 1, NULL);
    print_message("\"GARBAGE\\r\\n\\r\\n\": %s (%d)\n", st == 0 ? "closed without an answer" : "answered", st);
    assert_true(st == 400 || st == 0);
    static const char version[] = "GET /metrics HTTP/7.0\r\nHost: localhost\r\n\r\n";
    st = http_raw(version, sizeof version - 1, NULL);
    assert_true(st == 505 || st == 400);
    /* Binary junk, a huge header, and a client that goes away mid-request. */
    char junk[4096];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (char)(i * 7919 % 251);
    int fd = connect_metrics();
    assert_true(fd >= 0);
    assert_true(send(fd, junk, sizeof junk, MSG_NOSIGNAL) > 0);
    close(fd);
    static char big[64 * 1024];
    int n = snprintf(big, sizeof big, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Big: ");
    memset(big + n, 'x', sizeof big - (size_t)n - 5);
    memcpy(big + sizeof big - 5, "\r\n\r\n", 5);
    st = http_raw(big, sizeof big - 1, NULL);
    print_message("a 64 KiB header: %d\n", st);
    assert_true(st == 431 || st == 414 || st == 413 || st == 400 || st == 0);
    fd = connect_metrics();
    assert_true(fd >= 0);
    assert_true(send(fd, "GET /metr", 9, MSG_NOSIGNAL) == 9);
    close(fd);

    /* More idle connections than the limit (64): some are refused, none
     * breaks anything, and once they are gone requests are served again. */
    int fds[80];
    for (int i = 0; i < 80; i++)
        fds[i] = connect_metrics();
    for (int i = 0; i < 80; i++)
        if (fds[i] >= 0)
            close(fds[i]);

    assert_int_equal(http("GET", "/health", &body), 200);
    assert_int_equal(http("GET", "/metrics", &body), 200);
    assert_non_null(strstr(body, "poolbroker_pool_size{pool=\"main\"}"));
    assert_true(kill(env.broker_pid, 0) == 0);
    pb_client *c;
    pb_lease *l;
    pb_result *r;
    assert_int_equal(pb_connect(env.sock_path, &c), PB_OK);
    assert_int_equal(pb_acquire(c, "main", 5000, &l), PB_OK);
    assert_int_equal(pb_pg_exec(l, "SELECT 'still serving'", &r), PB_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "still serving");
    pb_result_free(r);
    assert_int_equal(pb_release(l), PB_OK);
    pb_disconnect(c);
}

/* A pool whose backend refuses every connection: /health 503 naming it
 * (down, with its last error), the healthy pool still listed as healthy;
 * /metrics still 200 and says so too. */
static void test_unhealthy_pool(void **state)
{
    (void)state;
    start_broker_v4(PG_POOL "\n" DEAD_POOL);
    const char *body = "";
    int st = -1;
    for (int i = 0; i < 100 && st != 503; i++) {   /* the pool is down after its first connect fails */
        st = http("GET", "/health", &body);
        if (st != 503)
            usleep(100000);
    }
    if (st != 503)
        fail_msg("/health: %d, not 503: %s", st, resp);
    print_message("/health with a dead pool: %s", body);
    assert_non_null(strstr(body, "\"status\": \"degraded\""));
    assert_non_null(strstr(body, "{\"name\": \"dead\", \"type\": \"postgres\", \"health\": \"down\""));
    assert_non_null(strstr(body, "{\"name\": \"main\", \"type\": \"postgres\", \"health\": \"healthy\""));
    assert_non_null(strstr(body, "\"pool 'dead' is down"));
    assert_null(strstr(body, "\"pool 'main'"));

    assert_int_equal(http("GET", "/metrics", &body), 200);
    assert_true(sample(body, "poolbroker_pool_info{pool=\"dead\",type=\"postgres\",health=\"down\"}") == 1);
    assert_true(sample(body, "poolbroker_pool_connect_failures_total{pool=\"dead\"}") >= 1);
    assert_true(sample(body, "poolbroker_pool_info{pool=\"main\",type=\"postgres\",health=\"healthy\"}") == 1);
}

/* metrics_listen on an address in use: the broker refuses to start, exit 1,
 * and says why. */
static void test_bind_failure(void **state)
{
    (void)state;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof sa;
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(fd, 1), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    char listen_at[64];
    snprintf(listen_at, sizeof listen_at, "127.0.0.1:%d", ntohs(sa.sin_port));
    assert_int_equal(start_broker(listen_at, PG_POOL), -1);
    close(fd);
    assert_true(WIFEXITED(env.broker_status));
    assert_int_equal(WEXITSTATUS(env.broker_status), 1);
    assert_true(th_count_lines(env.broker_log, "metrics_listen: cannot serve on") >= 1);
}

/* metrics_listen = [::1]:PORT, where the machine has IPv6. */
static void test_ipv6(void **state)
{
    (void)state;
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in6 sa = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    socklen_t sl = sizeof sa;
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        if (fd >= 0)
            close(fd);
        print_message("no IPv6 loopback here: skipped\n");
        skip();
    }
    port = ntohs(sa.sin6_port);
    close(fd);
    family = AF_INET6;
    char listen_at[64];
    snprintf(listen_at, sizeof listen_at, "[::1]:%d", port);
    assert_int_equal(start_broker(listen_at, PG_POOL), 0);
    const char *body;
    assert_int_equal(http("GET", "/health", &body), 200);
    assert_non_null(strstr(body, "\"status\": \"ok\""));
    assert_int_equal(th_broker_stop(&env, SIGTERM), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_and_health),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_unhealthy_pool),
        cmocka_unit_test(test_bind_failure),
        cmocka_unit_test(test_ipv6),
    };
    return cmocka_run_group_tests_name("metrics", tests, group_setup, group_teardown);
}
