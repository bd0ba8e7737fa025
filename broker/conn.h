/*
 * conn.h — what the connection modules (pool.c, conn.c, connio.c, release.c)
 * share with each other and nobody else.  The interface the rest of the
 * broker uses is in broker.h.
 */
#ifndef PB_CONN_H
#define PB_CONN_H

#include "broker.h"

/* pool.c */
void pool_publish_size(pool *p);
/* A broker-held, clean, connected slot: enter PH_READY and go to the first
 * live waiter, else to the free map. */
void pool_offer(conn *c);

/* conn.c */
/* Replies owed by the backend; B.inflight counts connections owing any. */
void conn_expect_add(conn *c, uint32_t n);
void conn_expect_clear(conn *c);
void conn_next(conn *c);
void conn_on_poll(ev_op *op, int res);
void conn_finish_close(conn *c);
void conn_fail(conn *c, const char *why, int err);
void conn_io_failed(conn *c, const char *why);

/* connio.c */
void conn_io_recv(conn *c, void *buf, size_t len);
void conn_io_send(conn *c, const void *buf, size_t len);
void conn_io_cancel(conn *c, ev_op *op);
void conn_on_send(ev_op *op, int res);
void conn_on_recv(ev_op *op, int res);
void conn_arm_recv(conn *c);
void conn_retry_deferred(conn *c);
/* The scanner found one complete reply on c: count it.  PB_EPROTO if none
 * was owed. */
int conn_got_reply(conn *c, const drv_reply *r);

/* release.c */
void conn_release_clean(conn *c);
void conn_finish_reset(conn *c);

#endif /* PB_CONN_H */
