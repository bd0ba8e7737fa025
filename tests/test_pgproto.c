/*
 * test_pgproto.c — unit tests of client/pgproto.c: the exact bytes of every
 * frontend message, and the decoder on hand-built backend streams fed whole,
 * byte by byte and in random pieces, including malformed input (which must
 * give PB_EPROTO without a sanitizer report).
 */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pgproto.h"

/* ------------------------------------------------------------ helpers */

static void b_u8(pb_buf *b, unsigned v)
{
    unsigned char c = (unsigned char)v;
    assert_int_equal(pb_buf_append(b, &c, 1), PB_OK);
}

static void b_u16(pb_buf *b, unsigned v)
{
    b_u8(b, v >> 8);
    b_u8(b, v & 0xff);
}

static void b_u32(pb_buf *b, uint32_t v)
{
    b_u16(b, v >> 16);
    b_u16(b, v & 0xffff);
}

static void b_str(pb_buf *b, const char *s)
{
    assert_int_equal(pb_buf_append(b, s, strlen(s) + 1), PB_OK);
}

/* One backend message with a raw body. */
static void bk_raw(pb_buf *b, char type, const void *body, size_t n)
{
    b_u8(b, (unsigned char)type);
    b_u32(b, (uint32_t)(n + 4));
    assert_int_equal(pb_buf_append(b, body, n), PB_OK);
}

/* RowDescription of n text columns with the given names and type OIDs. */
static void bk_rowdesc(pb_buf *b, int n, const char *const *names, const unsigned *types)
{
    pb_buf body = {0};
    b_u16(&body, (unsigned)n);
    for (int i = 0; i < n; i++) {
        b_str(&body, names[i]);
        b_u32(&body, 16384);          /* table oid */
        b_u16(&body, (unsigned)i + 1); /* attnum */
        b_u32(&body, types[i]);
        b_u16(&body, 0xffff);         /* typlen -1 */
        b_u32(&body, 0xffffffffu);    /* typmod -1 */
        b_u16(&body, 0);              /* text */
    }
    bk_raw(b, 'T', body.data, body.len);
    pb_buf_free(&body);
}

/* DataRow; vals[i] NULL is SQL NULL; lens NULL means strlen. */
static void bk_datarow(pb_buf *b, int n, const char *const *vals, const int *lens)
{
    pb_buf body = {0};
    b_u16(&body, (unsigned)n);
    for (int i = 0; i < n; i++) {
        if (!vals[i]) {
            b_u32(&body, 0xffffffffu);
            continue;
        }
        size_t l = lens ? (size_t)lens[i] : strlen(vals[i]);
        b_u32(&body, (uint32_t)l);
        assert_int_equal(pb_buf_append(&body, vals[i], l), PB_OK);
    }
    bk_raw(b, 'D', body.data, body.len);
    pb_buf_free(&body);
}

static void bk_cc(pb_buf *b, const char *tag)
{
    bk_raw(b, 'C', tag, strlen(tag) + 1);
}

static void bk_rfq(pb_buf *b, char status)
{
    bk_raw(b, 'Z', &status, 1);
}

/* Error or notice: fields given as "Cxxxxx", "Mmessage", ..., NULL. */
static void bk_fields(pb_buf *b, int type, ...)
{
    pb_buf body = {0};
    va_list ap;
    va_start(ap, type);
    for (const char *f; (f = va_arg(ap, const char *)) != NULL; )
        b_str(&body, f);
    va_end(ap);
    b_u8(&body, 0);
    bk_raw(b, type, body.data, body.len);
    pb_buf_free(&body);
}

static void assert_bytes(const pb_buf *b, const void *want, size_t n)
{
    assert_int_equal(b->len, n);
    assert_memory_equal(b->data, want, n);
}

/* Feed everything in pieces of the given sizes (cycled; 0 = the rest at
 * once) until PGP_READY; returns the result. */
static pb_result *feed_pieces(pgp_dec *d, const pb_buf *in, const size_t *sizes, size_t nsizes,
                              size_t *used)
{
    size_t pos = 0, k = 0;
    for (;;) {
        assert_true(pos < in->len);
        size_t n = nsizes ? sizes[k++ % nsizes] : 0;
        if (n == 0 || n > in->len - pos)
            n = in->len - pos;
        size_t c = 0;
        int rc = pgp_feed(d, in->data + pos, n, &c);
        assert_true(c <= n);
        pos += c;
        if (rc == PGP_READY)
            break;
        assert_int_equal(rc, PGP_MORE);
        assert_int_equal(c, n);
    }
    if (used)
        *used = pos;
    pb_result *r = pgp_take_result(d);
    assert_non_null(r);
    return r;
}

static pb_result *feed_all(pgp_dec *d, const pb_buf *in)
{
    return feed_pieces(d, in, NULL, 0, NULL);
}

/* Feed bytes that must fail with PB_EPROTO, whole and byte by byte. */
#define expect_eproto(in) expect_eproto_at(in, __LINE__)
static void expect_eproto_at(const pb_buf *in, int line)
{
    pgp_dec d;
    pgp_dec_init(&d);
    size_t c = 0;
    int rc = pgp_feed(&d, in->data, in->len, &c);
    if (rc != PB_EPROTO || c > in->len)
        fail_msg("case at line %d, fed whole: rc %d, consumed %zu", line, rc, c);
    pgp_dec_reset(&d);

    rc = PGP_MORE;
    for (size_t i = 0; i < in->len && rc == PGP_MORE; i++)
        rc = pgp_feed(&d, in->data + i, 1, &c);
    if (rc != PB_EPROTO)
        fail_msg("case at line %d, fed byte by byte: rc %d", line, rc);
    pgp_dec_reset(&d);
}

/* -------------------------------------------------------------- pb_buf */

static void test_buf(void **state)
{
    (void)state;
    pb_buf b = {0};
    assert_int_equal(pb_buf_append(&b, NULL, 0), PB_OK);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(pb_buf_append(&b, "abc", 3), PB_OK);
    assert_int_equal(b.len, 3000);
    assert_true(b.cap >= 3000);
    assert_memory_equal(b.data + 2997, "abc", 3);
    assert_int_equal(pb_buf_reserve(&b, 100000), PB_OK);
    assert_true(b.cap - b.len >= 100000);
    assert_int_equal(pb_buf_reserve(&b, SIZE_MAX), PB_ENOMEM);
    pb_buf_free(&b);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    pb_buf_free(&b);
}

