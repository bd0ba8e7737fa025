/*
 * client.c — libpoolbroker's attachment, leases and waiting.
 *
 * pb_connect() attaches over the control socket and maps the segment the
 * broker passes back.  From then on nothing goes through the socket: a lease
 * is a CAS on a slot word (found through the pool's free map), a command is
 * bytes in the slot's request buffer plus one entry on our submission ring,
 * and a reply is read from the slot's reply ring.
 *
 * Waiting — for a slot, for a reply — spins briefly, then sleeps on a shared
 * futex after telling the broker so (a "sleeping" flag the broker checks
 * before it pays for a wake-up).  The sleep itself is wait.c's: it also ends
 * when the broker dies (its lifeline), without waking up to look.
 *
 * Nothing read from the segment is trusted blindly: slot indices, offsets and
 * ring positions are checked before use, so a scribbled segment gives an
 * error, not a crash.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_SOCKET  "/run/poolbroker/poolbroker.sock"
#define SPIN_NS_MAX     50000
#define SPIN_NS_MIN     2000
#define SPIN_NS_START   20000
#define RETIRED_MIN     16          /* released handles kept before one is reused */

unsigned pb_fork_gen;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
    pb_fork_gen++;
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, on_fork_child);
}

PB_API const char *pb_version(void)
{
    return PB_VERSION;
}

PB_API int pb_version_number(void)
{
    return PB_VERSION_NUMBER;
}

PB_API const char *pb_strerror(int err)
{
    switch (err) {
    case PB_OK:        return "success";
    case PB_ETIMEDOUT: return "timed out";
    case PB_ENOPOOL:   return "no such pool";
    case PB_EBROKER:   return "broker not available";
    case PB_EBACKEND:  return "backend unavailable or connection lost";
    case PB_ETOOBIG:   return "request larger than the pool's max_request_size";
    case PB_ESTALE:    return "lease no longer valid";
    case PB_EINVAL:    return "invalid argument";
    case PB_ENOMEM:    return "out of memory";
    case PB_ESHUTDOWN: return "broker is shutting down";
    case PB_EPROTO:    return "protocol error";
    case PB_ETYPE:     return "wrong pool type for this call";
    case PB_EVERSION:  return "shared-memory layout mismatch between library and broker";
    case PB_EPERM:     return "refused by the broker";
    case PB_EBUSY:     return "lease busy (results, COPY or a pipeline outstanding)";
    case PB_ESERVER:   return "the server refused the statement";
    case PB_EINPROGRESS: return "in progress: wait for pb_client_fd and poll again";
    }
    return "unknown error";
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t pbi_now_us(void)
{
    return now_ns() / 1000;
}

static uint64_t coarse_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}


/* ------------------------------------------------------------------ attach */

static void detach(pb_client *c)
{
    if (c->hdr)
        munmap(c->hdr, c->shm_size);
    if (c->ctrl_fd >= 0)
        close(c->ctrl_fd);
    if (c->doorbell_fd >= 0)
        close(c->doorbell_fd);
    c->hdr = NULL;
    c->ctrl_fd = c->doorbell_fd = -1;
    c->attached = 0;
}

