/*
 * fuzz_pg_request.c — libFuzzer target: the broker's PostgreSQL framing
 * (broker/pg.c through pg_driver):
 *
 *   - pg_driver.frame_request(), the check every client request passes before
 *     a byte of it reaches the backend (whitelist of frontend message types,
 *     lengths that tile the buffer exactly, one reply per 'Q' and 'S');
 *   - pg_driver.scan_reply(), the reply scanner that counts ReadyForQuery
 *     messages across arbitrary recv boundaries.
 *
 * Input: 2 bytes (big endian) choosing a split point, then the payload.  The
 * same payload goes to both functions (the corpus holds real frontend and
 * real backend streams).  Checked, beyond "no sanitizer report":
 *
 *   frame_request   returns PB_OK, PB_EPROTO or PB_EPERM (a policy refusal)
 *                   only; PB_OK exactly when an
 *                   independent walk of the buffer finds whitelisted messages
 *                   with sane lengths tiling it, and then *nreplies is the
 *                   number of 'Q' and 'S' messages; never PB_OK for a
 *                   buffer holding Terminate, a startup packet, a password
 *                   or function-call message; deterministic; the request
 *                   unchanged unless it holds a Parse of a library-named
 *                   statement whose name matches its text (pb_shm.h; the
 *                   fe_lib_stmt seed), and then still valid with the same
 *                   reply count.
 *   scan_reply      fed whole, fed in two pieces at the split point, and fed
 *                   one byte at a time: same status, same ReadyForQuery
 *                   count, the same sequence of transaction-status bytes
 *                   and the same session state read from the
 *                   CommandComplete tags and ParameterStatus messages (the
 *                   resumption state in the driver's must be exact);
 *                   and the count matches an independent reference scanner.
 *                   The scanner is driven as broker/connio.c drives it: one
 *                   complete reply per call (DRV_OK), the rest fed again.
 *
 * The real driver is linked (broker/pg.c, broker/pgstmt.c, broker/pgshare.c,
 * broker/cancel.c, broker/log.c): it calls nothing of the pool, so nothing
 * is stubbed; it reads the loop's clock (B.now_ms, here 0).  conn->drv is the
 * driver's private state; zeroed memory of ample size stands in for it
 * (pg.c's pgconn is well under DRV_BYTES), freed by pg_driver.close (which
 * frees what the driver allocated in it).
 */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker.h"
#include "poolbroker.h"

#define DRV_BYTES 4096

broker B;                   /* pg.c reads B.now_ms (pgshare.c's timings) */

static struct {
    uint64_t replies;
    uint64_t txn_hash;      /* order-sensitive hash of the status bytes */
} G;


/* Feed p[0..n) to the scanner as broker/connio.c does: each DRV_OK is one
 * complete reply (counted, its status hashed), then the rest again. */
static int scan(conn *c, const uint8_t *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        size_t used = 0;
        drv_reply r = { 0 };
        int rc = pg_driver.scan_reply(c, p + off, n - off, &used, &r);
        if (rc == DRV_ERROR)
            return PB_EPROTO;
        assert(rc == DRV_OK || rc == DRV_AGAIN);
        assert(rc == DRV_AGAIN ? used == n - off : used > 0 && used <= n - off);
        off += used;
        if (rc == DRV_AGAIN)
            break;
        G.replies++;
        G.txn_hash = G.txn_hash * 1099511628211ull + (uint8_t)r.txn + 1;
    }
    return PB_OK;
}


/* ------------------------------------------------------------- reference */

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Frontend messages a worker may send (docs/protocol.md: Query, Parse, Bind,
 * Describe, Execute, Sync, Close, Flush, plus COPY data/done/fail). */
static int ref_allowed(uint8_t t)
{
    return t && strchr("QPBDESCHdcf", t) != NULL;
}

/* 1 and *n set if buf is a valid request. */
static int ref_frame(const uint8_t *buf, size_t len, uint32_t *n)
{
    size_t off = 0;
    *n = 0;
    while (off < len) {
        if (len - off < 5)
            return 0;
        uint32_t mlen = be32(buf + off + 1);
        if (!ref_allowed(buf[off]) || mlen < 4 || (uint64_t)mlen + 1 > len - off)
            return 0;
        if (buf[off] == 'Q' || buf[off] == 'S')
            (*n)++;
        off += 1 + (size_t)mlen;
    }
    return 1;
}

