/*
 * metrics.c — the monitoring endpoint (metrics_listen = host:port):
 *
 *   GET /metrics   200, the Prometheus text format: what `shmstat --prometheus`
 *                  prints, plus poolbroker_uptime_seconds
 *   GET /health    JSON; 200 when the broker is running and every pool is
 *                  healthy, 503 with the reasons otherwise
 *   other paths    404;  other methods: 405;  malformed requests: 400
 *
 * The HTTP server is libmicrohttpd, on a thread of its own
 * (MHD_USE_INTERNAL_POLLING_THREAD): nothing here runs on the event loop,
 * and a slow or hostile scraper costs the loop nothing.  The thread shares no
 * broker state either: every request copies the shared-memory segment by
 * name, read-only, through shmview.c — the same code and the same figures as
 * shmstat, so the two never disagree — and renders from that private copy.
 * (The copy runs without shmstat's SIGBUS guard, see shmview_catch_sigbus:
 * the broker never truncates its own segment.)
 *
 * Connections are limited (METRICS_MAX_CONNS) and time out when idle
 * (METRICS_TIMEOUT_S).  libmicrohttpd parses the requests: a malformed one is
 * answered 400 (or, for a request line it cannot split at all, closed) and
 * never reaches the handler.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <microhttpd.h>

#include "log.h"
#include "metrics.h"
#include "shmview.h"

#define METRICS_MAX_CONNS 64        /* concurrent connections; more are refused */
#define METRICS_TIMEOUT_S 10        /* an idle connection is closed after this */

#define CT_PROMETHEUS "text/plain; version=0.0.4; charset=utf-8"
#define CT_JSON       "application/json"
#define CT_TEXT       "text/plain; charset=utf-8"

static struct MHD_Daemon *daemon_;  /* NULL when not serving */
static char *shm_name_;             /* the segment every request reads */

/* While metrics_start runs, libmicrohttpd's complaints on that thread (why
 * a bind failed) are kept for its error message; the rest, and everything
 * afterwards (malformed requests, the connection limit), go to the debug log. */
static atomic_int starting;
static pthread_t start_thread;
static char start_err[512];

static void mhd_log(void *cls, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    (void)cls;
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\r\n")] = '\0';
    if (atomic_load(&starting) && pthread_equal(pthread_self(), start_thread))
        snprintf(start_err, sizeof start_err, "%s", msg);
    else
        log_debug("metrics: %s", msg);
}

/* Queue a response of len bytes of body (malloc'ed; ownership passes to
 * libmicrohttpd, which frees it) with the given status and content type. */
static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *type, char *body,
                             size_t len)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;              /* closes the connection */
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

/* A short fixed text answer. */
static enum MHD_Result reply_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
    char *body = strdup(text);
    return body ? reply(conn, status, CT_TEXT, body, strlen(body)) : MHD_NO;
}

enum page { PAGE_METRICS, PAGE_HEALTH };

/* Read the segment and render page into memory; answer with it. */
static enum MHD_Result serve(struct MHD_Connection *conn, enum page page)
{
    char *body = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&body, &len);
    if (!out)
        return reply_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n");

    shmview *v;
    char err[512];
    unsigned status = MHD_HTTP_OK;
    int rc = shmview_load(shm_name_, NULL, &v, err, sizeof err);
    if (rc != SHMVIEW_OK) {
        /* The broker's own segment unreadable: nothing can be vouched for. */
        status = MHD_HTTP_SERVICE_UNAVAILABLE;
        if (page == PAGE_HEALTH) {
            char reason[600];
            snprintf(reason, sizeof reason, "cannot read the shared-memory segment: %s", err);
            fputs("{\"status\": \"degraded\", \"reasons\": [", out);
            shmview_json_str(out, reason);
            fputs("]}\n", out);
        } else {
            fprintf(out, "# cannot read the shared-memory segment: %s\n", err);
        }
    } else if (page == PAGE_METRICS) {
        shmview_print_prometheus(out, v, SHMVIEW_PROM_UPTIME);
    } else if (!shmview_health_json(out, v)) {
        status = MHD_HTTP_SERVICE_UNAVAILABLE;
    }
    shmview_free(v);
    if (fclose(out) != 0) {
        free(body);
        return reply_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n");
    }
    const char *type = page == PAGE_HEALTH ? CT_JSON : rc == SHMVIEW_OK ? CT_PROMETHEUS : CT_TEXT;
    return reply(conn, status, type, body, len);
}

