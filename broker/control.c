/*
 * control.c — the control socket and the client table.
 *
 * A worker attaches by connecting to the socket and sending a pb_attach_req.
 * The broker checks the peer's credentials (SO_PEERCRED against allowed_uids
 * and allowed_gids), opens a pidfd for it, fills a client record in the
 * segment and answers with the segment and doorbell fds (SCM_RIGHTS).  From
 * then on the client talks to the broker only through its submission ring;
 * the socket stays open so that either side sees the other go (EOF), and the
 * pidfd tells us when the process itself has died, whatever killed it.
 *
 * control_scan_rings() drains the submission rings whose doorbell bit is set,
 * and the janitor's control_sweep() looks at a fixed slice of the client
 * table each pass (so neither costs more with more processes attached).  Each
 * entry is client-written, so it is read once and every field is checked
 * before use; a bad entry is logged and skipped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "attach.h"
#include "broker.h"
#include "log.h"
#include "poolbroker.h"

static void on_accept(ev_op *op, int res);
static void on_ctrl(ev_op *op, int res);
static void on_pidfd(ev_op *op, int res);

static int pidfd_open_(pid_t pid)
{
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int control_listen(broker *b)
{
    const char *path = b->cf->socket;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };

    if (strlen(path) >= sizeof sa.sun_path) {
        log_error("socket path too long: %s", path);
        return -1;
    }
    strcpy(sa.sun_path, path);

    /* A socket file may be left by a broker that died.  If a broker answers
     * an attach on it, one is running: refuse rather than steal its path.
     * A connect alone proves nothing: a broker killed a moment ago can
     * still have the socket listening while the kernel tears down its
     * io_uring (a supervisor restarting it at once hits exactly that). */
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0) {
        struct timeval tv = { .tv_sec = 1 };
        setsockopt(probe, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (connect(probe, (struct sockaddr *)&sa, sizeof sa) == 0) {
            pb_attach_req req = { PB_ATTACH_MAGIC, PB_SHM_VERSION, PB_SHM_FINGERPRINT, (int32_t)getpid() };
            pb_attach_resp resp;
            int answered = send(probe, &req, sizeof req, MSG_NOSIGNAL) == (ssize_t)sizeof req &&
                           recv(probe, &resp, sizeof resp, 0) > 0;
            close(probe);
            if (answered) {
                log_error("another broker is listening on %s", path);
                return -1;
            }
            log_info("%s accepts but nobody answers: a broker that just died; taking it over", path);
        } else {
            close(probe);
        }
    }
    if (unlink(path) == 0)
        log_info("removed stale socket %s", path);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        log_errno(LOG_LVL_ERROR, errno, "socket");
        return -1;
    }
    mode_t old = umask(0177);
    int r = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    umask(old);
    if (r < 0) {
        log_errno(LOG_LVL_ERROR, errno, "bind %s", path);
        close(fd);
        return -1;
    }
    if (chmod(path, b->cf->socket_mode) < 0 ||
        (b->cf->n_allowed_gids > 0 && (b->cf->socket_mode & 070) &&
         chown(path, (uid_t)-1, b->cf->allowed_gids[0]) < 0)) {
        log_errno(LOG_LVL_ERROR, errno, "setting mode/group of %s", path);
        close(fd);
        return -1;
    }
    if (listen(fd, 1024) < 0) {
        log_errno(LOG_LVL_ERROR, errno, "listen %s", path);
        close(fd);
        return -1;
    }
    b->listen_fd = fd;
    b->accept_op.cb = on_accept;
    b->accept_op.data = b;
    loop_accept(b->lp, &b->accept_op, fd);
    return 0;
}

void control_close(broker *b)
{
    if (b->listen_fd >= 0) {
        close(b->listen_fd);
        b->listen_fd = -1;
        unlink(b->cf->socket);
    }
}

client *client_by_id(broker *b, uint32_t id)
{
    if (id == 0)
        return NULL;
    uint32_t idx = PB_CLIENT_INDEX(id);
    if (idx >= b->max_clients || b->clients[idx].id != id)
        return NULL;
    return &b->clients[idx];
}