/* ------------------------------------------------------------ encoding */

static void test_enc_query(void **state)
{
    (void)state;
    pb_buf b = {0};
    assert_int_equal(pgp_query(&b, "SELECT 1"), PB_OK);
    assert_bytes(&b, "Q\0\0\0\x0d" "SELECT 1\0", 14);
    assert_int_equal(pgp_query(&b, NULL), PB_EINVAL);
    assert_int_equal(b.len, 14);
    assert_int_equal(pgp_query(NULL, "x"), PB_EINVAL);
    pb_buf_free(&b);
}

static void test_enc_parse(void **state)
{
    (void)state;
    pb_buf b = {0};
    assert_int_equal(pgp_parse(&b, "s1", "SELECT $1", 1, NULL), PB_OK);
    assert_bytes(&b, "P\0\0\0\x13" "s1\0" "SELECT $1\0" "\0\0", 20);
    b.len = 0;
    unsigned types[2] = {23, 0x01020304};
    assert_int_equal(pgp_parse(&b, NULL, "x", 2, types), PB_OK);
    assert_bytes(&b, "P\0\0\0\x11" "\0" "x\0" "\0\x02" "\0\0\0\x17" "\x01\x02\x03\x04", 18);
    b.len = 0;
    assert_int_equal(pgp_parse(&b, "", "x", -1, NULL), PB_EINVAL);
    assert_int_equal(pgp_parse(&b, "", "x", 65536, NULL), PB_EINVAL);
    assert_int_equal(pgp_parse(&b, "", NULL, 0, NULL), PB_EINVAL);
    assert_int_equal(b.len, 0);
    pb_buf_free(&b);
}

static void test_enc_bind(void **state)
{
    (void)state;
    pb_buf b = {0};
    /* Text params, one NULL, formats NULL, text results. */
    const char *vals[3] = {"42", NULL, "abc"};
    assert_int_equal(pgp_bind(&b, "", "", 3, vals, NULL, NULL, 0), PB_OK);
    static const char want1[] =
        "B\0\0\0\x1f" "\0" "\0"
        "\0\0"                     /* no format codes: all text */
        "\0\x03"                   /* 3 params */
        "\0\0\0\x02" "42"
        "\xff\xff\xff\xff"
        "\0\0\0\x03" "abc"
        "\0\x01" "\0\0";           /* one result format: text */
    assert_bytes(&b, want1, sizeof want1 - 1);

    /* Binary param with an embedded NUL, a text one, binary results. */
    b.len = 0;
    const char bin[4] = {0, 1, 0, 2};
    const char *vals2[2] = {bin, "7"};
    int lens[2] = {4, 999};        /* ignored for the text param */
    int fmts[2] = {1, 0};
    assert_int_equal(pgp_bind(&b, "p", "s", 2, vals2, lens, fmts, 1), PB_OK);
    static const char want2[] =
        "B\0\0\0\x21" "p\0" "s\0"
        "\0\x02" "\0\x01" "\0\0"
        "\0\x02"
        "\0\0\0\x04" "\0\x01\0\x02"
        "\0\0\0\x01" "7"
        "\0\x01" "\0\x01";
    assert_bytes(&b, want2, sizeof want2 - 1);

    /* No params at all. */
    b.len = 0;
    assert_int_equal(pgp_bind(&b, NULL, NULL, 0, NULL, NULL, NULL, 0), PB_OK);
    assert_bytes(&b, "B\0\0\0\x0e" "\0\0" "\0\0" "\0\0" "\0\x01\0\0", 15);

    /* Invalid arguments leave the buffer untouched. */
    b.len = 0;
    assert_int_equal(pgp_bind(&b, "", "", -1, vals, NULL, NULL, 0), PB_EINVAL);
    assert_int_equal(pgp_bind(&b, "", "", 65536, vals, NULL, NULL, 0), PB_EINVAL);
    assert_int_equal(pgp_bind(&b, "", "", 1, NULL, NULL, NULL, 0), PB_EINVAL);
    assert_int_equal(pgp_bind(&b, "", "", 2, vals2, NULL, fmts, 0), PB_EINVAL);  /* no lengths */
    int neg[2] = {-5, 0};
    assert_int_equal(pgp_bind(&b, "", "", 2, vals2, neg, fmts, 0), PB_EINVAL);
    int badf[2] = {2, 0};
    assert_int_equal(pgp_bind(&b, "", "", 2, vals2, lens, badf, 0), PB_EINVAL);
    assert_int_equal(pgp_bind(&b, "", "", 0, NULL, NULL, NULL, 2), PB_EINVAL);
    assert_int_equal(b.len, 0);
    pb_buf_free(&b);
}

static void test_enc_small(void **state)
{
    (void)state;
    pb_buf b = {0};
    assert_int_equal(pgp_describe(&b, 'S', "s1"), PB_OK);
    assert_bytes(&b, "D\0\0\0\x08" "Ss1\0", 9);
    b.len = 0;
    assert_int_equal(pgp_describe(&b, 'P', NULL), PB_OK);
    assert_bytes(&b, "D\0\0\0\x06" "P\0", 7);
    b.len = 0;
    assert_int_equal(pgp_describe(&b, 'X', ""), PB_EINVAL);
    assert_int_equal(pgp_close(&b, 'S', "st"), PB_OK);
    assert_bytes(&b, "C\0\0\0\x08" "Sst\0", 9);
    b.len = 0;
    assert_int_equal(pgp_close(&b, 'Q', "st"), PB_EINVAL);
    assert_int_equal(pgp_execute(&b, "", 0), PB_OK);
    assert_bytes(&b, "E\0\0\0\x09" "\0" "\0\0\0\0", 10);
    b.len = 0;
    assert_int_equal(pgp_execute(&b, "pp", 0x01020304), PB_OK);
    assert_bytes(&b, "E\0\0\0\x0b" "pp\0" "\x01\x02\x03\x04", 12);
    b.len = 0;
    assert_int_equal(pgp_execute(&b, "", -1), PB_EINVAL);
    assert_int_equal(pgp_sync(&b), PB_OK);
    assert_int_equal(pgp_flush(&b), PB_OK);
    assert_int_equal(pgp_copy_done(&b), PB_OK);
    assert_bytes(&b, "S\0\0\0\x04" "H\0\0\0\x04" "c\0\0\0\x04", 15);
    b.len = 0;
    assert_int_equal(pgp_copy_data(&b, "1\t2\n", 4), PB_OK);
    assert_bytes(&b, "d\0\0\0\x08" "1\t2\n", 9);
    b.len = 0;
    assert_int_equal(pgp_copy_data(&b, NULL, 0), PB_OK);
    assert_bytes(&b, "d\0\0\0\x04", 5);
    b.len = 0;
    assert_int_equal(pgp_copy_data(&b, NULL, 3), PB_EINVAL);
    assert_int_equal(pgp_copy_fail(&b, "nope"), PB_OK);
    assert_bytes(&b, "f\0\0\0\x09" "nope\0", 10);
    b.len = 0;
    assert_int_equal(pgp_sync(NULL), PB_EINVAL);
    pb_buf_free(&b);
}

