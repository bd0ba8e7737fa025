/*
 * fuzz_shm.c — libFuzzer target: the shared-memory primitives of
 * include/pb_shm.h that the broker, the client library and shmstat all run on
 * memory any worker can scribble on: the free map (pb_freemap_take, _put,
 * _repair), the word macros (PB_WORD*, PB_SQE*, PB_WAITW*, PB_CLIENT_INDEX)
 * the histogram buckets (pb_shm_hist_bucket / _add), and the broker's verdict
 * on the parts of a streamed request (pb_req_part).
 *
 * (The attach handshake's checks are fuzz_attach.c's, which calls the real
 * code in broker/attach.c and client/attachcheck.c.)
 *
 * Input: [u16 cap][u32 seed][u8 density] then an op stream (at most 96 ops).  The pool's free
 * map (all 4096 bits, also those past cap) and the cap slot words start from
 * a PRNG seeded by the input: any bit pattern, any state byte (valid or not),
 * any owner, generations near the wrap.  Each op then takes, puts, repairs,
 * scribbles a slot word or a map word, or checks a macro / bucket; after each
 * one the invariants are checked against a snapshot:
 *
 *   take    returns -1 or an index < cap; the slot was FREE with its bit set
 *           and is now exactly PB_WORD_NEXT(old, state, owner) (generation
 *           + 1, wrapping), and that is the word returned; no other slot word
 *           changed; bits are only ever cleared: the ones before the taken
 *           index (all of them pointing at non-FREE slots), none after it,
 *           none in map words past cap; -1 means every bit of the first
 *           (cap+63)/64 words pointed at a non-FREE slot (or past cap) and is
 *           now clear.
 *   put     sets exactly one bit.
 *   repair  sets exactly the bits of FREE slots that had none, returns how
 *           many, clears nothing, changes no slot word.
 *   macros  round-trip every field, masks never spill into neighbours.
 *   hist    bucket < PB_HIST_BUCKETS and us falls inside the bucket's bounds;
 *           pb_shm_hist_add counts into exactly that bucket.
 *   parts   any req_len/req_total/req_pos a holder writes, applied as the
 *           broker applies the verdict: what it holds never passes the
 *           request's total, the total never passes max_request_size, no
 *           part is over the buffer; a holder following the protocol gets
 *           WHOLE for a request that fits, else FIRST, NEXT..., complete.
 */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pb_shm.h"

#include "poison.h"

/* The checking code is not instrumented for coverage: its loops over 4096
 * bits would otherwise dominate the run time (and the fuzzer should steer by
 * pb_shm.h's branches, not by ours). */
#if defined(__clang__) && __clang_major__ >= 13
#define NOCOV __attribute__((no_sanitize("coverage")))
#else
#define NOCOV
#endif

/* One pool and the largest slot table, reused across runs (a fresh 1 MiB
 * calloc per run costs more than the run); slots past cap are poisoned, so
 * ASan still reports any access to an index >= cap. */
static pb_shm_pool pool;
static pb_shm_slot slot_table[PB_MAX_POOL_SLOTS];
static uint64_t snap_words[PB_MAX_POOL_SLOTS];

typedef struct in {
    const uint8_t *p;
    size_t n;
} in;

static uint64_t take_bytes(in *s, int k)
{
    uint64_t v = 0;
    for (int i = 0; i < k; i++) {
        v <<= 8;
        if (s->n) {
            v |= *s->p++;
            s->n--;
        }
    }
    return v;
}