static void say(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Write why an attach failed into buf (n bytes; nothing when n is 0). */
static void say(char *buf, size_t n, const char *fmt, ...)
{
    if (!buf || n == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, n, fmt, ap);
    va_end(ap);
}

/* Why connect() to the broker's socket failed with err, in the words a
 * user can act on: who may connect is decided by the socket's mode and
 * owner (socket_mode, allowed_gids) and by the directories above it. */
static void say_connect_failed(const char *path, int err, char *buf, size_t n)
{
    struct stat st;
    if (err == EACCES || err == EPERM) {
        if (stat(path, &st) == 0)
            say(buf, n, "permission denied connecting to %s: the socket is mode %04o, owner uid %u gid %u, and "
                "this process is uid %u gid %u (the broker's socket_mode and allowed_gids decide who may "
                "connect)", path, (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid, (unsigned)st.st_gid,
                (unsigned)geteuid(), (unsigned)getegid());
        else
            say(buf, n, "permission denied reaching %s: a directory on the path is not searchable by uid %u "
                "gid %u", path, (unsigned)geteuid(), (unsigned)getegid());
    } else if (err == ENOENT) {
        say(buf, n, "no broker socket at %s (is poolbroker running, with this 'socket'?)", path);
    } else if (err == ECONNREFUSED) {
        say(buf, n, "nothing listens on %s (a broker that stopped left the socket)", path);
    } else {
        say(buf, n, "cannot connect to %s: %s", path, strerror(err));
    }
}

/* The broker's refusal, as it explained it (pb_attach_refusal). */
static void say_refused(const pb_attach_resp *resp, ssize_t n, char *buf, size_t len)
{
    uint32_t reason = n == (ssize_t)sizeof *resp ? resp->refusal.reason : PB_REFUSED_UNSAID;
    switch (reason) {
    case PB_REFUSED_UID:
        say(buf, len, "refused by the broker: uid %u gid %u is not allowed to attach (its allowed_uids and "
            "allowed_gids; with neither set, only the broker's own uid)", resp->refusal.uid, resp->refusal.gid);
        return;
    case PB_REFUSED_MAX_CLIENTS:
        say(buf, len, "refused by the broker: max_clients (%u) reached: every client record is in use",
            resp->refusal.limit);
        return;
    case PB_REFUSED_VERSION:
        say(buf, len, "refused by the broker: shared-memory layout %u/%08x, this library has %u/%08x (build "
            "the library and the broker from the same release)", resp->version, resp->fingerprint,
            PB_SHM_VERSION, (unsigned)PB_SHM_FINGERPRINT);
        return;
    case PB_REFUSED_DRAINING:
        say(buf, len, "refused by the broker: it is shutting down");
        return;
    case PB_REFUSED_MALFORMED:
        say(buf, len, "refused by the broker: it did not understand the attach request");
        return;
    case PB_REFUSED_TRACKING:
        say(buf, len, "refused by the broker: it cannot watch this process (pidfd_open failed; see its log)");
        return;
    }
    say(buf, len, "refused by the broker: %s", pb_strerror(resp->status));
}

static int attach(pb_client *c, char *why, size_t whylen)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd = -1, rc;

    if (strlen(c->socket_path) >= sizeof sa.sun_path) {
        say(why, whylen, "socket path longer than %zu bytes", sizeof sa.sun_path - 1);
        return PB_EINVAL;
    }
    strcpy(sa.sun_path, c->socket_path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        say(why, whylen, "socket: %s", strerror(errno));
        return errno == ENOMEM || errno == ENOBUFS ? PB_ENOMEM : PB_EBROKER;
    }
    struct timeval tv = { .tv_sec = 5 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int err = errno;
        close(fd);
        say_connect_failed(c->socket_path, err, why, whylen);
        return err == EACCES || err == EPERM ? PB_EPERM : PB_EBROKER;
    }
    pb_attach_req req = { PB_ATTACH_MAGIC, PB_SHM_VERSION, PB_SHM_FINGERPRINT, (int32_t)getpid() };
    /* A broker that refuses at accept (max_clients) answers and closes
     * without reading: our send can then fail, but its answer is there to
     * read, and says why. */
    /* EINTR: a socket timeout makes these fail on any interruption (no
     * SA_RESTART), and io_uring completions for this process (async.c)
     * interrupt like signals do.  Try again; the timeouts still bound it. */
    ssize_t sn;
    do
        sn = send(fd, &req, sizeof req, MSG_NOSIGNAL);
    while (sn < 0 && errno == EINTR);
    int sent = sn == (ssize_t)sizeof req;
    pb_attach_resp resp;
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } u;
    struct iovec iov = { .iov_base = &resp, .iov_len = sizeof resp };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
    ssize_t n;
    do
        n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    int recv_err = n < 0 ? errno : 0;
    int fds[2] = { -1, -1 };
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(2 * sizeof(int)))
            memcpy(fds, CMSG_DATA(cm), sizeof fds);
    /* The answer, layout included, is all we go by: the segment's header is
     * for shmstat (pb_shm_layout says why). */
    rc = pbi_attach_resp_check(&resp, n);
    if (rc == PB_OK && !sent)
        rc = PB_EBROKER;
    if (rc != PB_OK) {
        if (n < 0)
            say(why, whylen, "no answer from the broker on %s: %s", c->socket_path,
                recv_err == EAGAIN ? "none within 5 s" : strerror(recv_err));
        else if (n >= (ssize_t)offsetof(pb_attach_resp, client_id) && resp.magic == PB_ATTACH_MAGIC &&
                 resp.status != PB_OK)
            say_refused(&resp, n, why, whylen);
        else if (rc == PB_EVERSION)
            say(why, whylen, "the broker's shared-memory layout is %u/%08x, this library's %u/%08x (build the "
                "library and the broker from the same release)", resp.version, resp.fingerprint,
                PB_SHM_VERSION, (unsigned)PB_SHM_FINGERPRINT);
        else
            say(why, whylen, "the answer on %s is not a poolbroker attach answer (%zd bytes)", c->socket_path, n);
        goto fail;
    }
    struct stat st;
    if (fds[0] < 0 || fds[1] < 0 || fstat(fds[0], &st) < 0 || (uint64_t)st.st_size < resp.shm_size) {
        say(why, whylen, "the broker's answer came without a usable segment");
        rc = PB_EBROKER;
        goto fail;
    }
    void *base = mmap(NULL, resp.shm_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    if (base == MAP_FAILED) {
        say(why, whylen, "mapping the segment (%llu bytes): %s", (unsigned long long)resp.shm_size, strerror(errno));
        rc = PB_ENOMEM;
        goto fail;
    }
    close(fds[0]);
    c->hdr = base;
    c->shm_size = resp.shm_size;
    c->id = resp.client_id;
    c->generation = resp.generation;
    c->ctrl_fd = fd;
    c->doorbell_fd = fds[1];
    c->pools = (pb_shm_pool *)((char *)base + resp.layout.pool_off);
    c->rec = &((pb_shm_client *)((char *)base + resp.layout.client_off))[PB_CLIENT_INDEX(c->id)];
    c->slots = (pb_shm_slot *)((char *)base + resp.layout.slot_off);
    c->nslots = resp.layout.nslots;
    c->buf_off = resp.layout.buf_off;
    c->lifeline_tid = resp.layout.lifeline_tid & FUTEX_TID_MASK;
    c->sq_tail = atomic_load(&c->rec->sq_tail);
    c->fork_gen = pb_fork_gen;
    c->attached = 1;
    c->broken = 0;
    c->epoch++;
    c->last_pool[0] = 0;
    return PB_OK;
fail:
    if (fds[0] >= 0)
        close(fds[0]);
    if (fds[1] >= 0)
        close(fds[1]);
    close(fd);
    return rc;
}

PB_API int pb_connect(const char *socket_path, pb_client **out)
{
    return pb_connect_err(socket_path, out, NULL, 0);
}

PB_API int pb_connect_err(const char *socket_path, pb_client **out, char *errbuf, size_t errlen)
{
    if (errbuf && errlen)
        errbuf[0] = '\0';
    if (!out) {
        say(errbuf, errlen, "out is NULL");
        return PB_EINVAL;
    }
    *out = NULL;
    pthread_once(&atfork_once, register_atfork);
    if (!socket_path)
        socket_path = getenv("POOLBROKER_SOCKET");
    if (!socket_path || !*socket_path)
        socket_path = DEFAULT_SOCKET;
    pb_client *c = calloc(1, sizeof *c);
    if (!c) {
        say(errbuf, errlen, "out of memory");
        return PB_ENOMEM;
    }
    c->socket_path = strdup(socket_path);
    c->ctrl_fd = c->doorbell_fd = -1;
    c->spin_ns = c->acq_spin_ns = SPIN_NS_START;
    const char *spin = getenv("POOLBROKER_SPIN_US");
    if (spin) {
        /* In µs; clamped to what the nanosecond counter holds. */
        unsigned long us = strtoul(spin, NULL, 10);
        c->spin_ns = c->acq_spin_ns = us > UINT32_MAX / 1000 ? UINT32_MAX / 1000 * 1000 : (uint32_t)us * 1000;
    }
    if (!c->socket_path) {
        free(c);
        say(errbuf, errlen, "out of memory");
        return PB_ENOMEM;
    }
    int rc = attach(c, errbuf, errlen);
    if (rc != PB_OK) {
        free(c->socket_path);
        free(c);
        return rc;
    }
    *out = c;
    return PB_OK;
}