/* Messages over 1 GB are refused before anything is allocated or read. */
static void test_enc_too_big(void **state)
{
    (void)state;
    pb_buf b = {0};
    static const char dummy[1];
    assert_int_equal(pgp_copy_data(&b, dummy, PGP_MAX_MESSAGE), PB_EINVAL);
    assert_int_equal(pgp_copy_data(&b, dummy, PGP_MAX_MESSAGE - 3), PB_EINVAL);
    assert_int_equal(pgp_copy_data(&b, dummy, SIZE_MAX), PB_EINVAL);
    assert_int_equal(b.len, 0);
    assert_null(b.data);
    /* A binary parameter whose length puts Bind past the limit. */
    const char *vals[2] = {dummy, dummy};
    int lens[2] = {INT_MAX / 2, INT_MAX / 2};
    int fmts[2] = {1, 1};
    assert_int_equal(pgp_bind(&b, "", "", 2, vals, lens, fmts, 0), PB_EINVAL);
    assert_null(b.data);
}

/* ------------------------------------------------------------ decoding */

static const char *const names3[3] = {"id", "name", "note"};
static const unsigned types3[3] = {23, 25, 25};

/* RowDescription + 3 DataRows (NULLs included) + CommandComplete + RFQ. */
static void build_select(pb_buf *b)
{
    bk_raw(b, 'S', "client_encoding\0UTF8", 21);    /* ignored */
    bk_rowdesc(b, 3, names3, types3);
    const char *r1[3] = {"1", "alice", NULL};
    const char *r2[3] = {"2", "", "hello"};
    const char *r3[3] = {NULL, NULL, NULL};
    bk_datarow(b, 3, r1, NULL);
    bk_datarow(b, 3, r2, NULL);
    bk_datarow(b, 3, r3, NULL);
    bk_cc(b, "SELECT 3");
    bk_rfq(b, 'T');
}

static void check_select(const pb_result *r)
{
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_ntuples(r), 3);
    assert_int_equal(pb_nfields(r), 3);
    assert_string_equal(pb_fname(r, 0), "id");
    assert_string_equal(pb_fname(r, 1), "name");
    assert_string_equal(pb_fname(r, 2), "note");
    assert_int_equal(pb_ftype(r, 0), 23);
    assert_int_equal(pb_ftype(r, 2), 25);
    assert_int_equal(pb_fformat(r, 1), 0);
    assert_string_equal(pb_getvalue(r, 0, 0), "1");
    assert_string_equal(pb_getvalue(r, 0, 1), "alice");
    assert_int_equal(pb_getlength(r, 0, 1), 5);
    assert_string_equal(pb_getvalue(r, 0, 2), "");
    assert_int_equal(pb_getisnull(r, 0, 2), 1);
    assert_int_equal(pb_getlength(r, 0, 2), 0);
    assert_int_equal(pb_getisnull(r, 0, 1), 0);
    assert_string_equal(pb_getvalue(r, 1, 0), "2");
    assert_string_equal(pb_getvalue(r, 1, 1), "");
    assert_int_equal(pb_getisnull(r, 1, 1), 0);
    assert_int_equal(pb_getlength(r, 1, 1), 0);
    assert_string_equal(pb_getvalue(r, 1, 2), "hello");
    assert_int_equal(pb_getlength(r, 1, 2), 5);
    for (int c = 0; c < 3; c++) {
        assert_int_equal(pb_getisnull(r, 2, c), 1);
        assert_string_equal(pb_getvalue(r, 2, c), "");
    }
    assert_string_equal(pb_cmd_status(r), "SELECT 3");
    assert_int_equal(pb_cmd_tuples(r), 3);
    assert_null(pb_error_field(r, 'M'));
    assert_string_equal(pb_error_message(r), "");
}

static void test_dec_select_splits(void **state)
{
    (void)state;
    pb_buf in = {0};
    build_select(&in);
    pgp_dec d;
    pgp_dec_init(&d);

    pb_result *r = feed_all(&d, &in);
    check_select(r);
    assert_int_equal(d.txn_status, 'T');
    pb_result_free(r);

    size_t one = 1;
    r = feed_pieces(&d, &in, &one, 1, NULL);
    check_select(r);
    pb_result_free(r);

    srand(12345);
    for (int iter = 0; iter < 200; iter++) {
        size_t sizes[16];
        for (int i = 0; i < 16; i++)
            sizes[i] = 1 + (size_t)(rand() % (iter % 3 == 0 ? 7 : 60));
        size_t used = 0;
        r = feed_pieces(&d, &in, sizes, 16, &used);
        assert_int_equal(used, in.len);
        check_select(r);
        pb_result_free(r);
    }
    assert_int_equal(d.partial.len, 0);
    pgp_dec_reset(&d);
    pb_buf_free(&in);
}

