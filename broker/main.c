/*
 * main.c — poolbroker: command line, signals and the main loop.
 *
 * One thread runs everything.  Each iteration: drain the clients' submission
 * rings, run the janitor when it is due, then hand queued I/O to the kernel
 * and wait for completions in one call.  Before waiting, the broker announces
 * that it sleeps (header.broker_sleeping) so that a client which submits work
 * afterwards rings the doorbell eventfd; a client that sees the flag clear
 * skips that syscall (io_uring's NEED_WAKEUP pattern).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"
#include "metrics.h"
#include "poolbroker.h"

#define JANITOR_MS   100            /* default janitor period */
#define SPIN_NS      20000          /* poll the rings this long before sleeping */

broker B;

/* The janitor's period in ms: JANITOR_MS, or PB_TEST_JANITOR_MS (1..1000) from
 * the environment — a test knob, so that races with the janitor's pass (say,
 * its republishing of the segment) show up in seconds, not hours. */
static uint64_t janitor_ms = JANITOR_MS;

uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* systemd's notify protocol, without libsystemd. */
static void sd_notify_(const char *msg)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    size_t n = strlen(path);
    if (n >= sizeof sa.sun_path)
        return;
    memcpy(sa.sun_path, path, n);
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = 0;         /* abstract namespace */
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    /* Never wait for the supervisor: a notify socket nobody reads fills up,
     * and a blocking send would stop the whole event loop with it.  A
     * status the supervisor has no room for is dropped. */
    if (sendto(fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT, (struct sockaddr *)&sa,
               (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n)) < 0 &&
        (errno == EAGAIN || errno == EWOULDBLOCK))
        log_debug("NOTIFY_SOCKET full: dropped \"%.40s\"", msg);
    close(fd);
}

static void sd_notify_reloading(void)
{
    struct timespec ts;
    char msg[64];
    clock_gettime(CLOCK_MONOTONIC, &ts);
    snprintf(msg, sizeof msg, "RELOADING=1\nMONOTONIC_USEC=%llu",
             (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000);
    sd_notify_(msg);
}

/* READY=1 (if ready) with a one-line STATUS= summary. */
static void sd_notify_status(broker *b, int ready)
{
    char msg[256];
    uint32_t live = 0, leased = 0;
    for (uint32_t s = 0; s < b->nslots; s++) {
        conn *c = b->slots[s];
        if (c && (c->handle || PH_UP(c->phase)))
            leased += PB_WORD_STATE(atomic_load(&c->slot->word)) == PB_SLOT_LEASED;
    }
    for (uint32_t i = 0; i < b->npools; i++)
        live += b->pools[i].live - b->pools[i].connecting;
    snprintf(msg, sizeof msg, "%sSTATUS=%u pools, %u connections (%u leased), %u clients, %s",
             ready ? "READY=1\n" : "", b->npools, live, leased, b->nattached,
             b->draining ? "draining" : "running");
    sd_notify_(msg);
}

static void on_doorbell(ev_op *op, int res)
{
    broker *b = op->data;
    (void)res;
    /* Clients ring it, and so does the cancel thread when a cancel request
     * was delivered: let connections waiting on one move on. */
    unsigned done = cancel_delivered();
    if (done != b->cancels_seen) {
        b->cancels_seen = done;
        for (uint32_t i = 0; i < b->npools; i++) {
            pool *p = &b->pools[i];
            conn *backs = POOL_BACKENDS(p);
            for (uint32_t k = 0; k < POOL_NBACKENDS(p); k++)
                if (backs[k].phase == PH_AWAIT_CANCEL || backs[k].submit_deferred)
                    conn_settle(&backs[k]);
        }
    }
    if (!b->stop)
        loop_read(b->lp, &b->doorbell_op, b->doorbell_fd, &b->doorbell_val, sizeof b->doorbell_val);
}

static void start_drain(broker *b, const char *why)
{
    if (b->draining)
        return;
    log_info("%s: draining (no new leases; waiting up to %u ms for leases to return)", why,
             b->cf->shutdown_timeout_ms);
    sd_notify_("STOPPING=1");
    b->draining = 1;
    b->drain_deadline_ms = b->now_ms + b->cf->shutdown_timeout_ms;
    atomic_store(&b->hdr->state, PB_BROKER_DRAINING);
    for (uint32_t i = 0; i < b->npools; i++) {
        atomic_store(&b->pools[i].shm->accepting, 0);
        pool_fail_waiters(&b->pools[i], PB_ESHUTDOWN);
    }
}

static void on_signal(ev_op *op, int res)
{
    broker *b = op->data;
    if (res == (int)sizeof(struct signalfd_siginfo)) {
        struct signalfd_siginfo si;
        memcpy(&si, b->siginfo, sizeof si);
        if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
            start_drain(b, si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
        else if (si.ssi_signo == SIGHUP && !b->draining) {
            sd_notify_reloading();
            reload_config(b);
            sd_notify_status(b, 1);
        }
    }
    if (!b->stop)
        loop_read(b->lp, &b->signal_op, b->signal_fd, b->siginfo, sizeof(struct signalfd_siginfo));
}

/* While draining: are any leases (or resets) still out? */
static int leases_out(broker *b)
{
    for (uint32_t s = 0; s < b->nslots; s++) {
        if (!b->slots[s])
            continue;
        unsigned st = PB_WORD_STATE(atomic_load(&b->slots[s]->slot->word));
        if (st == PB_SLOT_LEASED || st == PB_SLOT_RELEASING || st == PB_SLOT_RESETTING ||
            st == PB_SLOT_RECLAIMING)
            return 1;
    }
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: poolbroker -c FILE [-t]\n"
            "  -c, --config FILE   configuration file (poolbroker.conf(5))\n"
            "  -t, --test          check the configuration and exit\n"
            "  -V, --version       print the version and exit\n"
            "  -h, --help          this help\n");
}

/* Two descriptors per attached client, plus backends: raise the soft
 * open-file limit to the hard one. */
static void raise_nofile(uint32_t max_clients)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max)
        return;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        log_errno(LOG_LVL_WARN, errno, "raising the open-file limit");
    if (rl.rlim_cur < (rlim_t)max_clients * 2 + 256)
        log_warn("open-file limit %llu is low for max_clients %u (needs about %u)",
                 (unsigned long long)rl.rlim_cur, max_clients, max_clients * 2 + 256);
}

