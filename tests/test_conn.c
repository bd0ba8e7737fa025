/*
 * test_conn.c — unit test of the connection state machine (broker/conn.c,
 * connio.c, release.c, pool.c, slot.c) with a fake driver and a fake event
 * loop: no sockets, no servers.  The loop records each operation the broker
 * submits; the test completes them by hand (complete()), as the real loop
 * would, and checks the phase, the slot word and the pool's counters after
 * every step.
 *
 * Covered: every move of the phase diagram the integration tests rely on
 * (connect, connect failure, serve and release, release with replies owed,
 * release waiting for a cancel, reset, validation, reclaim, failure and
 * close), the impossible moves refused; in a transaction-mode pool
 * (txn.c), binding and unbinding per statement, the FIFO of statements
 * waiting for a backend, pinning by an open transaction, and a release with
 * replies owed holding the handle until its backend is clean; and following
 * a failover (failover.c): a server that says it is read-only or going away
 * has its free connections closed at once and its leased ones at release,
 * and the next connection to another server is counted.
 *
 * Built without PB_DEBUG (see the Makefile), so a refused move returns
 * PB_EINVAL instead of aborting.
 */
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "broker.h"
#include "log.h"
#include "poolbroker.h"

broker B;

/* ------------------------------------------------------------- fake loop */

static void fake_submit(loop *l, ev_op *op)
{
    (void)l;
    (void)op;                       /* the op stays pending until complete() */
}

static void fake_cancel(loop *l, ev_op *op)
{
    (void)l;
    (void)op;                       /* the test completes it, as a real loop would */
}

static int fake_run(loop *l, int timeout_ms)
{
    (void)l;
    (void)timeout_ms;
    return 0;
}

static void fake_destroy(loop *l)
{
    (void)l;
}

static const struct loop_ops fake_ops = { "fake", fake_submit, fake_cancel, fake_run, fake_destroy, NULL, NULL };
static loop fake_loop = { &fake_ops, LOOP_EPOLL };

/* The loop delivers op's completion. */
static void complete(ev_op *op, int res)
{
    assert_true(op->pending);
    op->pending = 0;
    op->cb(op, res);
}

/* The backends loop.c would choose between: not used here. */
loop *loop_uring_new(void) { return NULL; }
loop *loop_epoll_new(void) { return NULL; }

/* ----------------------------------------------------------- fake driver
 * A request is any bytes and asks for one reply per byte 'Q'.  In the reply
 * stream each 'R' is one complete reply (transaction status idle), 'B' one
 * that leaves a transaction open (status 'T'), 'E' an error reply, 'O' an
 * error reply saying the server is read-only (25006), 'G' one saying it is
 * going away (57P01), anything else filler; '!' is a protocol error. */

static int fake_connect_result = PB_OK;
static const char *fake_server;     /* the server every new connection reaches */

static int fake_connect_start(conn *c, drv_poll *want)
{
    c->fd = 1000 + (int)c->index;  /* no such descriptor: shutdown() on it fails harmlessly */
    snprintf(c->server, sizeof c->server, "%s", fake_server);
    if (fake_connect_result != PB_OK) {
        snprintf(c->error, sizeof c->error, "fake connect failed");
        return DRV_ERROR;
    }
    want->fd = c->fd;
    want->events = POLLOUT;
    return DRV_AGAIN;
}

/* The handshake is one round: the poll fired, it is done. */
static int fake_connect_step(conn *c, int revents, drv_poll *want)
{
    (void)c;
    (void)want;
    return revents > 0 ? DRV_OK : DRV_ERROR;
}

static int fake_frame_request(conn *c, drv_buf *rq, uint32_t *nreplies, const char **why)
{
    (void)c;
    *why = NULL;
    uint32_t n = 0;
    for (uint32_t i = 0; i < rq->len; i++)
        n += rq->p[i] == 'Q';
    *nreplies = n;
    return PB_OK;
}

static int fake_scan_reply(conn *c, const uint8_t *p, size_t n, size_t *used, drv_reply *out)
{
    (void)c;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '!')
            return DRV_ERROR;
        if (p[i] == 'R' || p[i] == 'E' || p[i] == 'B' || p[i] == 'O' || p[i] == 'G') {
            out->txn = p[i] == 'B' ? 'T' : 'I';
            out->errors = p[i] == 'E' || p[i] == 'O' || p[i] == 'G';
            out->server_readonly = p[i] == 'O' ? "read-only (fake)" : NULL;
            out->server_gone = p[i] == 'G' ? "going away (fake)" : NULL;
            *used = i + 1;
            return DRV_OK;
        }
    }
    *used = n;
    return DRV_AGAIN;
}

static int fake_build_reset(conn *c, int dirty, drv_buf *out)
{
    (void)c;
    if (!dirty)
        return 0;
    return drv_buf_append(out, "Q", 1) == PB_OK ? 1 : -1;
}

static int fake_build_ping(conn *c, drv_buf *out)
{
    (void)c;
    return drv_buf_append(out, "Q", 1) == PB_OK ? 1 : -1;
}

static int cancels;

/* Queued at once; "delivered" when the test sets the count back to 0. */
static int fake_cancel_cmd(conn *c, _Atomic int *inflight, int wake_fd)
{
    (void)c;
    (void)wake_fd;
    cancels++;
    atomic_fetch_add(inflight, 1);
    return PB_OK;
}

static int fake_closed;

static void fake_close(conn *c)
{
    fake_closed++;
    c->fd = -1;
}