/* Send the attach answer; fds only on success.  A refusal carries why
 * (pb_attach_refusal), for the client to tell its caller. */
static void send_answer(broker *b, int fd, int status, client *cl, pb_attach_refusal why)
{
    pb_attach_resp resp = {
        .magic = PB_ATTACH_MAGIC,
        .status = status,
        .version = PB_SHM_VERSION,
        .fingerprint = PB_SHM_FINGERPRINT,
        .client_id = cl ? cl->id : 0,
        .generation = atomic_load(&b->hdr_copy.generation),
        .shm_size = b->shm_size,
    };
    if (status != PB_OK)
        resp.refusal = why;
    if (status == PB_OK)
        resp.layout = (pb_shm_layout){
            .pool_off = b->hdr_copy.pool_off,
            .client_off = b->hdr_copy.client_off,
            .slot_off = b->hdr_copy.slot_off,
            .buf_off = b->hdr_copy.buf_off,
            .max_clients = b->hdr_copy.max_clients,
            .nslots = b->hdr_copy.nslots,
            .lifeline_tid = b->lifeline_tid,
        };
    struct iovec iov = { .iov_base = &resp, .iov_len = sizeof resp };
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } u;
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (status == PB_OK) {
        memset(&u, 0, sizeof u);
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof u.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(2 * sizeof(int));
        int fds[2] = { b->shm_fd, b->doorbell_fd };
        memcpy(CMSG_DATA(cm), fds, sizeof fds);
    }
    /* The socket is fresh and the message small: a non-blocking send of it
     * cannot be partial in practice; if it is, the client sees a short read
     * and reports PB_EBROKER. */
    if (sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)sizeof resp)
        log_errno(LOG_LVL_WARN, errno, "sending attach answer");
}

static void send_refusal(broker *b, int fd, int status, pb_attach_refusal why)
{
    send_answer(b, fd, status, NULL, why);
}

static client *alloc_client(broker *b)
{
    for (uint32_t i = 0; i < b->max_clients; i++) {
        client *cl = &b->clients[i];
        if (cl->id == 0 && !cl->dead && cl->ctrl_fd < 0) {
            cl->reuse++;
            cl->id = ((cl->reuse & 0xFFFu) << PB_CLIENT_INDEX_BITS) | (i + 1);
            cl->idx = i;
            return cl;
        }
    }
    return NULL;
}

static void on_accept(ev_op *op, int res)
{
    broker *b = op->data;
    if (res >= 0) {
        client *cl = alloc_client(b);
        if (!cl) {
            log_warn("refused a client: max_clients (%u) reached", b->max_clients);
            send_refusal(b, res, PB_EPERM,
                         (pb_attach_refusal){ .reason = PB_REFUSED_MAX_CLIENTS, .limit = b->max_clients });
            close(res);
        } else {
            cl->ctrl_fd = res;
            cl->attached = 0;
            cl->dead = 0;
            cl->pidfd = -1;
            cl->ctrl_op.cb = on_ctrl;
            cl->ctrl_op.data = cl;
            loop_recv(b->lp, &cl->ctrl_op, res, cl->ctrl_buf, sizeof cl->ctrl_buf);
        }
    } else if (res != -EAGAIN && res != -EINTR && res != -ECONNABORTED) {
        log_errno(LOG_LVL_WARN, -res, "accept");
    }
    if (b->listen_fd >= 0 && !b->stop)
        loop_accept(b->lp, &b->accept_op, b->listen_fd);
}

/* Free the record once nothing of ours is in flight on it. */
static void client_finalize(broker *b, client *cl)
{
    if (cl->ctrl_op.pending || cl->pid_op.pending)
        return;
    if (cl->ctrl_fd >= 0)
        close(cl->ctrl_fd);
    if (cl->pidfd >= 0)
        close(cl->pidfd);
    cl->ctrl_fd = cl->pidfd = -1;
    cl->dead = 0;
    cl->attached = 0;
    (void)b;
}

