/*
 * redis.c — the Redis driver (see broker.h's driver).  Placeholder until the
 * Redis issue lands: pools of type redis fail to connect with a clear error.
 */
#include <string.h>
#include <stdio.h>

#include "broker.h"
#include "poolbroker.h"

static int r_connect_start(conn *c)
{
    snprintf(c->error, sizeof c->error, "redis pools are not implemented yet");
    return PB_EBACKEND;
}
static void r_connect_step(conn *c, int revents) { (void)c; (void)revents; }
static int r_frame(conn *c, const uint8_t *req, uint32_t len, uint32_t *n)
{ (void)c; (void)req; (void)len; (void)n; return PB_EPROTO; }
static int r_scan(conn *c, const uint8_t *p, size_t n) { (void)c; (void)p; (void)n; return PB_EPROTO; }
static int r_reset(conn *c, int dirty) { (void)c; (void)dirty; return 0; }
static int r_ping(conn *c) { (void)c; return 0; }
static void r_close(conn *c) { (void)c; }

const driver redis_driver = {
    .name = "redis",
    .connect_start = r_connect_start,
    .connect_step = r_connect_step,
    .frame_request = r_frame,
    .scan_reply = r_scan,
    .build_reset = r_reset,
    .build_ping = r_ping,
    .close = r_close,
};