static int setup(broker *b)
{
    int chosen;
    raise_nofile(b->cf->max_clients);
    int want = LOOP_AUTO;
    if (b->cf->io_backend && strcmp(b->cf->io_backend, "io_uring") == 0)
        want = LOOP_URING;
    else if (b->cf->io_backend && strcmp(b->cf->io_backend, "epoll") == 0)
        want = LOOP_EPOLL;
    b->lp = loop_new(want, &chosen);
    if (!b->lp) {
        log_errno(LOG_LVL_ERROR, errno, "cannot create the event loop (%s)",
                  b->cf->io_backend ? b->cf->io_backend : "auto");
        return -1;
    }
    b->io_backend = chosen;
    b->listen_fd = -1;
    b->max_clients = b->cf->max_clients;
    b->clients = calloc(b->max_clients, sizeof *b->clients);
    if (!b->clients)
        return -1;
    for (uint32_t i = 0; i < b->max_clients; i++)
        b->clients[i].ctrl_fd = b->clients[i].pidfd = -1;

    /* The socket first: if another broker is running, fail before touching
     * its segment. */
    if (control_listen(b) < 0)
        return -1;
    if (shm_create(b) < 0)
        return -1;
    b->hdr->io_backend = chosen == LOOP_URING ? PB_IO_URING : PB_IO_EPOLL;
    if (pools_init(b) < 0) {
        log_error("out of memory setting up pools");
        return -1;
    }
    b->doorbell_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (b->doorbell_fd < 0) {
        log_errno(LOG_LVL_ERROR, errno, "eventfd");
        return -1;
    }
    b->doorbell_op.cb = on_doorbell;
    b->doorbell_op.data = b;
    loop_read(b->lp, &b->doorbell_op, b->doorbell_fd, &b->doorbell_val, sizeof b->doorbell_val);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    b->signal_fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (b->signal_fd < 0) {
        log_errno(LOG_LVL_ERROR, errno, "signalfd");
        return -1;
    }
    b->signal_op.cb = on_signal;
    b->signal_op.data = b;
    loop_read(b->lp, &b->signal_op, b->signal_fd, b->siginfo, sizeof(struct signalfd_siginfo));

    return lifeline_start(b);
}

/* Wait until every pool has tried its min_size once (or 5 s passed). */
static void initial_connects(broker *b)
{
    uint64_t deadline = now_ms() + 5000;
    for (uint32_t i = 0; i < b->npools; i++) {
        sentinel_tick(&b->pools[i], 1); /* a Sentinel pool learns where its server is first */
        pool_maybe_grow(&b->pools[i]);
    }
    for (;;) {
        int busy = 0;
        for (uint32_t i = 0; i < b->npools; i++)
            busy |= b->pools[i].connecting > 0;
        if (!busy || now_ms() > deadline)
            break;
        loop_run(b->lp, 50);
        b->now_ms = now_ms();
        control_scan_rings(b);
    }
}