static const driver fake_driver = {
    .name = "fake",
    .connect_start = fake_connect_start,
    .connect_step = fake_connect_step,
    .frame_request = fake_frame_request,
    .scan_reply = fake_scan_reply,
    .build_reset = fake_build_reset,
    .build_ping = fake_build_ping,
    .cancel = fake_cancel_cmd,
    .close = fake_close,
};

/* pool_setup picks one of these by pool type; the test swaps in its own. */
const driver pg_driver = { .name = "pg (unused)" };
const driver redis_driver = { .name = "redis (unused)" };

/* --------------------------------------------------- the rest of the broker */

static int repairs;
void shm_note_repair(broker *b)
{
    (void)b;
    repairs++;
}

/* The transaction-mode janitor (txn.c) asks who holds a handle; no pool
 * here is in transaction mode. */
client *client_by_id(broker *b, uint32_t id) { (void)b; (void)id; fail(); return NULL; }

void tls_recv(conn *c, void *buf, size_t len) { (void)c; (void)buf; (void)len; fail(); }
void tls_send(conn *c, const void *buf, size_t len) { (void)c; (void)buf; (void)len; fail(); }
void tls_cancel(conn *c, ev_op *op) { (void)c; (void)op; fail(); }


/* ------------------------------------------------------------ the fixture */

#define REQ_SIZE 256
#define REP_SIZE 256
#define NSLOTS   2
#define CLIENT_ID 0x1001u

static struct {
    pb_shm_header hdr;
    pb_shm_pool pools[1];
    pb_shm_client clients[1];
    pb_shm_slot slots[NSLOTS];
    uint8_t bufs[NSLOTS][REQ_SIZE + REP_SIZE];
} *seg;

static conf_pool cp;
static pool *P;

static int setup(void **state)
{
    (void)state;
    log_level = LOG_LVL_ERROR;      /* the refused moves log an error: expected */
    seg = calloc(1, sizeof *seg);
    assert_non_null(seg);
    for (uint32_t i = 0; i < NSLOTS; i++) {
        pb_shm_slot *sl = &seg->slots[i];
        sl->req_off = (uint64_t)((uint8_t *)seg->bufs[i] - (uint8_t *)seg);
        sl->rep_off = sl->req_off + REQ_SIZE;
        sl->req_size = REQ_SIZE;
        sl->rep_size = REP_SIZE;
        atomic_store(&sl->word, PB_WORD(PB_SLOT_EMPTY, 0, 1));
    }
    memset(&B, 0, sizeof B);
    B.lp = &fake_loop;
    B.hdr = &seg->hdr;
    B.shm_pools = seg->pools;
    B.shm_clients = seg->clients;
    B.shm_slots = seg->slots;
    B.max_clients = 1;
    B.nslots = NSLOTS;
    B.now_ms = 1000000;
    B.doorbell_fd = -1;
    memset(&cp, 0, sizeof cp);
    snprintf(cp.name, sizeof cp.name, "t");
    cp.type = PB_POOL_POSTGRES;
    cp.max_size = NSLOTS;
    cp.slots = NSLOTS;              /* the fake segment's slots, no headroom (conf_pool_slots) */
    cp.reset_policy = PB_RESET_ROLLBACK;
    cp.max_request_size = 1u << 20;
    B.pools = calloc(1, sizeof *B.pools);
    B.slots = calloc(NSLOTS, sizeof *B.slots);
    assert_non_null(B.pools);
    assert_non_null(B.slots);
    assert_int_equal(pool_setup(&B, &B.pools[0], 0, &cp, 0), 0);
    B.npools = 1;
    P = &B.pools[0];
    P->drv = &fake_driver;
    fake_connect_result = PB_OK;
    fake_server = "10.0.0.1:5432";
    fake_closed = repairs = cancels = 0;
    return 0;
}

/* The same segment with one pool_mode = transaction pool: both slots are
 * handles, and one backend connection (max_size 1). */
static int setup_txn(void **state)
{
    setup(state);
    free(P->conns);
    free(P->wq);
    cp.pool_mode = PB_MODE_TRANSACTION;
    cp.max_size = 1;
    cp.acquire_timeout_ms = 5000;   /* statements may wait for the backend */
    cp.slots = NSLOTS;
    for (uint32_t i = 0; i < NSLOTS; i++)
        atomic_store(&seg->slots[i].word, PB_WORD(PB_SLOT_EMPTY, 0, 1));
    assert_int_equal(pool_setup(&B, P, 0, &cp, 0), 0);
    P->drv = &fake_driver;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (uint32_t k = 0; k < P->nconns; k++) {
        free(P->conns[k].sbuf.p);
        free(P->conns[k].stream.p);
        free(P->conns[k].scratch);
    }
    if (P->backs)
        txn_free(P);
    free(P->conns);
    free(P->wq);
    free(B.pools);
    free(B.slots);
    free(seg);
    return 0;
}

static unsigned slot_state(const conn *c)
{
    return PB_WORD_STATE(atomic_load(&c->slot->word));
}

/* Start slot 0's connection and finish its handshake: READY and FREE. */
static conn *connected(void)
{
    conn *c = &P->conns[0];
    conn_start_connect(c);
    assert_int_equal(c->phase, PH_CONNECTING);
    assert_int_equal(slot_state(c), PB_SLOT_CONNECTING);
    assert_int_equal(P->connecting, 1);
    assert_int_equal(P->live, 1);
    assert_true(c->poll_op.pending);    /* the driver asked to wait for POLLOUT */
    complete(&c->poll_op, POLLOUT);
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
    assert_int_equal(P->connecting, 0);
    assert_int_equal(P->live, 1);
    assert_true(atomic_load(&P->shm->freemap[0]) & 1u);
    return c;
}