NOCOV static uint64_t rng(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

typedef struct snap {
    uint64_t map[PB_FREEMAP_WORDS];
    uint64_t *words;
} snap;

NOCOV static void snapshot(snap *s, pb_shm_pool *p, pb_shm_slot *slots, uint32_t cap)
{
    for (int i = 0; i < PB_FREEMAP_WORDS; i++)
        s->map[i] = atomic_load(&p->freemap[i]);
    for (uint32_t i = 0; i < cap; i++)
        s->words[i] = atomic_load(&slots[i].word);
}

NOCOV static int bit(const uint64_t *map, uint32_t i)
{
    return (map[i / 64] >> (i % 64)) & 1;
}

NOCOV static void check_take(pb_shm_pool *p, pb_shm_slot *slots, uint32_t cap, const snap *b, int r, uint64_t w,
                       unsigned state, uint32_t owner)
{
    uint32_t nwords = (cap + 63) / 64;
    uint32_t nbits = nwords * 64;
    uint64_t after[PB_FREEMAP_WORDS];
    for (int i = 0; i < PB_FREEMAP_WORDS; i++)
        after[i] = atomic_load(&p->freemap[i]);
    for (uint32_t i = nwords; i < PB_FREEMAP_WORDS; i++)
        assert(after[i] == b->map[i]);                  /* words past cap untouched */
    for (uint32_t i = 0; i < PB_FREEMAP_WORDS; i++)
        assert((after[i] & ~b->map[i]) == 0);           /* take never sets a bit */
    if (r >= 0) {
        uint32_t t = (uint32_t)r;
        assert(t < cap);
        assert(bit(b->map, t) && !bit(after, t));
        assert(PB_WORD_STATE(b->words[t]) == PB_SLOT_FREE);
        uint64_t want = PB_WORD_NEXT(b->words[t], state, owner);
        assert(w == want && atomic_load(&slots[t].word) == want);
        assert(PB_WORD_GEN(want) == PB_WORD_GEN(b->words[t]) + 1u);
        for (uint32_t i = 0; i < cap; i++)
            if (i != t)
                assert(atomic_load(&slots[i].word) == b->words[i]);
        for (uint32_t i = 0; i < t; i++) {
            assert(!bit(after, i));
            if (bit(b->map, i))
                assert(PB_WORD_STATE(b->words[i]) != PB_SLOT_FREE);
        }
        for (uint32_t i = t + 1; i < nbits; i++)
            assert(bit(after, i) == bit(b->map, i));
    } else {
        assert(r == -1);
        for (uint32_t i = 0; i < nwords; i++)
            assert(after[i] == 0);
        for (uint32_t i = 0; i < cap; i++) {
            assert(atomic_load(&slots[i].word) == b->words[i]);
            if (bit(b->map, i))
                assert(PB_WORD_STATE(b->words[i]) != PB_SLOT_FREE);
        }
    }
}

NOCOV static void check_put(pb_shm_pool *p, const snap *b, uint32_t local)
{
    for (uint32_t i = 0; i < PB_FREEMAP_WORDS; i++) {
        uint64_t want = b->map[i] | (i == local / 64 ? 1ull << (local % 64) : 0);
        assert(atomic_load(&p->freemap[i]) == want);
    }
}

NOCOV static void check_repair(pb_shm_pool *p, pb_shm_slot *slots, uint32_t cap, const snap *b, uint32_t fixed)
{
    uint32_t want = 0;
    for (uint32_t i = 0; i < cap; i++) {
        int is_free = PB_WORD_STATE(b->words[i]) == PB_SLOT_FREE;
        uint64_t now = atomic_load(&p->freemap[i / 64]);
        assert(atomic_load(&slots[i].word) == b->words[i]);
        if (is_free && !bit(b->map, i))
            want++;
        assert(((now >> (i % 64)) & 1) == (uint64_t)(bit(b->map, i) | is_free));
    }
    for (uint32_t i = cap; i < PB_MAX_POOL_SLOTS; i++)
        assert(bit(b->map, i) == (int)((atomic_load(&p->freemap[i / 64]) >> (i % 64)) & 1));
    assert(fixed == want);
}

static void check_macros(uint64_t a, uint64_t c)
{
    unsigned st = (unsigned)(a & 0xFF);
    uint32_t owner = (uint32_t)(a >> 8);            /* may exceed 24 bits: must be masked */
    uint32_t gen = (uint32_t)c;
    uint64_t w = PB_WORD(st, owner, gen);
    assert(PB_WORD_STATE(w) == st && PB_WORD_OWNER(w) == (owner & 0xFFFFFFu) && PB_WORD_GEN(w) == gen);
    uint64_t nx = PB_WORD_NEXT(w, (st + 1) & 0xFF, owner >> 1);
    assert(PB_WORD_GEN(nx) == gen + 1u && PB_WORD_STATE(nx) == ((st + 1) & 0xFF) &&
           PB_WORD_OWNER(nx) == ((owner >> 1) & 0xFFFFFFu));
    uint64_t e = PB_SQE(st, owner, gen);
    assert(PB_SQE_OP(e) == st && PB_SQE_ARG(e) == (owner & 0xFFFFFFu) && PB_SQE_VAL(e) == gen);
    uint64_t ww = PB_WAITW(st, owner, gen);
    assert(PB_WAITW_STATE(ww) == st && PB_WAITW_SLOT(ww) == (owner & 0xFFFFFFu) && PB_WAITW_TICKET(ww) == gen);
    /* Any 64-bit pattern decodes to fields in range. */
    assert(PB_WORD_STATE(c) <= 0xFF && PB_WORD_OWNER(c) <= 0xFFFFFFu);
    assert(PB_WORD(PB_WORD_STATE(c), PB_WORD_OWNER(c), PB_WORD_GEN(c)) == c);
    /* A client id's index: 0..PB_MAX_CLIENTS-1 for ids the broker makes;
     * for id 0 ("nobody") or a multiple of 4096 it underflows to 0xFFFFFFFF,
     * which every user must reject with "idx >= max_clients". */
    uint32_t id = (uint32_t)(a >> 20) & 0xFFFFFFu;
    uint32_t idx = PB_CLIENT_INDEX(id);
    if ((id & 0xFFFu) != 0)
        assert(idx < PB_MAX_CLIENTS);
    else
        assert(idx == 0xFFFFFFFFu);
}

static void check_hist(uint64_t us)
{
    uint32_t b = pb_shm_hist_bucket(us);
    assert(b < PB_HIST_BUCKETS);
    if (b < PB_HIST_BUCKETS - 1)
        assert(us < (16ull << b));
    if (b > 0)
        assert(us >= (16ull << (b - 1)));
    static pb_hist h;
    uint64_t before = atomic_load(&h.bucket[b]), count = atomic_load(&h.count);
    pb_shm_hist_add(&h, us);
    assert(atomic_load(&h.bucket[b]) == before + 1 && atomic_load(&h.count) == count + 1);
}

/* Apply verdict v to the broker's model (have of want bytes) and check it. */
static void apply_part(enum pb_part v, uint32_t len, uint32_t total, uint32_t pos, uint32_t *have, uint32_t *want,
                       uint32_t req_size, uint32_t cap)
{
    switch (v) {
    case PB_PART_WHOLE:
        assert(*have == 0 && pos == 0 && len == total && len <= req_size && len <= cap && len > 0);
        *want = 0;
        return;
    case PB_PART_FIRST:
        assert(pos == 0 && len > 0 && len <= req_size && len <= total && total <= cap);
        *have = len;
        *want = total;
        break;
    case PB_PART_NEXT:
        assert(pos == *have && total == *want && *have > 0 && len > 0 && len <= req_size);
        *have += len;
        break;
    default:
        assert(v <= PB_PART_TOO_BIG);
        *have = *want = 0;          /* the request failed: dropped */
        return;
    }
    assert(*have <= *want && *want <= cap);
    if (*have == *want)
        *have = *want = 0;          /* complete: sent */
}

/* A stream of parts: a well-behaved holder's (split by req_size) or any values. */
static void check_parts(in *s)
{
    uint32_t req_size = 1 + (uint32_t)(take_bytes(s, 2) % 4096);
    uint32_t cap = (uint32_t)take_bytes(s, 3);
    uint32_t have = 0, want = 0;
    if (take_bytes(s, 1) & 1) {
        uint32_t total = 1 + (uint32_t)(take_bytes(s, 2) % 65536);
        for (uint32_t pos = 0; pos < total;) {
            uint32_t len = total - pos < req_size ? total - pos : req_size;
            enum pb_part v = pb_req_part(len, total, pos, have, want, req_size, cap);
            if (total > cap) {
                assert(v == PB_PART_TOO_BIG);
                return;
            }
            assert(v == (total <= req_size ? PB_PART_WHOLE : pos == 0 ? PB_PART_FIRST : PB_PART_NEXT));
            apply_part(v, len, total, pos, &have, &want, req_size, cap);
            pos += len;
        }
        assert(have == 0 && want == 0);
        return;
    }
    for (int k = 0; k < 16 && s->n; k++) {
        uint32_t len = (uint32_t)take_bytes(s, 2), total = (uint32_t)take_bytes(s, 3);
        uint32_t pos = take_bytes(s, 1) & 1 ? have : (uint32_t)take_bytes(s, 3);
        if (take_bytes(s, 1) & 1)
            total = want ? want : total;
        apply_part(pb_req_part(len, total, pos, have, want, req_size, cap), len, total, pos, &have, &want,
                   req_size, cap);
    }
}

/* Start state: any map bits (also past cap), mostly FREE slots, other states
 * valid or not, any owner, generations often just below the wrap. */
NOCOV static void fill(pb_shm_pool *p, pb_shm_slot *slots, uint32_t cap, uint64_t x, unsigned density)
{
    for (uint32_t i = 0; i < PB_MAX_POOL_SLOTS; i++)
        if ((rng(&x) & 0xFF) < density)
            atomic_fetch_or(&p->freemap[i / 64], 1ull << (i % 64));
    for (uint32_t i = 0; i < cap; i++) {
        uint64_t r = rng(&x);
        unsigned st = (r & 3) ? PB_SLOT_FREE : (unsigned)((r >> 2) % (PB_SLOT_STATE_MAX + 3));
        uint32_t gen = (r & 0x10000) ? 0xFFFFFFFFu - (uint32_t)((r >> 17) & 3) : (uint32_t)(r >> 32);
        atomic_store(&slots[i].word, PB_WORD(st, (uint32_t)(r >> 40), gen));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    in s = { data, size };
    /* cap: 1..4096 when the top bit is set, else 1..130 (small pools run
     * faster, so more of them get tried; 65..130 straddle a map word) */
    uint32_t raw = (uint32_t)take_bytes(&s, 2);
    uint32_t cap = 1 + (raw & 0x8000 ? raw % PB_MAX_POOL_SLOTS : raw % 130);
    uint64_t x = take_bytes(&s, 4) * 0x9E3779B97F4A7C15ull + 1;
    unsigned density = (unsigned)take_bytes(&s, 1);

    pb_shm_pool *p = &pool;
    pb_shm_slot *slots = slot_table;
    UNPOISON(slot_table, sizeof slot_table);
    memset(p, 0, sizeof *p);
    memset(slots, 0, cap * sizeof *slots);
    POISON(slot_table + cap, (PB_MAX_POOL_SLOTS - cap) * sizeof *slots);
    snap b;
    b.words = snap_words;
    fill(p, slots, cap, x, density);

    int ops = 0;
    while (s.n && ops++ < 96) {
        unsigned op = (unsigned)take_bytes(&s, 1) % 9;
        switch (op) {
        case 0: {       /* take, as a client (LEASED) or the broker (RESETTING) or anything */
            unsigned state = (unsigned)take_bytes(&s, 1);
            uint32_t owner = (uint32_t)take_bytes(&s, 3);
            snapshot(&b, p, slots, cap);
            uint64_t w = 0;
            int r = pb_freemap_take(p, slots, cap, state, owner, &w);
            check_take(p, slots, cap, &b, r, w, state, owner);
            break;
        }
        case 1: {       /* put */
            uint32_t local = (uint32_t)(take_bytes(&s, 2) % cap);
            snapshot(&b, p, slots, cap);
            pb_freemap_put(p, local);
            check_put(p, &b, local);
            break;
        }
        case 2: {       /* repair */
            snapshot(&b, p, slots, cap);
            uint32_t fixed = pb_freemap_repair(p, slots, cap);
            check_repair(p, slots, cap, &b, fixed);
            break;
        }
        case 3: {       /* a rogue writes a slot word */
            uint32_t i = (uint32_t)(take_bytes(&s, 2) % cap);
            atomic_store(&slots[i].word, take_bytes(&s, 8));
            break;
        }
        case 4: {       /* a rogue writes a map word */
            uint32_t i = (uint32_t)take_bytes(&s, 1) % PB_FREEMAP_WORDS;
            atomic_store(&p->freemap[i], take_bytes(&s, 8));
            break;
        }
        case 5:
            check_hist(take_bytes(&s, 8) >> (take_bytes(&s, 1) % 64));
            break;
        case 6: {
            uint64_t a = take_bytes(&s, 8);
            check_macros(a, take_bytes(&s, 8));
            break;
        }
        case 7: {       /* a holder gives its slot back: CAS to FREE, then the bit */
            uint32_t i = (uint32_t)(take_bytes(&s, 2) % cap);
            uint64_t w = atomic_load(&slots[i].word);
            if (PB_WORD_STATE(w) != PB_SLOT_FREE) {
                uint64_t fw = PB_WORD_NEXT(w, PB_SLOT_FREE, 0);
                assert(atomic_compare_exchange_strong(&slots[i].word, &w, fw));
                pb_freemap_put(p, i);
                assert(PB_WORD_GEN(fw) == PB_WORD_GEN(w) + 1u && PB_WORD_OWNER(fw) == 0);
            }
            break;
        }
        case 8:
            check_parts(&s);
            break;
        }
    }
    return 0;
}