static void lease_unlink(pb_lease *l)
{
    pb_client *c = l->c;
    if (l->prev)
        l->prev->next = l->next;
    else if (c->leases == l)
        c->leases = l->next;
    if (l->next)
        l->next->prev = l->prev;
    l->prev = l->next = NULL;
}

/* Retire a handle.  Handles are not freed until pb_disconnect: they queue,
 * and the oldest is reused only once RETIRED_MIN others are behind it, so a
 * double release or a use after release finds l->released set and returns
 * PB_ESTALE instead of touching freed memory or someone else's lease. */
static void lease_free(pb_lease *l)
{
    pb_client *c = l->c;
    pbi_nb_lease_gone(l);
    lease_unlink(l);
    pgp_dec_reset(&l->dec);
    if (l->rreader) {
        redisReaderFree(l->rreader);
        l->rreader = NULL;
    }
    if (l->rheld) {
        freeReplyObject(l->rheld);
        l->rheld = NULL;
    }
    pbi_redis_free_messages(l);
    pb_buf_free(&l->rqueue);
    pb_buf_free(&l->rends);
    pb_buf_free(&l->cbuf);
    pb_buf_free(&l->pipe);
    pb_buf_free(&l->pends);
    pb_result_free(l->held);
    l->held = NULL;
    while (l->nq_head) {
        pb_notify *n = l->nq_head;
        l->nq_head = n->next;
        pb_notify_free(n);
    }
    l->nq_tail = NULL;
    l->released = 1;
    l->next = NULL;
    if (c->retired_tail)
        c->retired_tail->next = l;
    else
        c->retired_head = l;
    c->retired_tail = l;
    c->nretired++;
}

static pb_lease *lease_alloc(pb_client *c)
{
    pb_lease *l;
    if (c->nretired > RETIRED_MIN) {
        l = c->retired_head;
        c->retired_head = l->next;
        if (!c->retired_head)
            c->retired_tail = NULL;
        c->nretired--;
        memset(l, 0, sizeof *l);
        return l;
    }
    return calloc(1, sizeof *l);
}

PB_API void pb_disconnect(pb_client *c)
{
    if (!c)
        return;
    while (c->leases) {
        pb_lease *l = c->leases;
        if (pb_release(l) != PB_OK && c->leases == l)
            lease_free(l);
    }
    if (c->attached && c->fork_gen == pb_fork_gen)
        detach(c);
    else if (c->attached) {
        /* Inherited across fork: unmap our copy, leave the parent's alone. */
        munmap(c->hdr, c->shm_size);
        close(c->ctrl_fd);
        close(c->doorbell_fd);
    }
    while (c->retired_head) {
        pb_lease *l = c->retired_head;
        c->retired_head = l->next;
        free(l);
    }
    pbi_nb_free(c);
    pb_buf_free(&c->scratch);
    while (c->stmts) {
        pb_stmt *st = c->stmts;
        c->stmts = st->next;
        free(st->name);
        free(st->sql);
        free(st->types);
        free(st);
    }
    free(c->socket_path);
    free(c);
}

/* The broker is gone if its generation changed, it says it stopped, its
 * process is gone, or our control socket hung up. */
static int broker_alive(pb_client *c)
{
    pb_shm_header *h = c->hdr;
    if (atomic_load(&h->generation) != c->generation || atomic_load(&h->state) == PB_BROKER_STOPPED)
        return 0;
    pid_t pid = atomic_load(&h->broker_pid);
    if (pid > 0 && kill(pid, 0) < 0 && errno == ESRCH)
        return 0;
    struct pollfd p = { .fd = c->ctrl_fd, .events = POLLIN };
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR | POLLIN))) {
        char b;
        if (recv(c->ctrl_fd, &b, 1, MSG_DONTWAIT | MSG_PEEK) <= 0)
            return 0;
    }
    return 1;
}

/* Make sure c is attached in this process to a live broker. */
static int ensure_attached(pb_client *c)
{
    if (c->attached && c->fork_gen != pb_fork_gen) {
        /* We are a forked child: the mapping and fds are the parent's
         * attachment.  Drop our copies and attach as ourselves. */
        munmap(c->hdr, c->shm_size);
        close(c->ctrl_fd);
        close(c->doorbell_fd);
        c->hdr = NULL;
        c->ctrl_fd = c->doorbell_fd = -1;
        c->attached = 0;
        /* Inherited lease handles stay in the list; they are stale now. */
    }
    /* A stopped segment: the broker exited, or died and was replaced. */
    if (c->attached && !c->broken && atomic_load_explicit(&c->hdr->state, memory_order_relaxed) == PB_BROKER_STOPPED)
        c->broken = 1;
    if (c->attached && c->broken)
        detach(c);
    if (!c->attached)
        return attach(c, NULL, 0);
    return PB_OK;
}

/* ----------------------------------------------------------------- ringing */