/* What a client does to lease a free slot on the fast path. */
static uint64_t client_lease(conn *c)
{
    uint64_t w = atomic_load(&c->slot->word);
    assert_int_equal(PB_WORD_STATE(w), PB_SLOT_FREE);
    atomic_fetch_and(&P->shm->freemap[0], ~1ull);
    uint64_t leased = PB_WORD_NEXT(w, PB_SLOT_LEASED, CLIENT_ID);
    assert_true(atomic_compare_exchange_strong(&c->slot->word, &w, leased));
    pb_slot_stamp_lease(c->slot, B.now_ms);
    return leased;
}

/* The holder writes a request and submits it; the broker sends it. */
static void client_submit(conn *c, uint64_t lease, const char *req)
{
    uint32_t len = (uint32_t)strlen(req);
    memcpy(c->req, req, len);
    atomic_store(&c->slot->req_len, len);
    atomic_store(&c->slot->req_total, len);
    atomic_store(&c->slot->req_pos, 0);
    uint32_t seq = atomic_fetch_add(&c->slot->req_seq, 1) + 1;
    conn_submit(c, lease, seq);
    assert_int_equal(atomic_load(&c->slot->req_ack), seq);
    assert_true(c->send_op.pending);
    complete(&c->send_op, (int)len);
}

/* The server's bytes arrive for the recv in flight. */
static void server_replies(conn *c, const char *bytes)
{
    size_t n = strlen(bytes);
    assert_true(c->recv_op.pending);
    assert_true(n <= c->recv_op.len);
    memcpy(c->recv_op.buf, bytes, n);
    complete(&c->recv_op, (int)n);
}

/* The holder gives the slot back through the broker (LEASED → RELEASING). */
static void client_release(conn *c, uint64_t lease)
{
    uint64_t rel = PB_WORD_NEXT(lease, PB_SLOT_RELEASING, CLIENT_ID);
    assert_true(atomic_compare_exchange_strong(&c->slot->word, &lease, rel));
    conn_release(c, rel);
}

/* ----------------------------------------------------------------- tests */

static void test_connect(void **state)
{
    (void)state;
    (void)connected();
    assert_int_equal(atomic_load(&P->shm->size), 1);
    assert_int_equal(P->health, PB_HEALTH_HEALTHY);
}

static void test_connect_failed(void **state)
{
    (void)state;
    conn *c = &P->conns[0];
    fake_connect_result = PB_EBACKEND;
    conn_start_connect(c);
    assert_int_equal(c->phase, PH_EMPTY);
    assert_int_equal(slot_state(c), PB_SLOT_EMPTY);
    assert_int_equal(P->connecting, 0);
    assert_int_equal(P->live, 0);
    assert_int_equal(P->fails, 1);
    assert_int_equal(P->health, PB_HEALTH_DOWN);
    assert_true(P->backoff_until_ms > B.now_ms);
}

/* The driver's handshake step fails after the poll: back to EMPTY. */
static void test_connect_step_failed(void **state)
{
    (void)state;
    conn *c = &P->conns[0];
    conn_start_connect(c);
    assert_int_equal(c->phase, PH_CONNECTING);
    complete(&c->poll_op, 0);           /* fake_connect_step: DRV_ERROR */
    assert_int_equal(c->phase, PH_EMPTY);
    assert_int_equal(slot_state(c), PB_SLOT_EMPTY);
    assert_int_equal(P->live, 0);
    assert_int_equal(P->connecting, 0);
    assert_int_equal(fake_closed, 1);
}

static void test_serve_and_release(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    client_submit(c, lease, "QQ");
    assert_int_equal(c->expect, 2);
    assert_int_equal(B.inflight, 1);
    server_replies(c, "xR");
    assert_int_equal(c->expect, 1);
    assert_int_equal(atomic_load(&c->slot->reply_done), 1);
    server_replies(c, "R");
    assert_int_equal(c->expect, 0);
    assert_int_equal(B.inflight, 0);
    assert_int_equal(atomic_load(&c->slot->reply_done), 2);
    assert_int_equal(c->phase, PH_READY);
    client_release(c, lease);
    /* Nothing owed, nothing to reset: straight back to the free map. */
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
}

static void test_release_with_replies_owed(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    client_submit(c, lease, "Q");
    client_release(c, lease);
    assert_int_equal(c->phase, PH_DRAINING);
    assert_int_equal(slot_state(c), PB_SLOT_RESETTING);
    assert_true(c->to_sink);
    assert_int_equal(cancels, 1);       /* nobody reads it: PostgreSQL cancels it */
    atomic_store(&c->cancel_inflight, 0);   /* delivered */
    server_replies(c, "R");
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
    assert_false(c->to_sink);
}

static void test_release_awaits_cancel(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    client_submit(c, lease, "Q");
    client_release(c, lease);
    assert_int_equal(c->phase, PH_DRAINING);
    assert_int_equal(atomic_load(&c->cancel_inflight), 1);
    /* The reply arrives before the cancel request was delivered: hold. */
    server_replies(c, "R");
    assert_int_equal(c->phase, PH_AWAIT_CANCEL);
    assert_int_equal(slot_state(c), PB_SLOT_RESETTING);
    conn_settle(c);                     /* still in flight: nothing happens */
    assert_int_equal(c->phase, PH_AWAIT_CANCEL);
    atomic_store(&c->cancel_inflight, 0);
    conn_settle(c);
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
}