/* Several statements: the last result; an error wins. */
static void test_dec_multi_statement(void **state)
{
    (void)state;
    pgp_dec d;
    pgp_dec_init(&d);
    pb_buf in = {0};
    bk_cc(&in, "BEGIN");
    bk_cc(&in, "INSERT 0 5");
    bk_rowdesc(&in, 1, names3, types3);
    const char *v[1] = {"x"};
    bk_datarow(&in, 1, v, NULL);
    bk_cc(&in, "SELECT 1");
    bk_cc(&in, "UPDATE 4");
    bk_rfq(&in, 'T');
    pb_result *r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_string_equal(pb_cmd_status(r), "UPDATE 4");
    assert_int_equal(pb_cmd_tuples(r), 4);
    assert_int_equal(pb_nfields(r), 0);
    assert_int_equal(pb_ntuples(r), 0);
    pb_result_free(r);

    /* SELECT last: its rows. */
    in.len = 0;
    bk_cc(&in, "SET");
    bk_rowdesc(&in, 1, names3, types3);
    bk_datarow(&in, 1, v, NULL);
    bk_cc(&in, "SELECT 1");
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_string_equal(pb_getvalue(r, 0, 0), "x");
    pb_result_free(r);

    /* An error stops the query: rows of the failing statement are dropped. */
    in.len = 0;
    bk_cc(&in, "INSERT 0 1");
    bk_rowdesc(&in, 1, names3, types3);
    bk_datarow(&in, 1, v, NULL);
    bk_fields(&in, 'E', "SERROR", "C22012", "Mdivision by zero", NULL);
    bk_rfq(&in, 'E');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_string_equal(pb_error_field(r, 'C'), "22012");
    assert_string_equal(pb_error_message(r), "division by zero");
    assert_int_equal(pb_ntuples(r), 0);
    assert_int_equal(d.txn_status, 'E');
    pb_result_free(r);

    /* Nothing after an error replaces it (e.g. pipelined statements). */
    in.len = 0;
    bk_fields(&in, 'E', "C42601", "Mfirst", NULL);
    bk_cc(&in, "SELECT 1");
    bk_fields(&in, 'E', "C25P02", "Msecond", NULL);
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_string_equal(pb_error_message(r), "first");
    pb_result_free(r);

    /* Empty query string. */
    in.len = 0;
    bk_raw(&in, 'I', NULL, 0);
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_EMPTY_QUERY);
    assert_string_equal(pb_cmd_status(r), "");
    pb_result_free(r);

    /* RFQ alone: a COMMAND_OK with no tag. */
    in.len = 0;
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_string_equal(pb_cmd_status(r), "");
    assert_int_equal(pb_cmd_tuples(r), -1);
    pb_result_free(r);

    pgp_dec_reset(&d);
    pb_buf_free(&in);
}