static int sq_push(pb_client *c, uint64_t e)
{
    pb_shm_client *rec = c->rec;
    uint32_t tail = c->sq_tail;
    int spins = 0;
    for (;;) {
        uint32_t used = tail - atomic_load_explicit(&rec->sq_head, memory_order_acquire);
        if (used < PB_SQ_ENTRIES)
            break;
        /* More than full can only be a scribbled ring, and a ring full for
         * seconds with a live broker likely is too: start over from the
         * broker's position (entries in between are lost, not replayed). */
        if (used > PB_SQ_ENTRIES || spins > 40000) {
            tail = atomic_load(&rec->sq_head);
            break;
        }
        /* Full: the broker is behind (or gone). */
        uint64_t one = 1;
        (void)!write(c->doorbell_fd, &one, sizeof one);
        if (++spins % 1000 == 0 && !broker_alive(c)) {
            c->broken = 1;
            return PB_EBROKER;
        }
        usleep(50);
    }
    atomic_store_explicit(&rec->sq[tail & (PB_SQ_ENTRIES - 1)], e, memory_order_relaxed);
    atomic_store_explicit(&rec->sq_tail, tail + 1, memory_order_release);
    c->sq_tail = tail + 1;
    /* Our doorbell bit, after the tail (the broker drains only the rings
     * whose bit it finds set), then our word's bit in the summary (the
     * broker reads only the words it names), then the sequence it watches.
     * Always the RMWs, never "already set, skip it": the broker's exchanges
     * must read writes made after our tail store, or our entry waits for the
     * janitor's sweep. */
    uint32_t ri = PB_CLIENT_INDEX(c->id);
    atomic_fetch_or(&c->hdr->sq_ready[ri / 64], 1ull << (ri % 64));
    atomic_fetch_or(&c->hdr->sq_ready_sum, 1ull << (ri / 64));
    atomic_fetch_add(&c->hdr->sq_seq, 1);
    uint32_t sleeping = 1;
    if (atomic_load(&c->hdr->broker_sleeping) &&
        atomic_compare_exchange_strong(&c->hdr->broker_sleeping, &sleeping, 0)) {
        uint64_t one = 1;
        (void)!write(c->doorbell_fd, &one, sizeof one);
    }
    return PB_OK;
}

/* Spin, then sleep on *word until it moves from seen, deadline passes
 * (returns PB_ETIMEDOUT) or the broker dies (PB_EBROKER).  Returns PB_OK
 * when woken or when it is time to look again. */
static int wait_change(pb_client *c, uint32_t *spin_ns, _Atomic uint32_t *word, _Atomic uint32_t *sleeping,
                       uint32_t seen, uint64_t deadline_ns)
{
    uint64_t t0 = now_ns();
    /* Spin only while a core is idle: otherwise the spin takes the CPU of
     * whoever would change the word (the broker, the server). */
    uint32_t budget = pbi_core_idle() ? *spin_ns : 0;
    for (unsigned i = 0; budget; i++) {
        if (atomic_load_explicit(word, memory_order_acquire) != seen) {
            /* Woken while spinning: spinning pays, allow a little more. */
            if (*spin_ns < SPIN_NS_MAX)
                *spin_ns += *spin_ns / 8 + 100;
            return PB_OK;
        }
        if ((i & 31) == 31 && now_ns() - t0 >= budget)
            break;
        pb_cpu_relax();
    }
    /* Spinning did not pay this time: spin a little less next time (on 2
     * cores, a spinning waiter takes the CPU the broker and the server need). */
    if (budget) {
        *spin_ns -= *spin_ns / 16;
        if (*spin_ns < SPIN_NS_MIN)
            *spin_ns = SPIN_NS_MIN;
    }

    int rc = pbi_sleep(c, word, sleeping, seen, deadline_ns);
    if (rc == PB_EBROKER)
        c->broken = 1;
    return rc;
}

/* ------------------------------------------------------------------ leases */

static int find_pool(pb_client *c, const char *name, uint32_t *idx)
{
    if (c->last_pool[0] && strcmp(c->last_pool, name) == 0 &&
        atomic_load_explicit(&c->pools[c->last_pool_idx].health, memory_order_relaxed) < PB_HEALTH_REMOVED) {
        *idx = c->last_pool_idx;
        return PB_OK;
    }
    size_t n = strlen(name);
    if (n == 0 || n >= PB_NAME_MAX)
        return PB_ENOPOOL;
    /* A reload may have added pools since we attached.  A pool_mode switch
     * (broker/reload.c) publishes the new pool (npools) before it marks the
     * old one of the same name removed: having seen a removed one of our
     * name, a fresh npools covers its successor, so we look once more. */
    for (int pass = 0; pass < 4; pass++) {
        uint32_t np = atomic_load(&c->hdr->npools);
        c->npools = np <= PB_MAX_POOLS ? np : PB_MAX_POOLS;
        int removed_seen = 0;
        for (uint32_t i = 0; i < c->npools; i++) {
            /* Compared on a consistent copy: the broker may be rewriting
             * the name this instant (undoing a scribble), see pb_pool_ident. */
            pb_pool_ident id;
            for (int tries = 0; pb_shm_pool_ident_read(&c->pools[i], &id, 64) < 0 && tries < 100; tries++)
                sched_yield();
            if (memcmp(id.name, name, n + 1) != 0)
                continue;
            uint32_t health = atomic_load(&c->pools[i].health);
            if (health == PB_HEALTH_REMOVED) {
                removed_seen = 1;   /* a pool a reload removed (it may be re-added, or switched) */
                continue;
            }
            if (health == PB_HEALTH_PENDING)
                continue;           /* a pool_mode switch's new pool, not serving yet */
            memcpy(c->last_pool, name, n + 1);
            c->last_pool_idx = i;
            *idx = i;
            return PB_OK;
        }
        if (!removed_seen || atomic_load(&c->hdr->npools) == np)
            break;
    }
    return PB_ENOPOOL;
}

