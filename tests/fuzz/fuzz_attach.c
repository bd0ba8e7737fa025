/*
 * fuzz_attach.c — libFuzzer target: the attach handshake, both ends, on bytes
 * nobody vouches for.  The broker's checks of a request (attach_check_req,
 * attach_uid_allowed in broker/attach.c: anyone who can connect to the
 * socket sends these bytes) and the library's checks of the answer and of the
 * segment layout the answer carries (pbi_attach_resp_check, pbi_check_layout
 * in client/attachcheck.c: whoever listens on the socket path sends the
 * answer, and the library derives every table address from its layout, none
 * from the segment's header).
 *
 * Input: [u8 mode|flags] then, by mode (byte & 3; 3 is 2):
 *
 *   0 broker   [u8 nuids][u8 ngids][u32 euid][u32 uid][u32 gid]
 *              [nuids × u32][ngids × u32] request bytes (any length)
 *   1 answer   answer bytes (any length)
 *   2 layout   [u32 size][u32 client_id] then a pb_shm_layout: [u64 pool_off]
 *              [u64 client_off][u64 slot_off][u64 buf_off][u32 max_clients]
 *              [u32 nslots] (the rest is ignored)
 *
 * (integers little endian; missing bytes read as 0).  Flag bits (byte >> 2):
 *
 *   1 2 4  (modes 0, 1) stamp this build's magic, PB_SHM_VERSION and
 *          PB_SHM_FINGERPRINT over the message where it is long enough, so
 *          that the seeds stay valid when the layout changes.
 *   8      (mode 1) recvmsg failed: n = -1 (and the bytes are poisoned: the
 *          check may read none of them).
 *   16     (modes 1, 2) shm_size at the end: the furthest thing the layout
 *          claims (buf_off, or a table's end if further) plus a signed byte,
 *          the low byte of size (mode 2; an input whose end is past 1 MiB
 *          is skipped) or of the answer's shm_size (mode 1, stamped back in
 *          place).  A segment that ends exactly at, or a few bytes around,
 *          buf_off or a table's end is where an off-by-one in the check
 *          would show, and random sizes hardly ever land there.  Without it
 *          mode 2's shm_size is size mod (1 MiB + 1).
 *   32     (modes 1, 2) relative layout: each offset is a delta (mod 2^64)
 *          from where the tables would sit packed: pool_off from the end of
 *          the header, client_off from the end of the pool table, slot_off
 *          from the end of the client table (each rounded up to PB_CACHELINE,
 *          as broker/shm.c does), buf_off from the end of the slot table (not
 *          rounded).  All zero is a valid layout with every table boundary
 *          exact, whatever the struct sizes (what the stamp flags are to the
 *          magic: such seeds survive a layout change); ±1 and ±PB_CACHELINE
 *          are the off-by-ones.  In mode 1 the offsets are rewritten in
 *          place where the answer holds them (before flag 16 is applied).
 *
 * Every message is an exact-size heap copy (the layout of mode 2 too), so
 * ASan reports any read past what was received.  Checked:
 *
 *   broker   the verdict is PB_OK, PB_EPROTO or PB_EVERSION: PB_EPROTO for
 *            any length but sizeof(pb_attach_req) (and then *out is not
 *            written) or a wrong magic, PB_EVERSION for a wrong version or
 *            fingerprint, PB_OK otherwise; *out is the bytes sent.  A peer is
 *            allowed exactly when listed by uid or gid, or, with both lists
 *            empty, when its uid is the broker's euid.  The unused list
 *            entries hold the peer's own uid and gid: reading past the
 *            counts would let it in.
 *   answer   the verdict, recomputed in this order: PB_EBROKER when n does
 *            not reach past the fingerprint (the fields every version
 *            shares) or the magic is wrong; else, for a status other than 0,
 *            that status when it is a PB_E* code, else PB_EBROKER; else
 *            PB_EVERSION for a wrong version or fingerprint; else PB_EBROKER
 *            unless n is sizeof(pb_attach_resp); else the layout verdict
 *            (below) of layout, shm_size and client_id.  The copy ends at n,
 *            so nothing the read did not reach is read.  An answer that
 *            passes is then used as a layout that passed (below; the segment
 *            is built only when shm_size <= 1 MiB).
 *   layout   PB_OK or PB_EPROTO; PB_OK exactly when, in 128-bit arithmetic,
 *            pool_off, client_off and slot_off are multiples of
 *            PB_CACHELINE, max_clients <= PB_MAX_CLIENTS, buf_off <=
 *            shm_size, the pool table (PB_MAX_POOLS entries) starts at or
 *            after the end of the header, the client table (max_clients)
 *            at or after the end of the pool table, the slot table (nslots)
 *            at or after the end of the client table, all three end at or
 *            before buf_off, and the client id's index bits are in
 *            1..max_clients.  The layout is not written.  On PB_OK, asserted
 *            apart from the verdict's formula: the header and the three
 *            tables are pairwise disjoint and end at or before buf_off, and
 *            buf_off <= shm_size; then, on a segment of exactly shm_size
 *            bytes (cache-line aligned like a mapping; 1 MiB at most), the
 *            first and last byte of every table element (PB_MAX_POOLS pools
 *            — a reload may add up to that many —, max_clients clients,
 *            nslots slots, our own record) and of the buffer area are read
 *            through pointers derived as client.c derives them, each aligned
 *            for its type, and a field of each is loaded with its type (our
 *            record's sq_tail, as attach() does), so ASan and UBSan report
 *            anything the check lets through.
 */