static void test_dec_error_fields(void **state)
{
    (void)state;
    pb_buf in = {0};
    bk_fields(&in, 'E', "SERROR", "VERROR", "C23505",
              "Mduplicate key value violates unique constraint \"t_pkey\"",
              "DKey (id)=(1) already exists.", "Hsome hint", "P15", "p3", "qselect 1",
              "Win function f", "spublic", "tt", "cid", "dint4", "nt_pkey",
              "Fnbtinsert.c", "L664", "R_bt_check_unique", NULL);
    bk_rfq(&in, 'I');
    pgp_dec d;
    pgp_dec_init(&d);
    size_t one = 1;
    pb_result *r = feed_pieces(&d, &in, &one, 1, NULL);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    static const struct { char code; const char *v; } want[] = {
        {'S', "ERROR"}, {'V', "ERROR"}, {'C', "23505"},
        {'M', "duplicate key value violates unique constraint \"t_pkey\""},
        {'D', "Key (id)=(1) already exists."}, {'H', "some hint"}, {'P', "15"},
        {'p', "3"}, {'q', "select 1"}, {'W', "in function f"}, {'s', "public"},
        {'t', "t"}, {'c', "id"}, {'d', "int4"}, {'n', "t_pkey"},
        {'F', "nbtinsert.c"}, {'L', "664"}, {'R', "_bt_check_unique"},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        assert_string_equal(pb_error_field(r, want[i].code), want[i].v);
    assert_null(pb_error_field(r, 'Z'));
    assert_null(pb_error_field(r, 0));
    assert_null(pb_error_field(r, -1));
    assert_null(pb_error_field(r, 1000));
    assert_string_equal(pb_error_message(r), want[3].v);
    assert_int_equal(pb_ntuples(r), 0);
    assert_null(pb_getvalue(r, 0, 0));
    pb_result_free(r);
    pgp_dec_reset(&d);
    pb_buf_free(&in);
}

struct seen {
    int notices;
    char last_notice[64];
    char last_sev[16];
    int notifies;
    int pid;
    char chan[32], payload[32];
};

static void on_notice(void *arg, const pb_result *n)
{
    struct seen *s = arg;
    s->notices++;
    snprintf(s->last_notice, sizeof s->last_notice, "%s", pb_error_message(n));
    snprintf(s->last_sev, sizeof s->last_sev, "%s", pb_error_field(n, 'S'));
}

static void on_notify(void *arg, int pid, const char *chan, const char *payload)
{
    struct seen *s = arg;
    s->notifies++;
    s->pid = pid;
    snprintf(s->chan, sizeof s->chan, "%s", chan);
    snprintf(s->payload, sizeof s->payload, "%s", payload);
}

static void test_dec_notice_notify(void **state)
{
    (void)state;
    struct seen s = {0};
    pgp_dec d;
    pgp_dec_init(&d);
    d.notice = on_notice;
    d.notice_arg = &s;
    d.notify = on_notify;
    d.notify_arg = &s;
    pb_buf in = {0};
    bk_fields(&in, 'N', "SNOTICE", "C00000", "Mtable \"t\" does not exist, skipping", NULL);
    bk_cc(&in, "DROP TABLE");
    pb_buf a = {0};
    b_u32(&a, 4242);
    b_str(&a, "chan");
    b_str(&a, "payload!");
    bk_raw(&in, 'A', a.data, a.len);
    bk_fields(&in, 'N', "SWARNING", "Msecond", NULL);
    bk_rfq(&in, 'I');
    pb_result *r = feed_all(&d, &in);
    assert_int_equal(s.notices, 2);
    assert_string_equal(s.last_notice, "second");
    assert_string_equal(s.last_sev, "WARNING");
    assert_int_equal(s.notifies, 1);
    assert_int_equal(s.pid, 4242);
    assert_string_equal(s.chan, "chan");
    assert_string_equal(s.payload, "payload!");
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_string_equal(pb_cmd_status(r), "DROP TABLE");
    assert_null(pb_error_field(r, 'M'));
    assert_string_equal(pb_error_message(r), "");
    pb_result_free(r);

    /* Without callbacks they are dropped just the same. */
    d.notice = NULL;
    d.notify = NULL;
    r = feed_all(&d, &in);
    assert_int_equal(s.notices, 2);
    assert_null(pb_error_field(r, 'M'));
    pb_result_free(r);

    /* Callbacks survive a reset. */
    d.notice = on_notice;
    pgp_dec_reset(&d);
    assert_ptr_equal(d.notice, on_notice);
    pgp_dec_reset(&d);
    pb_buf_free(&a);
    pb_buf_free(&in);
}

/* Two replies in one feed: the first stops right after its RFQ. */
static void test_dec_back_to_back(void **state)
{
    (void)state;
    pb_buf in = {0};
    bk_cc(&in, "INSERT 0 1");
    bk_rfq(&in, 'I');
    size_t first = in.len;
    build_select(&in);
    pgp_dec d;
    pgp_dec_init(&d);
    size_t c = 0;
    assert_int_equal(pgp_feed(&d, in.data, in.len, &c), PGP_READY);
    assert_int_equal(c, first);
    pb_result *r = pgp_take_result(&d);
    assert_string_equal(pb_cmd_status(r), "INSERT 0 1");
    assert_int_equal(pb_cmd_tuples(r), 1);
    assert_int_equal(d.txn_status, 'I');
    pb_result_free(r);
    size_t c2 = 0;
    assert_int_equal(pgp_feed(&d, in.data + c, in.len - c, &c2), PGP_READY);
    assert_int_equal(c + c2, in.len);
    r = pgp_take_result(&d);
    check_select(r);
    pb_result_free(r);
    assert_null(pgp_take_result(&d));

    /* A result not taken is dropped when the next reply begins. */
    assert_int_equal(pgp_feed(&d, in.data, in.len, &c), PGP_READY);
    assert_int_equal(pgp_feed(&d, in.data + c, in.len - c, &c2), PGP_READY);
    r = pgp_take_result(&d);
    check_select(r);
    pb_result_free(r);

    /* Same with a reply that is only an RFQ (a lone Sync). */
    assert_int_equal(pgp_feed(&d, in.data, first, &c), PGP_READY);
    assert_int_equal(pgp_feed(&d, "Z\0\0\0\x05I", 6, &c), PGP_READY);
    r = pgp_take_result(&d);
    assert_string_equal(pb_cmd_status(r), "");
    pb_result_free(r);
    pgp_dec_reset(&d);
    pb_buf_free(&in);
}

/* Extended protocol: ParseComplete, BindComplete, ... */
static void test_dec_extended(void **state)
{
    (void)state;
    pgp_dec d;
    pgp_dec_init(&d);
    pb_buf in = {0};
    bk_raw(&in, '1', NULL, 0);
    bk_raw(&in, '2', NULL, 0);
    bk_rowdesc(&in, 2, names3, types3);
    const char bin[5] = {0, 0, 0, 42, 0};
    const char *v[2] = {bin, "abc"};
    int lens[2] = {5, 3};
    bk_datarow(&in, 2, v, lens);
    bk_cc(&in, "SELECT 1");
    bk_raw(&in, '3', NULL, 0);
    bk_raw(&in, 'K', "\0\0\0\1\0\0\0\2", 8);
    bk_rfq(&in, 'I');
    pb_result *r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_getlength(r, 0, 0), 5);
    assert_memory_equal(pb_getvalue(r, 0, 0), bin, 5);
    assert_int_equal(pb_getvalue(r, 0, 0)[5], 0);
    assert_string_equal(pb_getvalue(r, 0, 1), "abc");
    assert_int_equal(pb_getlength(r, 0, 1), 3);
    pb_result_free(r);

    /* Describe statement only: ParameterDescription, RowDescription, no
     * CommandComplete.  The result carries the description. */
    in.len = 0;
    bk_raw(&in, '1', NULL, 0);
    bk_raw(&in, 't', "\0\x01\0\0\0\x17", 6);
    bk_rowdesc(&in, 3, names3, types3);
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_int_equal(pb_nfields(r), 3);
    assert_string_equal(pb_fname(r, 2), "note");
    assert_int_equal(pb_ntuples(r), 0);
    pb_result_free(r);

    /* NoData, then a command; PortalSuspended ignored. */
    in.len = 0;
    bk_raw(&in, 'n', NULL, 0);
    bk_cc(&in, "DELETE 2");
    bk_raw(&in, 's', NULL, 0);
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_int_equal(pb_cmd_tuples(r), 2);
    pb_result_free(r);

    /* Rows of a suspended portal (Execute with max_rows). */
    in.len = 0;
    bk_rowdesc(&in, 1, names3, types3);
    const char *one[1] = {"1"};
    bk_datarow(&in, 1, one, NULL);
    bk_raw(&in, 's', NULL, 0);
    bk_rfq(&in, 'T');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_ntuples(r), 1);
    pb_result_free(r);

    /* Zero-column rows (SELECT FROM t). */
    in.len = 0;
    bk_rowdesc(&in, 0, NULL, NULL);
    bk_datarow(&in, 0, NULL, NULL);
    bk_datarow(&in, 0, NULL, NULL);
    bk_cc(&in, "SELECT 2");
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_TUPLES_OK);
    assert_int_equal(pb_ntuples(r), 2);
    assert_int_equal(pb_nfields(r), 0);
    assert_null(pb_getvalue(r, 0, 0));
    pb_result_free(r);
    pgp_dec_reset(&d);
    pb_buf_free(&in);
}