static void test_reset_after_dirty_lease(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    atomic_fetch_or(&c->slot->client_flags, PB_CF_DIRTY);
    client_release(c, lease);
    assert_int_equal(c->phase, PH_RESETTING);
    assert_int_equal(slot_state(c), PB_SLOT_RESETTING);
    assert_int_equal(c->expect, 1);
    complete(&c->send_op, 1);
    server_replies(c, "R");
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
    assert_int_equal(atomic_load(&P->shm->resets), 1);
}

static void test_reset_refused_closes(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    atomic_fetch_or(&c->slot->client_flags, PB_CF_DIRTY);
    client_release(c, lease);
    complete(&c->send_op, 1);
    server_replies(c, "E");             /* the server refused the reset */
    assert_int_equal(c->phase, PH_CLOSING);
    assert_int_equal(slot_state(c), PB_SLOT_CLOSING);
    assert_int_equal(P->live, 0);
}

static void test_validate_after_idle(void **state)
{
    (void)state;
    cp.validate_after_idle_ms = 100;
    conn *c = connected();
    atomic_store(&c->slot->idle_ms, B.now_ms - 1000);
    /* What the janitor does with a slot idle too long. */
    assert_true(slot_take_free(c, PB_SLOT_RESETTING));
    conn_validate_or_offer(c);
    assert_int_equal(c->phase, PH_VALIDATING);
    complete(&c->send_op, 1);
    server_replies(c, "R");
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
}

static void test_reclaim(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    conn_take_back(c, lease, "test");
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
    assert_int_equal(atomic_load(&P->shm->reclaims), 1);
}

static void test_failure_and_close(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    client_submit(c, lease, "Q");
    complete(&c->recv_op, 0);           /* the server hung up */
    assert_true(c->broken);
    assert_int_equal(atomic_load(&c->slot->io_error), PB_EBACKEND);
    assert_int_equal(c->phase, PH_READY);   /* still leased: the holder learns first */
    client_release(c, lease);
    assert_int_equal(c->phase, PH_CLOSING);
    assert_int_equal(P->live, 0);
    /* In-flight operations end before the driver state goes. */
    if (c->poll_op.pending)
        complete(&c->poll_op, -125);
    assert_int_equal(c->phase, PH_EMPTY);
    assert_int_equal(slot_state(c), PB_SLOT_EMPTY);
    assert_true(fake_closed >= 1);
}

static void test_close_waits_for_ops(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    client_submit(c, lease, "Q");
    assert_true(c->recv_op.pending);
    client_release(c, lease);
    assert_int_equal(c->phase, PH_DRAINING);
    conn_close(c, "test");
    assert_int_equal(c->phase, PH_CLOSING);
    complete(&c->recv_op, -125);        /* the cancelled recv comes back */
    if (c->poll_op.pending)
        complete(&c->poll_op, -125);
    assert_int_equal(c->phase, PH_EMPTY);
    assert_int_equal(B.inflight, 0);
}

static void test_protocol_error(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    client_submit(c, lease, "Q");
    server_replies(c, "RR");            /* one more reply than asked for */
    assert_true(c->broken);
    assert_int_equal(atomic_load(&c->slot->io_error), PB_EBACKEND);
}

/* The diagram, as a table: every pair not listed is refused. */
static void test_phase_table(void **state)
{
    (void)state;
    static const struct { enum conn_phase from, to; } ok[] = {
        { PH_EMPTY, PH_CONNECTING },
        { PH_CONNECTING, PH_READY },       { PH_CONNECTING, PH_EMPTY },
        { PH_READY, PH_DRAINING },         { PH_READY, PH_RESETTING },
        { PH_READY, PH_VALIDATING },       { PH_READY, PH_CLOSING },
        { PH_DRAINING, PH_AWAIT_CANCEL },  { PH_DRAINING, PH_READY },
        { PH_DRAINING, PH_RESETTING },     { PH_DRAINING, PH_VALIDATING },
        { PH_DRAINING, PH_CLOSING },
        { PH_AWAIT_CANCEL, PH_READY },     { PH_AWAIT_CANCEL, PH_RESETTING },
        { PH_AWAIT_CANCEL, PH_VALIDATING }, { PH_AWAIT_CANCEL, PH_CLOSING },
        { PH_RESETTING, PH_READY },        { PH_RESETTING, PH_CLOSING },
        { PH_VALIDATING, PH_READY },       { PH_VALIDATING, PH_CLOSING },
        { PH_CLOSING, PH_EMPTY },
    };
    for (int f = 0; f < PH_COUNT; f++)
        for (int t = 0; t < PH_COUNT; t++) {
            int want = 0;
            for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
                want |= ok[i].from == (enum conn_phase)f && ok[i].to == (enum conn_phase)t;
            if (conn_phase_allowed((enum conn_phase)f, (enum conn_phase)t) != want)
                fail_msg("%s -> %s: allowed %d, want %d", conn_phase_name((enum conn_phase)f),
                         conn_phase_name((enum conn_phase)t), !want, want);
        }
}

