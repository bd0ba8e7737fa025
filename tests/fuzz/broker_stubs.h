/*
 * broker_stubs.h — the broker functions a protocol driver (broker/pg.c,
 * broker/redis.c) refers to besides conn_got_reply, for fuzz targets that
 * link the driver alone.  None is reached by framing or reply scanning, so
 * each aborts: a fuzz input that gets there is a finding.  Include once, in
 * the target's .c, after broker.h.
 */
#ifndef PB_FUZZ_BROKER_STUBS_H
#define PB_FUZZ_BROKER_STUBS_H

#include <stdlib.h>

broker B;

int conn_sbuf_append(conn *c, const void *p, uint32_t n)
{
    (void)c; (void)p; (void)n;
    abort();                /* only the reset/ping builders use it: not fuzzed */
}

void conn_connect_failed(conn *c, const char *why)
{
    (void)c; (void)why;
    abort();
}

void conn_connected(conn *c)
{
    (void)c;
    abort();
}

void loop_poll(loop *l, ev_op *op, int fd, uint32_t events)
{
    (void)l; (void)op; (void)fd; (void)events;
    abort();
}

#endif /* PB_FUZZ_BROKER_STUBS_H */