static void test_dec_copy(void **state)
{
    (void)state;
    pgp_dec d;
    pgp_dec_init(&d);
    pb_buf in = {0};
    /* COPY FROM STDIN: the feed stops right after CopyInResponse. */
    bk_raw(&in, 'G', "\0\0\x02\0\0\0\0", 7);
    size_t g = in.len;
    bk_cc(&in, "COPY 10");
    bk_rfq(&in, 'I');
    size_t c = 0;
    assert_int_equal(pgp_feed(&d, in.data, in.len, &c), PGP_COPY_IN);
    assert_int_equal(c, g);
    assert_int_equal(d.copy_in, 1);
    size_t c2 = 0;
    assert_int_equal(pgp_feed(&d, in.data + c, in.len - c, &c2), PGP_READY);
    assert_int_equal(c + c2, in.len);
    assert_int_equal(d.copy_in, 0);
    pb_result *r = pgp_take_result(&d);
    assert_int_equal(pb_cmd_tuples(r), 10);
    pb_result_free(r);

    /* Same, byte by byte. */
    int rc = PGP_MORE;
    size_t pos = 0;
    while (rc == PGP_MORE) {
        rc = pgp_feed(&d, in.data + pos, 1, &c);
        pos += c;
    }
    assert_int_equal(rc, PGP_COPY_IN);
    assert_int_equal(pos, g);
    r = feed_pieces(&d, &(pb_buf){in.data + pos, in.len - pos, 0}, NULL, 0, NULL);
    pb_result_free(r);

    /* COPY TO STDOUT: the decoder stops after CopyOutResponse, then hands
     * out each CopyData row (the caller takes d.row). */
    in.len = 0;
    bk_raw(&in, 'H', "\0\0\x01\0\0", 5);
    size_t h = in.len;
    bk_raw(&in, 'd', "1\n", 2);
    bk_raw(&in, 'd', "2\n", 2);
    assert_int_equal(pgp_feed(&d, in.data, in.len, &c), PGP_COPY_OUT);
    assert_int_equal(c, h);
    assert_int_equal(d.copy_out, 1);
    size_t pos2 = c;
    for (int row = 1; row <= 2; row++) {
        assert_int_equal(pgp_feed(&d, in.data + pos2, in.len - pos2, &c), PGP_COPY_ROW);
        pos2 += c;
        assert_int_equal(d.row_len, 2);
        assert_int_equal(d.row[0], '0' + row);
        free(d.row);
        d.row = NULL;
    }
    assert_int_equal(pos2, in.len);
    in.len = 0;
    bk_raw(&in, 'c', NULL, 0);
    assert_int_equal(pgp_feed(&d, in.data, in.len, &c), PGP_MORE);
    assert_int_equal(d.copy_out, 0);
    in.len = 0;
    bk_cc(&in, "COPY 2");
    bk_rfq(&in, 'I');
    r = feed_all(&d, &in);
    assert_int_equal(pb_result_status(r), PB_RES_COMMAND_OK);
    assert_int_equal(pb_cmd_tuples(r), 2);
    pb_result_free(r);
    pgp_dec_reset(&d);
    pb_buf_free(&in);
}