#include <assert.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "attach.h"
#include "internal.h"
#include "poolbroker.h"

#include "poison.h"

#define SEG_MAX     (1u << 20)      /* largest segment built (1 MiB) */
#define F_MAGIC     1u
#define F_VERSION   2u
#define F_FINGER    4u
#define F_RECV_FAIL 8u
#define F_SIZE_AT_END 16u
#define F_RELATIVE  32u

typedef unsigned __int128 u128;

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

static uint64_t take_u64(in *s)
{
    uint64_t lo = take_u32(s);
    return lo | (uint64_t)take_u32(s) << 32;
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

/* ------------------------------------------------------- layouts, shared */

/* The reference verdict on a layout: PB_OK exactly when this holds.  Written
 * from the rules, not from attachcheck.c: ends in 128 bits, so no sum or
 * product wraps, and the client index spelled out. */
static int layout_ok(const pb_shm_layout *L, uint64_t shm_size, uint32_t client_id)
{
    u128 pool_end = (u128)L->pool_off + (u128)PB_MAX_POOLS * sizeof(pb_shm_pool);
    u128 client_end = (u128)L->client_off + (u128)L->max_clients * sizeof(pb_shm_client);
    u128 slot_end = (u128)L->slot_off + (u128)L->nslots * sizeof(pb_shm_slot);
    uint32_t index_bits = client_id & ((1u << PB_CLIENT_INDEX_BITS) - 1);
    return L->pool_off % PB_CACHELINE == 0 && L->client_off % PB_CACHELINE == 0 &&
           L->slot_off % PB_CACHELINE == 0 && L->max_clients <= PB_MAX_CLIENTS && L->buf_off <= shm_size &&
           L->pool_off >= sizeof(pb_shm_header) && pool_end <= L->buf_off &&
           L->client_off >= pool_end && client_end <= L->buf_off &&
           L->slot_off >= client_end && slot_end <= L->buf_off &&
           client_id != 0 && index_bits >= 1 && index_bits <= L->max_clients;
}

static uint64_t line_up(uint64_t x)
{
    return (x + PB_CACHELINE - 1) & ~(uint64_t)(PB_CACHELINE - 1);
}

/* Flag 32: the offsets in *L are deltas from the packed layout (mod 2^64). */
static void relative_layout(pb_shm_layout *L)
{
    L->pool_off += line_up(sizeof(pb_shm_header));
    L->client_off += line_up(L->pool_off + (uint64_t)PB_MAX_POOLS * sizeof(pb_shm_pool));
    L->slot_off += line_up(L->client_off + (uint64_t)L->max_clients * sizeof(pb_shm_client));
    L->buf_off += L->slot_off + (uint64_t)L->nslots * sizeof(pb_shm_slot);
}

/* Flag 16: the furthest thing the layout claims, plus delta (in 128 bits:
 * may be past 2^64 or, for a tiny end and a negative delta, "negative"). */
static __int128 layout_end(const pb_shm_layout *L, int8_t delta)
{
    u128 ends[4] = {
        L->buf_off,
        (u128)L->pool_off + (u128)PB_MAX_POOLS * sizeof(pb_shm_pool),
        (u128)L->client_off + (u128)L->max_clients * sizeof(pb_shm_client),
        (u128)L->slot_off + (u128)L->nslots * sizeof(pb_shm_slot),
    };
    u128 end = 0;
    for (int i = 0; i < 4; i++)
        end = ends[i] > end ? ends[i] : end;
    return (__int128)end + delta;   /* end < 2^77: no overflow */
}

static void touch(const void *elem, size_t size)
{
    const volatile uint8_t *b = elem;
    (void)b[0];
    (void)b[size - 1];
}

static int aligned(const void *p, size_t align)
{
    return (uintptr_t)p % align == 0;
}

/* Use a layout that passed as client.c does: the tables' addresses from it,
 * our record at PB_CLIENT_INDEX(client_id), the slot buffers from buf_off. */
static void use_layout(const pb_shm_layout *L, uint64_t shm_size, uint32_t client_id)
{
    /* [lo, hi) of the header and the three tables. */
    struct {
        u128 lo, hi;
    } r[4] = {
        { 0, sizeof(pb_shm_header) },
        { L->pool_off, (u128)L->pool_off + (u128)PB_MAX_POOLS * sizeof(pb_shm_pool) },
        { L->client_off, (u128)L->client_off + (u128)L->max_clients * sizeof(pb_shm_client) },
        { L->slot_off, (u128)L->slot_off + (u128)L->nslots * sizeof(pb_shm_slot) },
    };
    assert(L->buf_off <= shm_size);
    for (int i = 0; i < 4; i++) {
        assert(r[i].hi <= L->buf_off);
        for (int j = 0; j < i; j++)     /* empty tables overlap nothing */
            assert(r[i].lo == r[i].hi || r[j].lo == r[j].hi || r[i].hi <= r[j].lo || r[j].hi <= r[i].lo);
    }
    uint32_t idx = PB_CLIENT_INDEX(client_id);
    assert(idx < L->max_clients);
    if (shm_size > SEG_MAX)
        return;

    /* A mapping is page aligned, zero filled by ftruncate. */
    void *mem = NULL;
    if (posix_memalign(&mem, PB_CACHELINE, shm_size ? shm_size : 1) != 0)
        abort();
    memset(mem, 0, shm_size);
    char *base = mem;
    assert(aligned(base + L->pool_off, _Alignof(pb_shm_pool)));
    assert(aligned(base + L->client_off, _Alignof(pb_shm_client)));
    assert(aligned(base + L->slot_off, _Alignof(pb_shm_slot)));
    pb_shm_pool *pools = (pb_shm_pool *)(base + L->pool_off);
    pb_shm_client *clients = (pb_shm_client *)(base + L->client_off);
    pb_shm_client *rec = &clients[idx];
    pb_shm_slot *slots = (pb_shm_slot *)(base + L->slot_off);
    for (uint32_t i = 0; i < PB_MAX_POOLS; i++) {
        touch(&pools[i], sizeof pools[i]);
        (void)atomic_load_explicit(&pools[i].freemap[PB_FREEMAP_WORDS - 1], memory_order_relaxed);
    }
    for (uint32_t i = 0; i < L->max_clients; i++) {
        touch(&clients[i], sizeof clients[i]);
        (void)atomic_load_explicit(&clients[i].id, memory_order_relaxed);
    }
    for (uint32_t i = 0; i < L->nslots; i++) {
        touch(&slots[i], sizeof slots[i]);
        (void)atomic_load_explicit(&slots[i].word, memory_order_relaxed);
    }
    touch(rec, sizeof *rec);
    (void)atomic_load(&rec->sq_tail);
    if (L->buf_off < shm_size)          /* the slot buffers (make_lease: >= buf_off) */
        touch(base + L->buf_off, shm_size - L->buf_off);
    free(mem);
}

/* ------------------------------------------------------------ 1: answer */

/* A field of the received bytes (0 where they stop short). */
static uint64_t peek(const uint8_t *buf, size_t len, size_t off, size_t flen)
{
    uint64_t v = 0;
    if (off + flen <= len)
        memcpy(&v, buf + off, flen);    /* little endian, like the host */
    return v;
}

#define RESP_FIELD(f) offsetof(pb_attach_resp, f), sizeof(((pb_attach_resp *)0)->f)

/* Flags 32 and 16 on the answer: rewrite its offsets and shm_size in place,
 * where the message holds them. */
static void answer_layout_flags(unsigned flags, uint8_t *buf, size_t len)
{
    if (!(flags & (F_RELATIVE | F_SIZE_AT_END)))
        return;
    pb_shm_layout L = {
        .pool_off = peek(buf, len, RESP_FIELD(layout.pool_off)),
        .client_off = peek(buf, len, RESP_FIELD(layout.client_off)),
        .slot_off = peek(buf, len, RESP_FIELD(layout.slot_off)),
        .buf_off = peek(buf, len, RESP_FIELD(layout.buf_off)),
        .max_clients = (uint32_t)peek(buf, len, RESP_FIELD(layout.max_clients)),
        .nslots = (uint32_t)peek(buf, len, RESP_FIELD(layout.nslots)),
    };
    if (flags & F_RELATIVE) {
        relative_layout(&L);
        stamp(buf, len, offsetof(pb_attach_resp, layout.pool_off), &L.pool_off, sizeof L.pool_off);
        stamp(buf, len, offsetof(pb_attach_resp, layout.client_off), &L.client_off, sizeof L.client_off);
        stamp(buf, len, offsetof(pb_attach_resp, layout.slot_off), &L.slot_off, sizeof L.slot_off);
        stamp(buf, len, offsetof(pb_attach_resp, layout.buf_off), &L.buf_off, sizeof L.buf_off);
    }
    if (flags & F_SIZE_AT_END) {
        int8_t delta = (int8_t)peek(buf, len, RESP_FIELD(shm_size));
        uint64_t shm_size = (uint64_t)layout_end(&L, delta);   /* mod 2^64 */
        stamp(buf, len, offsetof(pb_attach_resp, shm_size), &shm_size, sizeof shm_size);
    }
}

static void fuzz_answer(unsigned flags, in *s)
{
    uint8_t *buf = copy_exact(s->p, s->n);
    size_t len = s->n;
    uint32_t magic = PB_ATTACH_MAGIC;
    stamp_fields(flags, buf, len, offsetof(pb_attach_resp, magic), &magic, sizeof magic,
                 offsetof(pb_attach_resp, version), offsetof(pb_attach_resp, fingerprint));
    answer_layout_flags(flags, buf, len);
    ssize_t n = flags & F_RECV_FAIL ? -1 : (ssize_t)len;
    if (n < 0 && buf)
        POISON(buf, len);
    int rc = pbi_attach_resp_check((const pb_attach_resp *)buf, n);
    if (n < 0 && buf)
        UNPOISON(buf, len);

    int expect;
    if (n < (ssize_t)(offsetof(pb_attach_resp, fingerprint) + sizeof(uint32_t))) {
        expect = PB_EBROKER;
    } else {
        uint32_t r_magic = (uint32_t)peek(buf, len, RESP_FIELD(magic));
        int32_t status = (int32_t)(uint32_t)peek(buf, len, RESP_FIELD(status));
        uint32_t version = (uint32_t)peek(buf, len, RESP_FIELD(version));
        uint32_t finger = (uint32_t)peek(buf, len, RESP_FIELD(fingerprint));
        if (r_magic != PB_ATTACH_MAGIC)
            expect = PB_EBROKER;
        else if (status != PB_OK)
            expect = status <= -1 && status >= PB_ESERVER ? status : PB_EBROKER;
        else if (version != PB_SHM_VERSION || finger != PB_SHM_FINGERPRINT)
            expect = PB_EVERSION;
        else if (n != (ssize_t)sizeof(pb_attach_resp))
            expect = PB_EBROKER;
        else {
            pb_attach_resp r;
            memcpy(&r, buf, sizeof r);
            expect = layout_ok(&r.layout, r.shm_size, r.client_id) ? PB_OK : PB_EPROTO;
        }
    }
    assert(rc == expect);
    if (rc == PB_OK) {
        pb_attach_resp r;
        memcpy(&r, buf, sizeof r);
        use_layout(&r.layout, r.shm_size, r.client_id);
    }
    free(buf);
}

/* ------------------------------------------------------------ 2: layout */

static void fuzz_layout(unsigned flags, in *s)
{
    uint32_t size = take_u32(s);
    uint32_t client_id = take_u32(s);
    pb_shm_layout L = { 0 };
    L.pool_off = take_u64(s);
    L.client_off = take_u64(s);
    L.slot_off = take_u64(s);
    L.buf_off = take_u64(s);
    L.max_clients = take_u32(s);
    L.nslots = take_u32(s);
    if (flags & F_RELATIVE)
        relative_layout(&L);
    uint64_t shm_size = size % (SEG_MAX + 1);
    if (flags & F_SIZE_AT_END) {
        __int128 end = layout_end(&L, (int8_t)(size & 0xFF));
        if (end < 0 || end > SEG_MAX)
            return;
        shm_size = (uint64_t)end;
    }

    pb_shm_layout *copy = (pb_shm_layout *)copy_exact((const uint8_t *)&L, sizeof L);
    int rc = pbi_check_layout(copy, shm_size, client_id);
    assert(memcmp(copy, &L, sizeof L) == 0);
    free(copy);
    assert(rc == (layout_ok(&L, shm_size, client_id) ? PB_OK : PB_EPROTO));
    if (rc == PB_OK)
        use_layout(&L, shm_size, client_id);
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
        fuzz_layout(flags, &s);
        break;
    }
    return 0;
}