static void test_impossible_moves_refused(void **state)
{
    (void)state;
    log_level = LOG_LVL_ERROR + 1;  /* each refusal logs two errors: expected, not shown */
    conn *c = &P->conns[0];
    assert_int_equal(conn_set_phase(c, PH_READY), PB_EINVAL);      /* EMPTY -> READY */
    assert_int_equal(c->phase, PH_EMPTY);
    assert_int_equal(conn_set_phase(c, PH_CLOSING), PB_EINVAL);
    assert_int_equal(P->live, 0);                                   /* nothing was undone */
    c = connected();
    assert_int_equal(conn_set_phase(c, PH_CONNECTING), PB_EINVAL);
    assert_int_equal(conn_set_phase(c, PH_AWAIT_CANCEL), PB_EINVAL);
    assert_int_equal(conn_set_phase(c, PH_EMPTY), PB_EINVAL);
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(P->live, 1);
    assert_int_equal(conn_set_phase(c, (enum conn_phase)PH_COUNT), PB_EINVAL);
    assert_int_equal(c->phase, PH_READY);
}

/* A worker writing a RELEASING word over a slot the broker holds must not
 * derail (or crash) the broker: the release is ignored and counted. */
static void test_scribbled_release_ignored(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    atomic_fetch_or(&c->slot->client_flags, PB_CF_DIRTY);
    client_release(c, lease);
    assert_int_equal(c->phase, PH_RESETTING);
    uint64_t w = atomic_load(&c->slot->word);
    uint64_t bad = PB_WORD_NEXT(w, PB_SLOT_RELEASING, CLIENT_ID);
    atomic_store(&c->slot->word, bad);
    conn_release(c, bad);
    assert_int_equal(c->phase, PH_RESETTING);
    assert_int_equal(repairs, 1);
    complete(&c->send_op, 1);
    server_replies(c, "R");
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
}

/* Start slot k's connection and finish its handshake. */
static conn *connect_slot(uint32_t k)
{
    conn *c = &P->conns[k];
    conn_start_connect(c);
    complete(&c->poll_op, POLLOUT);
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
    return c;
}

/* A closing connection's pending idle poll comes back: it is EMPTY. */
static void closed(conn *c)
{
    if (c->poll_op.pending)
        complete(&c->poll_op, -125);
    assert_int_equal(c->phase, PH_EMPTY);
    assert_int_equal(slot_state(c), PB_SLOT_EMPTY);
}

/* Slot 0 leased and its command answered with reply (one byte of the fake
 * stream); slot 1 free.  Returns slot 0's lease word. */
static uint64_t server_says(const char *reply)
{
    conn *a = connect_slot(0);
    (void)connect_slot(1);
    assert_string_equal(P->shm->server, "10.0.0.1:5432");
    uint64_t lease = client_lease(a);
    client_submit(a, lease, "Q");
    server_replies(a, reply);
    return lease;
}

/* A pool that wants the primary hears 25006: the free connection closes at
 * once, the leased one goes on and closes at release; the next connection
 * reaches the promoted server and counts as a failover. */
static void test_failover_readonly(void **state)
{
    (void)state;
    cp.follow = PB_FOLLOW_PRIMARY;
    conn *a = &P->conns[0], *b = &P->conns[1];
    uint64_t lease = server_says("O");
    closed(b);
    assert_int_equal(a->phase, PH_READY);           /* never mid-lease */
    assert_int_equal(slot_state(a), PB_SLOT_LEASED);
    assert_true(a->suspect);
    assert_true(atomic_load(&a->slot->flags) & PB_SF_RETIRE);
    client_release(a, lease);
    closed(a);
    assert_int_equal(atomic_load(&P->shm->failovers), 0);
    assert_int_equal(P->backoff_until_ms, 0);       /* look for the new server now */
    fake_server = "10.0.0.2:5432";
    (void)connect_slot(0);
    assert_int_equal(atomic_load(&P->shm->failovers), 1);
    assert_string_equal(P->shm->server, "10.0.0.2:5432");
    /* The same server again later is no failover. */
    (void)connect_slot(1);
    assert_int_equal(atomic_load(&P->shm->failovers), 1);
}

/* A read pool (several hosts, prefer-standby): 25006 is the writer's
 * mistake; a server going away is drained all the same, and a connection
 * back to the same server is no failover. */
static void test_failover_read_pool(void **state)
{
    (void)state;
    cp.follow = PB_FOLLOW_HOSTS;
    conn *a = &P->conns[0], *b = &P->conns[1];
    uint64_t lease = server_says("O");
    assert_false(a->suspect);
    assert_int_equal(b->phase, PH_READY);
    assert_int_equal(slot_state(b), PB_SLOT_FREE);
    client_submit(a, lease, "Q");
    server_replies(a, "G");
    closed(b);
    assert_true(a->suspect);
    client_release(a, lease);
    closed(a);
    (void)connect_slot(0);                           /* the same server came back */
    assert_int_equal(atomic_load(&P->shm->failovers), 0);
}

/* One server and no target_session_attrs: nothing is drained. */
static void test_no_failover_single_host(void **state)
{
    (void)state;
    cp.follow = PB_FOLLOW_NONE;
    conn *a = &P->conns[0], *b = &P->conns[1];
    uint64_t lease = server_says("G");
    assert_false(a->suspect);
    assert_int_equal(slot_state(b), PB_SLOT_FREE);
    client_release(a, lease);
    assert_int_equal(a->phase, PH_READY);
    assert_int_equal(slot_state(a), PB_SLOT_FREE);
}

/* ---------------------------------------------- streamed requests (#18) */

/* The holder writes bytes [pos, pos + len) of a request of total bytes (all
 * 'Q' then filler: req[] is the whole request) and submits that part;
 * returns its req_seq. */