/* Does a valid request hold a Parse of a library-named statement whose name
 * is the hash of its own text and types (pb_shm.h)?  Only such a request
 * may be rewritten. */
static int ref_tracked_parse(const uint8_t *buf, size_t len)
{
    size_t off = 0;
    while (off + 5 <= len) {
        uint32_t mlen = be32(buf + off + 1);
        const uint8_t *b = buf + off + 5, *end = buf + off + 1 + mlen;
        if (buf[off] == 'P' && mlen - 4 > PB_STMT_NAME_LEN && b[PB_STMT_NAME_LEN] == 0 &&
            memcmp(b, PB_STMT_PREFIX, 3) == 0) {
            const uint8_t *q = b + PB_STMT_NAME_LEN + 1;
            const uint8_t *qe = memchr(q, 0, (size_t)(end - q));
            if (qe && end - qe >= 3) {
                uint32_t nt = (uint32_t)qe[1] << 8 | qe[2];
                if ((size_t)(end - qe) == 3 + 4 * (size_t)nt) {
                    uint64_t h = pb_stmt_hash_bytes(PB_STMT_HASH_INIT, q, (size_t)(qe - q));
                    for (uint32_t i = 0; i < nt; i++)
                        h = PB_STMT_HASH_TYPE(h, be32(qe + 3 + 4 * i));
                    h = pb_stmt_hash_end(h, nt);
                    char name[PB_STMT_NAME_LEN + 1];
                    snprintf(name, sizeof name, PB_STMT_PREFIX "%016llx", (unsigned long long)h);
                    if (memcmp(name, b, PB_STMT_NAME_LEN) == 0)
                        return 1;
                }
            }
        }
        off += 1 + (size_t)mlen;
    }
    return 0;
}

/* Count ReadyForQuery messages of a backend stream; the status of the scan
 * (0 ok so far / -1 malformed) and the count up to where it stopped. */
static int ref_scan(const uint8_t *p, size_t n, uint64_t *count, uint64_t *hash)
{
    size_t off = 0;
    *count = 0;
    *hash = 0;
    while (off < n) {
        if (n - off < 5)
            return 0;       /* incomplete header: fine, more may come */
        uint32_t mlen = be32(p + off + 1);
        if (mlen < 4 || mlen > (1u << 30))
            return -1;
        if (p[off] == 'Z') {
            if (mlen != 5)
                return -1;
            if (n - off < 6)
                return 0;
            uint8_t st = p[off + 5];
            if (st != 'I' && st != 'T' && st != 'E')
                return -1;
            (*count)++;
            *hash = *hash * 1099511628211ull + st + 1;
        }
        if ((uint64_t)mlen + 1 > n - off)
            return 0;       /* incomplete body */
        off += 1 + (size_t)mlen;
    }
    return 0;
}

/* ----------------------------------------------------------------- target */

static void fresh(conn *c)
{
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->drv = calloc(1, DRV_BYTES);
    assert(c->drv);
    memset(&G, 0, sizeof G);
}

/* The driver's state freed, with what it allocated; the session state the
 * scan left returned. */