static void test_dec_malformed(void **state)
{
    (void)state;
    pb_buf in = {0};

    /* Length below 4. */
    assert_int_equal(pb_buf_append(&in, "C\0\0\0\x03xx", 7), PB_OK);
    expect_eproto(&in);
    in.len = 0;
    assert_int_equal(pb_buf_append(&in, "Z\0\0\0\0", 5), PB_OK);
    expect_eproto(&in);

    /* Huge lengths: over 1 GB, and "negative". */
    in.len = 0;
    assert_int_equal(pb_buf_append(&in, "D\x40\0\0\x01\0\0", 7), PB_OK);
    expect_eproto(&in);
    in.len = 0;
    assert_int_equal(pb_buf_append(&in, "D\xff\xff\xff\xff\0\0", 7), PB_OK);
    expect_eproto(&in);

    /* DataRow with the wrong column count, and without a RowDescription. */
    const char *v2[2] = {"a", "b"};
    in.len = 0;
    bk_rowdesc(&in, 3, names3, types3);
    bk_datarow(&in, 2, v2, NULL);
    expect_eproto(&in);
    in.len = 0;
    bk_datarow(&in, 2, v2, NULL);
    expect_eproto(&in);

    /* DataRow whose value length runs past the message. */
    in.len = 0;
    bk_rowdesc(&in, 1, names3, types3);
    bk_raw(&in, 'D', "\0\x01\0\0\0\x09" "abc", 9);
    expect_eproto(&in);
    /* ... whose value length is negative but not -1. */
    in.len = 0;
    bk_rowdesc(&in, 1, names3, types3);
    bk_raw(&in, 'D', "\0\x01\xff\xff\xff\xfe", 6);
    expect_eproto(&in);
    /* ... with a truncated length field, and with trailing bytes. */
    in.len = 0;
    bk_rowdesc(&in, 1, names3, types3);
    bk_raw(&in, 'D', "\0\x01\0\0", 4);
    expect_eproto(&in);
    in.len = 0;
    bk_rowdesc(&in, 1, names3, types3);
    bk_raw(&in, 'D', "\0\x01\0\0\0\x01" "ab", 8);
    expect_eproto(&in);
    /* ... with no count at all. */
    in.len = 0;
    bk_rowdesc(&in, 1, names3, types3);
    bk_raw(&in, 'D', "\0", 1);
    expect_eproto(&in);

    /* Strings without their NUL. */
    in.len = 0;
    bk_raw(&in, 'C', "SELECT 1", 8);
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'E', "SERROR\0Mno end", 14);
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'E', "SERROR\0", 7);              /* no final 0 byte */
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'N', "Mx", 2);
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'A', "\0\0\0\1chan\0payload", 16);
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'A', "\0\0", 2);
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'T', "\0\x01" "name", 6);          /* field name unterminated */
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'T', "\0\x01" "id\0" "\0\0\0\0", 9); /* field attributes cut short */
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'T', "\0\x02" "id\0" "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 23);
    expect_eproto(&in);                             /* count past the end */
    in.len = 0;
    bk_raw(&in, 'T', "\x80\0", 2);                   /* negative count */
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'G', "\0\0\x05\0\0", 5);             /* copy formats past the end */
    expect_eproto(&in);

    /* RowDescription in the middle of rows. */
    in.len = 0;
    const char *v1[1] = {"a"};
    bk_rowdesc(&in, 1, names3, types3);
    bk_datarow(&in, 1, v1, NULL);
    bk_rowdesc(&in, 1, names3, types3);
    expect_eproto(&in);

    /* Bad ReadyForQuery status, and a wrong RFQ length. */
    in.len = 0;
    bk_rfq(&in, 'X');
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'Z', "II", 2);
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'Z', NULL, 0);
    expect_eproto(&in);

    /* Unknown types (Authentication and CopyBoth are not expected here). */
    in.len = 0;
    bk_raw(&in, 'X', NULL, 0);
    expect_eproto(&in);
    in.len = 0;
    bk_raw(&in, 'R', "\0\0\0\0", 4);
    expect_eproto(&in);
    in.len = 0;
    assert_int_equal(pb_buf_append(&in, "\0", 1), PB_OK);
    expect_eproto(&in);

    /* Garbage after a good message: the good part is consumed first. */
    in.len = 0;
    bk_cc(&in, "SET");
    assert_int_equal(pb_buf_append(&in, "?\0\0\0\x04", 5), PB_OK);
    expect_eproto(&in);

    /* Random bytes after a RowDescription never over-read. */
    srand(777);
    for (int iter = 0; iter < 2000; iter++) {
        in.len = 0;
        bk_rowdesc(&in, 3, names3, types3);
        char junk[40];
        size_t n = (size_t)(rand() % 40);
        for (size_t i = 0; i < n; i++)
            junk[i] = (char)(rand() % 4 == 0 ? 0xff : rand() % 8);
        bk_raw(&in, (char)"DTECNAZG"[rand() % 8], junk, n);
        pgp_dec d;
        pgp_dec_init(&d);
        size_t c;
        int rc = pgp_feed(&d, in.data, in.len, &c);
        assert_true(rc == PB_EPROTO || rc == PGP_MORE || rc == PGP_READY || rc == PGP_COPY_IN);
        pgp_dec_reset(&d);
    }

    /* A good stream with bytes overwritten, fed in random pieces: any
     * outcome but a crash or a sanitizer report. */
    pb_buf good = {0};
    build_select(&good);
    in.len = 0;
    assert_int_equal(pb_buf_append(&in, good.data, good.len), PB_OK);
    for (int iter = 0; iter < 5000; iter++) {
        memcpy(in.data, good.data, good.len);
        for (int k = 1 + rand() % 3; k > 0; k--)
            in.data[rand() % (int)in.len] = (char)(rand() % 3 == 0 ? 0xff : rand());
        pgp_dec d;
        pgp_dec_init(&d);
        size_t pos = 0, c;
        int rc = PGP_MORE;
        while (pos < in.len && rc >= 0) {
            size_t n = 1 + (size_t)(rand() % 20);
            if (n > in.len - pos)
                n = in.len - pos;
            rc = pgp_feed(&d, in.data + pos, n, &c);
            assert_true(c <= n);
            pos += c;
            if (rc == PGP_READY || rc == PGP_COPY_IN)
                pb_result_free(pgp_take_result(&d));
        }
        pgp_dec_reset(&d);
    }
    pb_buf_free(&good);
    pb_buf_free(&in);
}

static void test_cmd_tuples(void **state)
{
    (void)state;
    static const struct { const char *tag; long long n; } cases[] = {
        {"INSERT 0 5", 5}, {"INSERT 16384 1", 1}, {"UPDATE 3", 3}, {"DELETE 2", 2},
        {"SELECT 7", 7}, {"MOVE 0", 0}, {"FETCH 12", 12}, {"COPY 10", 10},
        {"MERGE 4", 4}, {"SELECT 9223372036854775807", 9223372036854775807LL},
        {"SELECT 9223372036854775808", -1}, {"INSERT 5", -1}, {"INSERT", -1},
        {"CREATE TABLE", -1}, {"BEGIN", -1}, {"SELECT", -1}, {"SELECT ", -1},
        {"SELECT 1x", -1}, {"UPDATE -1", -1}, {"", -1}, {"COPY", -1},
    };
    pgp_dec d;
    pgp_dec_init(&d);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pb_buf in = {0};
        bk_cc(&in, cases[i].tag);
        bk_rfq(&in, 'I');
        pb_result *r = feed_all(&d, &in);
        assert_string_equal(pb_cmd_status(r), cases[i].tag);
        if (pb_cmd_tuples(r) != cases[i].n)
            fail_msg("tag \"%s\": got %lld, want %lld", cases[i].tag, pb_cmd_tuples(r),
                     cases[i].n);
        pb_result_free(r);
        pb_buf_free(&in);
    }
    pgp_dec_reset(&d);
}

static void test_null_and_range(void **state)
{
    (void)state;
    assert_int_equal(pb_result_status(NULL), PB_RES_ERROR);
    assert_int_equal(pb_ntuples(NULL), 0);
    assert_int_equal(pb_nfields(NULL), 0);
    assert_null(pb_fname(NULL, 0));
    assert_int_equal(pb_ftype(NULL, 0), 0);
    assert_int_equal(pb_fformat(NULL, 0), -1);
    assert_null(pb_getvalue(NULL, 0, 0));
    assert_int_equal(pb_getlength(NULL, 0, 0), 0);
    assert_int_equal(pb_getisnull(NULL, 0, 0), 1);
    assert_string_equal(pb_cmd_status(NULL), "");
    assert_int_equal(pb_cmd_tuples(NULL), -1);
    assert_null(pb_error_field(NULL, 'M'));
    assert_string_equal(pb_error_message(NULL), "");
    pb_result_free(NULL);

    pb_buf in = {0};
    build_select(&in);
    pgp_dec d;
    pgp_dec_init(&d);
    pb_result *r = feed_all(&d, &in);
    int bad[][2] = {{-1, 0}, {0, -1}, {3, 0}, {0, 3}, {INT_MAX, 0}, {0, INT_MAX}, {INT_MIN, INT_MIN}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_null(pb_getvalue(r, bad[i][0], bad[i][1]));
        assert_int_equal(pb_getlength(r, bad[i][0], bad[i][1]), 0);
        assert_int_equal(pb_getisnull(r, bad[i][0], bad[i][1]), 1);
    }
    assert_null(pb_fname(r, 3));
    assert_null(pb_fname(r, -1));
    assert_int_equal(pb_ftype(r, 3), 0);
    assert_int_equal(pb_fformat(r, -1), -1);
    pb_result_free(r);
    pgp_dec_reset(&d);
    pb_buf_free(&in);

    /* Misuse of the decoder entry points. */
    size_t c = 99;
    pgp_dec_init(&d);
    assert_int_equal(pgp_feed(&d, NULL, 1, &c), PB_EINVAL);
    assert_int_equal(c, 0);
    assert_int_equal(pgp_feed(&d, NULL, 0, &c), PGP_MORE);
    assert_null(pgp_take_result(&d));
    pgp_dec_reset(&d);
}