static uint32_t client_part(conn *c, uint64_t lease, const char *req, uint32_t pos, uint32_t len, uint32_t total)
{
    memcpy(c->req, req + pos, len);
    atomic_store(&c->slot->req_len, len);
    atomic_store(&c->slot->req_total, total);
    atomic_store(&c->slot->req_pos, pos);
    uint32_t seq = atomic_fetch_add(&c->slot->req_seq, 1) + 1;
    conn_submit(c, lease, seq);
    return seq;
}

/* A request of n bytes, 3 of them 'Q' (3 replies owed), in a static buffer. */
static const char *big_request(uint32_t n)
{
    static char req[4096];
    assert_true(n <= sizeof req);
    memset(req, '.', n);
    req[0] = req[n / 2] = req[n - 1] = 'Q';
    return req;
}

/* 600 bytes through a 256-byte request buffer: each part is acked at once
 * and nothing is sent until the last, which sends the whole request. */
static void test_streamed_request(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    const char *req = big_request(600);
    uint32_t seq = client_part(c, lease, req, 0, 256, 600);
    assert_int_equal(atomic_load(&c->slot->req_ack), seq);
    assert_false(c->send_op.pending);
    assert_int_equal(c->stream.len, 256);
    seq = client_part(c, lease, req, 256, 256, 600);
    assert_int_equal(atomic_load(&c->slot->req_ack), seq);
    assert_false(c->send_op.pending);
    seq = client_part(c, lease, req, 512, 88, 600);
    assert_int_equal(atomic_load(&c->slot->req_ack), seq);
    assert_true(c->send_op.pending);
    assert_int_equal(c->send_op.len, 600);
    assert_memory_equal(c->send_op.buf, req, 600);
    assert_int_equal(c->expect, 3);
    assert_int_equal(atomic_load(&c->slot->io_error), 0);
    assert_null(c->stream.p);           /* the parts became the send buffer */
    complete(&c->send_op, 600);
    server_replies(c, "RRR");
    assert_int_equal(c->expect, 0);
    client_release(c, lease);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
    assert_int_equal(repairs, 0);
}

/* Released (or reclaimed) between parts: nothing was sent, the parts are
 * freed and the connection goes back clean. */
static void test_stream_released_midway(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    const char *req = big_request(600);
    client_part(c, lease, req, 0, 256, 600);
    client_release(c, lease);
    assert_null(c->stream.p);
    assert_false(c->send_op.pending);
    assert_int_equal(c->expect, 0);
    assert_int_equal(c->phase, PH_READY);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
    /* The holder died mid-stream: taken back the same way. */
    lease = client_lease(c);
    client_part(c, lease, req, 0, 256, 600);
    client_part(c, lease, req, 256, 256, 600);
    conn_take_back(c, lease, "worker died (test)");
    assert_null(c->stream.p);
    assert_false(c->send_op.pending);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
}

/* Parts a holder scribbled: out of order, a changed total, one past the
 * end, a length over the buffer; each fails the request with PB_EPROTO
 * (acked, parts freed, a repair counted) and the next request works. */
static void test_stream_malformed(void **state)
{
    (void)state;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    const char *req = big_request(600);
    static const struct { uint32_t pos, len, total; } bad[] = {
        { 300, 256, 600 },              /* a gap */
        { 256, 256, 700 },              /* the total changed */
        { 256, 256, 400 },              /* past the end (and the total changed) */
        { 256, 257, 600 },              /* over the buffer */
        { 0, 256, 100 },                /* a first part over its total */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int before = repairs;
        if (bad[i].pos)
            client_part(c, lease, req, 0, 256, 600);
        uint32_t seq = client_part(c, lease, req, bad[i].pos, bad[i].len, bad[i].total);
        assert_int_equal(atomic_load(&c->slot->req_ack), seq);
        assert_int_equal(atomic_load(&c->slot->io_error), PB_EPROTO);
        assert_null(c->stream.p);
        assert_false(c->send_op.pending);
        assert_int_equal(repairs, before + 1);
    }
    /* The holder starts over at 0 mid-stream: the earlier parts are dropped. */
    client_part(c, lease, req, 0, 256, 600);
    client_part(c, lease, req, 0, 256, 600);
    assert_int_equal(c->stream.len, 256);
    client_part(c, lease, req, 256, 256, 600);
    client_part(c, lease, req, 512, 88, 600);
    assert_true(c->send_op.pending);
    assert_int_equal(c->send_op.len, 600);
    complete(&c->send_op, 600);
    server_replies(c, "RRR");
    client_submit(c, lease, "Q");
    server_replies(c, "R");
    client_release(c, lease);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
}

/* Over max_request_size: refused at the first part (PB_ETOOBIG, no repair:
 * a limit, not a scribble), also a request that fits the buffer. */
static void test_stream_over_cap(void **state)
{
    (void)state;
    cp.max_request_size = 512;
    conn *c = connected();
    uint64_t lease = client_lease(c);
    const char *req = big_request(600);
    uint32_t seq = client_part(c, lease, req, 0, 256, 600);
    assert_int_equal(atomic_load(&c->slot->req_ack), seq);
    assert_int_equal(atomic_load(&c->slot->io_error), PB_ETOOBIG);
    assert_null(c->stream.p);
    cp.max_request_size = 100;
    seq = client_part(c, lease, req, 0, 200, 200);
    assert_int_equal(atomic_load(&c->slot->io_error), PB_ETOOBIG);
    assert_false(c->send_op.pending);
    assert_int_equal(repairs, 0);
    /* The lease goes on. */
    cp.max_request_size = 1u << 20;
    client_submit(c, lease, "Q");
    assert_int_equal(atomic_load(&c->slot->io_error), 0);
    server_replies(c, "R");
    client_release(c, lease);
    assert_int_equal(slot_state(c), PB_SLOT_FREE);
}