/* Build the lease handle for slot s, held with word w. */
static int make_lease(pb_client *c, uint32_t pi, uint32_t s, uint64_t w, pb_lease **out)
{
    pb_shm_slot *sl = &c->slots[s];
    uint64_t req_off = sl->req_off, rep_off = sl->rep_off;
    uint32_t req_size = sl->req_size, rep_size = sl->rep_size;
    /* Inside the buffer area, never over the tables: a scribbled offset must
     * not make us write a request over somebody's slot word. */
    if (req_off < c->buf_off || req_off > c->shm_size || req_size > c->shm_size - req_off ||
        rep_off < c->buf_off || rep_off > c->shm_size || rep_size > c->shm_size - rep_off || rep_size == 0 ||
        (rep_size & (rep_size - 1)))
        return PB_EPROTO;
    pb_lease *l = lease_alloc(c);
    if (!l)
        return PB_ENOMEM;
    l->c = c;
    l->epoch = c->epoch;
    l->fork_gen = pb_fork_gen;
    l->slot = s;
    l->pool = pi;
    /* Our own copy: the pool's first_slot in the segment may be scribbled
     * later, and a freed bit must land inside the pool's map. */
    uint32_t first = c->pools[pi].first_slot;
    if (s < first || s - first >= PB_MAX_POOL_SLOTS) {
        free(l);
        return PB_EPROTO;
    }
    l->local = s - first;
    l->type = (int)c->pools[pi].type;
    l->word = w;
    l->s = sl;
    l->req = (uint8_t *)c->hdr + req_off;
    l->rep = (uint8_t *)c->hdr + rep_off;
    l->req_size = req_size;
    l->rep_size = rep_size;
    l->rep_tail = atomic_load_explicit(&sl->rep_head, memory_order_acquire);
    l->seq = atomic_load_explicit(&sl->req_ack, memory_order_acquire);
    l->done_target = atomic_load_explicit(&sl->reply_done, memory_order_acquire);
    atomic_store_explicit(&sl->req_seq, l->seq, memory_order_relaxed);
    atomic_store_explicit(&sl->rep_tail, l->rep_tail, memory_order_relaxed);
    l->pending = 0;
    l->desync = 0;
    pgp_dec_init(&l->dec);
    l->dec.notice = c->notice_fn;
    l->dec.notice_arg = c->notice_arg;
    l->next = c->leases;
    l->prev = NULL;
    if (c->leases)
        c->leases->prev = l;
    c->leases = l;
    *out = l;
    return PB_OK;
}

/* The fast path: a free-map bit, then the CAS that makes the slot ours. */
static int try_take_free(pb_client *c, uint32_t pi, uint32_t *slot, uint64_t *word)
{
    pb_shm_pool *p = &c->pools[pi];
    uint32_t first = p->first_slot, cap = p->slot_capacity;
    if (cap > PB_MAX_POOL_SLOTS || first > c->nslots || cap > c->nslots - first)
        return 0;
    int local = pb_freemap_take(p, &c->slots[first], cap, PB_SLOT_LEASED, c->id, word);
    if (local < 0)
        return 0;
    *slot = first + (uint32_t)local;
    return 1;
}

/* Queue for a slot and wait for the broker to hand us one, at most
 * timeout_ms (1 .. UINT32_MAX: the whole range of acquire_timeout_ms; the
 * deadline is computed in 64-bit nanoseconds, which cannot overflow). */
static int wait_for_slot(pb_client *c, uint32_t pi, uint32_t timeout_ms, uint32_t *slot, uint64_t *word)
{
    pb_shm_client *rec = c->rec;
    uint32_t ticket = ++c->ticket;
    uint64_t waiting = PB_WAITW(PB_WAIT_WAITING, 0, ticket);
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;

    atomic_store(&rec->wait_word, waiting);
    int rc = sq_push(c, PB_SQE(PB_SQ_WAIT, pi, ticket));
    if (rc != PB_OK)
        return rc;
    for (;;) {
        uint32_t seen = atomic_load(&rec->wait_futex);
        uint64_t w = atomic_load(&rec->wait_word);
        unsigned st = PB_WAITW_STATE(w);
        if (PB_WAITW_TICKET(w) == ticket && st == PB_WAIT_GRANTED) {
            uint32_t s = PB_WAITW_SLOT(w);
            if (s >= c->nslots)
                return PB_EPROTO;
            uint64_t sw = atomic_load(&c->slots[s].word);
            if (PB_WORD_STATE(sw) != PB_SLOT_LEASED || PB_WORD_OWNER(sw) != c->id)
                return PB_EPROTO;
            *slot = s;
            *word = sw;
            return PB_OK;
        }
        if (PB_WAITW_TICKET(w) == ticket && st == PB_WAIT_FAILED) {
            int err = -(int)PB_WAITW_SLOT(w);
            return err < 0 && err >= PB_ESERVER ? err : PB_EBACKEND;
        }
        if (st != PB_WAIT_WAITING || PB_WAITW_TICKET(w) != ticket)
            return PB_EPROTO;       /* someone scribbled on our record */
        rc = wait_change(c, &c->acq_spin_ns, &rec->wait_futex, &rec->wait_sleeping, seen, deadline);
        if (rc == PB_ETIMEDOUT) {
            if (atomic_compare_exchange_strong(&rec->wait_word, &waiting, PB_WAITW(PB_WAIT_CANCELLED, 0, ticket))) {
                sq_push(c, PB_SQE(PB_SQ_CANCEL_WAIT, pi, ticket));
                return PB_ETIMEDOUT;
            }
            continue;               /* granted or failed just now: look again */
        }
        if (rc != PB_OK) {
            atomic_compare_exchange_strong(&rec->wait_word, &waiting, PB_WAITW(PB_WAIT_CANCELLED, 0, ticket));
            return rc;
        }
    }
}