static void test_make_error(void **state)
{
    (void)state;
    pb_result *r = pgp_make_error("0A000", "COPY not supported here");
    assert_non_null(r);
    assert_int_equal(pb_result_status(r), PB_RES_ERROR);
    assert_string_equal(pb_error_field(r, 'C'), "0A000");
    assert_string_equal(pb_error_field(r, 'S'), "ERROR");
    assert_string_equal(pb_error_field(r, 'V'), "ERROR");
    assert_string_equal(pb_error_message(r), "COPY not supported here");
    assert_null(pb_error_field(r, 'D'));
    assert_int_equal(pb_ntuples(r), 0);
    assert_string_equal(pb_cmd_status(r), "");
    pb_result_free(r);
    r = pgp_make_error(NULL, NULL);
    assert_null(pb_error_field(r, 'C'));
    assert_string_equal(pb_error_message(r), "");
    pb_result_free(r);
}

/* A big result: 200k rows of 4 columns, fed in 64 KiB pieces as a reply ring
 * would hand them out, and then in one piece. */
static void test_dec_big(void **state)
{
    (void)state;
    enum { ROWS = 200000 };
    pb_buf in = {0};
    static const char *const names4[4] = {"a", "b", "c", "d"};
    static const unsigned types4[4] = {23, 25, 25, 17};
    bk_rowdesc(&in, 4, names4, types4);
    char a[16], c[80];
    memset(c, 'x', sizeof c);
    for (int i = 0; i < ROWS; i++) {
        snprintf(a, sizeof a, "%d", i);
        const char *v[4] = {a, "some text value", i % 10 ? c : NULL, ""};
        int lens[4] = {(int)strlen(a), 15, 1 + i % 79, 0};
        bk_datarow(&in, 4, v, lens);
    }
    bk_cc(&in, "SELECT 200000");
    bk_rfq(&in, 'I');

    pgp_dec d;
    pgp_dec_init(&d);
    for (int pass = 0; pass < 2; pass++) {
        size_t piece = 65536 - 13;
        pb_result *r = pass == 0 ? feed_pieces(&d, &in, &piece, 1, NULL) : feed_all(&d, &in);
        assert_int_equal(pb_ntuples(r), ROWS);
        assert_int_equal(pb_cmd_tuples(r), ROWS);
        for (int i = 0; i < ROWS; i += 997) {
            snprintf(a, sizeof a, "%d", i);
            assert_string_equal(pb_getvalue(r, i, 0), a);
            assert_string_equal(pb_getvalue(r, i, 1), "some text value");
            if (i % 10) {
                assert_int_equal(pb_getlength(r, i, 2), 1 + i % 79);
                assert_int_equal(pb_getisnull(r, i, 2), 0);
            } else {
                assert_int_equal(pb_getisnull(r, i, 2), 1);
            }
            assert_int_equal(pb_getlength(r, i, 3), 0);
            assert_int_equal(pb_getisnull(r, i, 3), 0);
        }
        assert_string_equal(pb_getvalue(r, ROWS - 1, 0), "199999");
        pb_result_free(r);
    }
    pgp_dec_reset(&d);
    pb_buf_free(&in);
}

/* One DataRow bigger than the piece size, split over many feeds. */
static void test_dec_big_value(void **state)
{
    (void)state;
    size_t n = 3u << 20;
    char *v = malloc(n);
    assert_non_null(v);
    for (size_t i = 0; i < n; i++)
        v[i] = (char)('a' + i % 26);
    pb_buf in = {0};
    bk_rowdesc(&in, 1, names3, types3);
    const char *vals[1] = {v};
    int lens[1] = {(int)n};
    bk_datarow(&in, 1, vals, lens);
    bk_cc(&in, "SELECT 1");
    bk_rfq(&in, 'I');
    pgp_dec d;
    pgp_dec_init(&d);
    size_t piece = 4096;
    pb_result *r = feed_pieces(&d, &in, &piece, 1, NULL);
    assert_int_equal(pb_getlength(r, 0, 0), (int)n);
    assert_memory_equal(pb_getvalue(r, 0, 0), v, n);
    assert_int_equal(pb_getvalue(r, 0, 0)[n], 0);
    assert_true(d.partial.cap <= (1u << 20));  /* a big assembly buffer is not kept */
    pb_result_free(r);
    pgp_dec_reset(&d);
    pb_buf_free(&in);
    free(v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_buf),
        cmocka_unit_test(test_enc_query),
        cmocka_unit_test(test_enc_parse),
        cmocka_unit_test(test_enc_bind),
        cmocka_unit_test(test_enc_small),
        cmocka_unit_test(test_enc_too_big),
        cmocka_unit_test(test_dec_select_splits),
        cmocka_unit_test(test_dec_multi_statement),
        cmocka_unit_test(test_dec_error_fields),
        cmocka_unit_test(test_dec_notice_notify),
        cmocka_unit_test(test_dec_back_to_back),
        cmocka_unit_test(test_dec_extended),
        cmocka_unit_test(test_dec_copy),
        cmocka_unit_test(test_dec_malformed),
        cmocka_unit_test(test_cmd_tuples),
        cmocka_unit_test(test_null_and_range),
        cmocka_unit_test(test_make_error),
        cmocka_unit_test(test_dec_big),
        cmocka_unit_test(test_dec_big_value),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