/* ------------------------------------------------- transaction mode */

/* Start the pool's one backend: READY at home, its private record FREE, no
 * free-map bit (both bits are the handles'). */
static conn *txn_backend(void)
{
    conn *b = &P->backs[0];
    assert_true(CONN_AT_HOME(b));
    assert_int_equal(atomic_load(&P->shm->freemap[0]), 3u);
    conn_start_connect(b);
    complete(&b->poll_op, POLLOUT);
    assert_int_equal(b->phase, PH_READY);
    assert_int_equal(slot_state(b), PB_SLOT_FREE);
    assert_int_equal(atomic_load(&P->shm->freemap[0]), 3u);
    return b;
}

/* A client's fast-path lease of handle k. */
static uint64_t txn_lease(uint32_t k)
{
    conn *h = &P->conns[k];
    uint64_t w = atomic_load(&h->slot->word);
    assert_int_equal(PB_WORD_STATE(w), PB_SLOT_FREE);
    atomic_fetch_and(&P->shm->freemap[0], ~(1ull << k));
    uint64_t leased = PB_WORD_NEXT(w, PB_SLOT_LEASED, CLIENT_ID);
    assert_true(atomic_compare_exchange_strong(&h->slot->word, &w, leased));
    pb_slot_stamp_lease(h->slot, B.now_ms);
    return leased;
}

/* The holder of handle h writes a request and submits it (not yet sent). */
static void txn_submit_req(conn *h, uint64_t lease, const char *req)
{
    uint32_t len = (uint32_t)strlen(req);
    memcpy(h->req, req, len);
    atomic_store(&h->slot->req_len, len);
    atomic_store(&h->slot->req_total, len);
    atomic_store(&h->slot->req_pos, 0);
    uint32_t seq = atomic_fetch_add(&h->slot->req_seq, 1) + 1;
    conn_submit(h, lease, seq);
}

static void test_txn_bind_per_statement(void **state)
{
    (void)state;
    conn *b = txn_backend();
    conn *h = &P->conns[0];
    uint64_t lease = txn_lease(0);
    txn_submit_req(h, lease, "Q");
    assert_ptr_equal(h->bound, b);          /* bound: the backend wears the handle's view */
    assert_ptr_equal(b->slot, h->slot);
    assert_int_equal(atomic_load(&h->slot->req_ack), 1);
    complete(&b->send_op, 1);
    server_replies(b, "R");
    /* The reply is in the handle's ring, the backend home again and free. */
    assert_int_equal(atomic_load(&h->slot->rep_head), 1);
    assert_int_equal(h->rep[0], 'R');
    assert_null(h->bound);
    assert_true(CONN_AT_HOME(b));
    assert_int_equal(slot_state(b), PB_SLOT_FREE);
    assert_int_equal(PB_WORD_STATE(atomic_load(&h->slot->word)), PB_SLOT_LEASED);
    /* The next statement binds again and its reply follows the first. */
    txn_submit_req(h, lease, "Q");
    assert_ptr_equal(h->bound, b);
    complete(&b->send_op, 1);
    server_replies(b, "R");
    assert_int_equal(atomic_load(&h->slot->rep_head), 2);
    assert_null(h->bound);
}

/* Transaction mode: the parts of a streamed statement are taken on the
 * handle with no backend bound; the last part binds one and sends it all. */
static void test_txn_stream_binds_at_last_part(void **state)
{
    (void)state;
    conn *b = txn_backend();
    conn *h = &P->conns[0];
    uint64_t lease = txn_lease(0);
    const char *req = big_request(600);
    uint32_t seq = client_part(h, lease, req, 0, 256, 600);
    assert_int_equal(atomic_load(&h->slot->req_ack), seq);
    assert_null(h->bound);
    assert_true(CONN_AT_HOME(b));
    seq = client_part(h, lease, req, 256, 256, 600);
    assert_null(h->bound);
    seq = client_part(h, lease, req, 512, 88, 600);
    assert_ptr_equal(h->bound, b);
    assert_int_equal(atomic_load(&h->slot->req_ack), seq);
    assert_true(b->send_op.pending);
    assert_int_equal(b->send_op.len, 600);
    assert_memory_equal(b->send_op.buf, req, 600);
    complete(&b->send_op, 600);
    server_replies(b, "RRR");
    assert_null(h->bound);
    /* A release mid-stream frees the parts; nothing was bound or sent. */
    client_part(h, lease, req, 0, 256, 600);
    uint64_t rel = PB_WORD_NEXT(lease, PB_SLOT_RELEASING, CLIENT_ID);
    assert_true(atomic_compare_exchange_strong(&h->slot->word, &lease, rel));
    conn_release(h, rel);
    assert_null(h->stream.p);
    assert_false(b->send_op.pending);
    assert_true(CONN_AT_HOME(b));
}

/* Transaction mode: the read-only answer drains the backend, not the
 * handle: the backend closes as soon as its statement is over (it is
 * never unbound back into service), the handle stays leased. */