PB_API int pb_acquire(pb_client *c, const char *pool, int timeout_ms, pb_lease **out)
{
    if (!c || !pool || !out)
        return PB_EINVAL;
    *out = NULL;
    int rc = ensure_attached(c);
    if (rc != PB_OK)
        return rc;
    /* A pool removed under us (PB_ENOPOOL from the pool we found) may have
     * a successor of the same name — a reload switched its pool_mode — so
     * the name is looked up again, a few times at most, with what is left
     * of the wait. */
    int lookups = 0;
again:;
    uint32_t pi;
    if ((rc = find_pool(c, pool, &pi)) != PB_OK)
        return rc;
    pb_shm_pool *p = &c->pools[pi];
    if (!atomic_load_explicit(&p->accepting, memory_order_relaxed)) {
        if (atomic_load(&c->hdr->state) == PB_BROKER_DRAINING)
            return PB_ESHUTDOWN;
        if (atomic_load(&p->health) == PB_HEALTH_REMOVED && ++lookups < 4)
            goto again;
        return PB_ENOPOOL;
    }

    uint32_t s;
    uint64_t w;
    uint64_t t0 = 0;
    int got = 0;
    /* The wait, in ms: the caller's, or (timeout_ms < 0) the pool's
     * acquire_timeout_ms, which is a uint32_t up to 4294967295 — never
     * squeezed through an int (issue #18: the top of the range timed out at
     * once). */
    int64_t wait_ms = timeout_ms;
    /* Waiters first: while anyone is queued, a newcomer queues too. */
    if (atomic_load(&p->nwaiters) == 0 && try_take_free(c, pi, &s, &w)) {
        got = 1;
        /* Idle too long to trust: the broker checks it before anyone uses
         * it (we queue meanwhile, and most likely get it back). */
        uint32_t vlimit = atomic_load_explicit(&p->validate_after_idle_ms, memory_order_relaxed);
        uint64_t idle = atomic_load_explicit(&c->slots[s].idle_ms, memory_order_relaxed);
        uint64_t now = coarse_ms();
        if (vlimit && now > idle && now - idle > vlimit) {
            uint64_t rel = PB_WORD_NEXT(w, PB_SLOT_RELEASING, c->id);
            if (atomic_compare_exchange_strong(&c->slots[s].word, &w, rel))
                sq_push(c, PB_SQE(PB_SQ_RELEASE, s, PB_WORD_GEN(rel)));
            got = 0;
            if (wait_ms == 0)
                wait_ms = -1;       /* one is there; it just needs a check */
        }
    }
    if (!got && pbi_nb_waiting(c))
        return PB_EBUSY;            /* the wait word is a non-blocking acquire's (async.c) */
    if (!got) {
        if (wait_ms < 0)
            wait_ms = (int64_t)atomic_load(&p->acquire_timeout_ms);
        if (wait_ms == 0 && atomic_load(&p->nwaiters) == 0)
            return PB_ETIMEDOUT;
        t0 = pbi_now_us();
        rc = wait_for_slot(c, pi, wait_ms ? (uint32_t)wait_ms : 1, &s, &w);
        if (rc == PB_ENOPOOL && atomic_load(&p->health) == PB_HEALTH_REMOVED && ++lookups < 4) {
            if (timeout_ms > 0) {       /* what is left of it after this wait */
                uint64_t spent_ms = (pbi_now_us() - t0) / 1000;
                timeout_ms = spent_ms < (uint64_t)timeout_ms ? timeout_ms - (int)spent_ms : 0;
            }
            goto again;
        }
        if (rc == PB_EBROKER) {
            /* The broker died under us: the mapping p points into is about
             * to go.  If a new broker is already up, try once more there. */
            if (ensure_attached(c) == PB_OK)
                return pb_acquire(c, pool, timeout_ms, out);
            return PB_EBROKER;
        }
        if (rc != PB_OK) {
            atomic_fetch_add_explicit(rc == PB_ETIMEDOUT ? &p->timeouts : &p->errors, 1, memory_order_relaxed);
            return rc;
        }
        pb_shm_hist_add(&p->acquire_wait, pbi_now_us() - t0);
    }
    pb_shm_slot *sl = &c->slots[s];
    if (!t0) {
        pb_slot_stamp_lease(sl, coarse_ms());
    }
    atomic_fetch_add_explicit(&p->acquires, 1, memory_order_relaxed);
    rc = make_lease(c, pi, s, w, out);
    if (rc != PB_OK) {
        /* Give the slot back through the broker, which checks it. */
        uint64_t rel = PB_WORD_NEXT(w, PB_SLOT_RELEASING, c->id);
        if (atomic_compare_exchange_strong(&sl->word, &w, rel))
            sq_push(c, PB_SQE(PB_SQ_RELEASE, s, PB_WORD_GEN(rel)));
    }
    return rc;
}

int pbi_lease_check(pb_lease *l)
{
    pb_client *c = l->c;
    if (l->released)
        return PB_ESTALE;
    if (l->fork_gen != pb_fork_gen || l->epoch != c->epoch || !c->attached)
        return PB_ESTALE;
    if (c->broken)
        return PB_EBROKER;
    if (atomic_load_explicit(&l->s->word, memory_order_acquire) != l->word)
        return PB_ESTALE;
    /* Our request sequence is ours alone: if it moved, something scribbled
     * on the slot, and what is in flight on it can no longer be trusted. */
    if (atomic_load_explicit(&l->s->req_seq, memory_order_relaxed) != l->seq) {
        l->desync = 1;
        return PB_EPROTO;
    }
    return PB_OK;
}

/* A lease a call may use: checked as pbi_lease_check, of pool type `type`
 * (0: either), and not out of step with its connection. */
int pbi_lease_usable(pb_lease *l, unsigned type)
{
    if (!l)
        return PB_EINVAL;
    int rc = pbi_lease_check(l);
    if (rc != PB_OK)
        return rc;
    if (type && (unsigned)l->type != type)
        return PB_ETYPE;
    return l->desync ? PB_EPROTO : PB_OK;
}

/* Does a release under this reset policy need the broker only when the
 * slot says so (PB_SF_RESET: state the server reported), so a clean lease
 * may go straight back to the free map? */
static int reset_on_state_only(uint32_t policy)
{
    return policy == PB_RESET_AUTO || policy == PB_RESET_ROLLBACK;
}

