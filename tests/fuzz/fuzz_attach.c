/*
 * fuzz_attach.c — libFuzzer target: the attach handshake, both ends, on bytes
 * nobody vouches for.  The broker's checks of a request (attach_check_req,
 * attach_uid_allowed in broker/attach.c: anyone who can connect to the
 * socket sends these bytes) and the library's checks of the answer and of the
 * segment header (pbi_attach_resp_check, pbi_check_header in
 * client/attachcheck.c: whoever listens on the socket path sends the answer,
 * and any attached worker can rewrite the header).
 *
 * Input: [u8 mode|flags] then, by mode (byte & 3; 3 is 2):
 *
 *   0 broker   [u8 nuids][u8 ngids][u32 euid][u32 uid][u32 gid]
 *              [nuids × u32][ngids × u32] request bytes (any length)
 *   1 answer   answer bytes (any length)
 *   2 segment  [u32 size][u32 client_id] segment bytes
 *
 * (integers little endian; missing bytes read as 0).  Flag bits (byte >> 2)
 * stamp this build's magic (1), PB_SHM_VERSION (2) and PB_SHM_FINGERPRINT
 * (4) over the message or header where it is long enough, so that the seeds
 * stay valid when the layout changes; 8 makes mode 1 see a failed recvmsg
 * (n = -1).  In mode 2, shm_size is size mod (1 MiB + 1), or with flag 16
 * the end of the furthest table the header claims (or total_size, if
 * larger) plus the low byte of size as a signed delta: a table that ends
 * exactly at, or a few bytes past, the end of the segment is what an
 * off-by-one in the check would let through, and random sizes hardly ever
 * land there.  Every message is an exact-size heap copy (the segment: exactly
 * shm_size bytes, cache-line aligned like a mapping), so ASan reports any
 * read past what was received.  Checked:
 *
 *   broker   the verdict is PB_OK, PB_EPROTO or PB_EVERSION: PB_EPROTO for
 *            any length but sizeof(pb_attach_req) (and then *out is not
 *            written) or a wrong magic, PB_EVERSION for a wrong version or
 *            fingerprint, PB_OK otherwise; *out is the bytes sent.  A peer is
 *            allowed exactly when listed by uid or gid, or, with both lists
 *            empty, when its uid is the broker's euid.  The unused list
 *            entries hold the peer's own uid and gid: reading past the
 *            counts would let it in.
 *   answer   PB_OK exactly when n is sizeof(pb_attach_resp) and magic,
 *            status 0, version and fingerprint match; otherwise PB_EBROKER
 *            for a short or foreign answer, the broker's status when it is a
 *            PB_E* code (else PB_EBROKER), then PB_EVERSION.
 *   segment  PB_EBROKER exactly when the segment is smaller than the header
 *            or the magic is wrong, then PB_EVERSION exactly for a wrong
 *            version or fingerprint; past those, PB_OK exactly when
 *            total_size, npools and max_clients are within bounds, every
 *            table lies inside shm_size (in 128-bit arithmetic) and the
 *            client id names a record in it.  The check reads only the header
 *            (the rest of the segment is poisoned meanwhile).  On PB_OK the
 *            first and last byte of every table element the header claims
 *            (PB_MAX_POOLS pools — a reload may add up to that many —,
 *            max_clients clients, nslots slots, and our own record) are read
 *            through the pointers client.c derives (pb_shm_pools/_clients/
 *            _slots), so ASan reports anything the check lets through.
 */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "attach.h"
#include "internal.h"
#include "poolbroker.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#define POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#endif
#endif
#ifndef POISON
#define POISON(p, n)   ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define SEG_MAX     (1u << 20)      /* largest segment built (1 MiB) */
#define F_MAGIC     1u
#define F_VERSION   2u
#define F_FINGER    4u
#define F_RECV_FAIL 8u
#define F_SIZE_AT_END 16u

typedef struct in {
    const uint8_t *p;
    size_t n;
} in;

static uint32_t take_u32(in *s)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        if (s->n) {
            v |= (uint32_t)*s->p << (8 * i);
            s->p++;
            s->n--;
        }
    }
    return v;
}

static uint8_t take_u8(in *s)
{
    if (!s->n)
        return 0;
    s->n--;
    return *s->p++;
}

/* Write v at off if the message is long enough to hold it. */
static void stamp(uint8_t *buf, size_t len, size_t off, const void *v, size_t vlen)
{
    if (off + vlen <= len)
        memcpy(buf + off, v, vlen);
}

static void stamp_fields(unsigned flags, uint8_t *buf, size_t len, size_t magic_off, const void *magic,
                         size_t magic_len, size_t version_off, size_t finger_off)
{
    uint32_t version = PB_SHM_VERSION, finger = PB_SHM_FINGERPRINT;
    if (flags & F_MAGIC)
        stamp(buf, len, magic_off, magic, magic_len);
    if (flags & F_VERSION)
        stamp(buf, len, version_off, &version, sizeof version);
    if (flags & F_FINGER)
        stamp(buf, len, finger_off, &finger, sizeof finger);
}

