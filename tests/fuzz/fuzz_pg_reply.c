/*
 * fuzz_pg_reply.c — libFuzzer target: the client library's PostgreSQL reply
 * decoder, pgp_feed() (client/pgproto.c), and every pb_result accessor on what
 * it produces.
 *
 * The decoder runs in every worker on bytes the backend sent (through the
 * slot's reply ring, which a buggy worker sharing the segment could also have
 * scribbled on), fed in whatever pieces the ring hands out.
 *
 * Input: 4 bytes of chunking seed, then a backend byte stream.  The stream is
 * decoded twice: in one feed, and in pieces whose sizes a PRNG seeded from the
 * input picks (1 byte up to 64 KiB).  Checked, beyond "no sanitizer report"
 * (ASan, UBSan, LeakSanitizer):
 *
 *   - pgp_feed returns PGP_MORE/READY/COPY_IN/COPY_OUT/COPY_ROW or
 *     PB_EPROTO/PB_ENOMEM, never claims more bytes than it was given, and
 *     consumes everything when it returns PGP_MORE; a PGP_COPY_ROW row is
 *     taken (and freed) by the caller, as client/pg.c does;
 *   - after PGP_READY, pgp_take_result() is never NULL and txn_status is one
 *     of 'I', 'T', 'E';
 *   - every accessor, in range and out of range (which must give
 *     NULL / 0 / 1 / -1 as poolbroker.h says), values NUL-terminated at
 *     pb_getlength(), NULL values read as "" with length 0;
 *   - the two decodings see the same results, notices, notifications and
 *     final status (a digest of everything the accessors return).
 */
#include <assert.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgproto.h"

typedef struct digest {
    uint64_t h;
    uint64_t events;
} digest;

static void mix(digest *d, uint64_t v)
{
    d->h = (d->h ^ v) * 0x100000001b3ull;
    d->h ^= d->h >> 29;
}

static void mix_bytes(digest *d, const void *p, size_t n)
{
    const unsigned char *u = p;
    mix(d, n);
    for (size_t i = 0; i < n; i++)
        mix(d, u[i]);
}

static void mix_str(digest *d, const char *s)
{
    if (!s) {
        mix(d, 0xA11CE);
        return;
    }
    mix_bytes(d, s, strlen(s));
}

static void digest_fields(digest *d, const pb_result *r)
{
    /* every code, so a field lookup can never walk off the end */
    for (int code = -1; code <= 256; code++)
        mix_str(d, pb_error_field(r, code));
    const char *m = pb_error_message(r);
    assert(m != NULL);
    mix_str(d, m);
}

static void digest_result(digest *d, const pb_result *r)
{
    int st = pb_result_status(r);
    assert(st == PB_RES_COMMAND_OK || st == PB_RES_TUPLES_OK || st == PB_RES_EMPTY_QUERY || st == PB_RES_ERROR);
    int nt = pb_ntuples(r), nf = pb_nfields(r);
    assert(nt >= 0 && nf >= 0);
    mix(d, (uint64_t)st);
    mix(d, (uint64_t)nt);
    mix(d, (uint64_t)nf);
    for (int c = 0; c < nf; c++) {
        const char *n = pb_fname(r, c);
        assert(n != NULL);
        mix_str(d, n);
        mix(d, pb_ftype(r, c));
        mix(d, (uint64_t)(int64_t)pb_fformat(r, c));
    }
    for (int row = 0; row < nt; row++) {
        for (int c = 0; c < nf; c++) {
            const char *v = pb_getvalue(r, row, c);
            int len = pb_getlength(r, row, c);
            int isnull = pb_getisnull(r, row, c);
            assert(v != NULL && len >= 0 && (isnull == 0 || isnull == 1));
            assert(v[len] == '\0');
            if (isnull)
                assert(len == 0 && v[0] == '\0');
            mix(d, (uint64_t)isnull);
            mix_bytes(d, v, (size_t)len);
        }
    }
    /* out of range: documented safe answers */
    const int bad[] = { -1, INT_MIN, INT_MAX };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert(pb_fname(r, bad[i]) == NULL && pb_ftype(r, bad[i]) == 0 && pb_fformat(r, bad[i]) == -1);
        assert(pb_getvalue(r, bad[i], 0) == NULL && pb_getvalue(r, 0, bad[i]) == NULL);
        assert(pb_getlength(r, bad[i], 0) == 0 && pb_getisnull(r, 0, bad[i]) == 1);
    }
    assert(pb_fname(r, nf) == NULL && pb_getvalue(r, nt, 0) == NULL && pb_getvalue(r, 0, nf) == NULL);
    assert(pb_getisnull(r, nt, 0) == 1 && pb_getlength(r, 0, nf) == 0);
    const char *tag = pb_cmd_status(r);
    assert(tag != NULL);
    mix_str(d, tag);
    long long tuples = pb_cmd_tuples(r);
    assert(tuples >= -1);
    mix(d, (uint64_t)tuples);
    digest_fields(d, r);
}