static void test_txn_failover_closes_backend(void **state)
{
    (void)state;
    cp.follow = PB_FOLLOW_PRIMARY;
    conn *b = txn_backend();
    conn *h = &P->conns[0];
    uint64_t lease = txn_lease(0);
    txn_submit_req(h, lease, "Q");
    assert_ptr_equal(h->bound, b);
    complete(&b->send_op, 1);
    server_replies(b, "O");
    assert_int_equal(h->rep[0], 'O');       /* the holder gets the error */
    assert_null(h->bound);
    assert_true(b->phase == PH_CLOSING || b->phase == PH_EMPTY);
    if (b->poll_op.pending)
        complete(&b->poll_op, -125);
    assert_int_equal(b->phase, PH_EMPTY);
    assert_int_equal(PB_WORD_STATE(atomic_load(&h->slot->word)), PB_SLOT_LEASED);
    fake_server = "10.0.0.2:5432";
    conn_start_connect(b);
    complete(&b->poll_op, POLLOUT);
    assert_int_equal(b->phase, PH_READY);
    assert_int_equal(atomic_load(&P->shm->failovers), 1);
}

static void test_txn_queue_is_fifo(void **state)
{
    (void)state;
    conn *b = txn_backend();
    conn *h0 = &P->conns[0], *h1 = &P->conns[1];
    uint64_t l0 = txn_lease(0), l1 = txn_lease(1);
    txn_submit_req(h0, l0, "Q");
    txn_submit_req(h1, l1, "Q");
    assert_true(h1->queued);                /* the one backend is h0's */
    assert_int_equal(atomic_load(&h1->slot->req_ack), 0);
    complete(&b->send_op, 1);
    server_replies(b, "R");
    /* h0's reply unbound the backend, which went straight to h1. */
    assert_false(h1->queued);
    assert_ptr_equal(h1->bound, b);
    assert_int_equal(atomic_load(&h1->slot->req_ack), 1);
    assert_true(b->send_op.pending);
    complete(&b->send_op, 1);
    server_replies(b, "R");
    assert_int_equal(atomic_load(&h0->slot->rep_head), 1);
    assert_int_equal(atomic_load(&h1->slot->rep_head), 1);
    assert_null(h1->bound);
}

static void test_txn_open_transaction_pins(void **state)
{
    (void)state;
    conn *b = txn_backend();
    conn *h0 = &P->conns[0], *h1 = &P->conns[1];
    uint64_t l0 = txn_lease(0), l1 = txn_lease(1);
    txn_submit_req(h0, l0, "Q");
    complete(&b->send_op, 1);
    server_replies(b, "B");                 /* BEGIN: a transaction is open */
    assert_ptr_equal(h0->bound, b);
    txn_submit_req(h1, l1, "Q");
    assert_true(h1->queued);
    txn_submit_req(h0, l0, "Q");            /* COMMIT */
    complete(&b->send_op, 1);
    server_replies(b, "R");
    assert_null(h0->bound);
    assert_ptr_equal(h1->bound, b);         /* and then the queue's turn */
}

static void test_txn_release_with_reply_owed(void **state)
{
    (void)state;
    conn *b = txn_backend();
    conn *h = &P->conns[0];
    uint64_t lease = txn_lease(0);
    txn_submit_req(h, lease, "Q");
    complete(&b->send_op, 1);
    client_release(h, lease);
    /* The handle stays the broker's while a receive may write into its ring. */
    assert_int_equal(b->phase, PH_DRAINING);
    assert_ptr_equal(h->bound, b);
    assert_int_equal(PB_WORD_STATE(atomic_load(&h->slot->word)), PB_SLOT_RESETTING);
    assert_int_equal(atomic_load(&P->shm->freemap[0]) & 1u, 0);
    assert_int_equal(cancels, 1);           /* nobody reads it: cancelled */
    atomic_store(&b->cancel_inflight, 0);   /* delivered */
    server_replies(b, "R");
    assert_null(h->bound);
    assert_true(CONN_AT_HOME(b));
    assert_int_equal(b->phase, PH_READY);
    assert_int_equal(slot_state(b), PB_SLOT_FREE);
    assert_int_equal(PB_WORD_STATE(atomic_load(&h->slot->word)), PB_SLOT_FREE);
    assert_true(atomic_load(&P->shm->freemap[0]) & 1u);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_connect, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_failed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_step_failed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_serve_and_release, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_with_replies_owed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_awaits_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reset_after_dirty_lease, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reset_refused_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_validate_after_idle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reclaim, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failure_and_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_waits_for_ops, setup, teardown),
        cmocka_unit_test_setup_teardown(test_protocol_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_streamed_request, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_released_midway, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_malformed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_over_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_phase_table, setup, teardown),
        cmocka_unit_test_setup_teardown(test_impossible_moves_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scribbled_release_ignored, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failover_readonly, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failover_read_pool, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_failover_single_host, setup, teardown),
        cmocka_unit_test_setup_teardown(test_txn_bind_per_statement, setup_txn, teardown),
        cmocka_unit_test_setup_teardown(test_txn_stream_binds_at_last_part, setup_txn, teardown),
        cmocka_unit_test_setup_teardown(test_txn_queue_is_fifo, setup_txn, teardown),
        cmocka_unit_test_setup_teardown(test_txn_open_transaction_pins, setup_txn, teardown),
        cmocka_unit_test_setup_teardown(test_txn_release_with_reply_owed, setup_txn, teardown),
        cmocka_unit_test_setup_teardown(test_txn_failover_closes_backend, setup_txn, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