static uint32_t done(conn *c)
{
    uint32_t st = c->sstate;
    pg_driver.close(c);
    return st;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t split = ((size_t)data[0] << 8 | data[1]);
    const uint8_t *in = data + 2;
    size_t len = size - 2;
    if (len > UINT32_MAX)
        return 0;
    split = len ? split % (len + 1) : 0;

    /* Exact-size heap copy so ASan sees any over-read. */
    uint8_t *buf = malloc(len ? len : 1);
    memcpy(buf, in, len);

    /* ---- frame_request, on a copy (the driver may replace its buffer) */
    conn c;
    fresh(&c);
    uint32_t n = 0xDEADBEEF, n2 = 0xDEADBEEF, rn;
    const char *why = NULL;
    drv_buf rq = { malloc(len ? len : 1), (uint32_t)len, (uint32_t)len };
    memcpy(rq.p, buf, len);
    int rc = pg_driver.frame_request(&c, &rq, &n, &why);
    assert(rc == PB_OK || rc == PB_EPROTO || rc == PB_EPERM);
    int tracked = rc == PB_OK && ref_tracked_parse(buf, len);
    if (!tracked)
        assert(rq.len == len && memcmp(rq.p, buf, len) == 0);  /* no library statement: unchanged */
    assert((rc == PB_OK) == (why == NULL));
    if (rc != PB_OK)
        rc = PB_EPROTO;
    int ok = ref_frame(buf, len, &rn);
    if (ok != (rc == PB_OK)) {
        fprintf(stderr, "frame_request says %d, reference says %s\n", rc, ok ? "valid" : "invalid");
        abort();
    }
    if (rc == PB_OK) {
        assert(n == rn);
        /* rewritten (a Close put before a tracked Parse): still valid, same replies */
        uint32_t rn2;
        assert(ref_frame(rq.p, rq.len, &rn2) && rn2 == rn);
        /* a valid request holds no Terminate / password / function call /
         * startup packet: ref_allowed() already guarantees that; check the
         * first byte explicitly as a canary for the whitelist itself. */
        assert(len == 0 || (buf[0] != 'X' && buf[0] != 'p' && buf[0] != 'F' && buf[0] != 0));
    }
    int rc2 = pg_driver.frame_request(&c, &rq, &n2, &why);
    if (rc2 != PB_OK)
        rc2 = PB_EPROTO;
    assert(rc2 == rc && (rc != PB_OK || n2 == n));
    free(rq.p);
    done(&c);

    /* ---- scan_reply: whole */
    fresh(&c);
    int s_whole = len ? scan(&c, buf, len) : PB_OK;
    uint64_t r_whole = G.replies, h_whole = G.txn_hash;
    uint32_t ss_whole = done(&c);
    assert(s_whole == PB_OK || s_whole == PB_EPROTO);

    /* in two pieces (each piece in its own exact-size buffer) */
    fresh(&c);
    int s_split = PB_OK;
    if (split) {
        uint8_t *a = malloc(split);
        memcpy(a, buf, split);
        s_split = scan(&c, a, split);
        free(a);
    }
    if (s_split == PB_OK && len - split) {
        uint8_t *b = malloc(len - split);
        memcpy(b, buf + split, len - split);
        s_split = scan(&c, b, len - split);
        free(b);
    }
    uint32_t ss_split = done(&c);
    if (s_split != s_whole || G.replies != r_whole || G.txn_hash != h_whole ||
        (s_whole == PB_OK && ss_split != ss_whole)) {
        fprintf(stderr, "scan_reply: whole %d/%llu, split at %zu %d/%llu\n", s_whole,
                (unsigned long long)r_whole, split, s_split, (unsigned long long)G.replies);
        abort();
    }

    /* one byte at a time (bounded, it is slow for big inputs) */
    if (len <= 4096) {
        fresh(&c);
        int s_byte = PB_OK;
        for (size_t i = 0; i < len && s_byte == PB_OK; i++) {
            uint8_t one = buf[i];
            s_byte = scan(&c, &one, 1);
        }
        uint32_t ss_byte = done(&c);
        if (s_byte != s_whole || G.replies != r_whole || G.txn_hash != h_whole ||
            (s_whole == PB_OK && ss_byte != ss_whole)) {
            fprintf(stderr, "scan_reply: whole %d/%llu, bytewise %d/%llu\n", s_whole,
                    (unsigned long long)r_whole, s_byte, (unsigned long long)G.replies);
            abort();
        }
    }

    /* against the reference */
    uint64_t rc_count, rc_hash;
    int ref = ref_scan(buf, len, &rc_count, &rc_hash);
    if ((ref == 0) != (s_whole == PB_OK) || rc_count != r_whole || rc_hash != h_whole) {
        fprintf(stderr, "scan_reply %d/%llu, reference %d/%llu\n", s_whole, (unsigned long long)r_whole, ref,
                (unsigned long long)rc_count);
        abort();
    }
    free(buf);
    return 0;
}