static void run(broker *b)
{
    b->next_janitor_ms = b->now_ms + janitor_ms;
    while (!b->stop) {
        b->now_ms = now_ms();
        b->work.loop_passes++;
        int work = 0;
        if (atomic_load(&b->hdr->sq_seq) != b->last_sq_seq) {
            control_scan_rings(b);
            work = 1;
        }
        if (b->now_ms >= b->next_janitor_ms) {
            janitor_run(b);
            if (b->watchdog_ms && b->now_ms - b->last_watchdog_ms >= b->watchdog_ms) {
                sd_notify_("WATCHDOG=1");
                sd_notify_status(b, 0);
                b->last_watchdog_ms = b->now_ms;
            }
            b->next_janitor_ms = b->now_ms + janitor_ms;
            if (b->draining && (!leases_out(b) || b->now_ms >= b->drain_deadline_ms)) {
                if (leases_out(b))
                    log_warn("shutdown_timeout_ms reached with leases still out; closing anyway");
                b->stop = 1;
                break;
            }
        }
        int n;
        /* Transaction mode's shared backends: what this pass took for them
         * goes out in one write each, with the loop's one submit. */
        if (txn_mux_flush())
            work = 1;
        if (tls_has_ready()) {
            tls_run_ready();
            work = 1;
        }
        if (work) {
            n = loop_run(b->lp, 0);     /* hand over what we queued, reap what is ready */
        } else {
            /* Nothing new.  Watch the rings a little before sleeping: a
             * hand-off through a sleeping broker costs a wake-up. */
            uint64_t t0 = now_ns();
            /* Spinning is only worth it when no completion can come: with
             * DEFER_TASKRUN completions arrive only inside io_uring_enter.
             * Nor while futex wakes wait for that enter: a woken worker
             * would wait out the spin (they go with the enter below). */
            int wakes = loop_queued(b->lp);
            while (!wakes && b->inflight == 0 &&
                   atomic_load_explicit(&b->hdr->sq_seq, memory_order_relaxed) == b->last_sq_seq &&
                   now_ns() - t0 < SPIN_NS)
                __builtin_ia32_pause();
            if (atomic_load(&b->hdr->sq_seq) != b->last_sq_seq)
                continue;
            atomic_store(&b->hdr->broker_sleeping, 1);
            if (atomic_load(&b->hdr->sq_seq) != b->last_sq_seq) {
                atomic_store(&b->hdr->broker_sleeping, 0);
                continue;
            }
            uint64_t now = now_ms();
            int timeout = (int)(b->next_janitor_ms > now ? b->next_janitor_ms - now : 0);
            n = loop_run(b->lp, timeout);
            atomic_store(&b->hdr->broker_sleeping, 0);
        }
        if (n < 0) {
            log_errno(LOG_LVL_ERROR, -n, "event loop");
            break;
        }
    }
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' },
        { "test", no_argument, NULL, 't' },
        { "version", no_argument, NULL, 'V' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    int test_only = 0, ch;
    while ((ch = getopt_long(argc, argv, "c:tVh", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': path = optarg; break;
        case 't': test_only = 1; break;
        case 'V': printf("poolbroker %s\n", PB_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!path) {
        usage(stderr);
        return 2;
    }
    char err[CONF_ERR_MAX];
    conf *cf = conf_load(path, err, sizeof err);
    if (!cf) {
        fprintf(stderr, "poolbroker: %s\n", err);
        return 1;
    }
    if (test_only) {
        printf("poolbroker: %s: configuration OK (%d pool%s)\n", path, cf->npools, cf->npools == 1 ? "" : "s");
        conf_free(cf);
        return 0;
    }
    const char *jms = getenv("PB_TEST_JANITOR_MS");
    if (jms && strtoul(jms, NULL, 10) >= 1 && strtoul(jms, NULL, 10) <= 1000)
        janitor_ms = strtoul(jms, NULL, 10);
    log_level = cf->log_level;
    if (cf->log_target && strcmp(cf->log_target, "syslog") == 0)
        log_use_syslog(1);
    srandom((unsigned)(getpid() ^ now_ns()));

    broker *b = &B;
    b->cf = cf;
    b->now_ms = now_ms();
    if (setup(b) < 0) {
        log_error("startup failed");
        return 1;
    }
    if (cf->metrics_listen && metrics_start(cf->metrics_listen, cf->shm_name, err, sizeof err) < 0) {
        log_error("metrics_listen: %s", err);
        return 1;
    }
    initial_connects(b);
    atomic_store(&b->hdr->state, PB_BROKER_RUNNING);
    atomic_store(&b->hdr->heartbeat_ms, now_ms());
    log_info("poolbroker ready: %u pool%s, %s, socket %s, segment %s", b->npools, b->npools == 1 ? "" : "s",
             loop_backend_name(b->lp), cf->socket, cf->shm_name);
    sd_notify_status(b, 1);
    const char *wd = getenv("WATCHDOG_USEC");
    b->watchdog_ms = wd ? strtoull(wd, NULL, 10) / 2000 : 0;   /* ping at half the interval */

    run(b);

    log_info("shutting down");
    metrics_stop();
    cancel_shutdown();
    sentinel_shutdown(b);
    control_close(b);
    for (uint32_t s = 0; s < b->nslots; s++) {
        conn *c = b->slots[s];
        if (c)
            conn_shutdown(c);
    }
    shm_destroy(b, 0);
    loop_free(b->lp);
    for (uint32_t i = 0; i < b->npools; i++)
        settings_trial_free(&b->pools[i]);
    pools_free(b);
    free(b->clients);
    for (uint32_t i = 0; i < b->nold_confs; i++)
        conf_free(b->old_confs[i]);
    free(b->old_confs);
    conf_free(b->cf);
    log_info("stopped");
    return 0;
}