/* An exact-size heap copy (NULL for 0 bytes: nothing may be read). */
static uint8_t *copy_exact(const uint8_t *p, size_t n)
{
    if (n == 0)
        return NULL;
    uint8_t *b = malloc(n);
    if (!b)
        abort();
    memcpy(b, p, n);
    return b;
}

/* ------------------------------------------------------------ 0: broker */

static void fuzz_broker(unsigned flags, in *s)
{
    static conf cf;                 /* only the allow lists are read */
    unsigned nu = take_u8(s) % (CONF_MAX_UIDS + 1), ng = take_u8(s) % (CONF_MAX_UIDS + 1);
    uid_t euid = take_u32(s), uid = take_u32(s);
    gid_t gid = take_u32(s);
    for (int i = 0; i < CONF_MAX_UIDS; i++) {
        cf.allowed_uids[i] = uid;   /* past the count: must be ignored */
        cf.allowed_gids[i] = gid;
    }
    int listed = 0;
    for (unsigned i = 0; i < nu; i++) {
        cf.allowed_uids[i] = take_u32(s);
        listed |= cf.allowed_uids[i] == uid;
    }
    for (unsigned i = 0; i < ng; i++) {
        cf.allowed_gids[i] = take_u32(s);
        listed |= cf.allowed_gids[i] == gid;
    }
    cf.n_allowed_uids = (int)nu;
    cf.n_allowed_gids = (int)ng;

    int allowed = attach_uid_allowed(&cf, euid, uid, gid);
    assert(allowed == 0 || allowed == 1);
    assert(allowed == (nu == 0 && ng == 0 ? uid == euid : listed));

    uint8_t *buf = copy_exact(s->p, s->n);
    size_t len = s->n;
    uint32_t magic = PB_ATTACH_MAGIC;
    stamp_fields(flags, buf, len, offsetof(pb_attach_req, magic), &magic, sizeof magic,
                 offsetof(pb_attach_req, version), offsetof(pb_attach_req, fingerprint));
    pb_attach_req req, canary;
    memset(&req, 0xA5, sizeof req);
    memcpy(&canary, &req, sizeof req);
    int rc = attach_check_req(buf, len, &req);
    if (len != sizeof(pb_attach_req)) {
        assert(rc == PB_EPROTO);
        assert(memcmp(&req, &canary, sizeof req) == 0);
    } else {
        pb_attach_req sent;
        memcpy(&sent, buf, sizeof sent);
        assert(memcmp(&req, &sent, sizeof req) == 0);
        if (sent.magic != PB_ATTACH_MAGIC)
            assert(rc == PB_EPROTO);
        else if (sent.version != PB_SHM_VERSION || sent.fingerprint != PB_SHM_FINGERPRINT)
            assert(rc == PB_EVERSION);
        else
            assert(rc == PB_OK);
    }
    free(buf);
}

/* ------------------------------------------------------------ 1: answer */

static void fuzz_answer(unsigned flags, in *s)
{
    uint8_t *buf = copy_exact(s->p, s->n);
    size_t len = s->n;
    uint32_t magic = PB_ATTACH_MAGIC;
    stamp_fields(flags, buf, len, offsetof(pb_attach_resp, magic), &magic, sizeof magic,
                 offsetof(pb_attach_resp, version), offsetof(pb_attach_resp, fingerprint));
    ssize_t n = flags & F_RECV_FAIL ? -1 : (ssize_t)len;
    int rc = pbi_attach_resp_check((const pb_attach_resp *)buf, n);

    assert(rc == PB_OK || (rc >= PB_ESERVER && rc < 0));
    if (n != (ssize_t)sizeof(pb_attach_resp)) {
        assert(rc == PB_EBROKER);
    } else {
        pb_attach_resp r;
        memcpy(&r, buf, sizeof r);
        if (r.magic != PB_ATTACH_MAGIC)
            assert(rc == PB_EBROKER);
        else if (r.status != PB_OK)
            assert(rc == (r.status < 0 && r.status >= PB_ESERVER ? r.status : PB_EBROKER));
        else if (r.version != PB_SHM_VERSION || r.fingerprint != PB_SHM_FINGERPRINT)
            assert(rc == PB_EVERSION);
        else
            assert(rc == PB_OK);
    }
    free(buf);
}

/* ----------------------------------------------------------- 2: segment */

/* Does a table of count elements of size bytes at off lie inside sz bytes?
 * In 128 bits: no wrap-around to reason about. */
static int table_fits(uint64_t off, uint64_t count, uint64_t size, uint64_t sz)
{
    return (unsigned __int128)off + (unsigned __int128)count * size <= sz;
}

static void touch(const void *elem, size_t size)
{
    const volatile uint8_t *b = elem;
    (void)b[0];
    (void)b[size - 1];
}

/* A header field from the input, as if it were at off (0 if cut short). */
static uint64_t peek_field(const in *s, size_t off, size_t len)
{
    uint64_t v = 0;
    if (off + len <= s->n)
        memcpy(&v, s->p + off, len);   /* little endian, like the host */
    return v;
}

/* The end of the furthest table the header in the input claims, plus delta;
 * or a size past SEG_MAX when that is out of reach (or negative). */