PB_API int pb_release(pb_lease *l)
{
    if (!l)
        return PB_EINVAL;
    pb_client *c = l->c;
    int rc = pbi_lease_check(l);
    if (rc == PB_EPROTO && !l->released) {
        rc = PB_OK;                 /* scribbled slot: still ours to give back (below, via the broker) */
    } else if (rc != PB_OK) {
        if (!l->released)
            lease_free(l);
        return rc;
    }
    pb_shm_slot *sl = l->s;
    pb_shm_pool *p = &c->pools[l->pool];
    uint64_t w = l->word;
    uint64_t max_uses = atomic_load_explicit(&p->max_uses, memory_order_relaxed);
    int fast = l->pending == 0 && !l->desync &&
               atomic_load_explicit(&sl->txn_status, memory_order_relaxed) == 'I' &&
               atomic_load_explicit(&sl->client_flags, memory_order_relaxed) == 0 &&
               atomic_load_explicit(&sl->flags, memory_order_relaxed) == 0 &&
               atomic_load_explicit(&sl->io_error, memory_order_relaxed) == 0 &&
               reset_on_state_only(atomic_load_explicit(&p->reset_policy, memory_order_relaxed)) &&
               (max_uses == 0 || atomic_load_explicit(&sl->uses, memory_order_relaxed) < max_uses) &&
               atomic_load_explicit(&p->nwaiters, memory_order_relaxed) == 0 &&
               atomic_load_explicit(&p->accepting, memory_order_relaxed);
    if (fast) {
        uint64_t freew = PB_WORD_NEXT(w, PB_SLOT_FREE, 0);
        atomic_store_explicit(&sl->idle_ms, coarse_ms(), memory_order_relaxed);
        if (!atomic_compare_exchange_strong(&sl->word, &w, freew)) {
            lease_free(l);
            return PB_ESTALE;
        }
        pb_freemap_put(p, l->local);
        /* A waiter may have queued after we looked: it must not miss this
         * slot.  Setting the bit (seq_cst) before reading nwaiters pairs with
         * the broker publishing nwaiters before it scans the map. */
        if (atomic_load(&p->nwaiters))
            sq_push(c, PB_SQE(PB_SQ_NOP, 0, 0));
    } else {
        if (l->desync)
            atomic_fetch_or(&sl->client_flags, PB_CF_DIRTY);
        uint64_t rel = PB_WORD_NEXT(w, PB_SLOT_RELEASING, c->id);
        if (!atomic_compare_exchange_strong(&sl->word, &w, rel)) {
            lease_free(l);
            return PB_ESTALE;
        }
        rc = sq_push(c, PB_SQE(PB_SQ_RELEASE, l->slot, PB_WORD_GEN(rel)));
    }
    lease_free(l);
    return rc;
}

PB_API int pb_pin(pb_lease *l)
{
    if (!l)
        return PB_EINVAL;
    int rc = pbi_lease_check(l);
    if (rc == PB_EPROTO)
        rc = PB_OK;                 /* out of step: the release goes through the broker anyway */
    if (rc != PB_OK)
        return rc;
    atomic_fetch_or(&l->s->client_flags, PB_CF_PIN);
    return PB_OK;
}

PB_API int pb_lease_backend_pid(const pb_lease *l)
{
    if (!l || pbi_lease_check((pb_lease *)l) != PB_OK)
        return -1;
    return atomic_load(&l->s->backend_pid);
}

/* The non-blocking API (async.c) reuses these; each is the static function
 * of the same name above. */
int pbi_ensure_attached(pb_client *c) { return ensure_attached(c); }
int pbi_find_pool(pb_client *c, const char *name, uint32_t *idx) { return find_pool(c, name, idx); }
int pbi_try_take_free(pb_client *c, uint32_t pi, uint32_t *slot, uint64_t *word)
{ return try_take_free(c, pi, slot, word); }
int pbi_make_lease(pb_client *c, uint32_t pi, uint32_t s, uint64_t w, pb_lease **out)
{ return make_lease(c, pi, s, w, out); }
int pbi_sq_push(pb_client *c, uint64_t e) { return sq_push(c, e); }
int pbi_broker_alive(pb_client *c) { return broker_alive(c); }
uint64_t pbi_coarse_ms(void) { return coarse_ms(); }

/* ---------------------------------------------------------------- commands */

void pbi_set_preview(pb_lease *l, const char *text, size_t len)
{
    if (len > PB_CMD_PREVIEW - 1)
        len = PB_CMD_PREVIEW - 1;
    memcpy(l->s->preview, text, len);
    l->s->preview[len] = 0;
}

int pbi_wait(pb_lease *l, uint32_t seen, uint64_t deadline_ns)
{
    return wait_change(l->c, &l->c->spin_ns, &l->s->rep_futex, &l->s->rep_sleeping, seen, deadline_ns);
}

static int req_buffer_free(pb_lease *l)
{
    return atomic_load_explicit(&l->s->req_ack, memory_order_acquire) == l->seq;
}

/* The request buffer is busy: ask the broker to wake us when it takes the
 * request (req_waiting), then look again.  Seq_cst on both sides (the
 * broker stores req_ack, then loads req_waiting): either we see the ack
 * here, or the broker sees req_waiting and bumps rep_futex. */
static int req_buffer_wait_armed(pb_lease *l)
{
    atomic_store(&l->s->req_waiting, 1);
    return atomic_load(&l->s->req_ack) == l->seq;
}

/* PB_ETOOBIG for a request of len bytes (0: a size the broker saw, not
 * us), with the text pb_lease_error gives. */
static int too_big(pb_lease *l, size_t len)
{
    uint32_t cap = atomic_load_explicit(&l->c->pools[l->pool].max_request_size, memory_order_relaxed);
    if (len)
        snprintf(l->errtext, sizeof l->errtext,
                 "request of %zu bytes is over the pool's max_request_size of %" PRIu32 " bytes", len, cap);
    else
        snprintf(l->errtext, sizeof l->errtext,
                 "request refused by the broker: over the pool's max_request_size of %" PRIu32 " bytes", cap);
    return PB_ETOOBIG;
}

int pbi_request_fits(pb_lease *l, size_t len)
{
    /* The broker's figure; 0 (a scribble) leaves the check to the broker. */
    uint32_t cap = atomic_load_explicit(&l->c->pools[l->pool].max_request_size, memory_order_relaxed);
    if (len <= UINT32_MAX && (cap == 0 || len <= cap))
        return PB_OK;
    return too_big(l, len);
}

uint32_t pbi_group_limit(pb_lease *l)
{
    uint32_t cap = atomic_load_explicit(&l->c->pools[l->pool].max_request_size, memory_order_relaxed);
    return cap && cap < l->req_size ? cap : l->req_size;
}

/* Hand bytes [pos, pos + n) of a request of len bytes to the broker: the
 * buffer must be free.  The replies are owed once its last part is in. */