static void on_notice(void *arg, const pb_result *n)
{
    digest *d = arg;
    mix(d, 0x4E);
    d->events++;
    digest_result(d, n);
}

static void on_notify(void *arg, int be_pid, const char *channel, const char *payload)
{
    digest *d = arg;
    mix(d, 0x41);
    d->events++;
    mix(d, (uint64_t)(unsigned)be_pid);
    mix_str(d, channel);
    mix_str(d, payload);
}

static uint32_t rng_next(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

/* Decode len bytes in pieces of at most maxc (0: all at once). */
static int decode(digest *d, const char *data, size_t len, uint32_t seed, uint32_t maxc)
{
    pgp_dec dec;
    pgp_dec_init(&dec);
    dec.notice = on_notice;
    dec.notice_arg = d;
    dec.notify = on_notify;
    dec.notify_arg = d;
    int final = PGP_MORE;
    size_t pos = 0;
    while (pos < len && final >= 0) {
        size_t k = len - pos;
        if (maxc) {
            size_t c = 1 + rng_next(&seed) % maxc;
            if (c < k)
                k = c;
        }
        /* Each piece in its own exact-size allocation: ASan sees over-reads. */
        char *piece = malloc(k);
        memcpy(piece, data + pos, k);
        size_t off = 0;
        while (off < k) {
            size_t consumed = (size_t)-1;
            int rc = pgp_feed(&dec, piece + off, k - off, &consumed);
            assert(consumed <= k - off);
            off += consumed;
            if (rc < 0) {
                assert(rc == PB_EPROTO || rc == PB_ENOMEM);
                final = rc;
                break;
            }
            if (rc == PGP_READY) {
                assert(consumed > 0);
                assert(dec.txn_status == 'I' || dec.txn_status == 'T' || dec.txn_status == 'E');
                pb_result *r = pgp_take_result(&dec);
                assert(r != NULL);
                mix(d, 0x5A);
                mix(d, (uint64_t)(unsigned char)dec.txn_status);
                d->events++;
                digest_result(d, r);
                pb_result_free(r);
                assert(pgp_take_result(&dec) == NULL);
                continue;
            }
            if (rc == PGP_COPY_IN || rc == PGP_COPY_OUT) {
                assert(consumed > 0);
                mix(d, rc == PGP_COPY_IN ? 0x47 : 0x48);
                d->events++;
                continue;
            }
            if (rc == PGP_COPY_ROW) {
                /* the row is the caller's: take it, as client/pg.c does */
                assert(consumed > 0 && dec.row != NULL);
                mix(d, 0x64);
                mix_bytes(d, dec.row, dec.row_len);
                d->events++;
                free(dec.row);
                dec.row = NULL;
                dec.row_len = 0;
                continue;
            }
            if (rc != PGP_MORE) {
                fprintf(stderr, "pgp_feed returned %d (unknown result code)\n", rc);
                abort();
            }
            assert(off == k);
        }
        free(piece);
        pos += k;
    }
    mix(d, (uint64_t)(int64_t)final);
    pgp_dec_reset(&dec);
    return final;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    uint32_t seed = (uint32_t)data[0] << 24 | (uint32_t)data[1] << 16 | (uint32_t)data[2] << 8 | data[3];
    uint32_t maxc = 1u << ((seed >> 24) % 17);      /* 1 .. 64 KiB */
    uint32_t rs = seed | 1;
    const char *in = (const char *)data + 4;
    size_t len = size - 4;

    /* the accessors on NULL */
    assert(pb_result_status(NULL) == PB_RES_ERROR && pb_ntuples(NULL) == 0 && pb_nfields(NULL) == 0);
    assert(pb_getvalue(NULL, 0, 0) == NULL && pb_cmd_tuples(NULL) == -1 && pb_error_field(NULL, 'M') == NULL);
    assert(strcmp(pb_cmd_status(NULL), "") == 0 && strcmp(pb_error_message(NULL), "") == 0);

    digest whole = { 0xcbf29ce484222325ull, 0 }, pieces = { 0xcbf29ce484222325ull, 0 };
    int rw = decode(&whole, in, len, rs, 0);
    int rp = decode(&pieces, in, len, rs, maxc);
    if (rw != rp || whole.h != pieces.h || whole.events != pieces.events) {
        fprintf(stderr, "whole: rc %d, %llu events; in pieces of <= %u: rc %d, %llu events; digests %s\n", rw,
                (unsigned long long)whole.events, maxc, rp, (unsigned long long)pieces.events,
                whole.h == pieces.h ? "equal" : "differ");
        abort();
    }
    return 0;
}