static uint64_t size_at_end(const in *s, int8_t delta)
{
#define FIELD(f) peek_field(s, offsetof(pb_shm_header, f), sizeof(((pb_shm_header *)0)->f))
    unsigned __int128 ends[4] = {
        (unsigned __int128)FIELD(pool_off) + (unsigned __int128)PB_MAX_POOLS * sizeof(pb_shm_pool),
        (unsigned __int128)FIELD(client_off) + (unsigned __int128)FIELD(max_clients) * sizeof(pb_shm_client),
        (unsigned __int128)FIELD(slot_off) + (unsigned __int128)FIELD(nslots) * sizeof(pb_shm_slot),
        FIELD(total_size),
    };
#undef FIELD
    unsigned __int128 end = 0;
    for (int i = 0; i < 4; i++)
        end = ends[i] > end ? ends[i] : end;
    if (end > SEG_MAX + 128u || (__int128)end + delta < 0)
        return SEG_MAX + 1;
    return (uint64_t)((__int128)end + delta);
}

static void fuzz_segment(unsigned flags, in *s)
{
    uint32_t size = take_u32(s);
    uint32_t client_id = take_u32(s);
    uint64_t shm_size = flags & F_SIZE_AT_END ? size_at_end(s, (int8_t)(size & 0xFF)) : size % (SEG_MAX + 1);
    if (shm_size > SEG_MAX)
        return;
    /* A mapping is page aligned; the header needs its cache-line alignment. */
    void *mem = NULL;
    if (posix_memalign(&mem, PB_CACHELINE, shm_size ? shm_size : 1) != 0)
        abort();
    uint8_t *seg = mem;
    size_t have = s->n < shm_size ? s->n : shm_size;
    memcpy(seg, s->p, have);
    memset(seg + have, 0, shm_size - have);
    uint64_t magic = PB_SHM_MAGIC;
    stamp_fields(flags, seg, shm_size, offsetof(pb_shm_header, magic), &magic, sizeof magic,
                 offsetof(pb_shm_header, version), offsetof(pb_shm_header, fingerprint));
    pb_shm_header *h = (pb_shm_header *)seg;

    /* Only the header may be read by the check. */
    size_t hdr_len = shm_size < sizeof *h ? shm_size : sizeof *h;
    POISON(seg + hdr_len, shm_size - hdr_len);
    int rc = pbi_check_header(h, shm_size, client_id);
    UNPOISON(seg + hdr_len, shm_size - hdr_len);

    assert(rc == PB_OK || rc == PB_EBROKER || rc == PB_EVERSION || rc == PB_EPROTO);
    if (shm_size < sizeof *h) {
        assert(rc == PB_EBROKER);
        free(mem);
        return;
    }
    if (h->magic != PB_SHM_MAGIC) {
        assert(rc == PB_EBROKER);
    } else if (h->version != PB_SHM_VERSION || h->fingerprint != PB_SHM_FINGERPRINT) {
        assert(rc == PB_EVERSION);
    } else {
        uint32_t max_clients = h->max_clients, nslots = h->nslots;
        uint32_t idx = PB_CLIENT_INDEX(client_id);
        int ok = h->total_size <= shm_size && h->npools <= PB_MAX_POOLS && max_clients <= PB_MAX_CLIENTS &&
                 table_fits(h->pool_off, PB_MAX_POOLS, sizeof(pb_shm_pool), shm_size) &&
                 table_fits(h->client_off, max_clients, sizeof(pb_shm_client), shm_size) &&
                 table_fits(h->slot_off, nslots, sizeof(pb_shm_slot), shm_size) && client_id != 0 &&
                 idx < max_clients;
        assert(rc == (ok ? PB_OK : PB_EPROTO));
        if (ok) {
            /* Addresses only (no member access): the check does not promise
             * alignment of the offsets, and this is about bounds. */
            const uint8_t *pools = (const uint8_t *)pb_shm_pools(h);
            const uint8_t *clients = (const uint8_t *)pb_shm_clients(h);
            const uint8_t *slots = (const uint8_t *)pb_shm_slots(h);
            for (uint32_t i = 0; i < PB_MAX_POOLS; i++)
                touch(pools + (size_t)i * sizeof(pb_shm_pool), sizeof(pb_shm_pool));
            for (uint32_t i = 0; i < max_clients; i++)
                touch(clients + (size_t)i * sizeof(pb_shm_client), sizeof(pb_shm_client));
            for (uint32_t i = 0; i < nslots; i++)
                touch(slots + (size_t)i * sizeof(pb_shm_slot), sizeof(pb_shm_slot));
            touch(clients + (size_t)idx * sizeof(pb_shm_client), sizeof(pb_shm_client));
        }
    }
    free(mem);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    in s = { data + 1, size - 1 };
    unsigned flags = data[0] >> 2;
    switch (data[0] & 3) {
    case 0:
        fuzz_broker(flags, &s);
        break;
    case 1:
        fuzz_answer(flags, &s);
        break;
    default:
        fuzz_segment(flags, &s);
        break;
    }
    return 0;
}