static int do_submit(pb_lease *l, const uint8_t *req, size_t len, size_t pos, size_t n, uint32_t nreplies)
{
    pb_shm_slot *sl = l->s;
    if (atomic_load_explicit(&sl->req_waiting, memory_order_relaxed))
        atomic_store_explicit(&sl->req_waiting, 0, memory_order_relaxed);
    memcpy(l->req, req + pos, n);
    atomic_store_explicit(&sl->req_len, (uint32_t)n, memory_order_relaxed);
    atomic_store_explicit(&sl->req_total, (uint32_t)len, memory_order_relaxed);
    atomic_store_explicit(&sl->req_pos, (uint32_t)pos, memory_order_relaxed);
    atomic_store_explicit(&sl->req_seq, ++l->seq, memory_order_release);
    if (pos + n == len) {
        l->pending += nreplies;
        l->done_target += nreplies;
    }
    l->watching = 0;                /* the broker's watch ends with a command */
    return sq_push(l->c, PB_SQE(PB_SQ_SUBMIT, l->slot, PB_WORD_GEN(l->word)));
}

int pbi_submit_nowait(pb_lease *l, const void *req, size_t len, uint32_t nreplies)
{
    int rc = pbi_request_fits(l, len);
    if (rc != PB_OK)
        return rc;
    for (;;) {
        if (!req_buffer_free(l) && !req_buffer_wait_armed(l))
            return PB_EBUSY;        /* the ack will bump rep_futex */
        size_t pos = l->stream_off;
        if (pos) {
            /* The broker took the part before; it says here if it refused
             * the request instead (over its max_request_size, or a part it
             * could not take): stop streaming. */
            int err = atomic_load(&l->s->io_error);
            if (err < 0) {
                l->stream_off = 0;
                return err == PB_ETOOBIG ? too_big(l, len) : err;
            }
        }
        if (pos >= len) {
            l->stream_off = 0;      /* called again with a shorter request: not ours to guess */
            return PB_EINVAL;
        }
        size_t n = len - pos < l->req_size ? len - pos : l->req_size;
        rc = do_submit(l, req, len, pos, n, nreplies);
        if (rc != PB_OK || pos + n == len) {
            l->stream_off = 0;
            return rc;
        }
        l->stream_off = (uint32_t)(pos + n);
    }
}

int pbi_submit(pb_lease *l, const void *req, size_t len, uint32_t nreplies)
{
    int rc;
    for (;;) {
        rc = pbi_submit_nowait(l, req, len, nreplies);
        if (rc != PB_EBUSY)
            return rc;
        /* pbi_submit_nowait set req_waiting: the broker's ack bumps rep_futex. */
        uint32_t seen = atomic_load(&l->s->rep_futex);
        if (req_buffer_free(l))
            continue;
        if ((rc = pbi_lease_check(l)) != PB_OK || (rc = pbi_wait(l, seen, 0)) != PB_OK) {
            l->stream_off = 0;
            return rc;
        }
    }
}

PB_API const char *pb_lease_error(const pb_lease *l)
{
    return l ? l->errtext : "";
}

int pbi_push_watch(pb_lease *l)
{
    if (l->watching)
        return PB_OK;
    l->watching = 1;
    return sq_push(l->c, PB_SQE(PB_SQ_WATCH, l->slot, PB_WORD_GEN(l->word)));
}

int pbi_reply_peek(pb_lease *l, const uint8_t **p, size_t *avail)
{
    pb_shm_slot *sl = l->s;
    uint64_t head = atomic_load_explicit(&sl->rep_head, memory_order_acquire);
    *avail = 0;
    if (head != l->rep_tail) {
        uint64_t used = head - l->rep_tail;
        if (used > l->rep_size)
            return PB_EPROTO;
        uint32_t off = (uint32_t)(l->rep_tail & (l->rep_size - 1));
        size_t n = l->rep_size - off;
        if (n > used)
            n = (size_t)used;
        *p = l->rep + off;
        *avail = n;
        return PB_OK;
    }
    if (req_buffer_free(l)) {
        int err = atomic_load(&sl->io_error);
        if (err == PB_ETOOBIG)
            return too_big(l, 0);   /* the broker's limit was lower than the one we checked */
        if (err < 0)
            return err >= PB_ESERVER ? err : PB_EPROTO;
    }
    return PB_OK;
}

int pbi_reply_wait(pb_lease *l, const uint8_t **p, size_t *avail)
{
    int rc;
    uint64_t unacked_since = 0;
    for (;;) {
        uint32_t seen = atomic_load(&l->s->rep_futex);
        if ((rc = pbi_reply_peek(l, p, avail)) != PB_OK || *avail)
            return rc;
        if ((rc = pbi_lease_check(l)) != PB_OK)
            return rc;
        /* The broker says every reply we asked for is in the ring (or that
         * it owes us none), and we have read it all, yet the caller still
         * waits for more: what we sent or read was not what it should have
         * been (a scribbled request or ring). */
        if (req_buffer_free(l) && l->pending) {
            uint32_t owed = atomic_load(&l->s->rep_owed);
            uint64_t done = atomic_load(&l->s->reply_done);
            uint64_t head = atomic_load_explicit(&l->s->rep_head, memory_order_acquire);
            if (head == l->rep_tail && (done >= l->done_target || owed == 0)) {
                l->desync = 1;
                return PB_EPROTO;
            }
        }
        /* The broker takes a request within microseconds.  One not taken
         * for a second lost its ring entry (a scribbled ring): push it
         * again — the broker ignores a sequence it has already taken. */
        if (!req_buffer_free(l)) {
            uint64_t now = now_ns();
            if (!unacked_since)
                unacked_since = now;
            else if (now - unacked_since > 1000000000ull) {
                sq_push(l->c, PB_SQE(PB_SQ_SUBMIT, l->slot, PB_WORD_GEN(l->word)));
                unacked_since = now;
            }
        }
        if ((rc = pbi_wait(l, seen, 0)) != PB_OK)
            return rc;
    }
}

void pbi_reply_consume(pb_lease *l, size_t n)
{
    pb_shm_slot *sl = l->s;
    l->rep_tail += n;
    atomic_store_explicit(&sl->rep_tail, l->rep_tail, memory_order_release);
    /* The broker stopped reading for want of room: tell it there is some. */
    if (atomic_load(&sl->rep_paused))
        sq_push(l->c, PB_SQE(PB_SQ_DRAINED, l->slot, PB_WORD_GEN(l->word)));
}
