/*
 * tls.c — I/O on PostgreSQL connections that libpq set up with TLS.
 *
 * After libpq's handshake the bytes on the socket are TLS records, so the
 * broker reads and writes through the connection's SSL* (PQsslStruct)
 * instead of handing the socket to io_uring.  To the rest of the broker
 * nothing changes: tls_recv()/tls_send() take the connection's recv_op and
 * send_op and complete them through their usual callbacks, always from the
 * main loop (never re-entrantly), with the same results a recv or send
 * would give.
 *
 * An operation is tried from the ready list on the next loop iteration; if
 * OpenSSL wants the socket readable or writable, a poll is armed and the
 * operation goes back on the ready list when it fires.  Data OpenSSL has
 * already decrypted (SSL_pending) needs no poll: the next read is simply
 * tried at once.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>

#include "broker.h"
#include "log.h"

static conn *ready_head, *ready_tail;

static void ready_push(conn *c)
{
    if (c->tls_queued)
        return;
    c->tls_queued = 1;
    c->tls_next = NULL;
    if (ready_tail)
        ready_tail->tls_next = c;
    else
        ready_head = c;
    ready_tail = c;
}

static void on_tls_poll(ev_op *op, int res)
{
    conn *c = op->data;
    (void)res;
    ready_push(c);                  /* try again, whatever the poll said */
}

static void tls_submit(conn *c, ev_op *op, void *buf, size_t len)
{
    op->buf = buf;
    op->len = len;
    op->pending = 1;
    op->cancelled = 0;
    if (!c->tls_poll_op.cb) {
        c->tls_poll_op.cb = on_tls_poll;
        c->tls_poll_op.data = c;
    }
    ready_push(c);
}

void tls_recv(conn *c, void *buf, size_t len)
{
    c->recv_op.kind = EV_RECV;
    tls_submit(c, &c->recv_op, buf, len);
}

void tls_send(conn *c, const void *buf, size_t len)
{
    c->send_op.kind = EV_SEND;
    tls_submit(c, &c->send_op, (void *)buf, len);
}

void tls_cancel(conn *c, ev_op *op)
{
    if (!op->pending)
        return;
    op->cancelled = 1;
    ready_push(c);
}

int tls_has_ready(void)
{
    return ready_head != NULL;
}

static void complete(ev_op *op, int res)
{
    op->pending = 0;
    op->cb(op, res);
}

/* Try one operation.  Returns 1 if it completed, 0 if it waits for the
 * socket (the poll mask it needs is or-ed into *want). */
static int attempt(conn *c, ev_op *op, short *want)
{
    SSL *ssl = c->ssl;
    if (op->cancelled) {
        complete(op, -ECANCELED);
        return 1;
    }
    ERR_clear_error();
    int n = op->kind == EV_RECV ? SSL_read(ssl, op->buf, (int)(op->len > 1u << 30 ? 1u << 30 : op->len))
                                : SSL_write(ssl, op->buf, (int)(op->len > 1u << 30 ? 1u << 30 : op->len));
    if (n > 0) {
        complete(op, n);
        return 1;
    }
    int err = SSL_get_error(ssl, n);
    if (err == SSL_ERROR_WANT_READ) {
        *want |= POLLIN;
        return 0;
    }
    if (err == SSL_ERROR_WANT_WRITE) {
        *want |= POLLOUT;
        return 0;
    }
    if (err == SSL_ERROR_ZERO_RETURN) {
        complete(op, 0);            /* the server closed the TLS session */
        return 1;
    }
    unsigned long e = ERR_peek_error();
    if (e)
        log_warn("TLS %s on backend=%d: %s", op->kind == EV_RECV ? "read" : "write", c->backend_pid,
                 ERR_reason_error_string(e));
    complete(op, err == SSL_ERROR_SYSCALL && errno ? -errno : -EIO);
    return 1;
}

int tls_run_ready(void)
{
    conn *list = ready_head;
    int n = 0;
    ready_head = ready_tail = NULL;
    while (list) {
        conn *c = list;
        list = c->tls_next;
        c->tls_queued = 0;
        short want = 0;
        /* Each completion may queue new work for c (it goes on the new list). */
        if (c->send_op.pending && c->ssl && attempt(c, &c->send_op, &want))
            n++;
        if (c->recv_op.pending && c->ssl && attempt(c, &c->recv_op, &want))
            n++;
        if (want && !c->tls_queued && !c->tls_poll_op.pending &&
            (c->send_op.pending || c->recv_op.pending))
            loop_poll(B.lp, &c->tls_poll_op, c->fd, (uint32_t)want);
    }
    return n;
}