/* libmicrohttpd calls this once the request line and headers are parsed (and
 * again per chunk of an upload body, which we never get that far with: every
 * request is answered on the first call). */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **req_cls)
{
    (void)cls;
    (void)version;
    (void)upload_data;
    (void)upload_data_size;
    (void)req_cls;
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return reply_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed: use GET\n");
    if (strcmp(url, "/metrics") == 0)
        return serve(conn, PAGE_METRICS);
    if (strcmp(url, "/health") == 0)
        return serve(conn, PAGE_HEALTH);
    return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found: try /metrics or /health\n");
}

/* Resolve "host:port" (host: a name, IPv4, or [IPv6]) into *ss.  Returns 0,
 * or -1 with a message in err. */
static int resolve(const char *listen, struct sockaddr_storage *ss, char *err, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    size_t hlen = colon ? (size_t)(colon - listen) : 0;
    if (!colon || hlen == 0 || hlen >= sizeof host || !colon[1]) {
        snprintf(err, errlen, "'%s' is not host:port", listen);
        return -1;
    }
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
    if (listen[0] == '[' && hlen >= 3 && listen[hlen - 1] == ']') {
        memcpy(host, listen + 1, hlen - 2);
        host[hlen - 2] = '\0';
        hints.ai_family = AF_INET6;
        hints.ai_flags |= AI_NUMERICHOST;
    } else {
        memcpy(host, listen, hlen);
        host[hlen] = '\0';
        hints.ai_family = AF_UNSPEC;
    }
    struct addrinfo *res;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve '%s': %s", listen, gai_strerror(rc));
        return -1;
    }
    /* The first address: getaddrinfo's preferred order, as for a client. */
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    return 0;
}

int metrics_start(const char *listen, const char *shm_name, char *err, size_t errlen)
{
    if (daemon_) {
        snprintf(err, errlen, "the metrics endpoint is already running");
        return -1;
    }
    static struct sockaddr_storage ss;
    if (resolve(listen, &ss, err, errlen) < 0)
        return -1;
    if (!(shm_name_ = strdup(shm_name))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    uint16_t port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6) {
        flags |= MHD_USE_IPv6;      /* v6 only: the address is what was asked for */
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    start_err[0] = '\0';
    start_thread = pthread_self();
    atomic_store(&starting, 1);
    /* The port is in the address; given again, it shows in libmicrohttpd's messages. */
    daemon_ = MHD_start_daemon(flags, port, NULL, NULL, on_request, NULL,
                               MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                               MHD_OPTION_CONNECTION_LIMIT, (unsigned int)METRICS_MAX_CONNS,
                               MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)METRICS_TIMEOUT_S,
                               /* 400 for an HTTP/1.1 request without Host, as RFC 9112 asks */
                               MHD_OPTION_STRICT_FOR_CLIENT, (int)1,
                               MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
                               MHD_OPTION_END);
    atomic_store(&starting, 0);
    if (!daemon_) {
        snprintf(err, errlen, "cannot serve on %s: %s", listen,
                 start_err[0] ? start_err : "libmicrohttpd could not start");
        free(shm_name_);
        shm_name_ = NULL;
        return -1;
    }
    log_info("metrics: serving /metrics and /health on %s", listen);
    return 0;
}

void metrics_stop(void)
{
    if (!daemon_)
        return;
    MHD_stop_daemon(daemon_);
    daemon_ = NULL;
    free(shm_name_);
    shm_name_ = NULL;
}