static void attach(broker *b, client *cl, const uint8_t *buf, int len)
{
    pb_attach_req req;
    struct ucred cred;
    socklen_t clen = sizeof cred;

    /* attach.c judges the message; of its refusals only a bad size is logged
     * before SO_PEERCRED, because the others name the peer's pid. */
    int rc = attach_check_req(buf, (size_t)len, &req);
    if (rc != PB_OK && len != (int)sizeof req) {
        log_warn("attach: bad request size %d", len);
        goto refuse_proto;
    }
    if (getsockopt(cl->ctrl_fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) {
        log_errno(LOG_LVL_WARN, errno, "SO_PEERCRED");
        goto refuse_proto;
    }
    if (rc == PB_EPROTO) {
        log_warn("attach from worker=%d: not a poolbroker client", (int)cred.pid);
        goto refuse_proto;
    }
    if (rc == PB_EVERSION) {
        log_warn("attach from worker=%d refused: layout version %u/%08x, broker has %u/%08x", (int)cred.pid,
                 req.version, req.fingerprint, PB_SHM_VERSION, PB_SHM_FINGERPRINT);
        send_refusal(b, cl->ctrl_fd, PB_EVERSION, (pb_attach_refusal){ .reason = PB_REFUSED_VERSION });
        goto drop;
    }
    if (!attach_uid_allowed(b->cf, geteuid(), cred.uid, cred.gid)) {
        log_warn("attach from worker=%d refused: uid %u gid %u not allowed", (int)cred.pid, (unsigned)cred.uid,
                 (unsigned)cred.gid);
        send_refusal(b, cl->ctrl_fd, PB_EPERM,
                     (pb_attach_refusal){ .reason = PB_REFUSED_UID, .uid = cred.uid, .gid = cred.gid });
        goto drop;
    }
    if (b->draining) {
        send_refusal(b, cl->ctrl_fd, PB_ESHUTDOWN, (pb_attach_refusal){ .reason = PB_REFUSED_DRAINING });
        goto drop;
    }
    cl->pidfd = pidfd_open_(cred.pid);
    if (cl->pidfd < 0) {
        log_errno(LOG_LVL_WARN, errno, "pidfd_open(worker=%d)", (int)cred.pid);
        send_refusal(b, cl->ctrl_fd, PB_EBROKER, (pb_attach_refusal){ .reason = PB_REFUSED_TRACKING });
        goto drop;
    }
    cl->pid = cred.pid;
    cl->uid = cred.uid;
    cl->sq_head = 0;

    pb_shm_client *sc = &b->shm_clients[cl->idx];
    atomic_store(&sc->pid, (int32_t)cred.pid);
    atomic_store(&sc->attach_ms, b->now_ms);
    atomic_store(&sc->wait_word, PB_WAITW(PB_WAIT_NONE, 0, 0));
    atomic_store(&sc->wait_sleeping, 0);
    atomic_store(&sc->sq_head, 0);
    atomic_store(&sc->sq_tail, 0);
    atomic_store_explicit(&sc->id, cl->id, memory_order_release);

    cl->attached = 1;
    b->nattached++;
    atomic_store(&b->hdr->clients_attached, b->nattached);
    send_answer(b, cl->ctrl_fd, PB_OK, cl, (pb_attach_refusal){ 0 });
    log_debug("client %u attached: worker=%d uid %u", cl->id, (int)cl->pid, (unsigned)cl->uid);

    cl->pid_op.cb = on_pidfd;
    cl->pid_op.data = cl;
    loop_poll(b->lp, &cl->pid_op, cl->pidfd, POLLIN);
    loop_recv(b->lp, &cl->ctrl_op, cl->ctrl_fd, cl->ctrl_buf, sizeof cl->ctrl_buf);
    return;

refuse_proto:
    send_refusal(b, cl->ctrl_fd, PB_EPROTO, (pb_attach_refusal){ .reason = PB_REFUSED_MALFORMED });
drop:
    cl->id = 0;
    client_finalize(b, cl);
}

static void on_ctrl(ev_op *op, int res)
{
    client *cl = op->data;
    broker *b = &B;

    if (cl->dead) {
        client_finalize(b, cl);
        return;
    }
    if (!cl->attached) {
        if (res <= 0) {             /* went away before attaching */
            cl->id = 0;
            client_finalize(b, cl);
            return;
        }
        attach(b, cl, cl->ctrl_buf, res);
        return;
    }
    if (res == 0 || (res < 0 && res != -EINTR && res != -EAGAIN)) {
        client_gone(b, cl, "disconnected");
        return;
    }
    /* Nothing is expected on the socket after the attach; ignore it. */
    loop_recv(b->lp, &cl->ctrl_op, cl->ctrl_fd, cl->ctrl_buf, sizeof cl->ctrl_buf);
}

static void on_pidfd(ev_op *op, int res)
{
    client *cl = op->data;
    broker *b = &B;
    if (cl->dead) {
        client_finalize(b, cl);
        return;
    }
    if (res == -ECANCELED)
        return;
    client_gone(b, cl, "process exited");
}

static void drain_ring(broker *b, client *cl);

/* A client detached or died: take back everything it held. */
void client_gone(broker *b, client *cl, const char *why)
{
    if (cl->dead || !cl->attached)
        return;
    uint32_t id = cl->id;
    log_debug("client %u (worker=%d) %s", id, (int)cl->pid, why);

    /* What it had already asked for is still worth doing (a release, say). */
    drain_ring(b, cl);
    pool_drop_client_waiters(b, cl);

    /* The reclaim's log line names the worker it takes the lease from. */
    char reason[128];
    snprintf(reason, sizeof reason, "worker=%d %s", (int)cl->pid, why);
    for (uint32_t s = 0; s < b->nslots; s++) {
        conn *c = b->slots[s];
        if (!c)
            continue;
        uint64_t w = atomic_load(&c->slot->word);
        unsigned st = PB_WORD_STATE(w);
        if (PB_WORD_OWNER(w) == id && (st == PB_SLOT_LEASED || st == PB_SLOT_RELEASING))
            conn_take_back(c, w, reason);
    }

    pb_shm_client *sc = &b->shm_clients[cl->idx];
    atomic_store(&sc->id, 0);
    atomic_store(&sc->pid, 0);
    cl->id = 0;
    cl->dead = 1;
    b->nattached--;
    atomic_store(&b->hdr->clients_attached, b->nattached);
    /* End both operations; the record is reused once their callbacks ran. */
    shutdown(cl->ctrl_fd, SHUT_RDWR);
    loop_cancel(b->lp, &cl->pid_op);
    loop_cancel(b->lp, &cl->ctrl_op);
    client_finalize(b, cl);
}

/* One submission entry from client cl. */
static void handle_sqe(broker *b, client *cl, uint64_t e)
{
    unsigned op = PB_SQE_OP(e);
    uint32_t arg = PB_SQE_ARG(e), val = PB_SQE_VAL(e);

    switch (op) {
    case PB_SQ_NOP:
        return;
    case PB_SQ_SUBMIT:
    case PB_SQ_RELEASE:
    case PB_SQ_DRAINED:
    case PB_SQ_WATCH: {
        if (arg >= b->nslots)
            break;
        conn *c = b->slots[arg];
        if (!c)
            break;
        uint64_t w = atomic_load(&c->slot->word);
        if (PB_WORD_OWNER(w) != cl->id || PB_WORD_GEN(w) != val)
            return;                 /* stale: that lease is over */
        if (op == PB_SQ_RELEASE) {
            if (PB_WORD_STATE(w) == PB_SLOT_RELEASING)
                conn_release(c, w);
        } else if (PB_WORD_STATE(w) == PB_SLOT_LEASED) {
            if (op == PB_SQ_SUBMIT)
                conn_submit(c, w, atomic_load(&c->slot->req_seq));
            else if (op == PB_SQ_WATCH)
                conn_watch(c, w);
            else
                conn_drained(c);
        }
        return;
    }
    case PB_SQ_WAIT:
    case PB_SQ_CANCEL_WAIT:
        if (arg >= b->npools)
            break;
        if (op == PB_SQ_WAIT)
            pool_enqueue_waiter(&b->pools[arg], cl, val);
        else
            pool_cancel_waiter(&b->pools[arg], cl, val);
        return;
    }
    log_warn("client %u (worker=%d): bad submission entry %016llx ignored", cl->id, (int)cl->pid,
             (unsigned long long)e);
    shm_note_repair(b);
}

/* Take every entry on client cl's submission ring. */
static void drain_ring(broker *b, client *cl)
{
    pb_shm_client *sc = &b->shm_clients[cl->idx];
    uint32_t tail = atomic_load_explicit(&sc->sq_tail, memory_order_acquire);
    uint32_t n = tail - cl->sq_head;
    if (n == 0)
        return;
    if (n > PB_SQ_ENTRIES) {
        log_warn("client %u (worker=%d): submission ring tail %u impossible (head %u); resynchronised",
                 cl->id, (int)cl->pid, tail, cl->sq_head);
        shm_note_repair(b);
        cl->sq_head = tail;
        atomic_store_explicit(&sc->sq_head, tail, memory_order_release);
        return;
    }
    while (cl->sq_head != tail) {
        uint64_t e = atomic_load_explicit(&sc->sq[cl->sq_head & (PB_SQ_ENTRIES - 1)], memory_order_relaxed);
        cl->sq_head++;
        b->work.sq_entries++;
        handle_sqe(b, cl, e);
        if (!cl->attached || cl->dead)
            break;
    }
    atomic_store_explicit(&sc->sq_head, cl->sq_head, memory_order_release);
}

/* The rings whose doorbell bit is set (header.sq_ready): the work is the
 * words the summary (sq_ready_sum) names plus the rings that have entries,
 * never one look per attached client nor per max_clients / 64 words.  The
 * summary, then each word, is taken (exchanged to 0) before the rings are
 * read: a push that lands meanwhile sets its bits again for the next pass
 * (it sets the word's bit before the summary's, so a summary bit we took
 * always leads to a word that already holds the push's bit).  Bits are
 * worker-written: one for a record that is not attached is ignored; one a
 * worker cleared is found by the janitor's sweep (control_sweep). */
void control_scan_rings(broker *b)
{
    b->last_sq_seq = atomic_load(&b->hdr->sq_seq);
    b->work.scans++;
    uint64_t sum = atomic_exchange(&b->hdr->sq_ready_sum, 0);
    while (sum) {
        uint32_t wi = (uint32_t)__builtin_ctzll(sum);
        sum &= sum - 1;
        if (wi * 64 >= b->max_clients)
            continue;               /* a bit no record has: scribbled */
        b->work.scan_words++;
        uint64_t m = atomic_exchange(&b->hdr->sq_ready[wi], 0);
        while (m) {
            uint32_t i = wi * 64 + (uint32_t)__builtin_ctzll(m);
            m &= m - 1;
            if (i >= b->max_clients)
                continue;
            client *cl = &b->clients[i];
            if (cl->attached && !cl->dead) {
                b->work.scan_rings++;
                drain_ring(b, cl);
            }
        }
    }
}

void control_sweep(broker *b)
{
    uint32_t n = b->max_clients < SWEEP_RECORDS ? b->max_clients : SWEEP_RECORDS;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = b->sweep_next;  /* broker-private, always below max_clients */
        b->sweep_next = i + 1 < b->max_clients ? i + 1 : 0;
        client *cl = &b->clients[i];
        pb_shm_client *sc = &b->shm_clients[i];
        int live = cl->attached && !cl->dead;
        b->work.sweep_records++;
        shm_republish_client(b, i);
        if (live && atomic_load_explicit(&sc->sq_tail, memory_order_relaxed) != cl->sq_head) {
            b->work.sweep_rings++;
            drain_ring(b, cl);
        }
    }
}
