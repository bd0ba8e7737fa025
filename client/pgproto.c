/*
 * pgproto.c — the PostgreSQL v3 wire protocol of the client library: frontend
 * message encoders, the backend message decoder, and pb_result with all of
 * its public accessors.
 *
 * The decoder is fed the reply stream in whatever pieces the slot's reply
 * ring hands out.  Messages that arrive whole are parsed straight from the
 * caller's bytes (the common case: one chunk holds many DataRows), and only a
 * message split across feeds is assembled in d->partial first.  Every length
 * and count is checked against the bytes present before it is used.
 *
 * A result's rows live in one growing arena: each value is stored once,
 * followed by a NUL so text values are C strings.  Per row we keep the
 * arena offset of its first byte (rows[], with rows[ntuples] the arena's end,
 * so a row ends where the next begins), and per value a 32-bit offset within
 * its row with the top bit marking SQL NULL.  A value's length is the distance
 * to the next value (or the row's end) minus its NUL, so a value costs four
 * bytes of index and no allocation of its own.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "pgproto.h"

#define VAL_NULL   0x80000000u      /* voff flag: the value is SQL NULL */
#define VAL_OFF    0x7fffffffu      /* voff mask: offset within the row */
#define PARTIAL_KEEP (1u << 20)     /* keep at most this much of d->partial between messages */

typedef struct pgp_field {
    const char *name;               /* in the same allocation as the field array */
    unsigned table_oid;             /* 0 when not a table column */
    int attnum;                     /* column number in that table, else 0 */
    unsigned type_oid;
    int typlen;                     /* pg_type.typlen: negative for variable width */
    int typmod;
    int format;                     /* 0 text, 1 binary */
} pgp_field;

struct pb_result {
    int status;                     /* PB_RES_* */
    int has_desc;                   /* a RowDescription was seen */
    int nfields;                    /* its column count; 0 without one */
    int ntuples;                    /* rows stored */
    pgp_field *fields;              /* nfields entries followed by their names; one malloc */
    size_t *rows;                   /* ntuples + 1 arena offsets; rows[ntuples] == data_len */
    size_t rows_cap;                /* entries allocated in rows */
    uint32_t *voff;                 /* ntuples * nfields: offset within the row | VAL_NULL */
    size_t voff_cap;                /* entries allocated in voff */
    char *data;                     /* value arena */
    size_t data_len, data_cap;
    char *cmd;                      /* command tag; NULL reads as "" */
    char *err;                      /* error/notice fields as on the wire: code, string,
                                       NUL, ..., then a 0 byte; NULL: none */
};

/* ================================================================ pb_buf */

int pb_buf_reserve(pb_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return PB_OK;
    if (extra > SIZE_MAX - b->len)
        return PB_ENOMEM;
    size_t need = b->len + extra;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return PB_ENOMEM;
    b->data = p;
    b->cap = cap;
    return PB_OK;
}

int pb_buf_append(pb_buf *b, const void *p, size_t n)
{
    if (n == 0)
        return PB_OK;
    if (pb_buf_reserve(b, n))
        return PB_ENOMEM;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return PB_OK;
}

void pb_buf_free(pb_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* ============================================================== encoding */

/* Writers used after msg_begin reserved the whole message: they cannot fail. */
static void put_u8(pb_buf *b, unsigned v)
{
    b->data[b->len++] = (char)(unsigned char)v;
}

static void put_u16(pb_buf *b, unsigned v)
{
    put_u8(b, (v >> 8) & 0xff);
    put_u8(b, v & 0xff);
}

static void put_u32(pb_buf *b, uint32_t v)
{
    put_u16(b, (unsigned)(v >> 16));
    put_u16(b, (unsigned)(v & 0xffff));
}

static void put_bytes(pb_buf *b, const void *p, size_t n)
{
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_str(pb_buf *b, const char *s, size_t n)    /* n == strlen(s) */
{
    put_bytes(b, s, n);
    put_u8(b, 0);
}

/* body += n, saturating past the message limit so later checks fail cleanly. */
static void add_len(size_t *body, size_t n)
{
    *body = n > PGP_MAX_MESSAGE || *body + n > PGP_MAX_MESSAGE ? (size_t)PGP_MAX_MESSAGE + 1
                                                               : *body + n;
}

/* Check the size, reserve the whole message and write its header, so the
 * encoders below never leave half a message behind. */
static int msg_begin(pb_buf *b, char type, size_t body)
{
    if (body > PGP_MAX_MESSAGE - 4)
        return PB_EINVAL;
    if (pb_buf_reserve(b, 5 + body))
        return PB_ENOMEM;
    put_u8(b, (unsigned char)type);
    put_u32(b, (uint32_t)(body + 4));
    return PB_OK;
}

/* A message whose body is zero or more C strings (NULL reads as ""). */
static int msg_strings(pb_buf *b, char type, const char *s1, const char *s2)
{
    if (!b)
        return PB_EINVAL;
    size_t n1 = s1 ? strlen(s1) : 0, n2 = s2 ? strlen(s2) : 0, body = 0;
    add_len(&body, n1 + 1);
    if (s2)
        add_len(&body, n2 + 1);
    int rc = msg_begin(b, type, body);
    if (rc)
        return rc;
    put_str(b, s1 ? s1 : "", n1);
    if (s2)
        put_str(b, s2, n2);
    return PB_OK;
}

int pgp_query(pb_buf *b, const char *sql)
{
    if (!sql)
        return PB_EINVAL;
    return msg_strings(b, 'Q', sql, NULL);
}

int pgp_parse(pb_buf *b, const char *stmt, const char *sql,
              int nparams, const unsigned int *param_types)
{
    if (!b || !sql || nparams < 0 || nparams > 65535)
        return PB_EINVAL;
    int ntypes = param_types ? nparams : 0;
    size_t ns = stmt ? strlen(stmt) : 0, nq = strlen(sql), body = 0;
    add_len(&body, ns + 1);
    add_len(&body, nq + 1);
    add_len(&body, 2 + 4 * (size_t)ntypes);
    int rc = msg_begin(b, 'P', body);
    if (rc)
        return rc;
    put_str(b, stmt ? stmt : "", ns);
    put_str(b, sql, nq);
    put_u16(b, (unsigned)ntypes);
    for (int i = 0; i < ntypes; i++)
        put_u32(b, param_types[i]);
    return PB_OK;
}

int pgp_bind(pb_buf *b, const char *portal, const char *stmt, int nparams,
             const char *const *values, const int *lengths, const int *formats,
             int result_format)
{
    if (!b || nparams < 0 || nparams > 65535 || (nparams > 0 && !values) ||
        (result_format != 0 && result_format != 1))
        return PB_EINVAL;
    size_t np = portal ? strlen(portal) : 0, ns = stmt ? strlen(stmt) : 0, body = 0;
    add_len(&body, np + 1);
    add_len(&body, ns + 1);
    add_len(&body, 2 + (formats ? 2 * (size_t)nparams : 0));   /* parameter formats */
    add_len(&body, 2);                                          /* parameter count */
    for (int i = 0; i < nparams; i++) {
        int fmt = formats ? formats[i] : 0;
        if (fmt != 0 && fmt != 1)
            return PB_EINVAL;
        add_len(&body, 4);
        if (!values[i])
            continue;
        if (fmt == 1) {
            if (!lengths || lengths[i] < 0)
                return PB_EINVAL;
            add_len(&body, (size_t)lengths[i]);
        } else {
            add_len(&body, strlen(values[i]));
        }
    }
    add_len(&body, 4);                                          /* one result format */
    int rc = msg_begin(b, 'B', body);
    if (rc)
        return rc;
    put_str(b, portal ? portal : "", np);
    put_str(b, stmt ? stmt : "", ns);
    if (formats) {
        put_u16(b, (unsigned)nparams);
        for (int i = 0; i < nparams; i++)
            put_u16(b, (unsigned)formats[i]);
    } else {
        put_u16(b, 0);
    }
    put_u16(b, (unsigned)nparams);
    for (int i = 0; i < nparams; i++) {
        if (!values[i]) {
            put_u32(b, 0xffffffffu);
            continue;
        }
        size_t n = formats && formats[i] == 1 ? (size_t)lengths[i] : strlen(values[i]);
        put_u32(b, (uint32_t)n);
        put_bytes(b, values[i], n);
    }
    put_u16(b, 1);
    put_u16(b, (unsigned)result_format);
    return PB_OK;
}

/* Describe and Close: a kind byte ('S' statement, 'P' portal) and a name. */
static int msg_kind_name(pb_buf *b, char type, char kind, const char *name)
{
    if (!b || (kind != 'S' && kind != 'P'))
        return PB_EINVAL;
    size_t n = name ? strlen(name) : 0, body = 1;
    add_len(&body, n + 1);
    int rc = msg_begin(b, type, body);
    if (rc)
        return rc;
    put_u8(b, (unsigned char)kind);
    put_str(b, name ? name : "", n);
    return PB_OK;
}

int pgp_describe(pb_buf *b, char kind, const char *name)
{
    return msg_kind_name(b, 'D', kind, name);
}

int pgp_close(pb_buf *b, char kind, const char *name)
{
    return msg_kind_name(b, 'C', kind, name);
}

int pgp_execute(pb_buf *b, const char *portal, int max_rows)
{
    if (!b || max_rows < 0)
        return PB_EINVAL;
    size_t n = portal ? strlen(portal) : 0, body = 0;
    add_len(&body, n + 1);
    add_len(&body, 4);
    int rc = msg_begin(b, 'E', body);
    if (rc)
        return rc;
    put_str(b, portal ? portal : "", n);
    put_u32(b, (uint32_t)max_rows);
    return PB_OK;
}

static int msg_empty(pb_buf *b, char type)
{
    if (!b)
        return PB_EINVAL;
    return msg_begin(b, type, 0);
}

int pgp_sync(pb_buf *b)
{
    return msg_empty(b, 'S');
}

int pgp_flush(pb_buf *b)
{
    return msg_empty(b, 'H');
}

int pgp_copy_data(pb_buf *b, const void *data, size_t len)
{
    if (!b || (!data && len))
        return PB_EINVAL;
    int rc = msg_begin(b, 'd', len);
    if (rc)
        return rc;
    put_bytes(b, data, len);
    return PB_OK;
}

int pgp_copy_done(pb_buf *b)
{
    return msg_empty(b, 'c');
}

int pgp_copy_fail(pb_buf *b, const char *msg)
{
    return msg_strings(b, 'f', msg ? msg : "", NULL);
}

/* ================================================================ results */

static pb_result *result_new(int status)
{
    pb_result *r = calloc(1, sizeof *r);
    if (r)
        r->status = status;
    return r;
}

PB_API void pb_result_free(pb_result *r)
{
    if (!r)
        return;
    free(r->fields);
    free(r->rows);
    free(r->voff);
    free(r->data);
    free(r->cmd);
    free(r->err);
    free(r);
}

/* Grow *p (elements of size sz, *cap allocated) to hold at least need, doubling. */
static int grow(void **p, size_t *cap, size_t need, size_t sz)
{
    if (need <= *cap)
        return PB_OK;
    size_t c = *cap ? *cap : 16;
    while (c < need) {
        if (c > SIZE_MAX / 2 / sz)
            return PB_ENOMEM;
        c *= 2;
    }
    void *q = realloc(*p, c * sz);
    if (!q)
        return PB_ENOMEM;
    *p = q;
    *cap = c;
    return PB_OK;
}

pb_result *pgp_make_error(const char *sqlstate, const char *message)
{
    pb_result *r = result_new(PB_RES_ERROR);
    if (!r)
        return NULL;
    const char *f[4][2] = {
        {"S", "ERROR"}, {"V", "ERROR"}, {"C", sqlstate}, {"M", message ? message : ""},
    };
    size_t n = 1;
    for (int i = 0; i < 4; i++)
        if (f[i][1])
            n += 1 + strlen(f[i][1]) + 1;
    r->err = malloc(n);
    if (!r->err) {
        free(r);
        return NULL;
    }
    char *w = r->err;
    for (int i = 0; i < 4; i++) {
        if (!f[i][1])
            continue;
        size_t l = strlen(f[i][1]);
        *w++ = f[i][0][0];
        memcpy(w, f[i][1], l + 1);
        w += l + 1;
    }
    *w = 0;
    return r;
}

/* ------------------------------------------------------------- accessors */

PB_API int pb_result_status(const pb_result *r)
{
    return r ? r->status : PB_RES_ERROR;
}

PB_API int pb_ntuples(const pb_result *r)
{
    return r ? r->ntuples : 0;
}

PB_API int pb_nfields(const pb_result *r)
{
    return r ? r->nfields : 0;
}

static const pgp_field *field_at(const pb_result *r, int col)
{
    if (!r || col < 0 || col >= r->nfields)
        return NULL;
    return &r->fields[col];
}

PB_API const char *pb_fname(const pb_result *r, int col)
{
    const pgp_field *f = field_at(r, col);
    return f ? f->name : NULL;
}

PB_API unsigned pb_ftype(const pb_result *r, int col)
{
    const pgp_field *f = field_at(r, col);
    return f ? f->type_oid : 0;
}

PB_API int pb_fformat(const pb_result *r, int col)
{
    const pgp_field *f = field_at(r, col);
    return f ? f->format : -1;
}

static int cell_ok(const pb_result *r, int row, int col)
{
    return r && row >= 0 && row < r->ntuples && col >= 0 && col < r->nfields;
}

PB_API const char *pb_getvalue(const pb_result *r, int row, int col)
{
    if (!cell_ok(r, row, col))
        return NULL;
    uint32_t o = r->voff[(size_t)row * (size_t)r->nfields + (size_t)col];
    if (o & VAL_NULL)
        return "";
    return r->data + r->rows[row] + o;
}

PB_API int pb_getlength(const pb_result *r, int row, int col)
{
    if (!cell_ok(r, row, col))
        return 0;
    const uint32_t *v = &r->voff[(size_t)row * (size_t)r->nfields];
    if (v[col] & VAL_NULL)
        return 0;
    size_t end = col + 1 < r->nfields ? (v[col + 1] & VAL_OFF) : r->rows[row + 1] - r->rows[row];
    return (int)(end - v[col] - 1);
}

PB_API int pb_getisnull(const pb_result *r, int row, int col)
{
    if (!cell_ok(r, row, col))
        return 1;
    return (r->voff[(size_t)row * (size_t)r->nfields + (size_t)col] & VAL_NULL) != 0;
}

PB_API const char *pb_cmd_status(const pb_result *r)
{
    return r && r->cmd ? r->cmd : "";
}

/* The count at s (digits up to the end or a space); -1 if there is none. */
static long long tag_count(const char *s)
{
    if (*s < '0' || *s > '9')
        return -1;
    long long n = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        if (n > (LLONG_MAX - (*s - '0')) / 10)
            return -1;
        n = n * 10 + (*s - '0');
    }
    return *s == 0 ? n : -1;
}

PB_API long long pb_cmd_tuples(const pb_result *r)
{
    if (!r || !r->cmd)
        return -1;
    static const char *const counted[] = {
        "UPDATE ", "DELETE ", "SELECT ", "MOVE ", "FETCH ", "COPY ", "MERGE ",
    };
    const char *t = r->cmd;
    if (strncmp(t, "INSERT ", 7) == 0) {
        const char *sp = strchr(t + 7, ' ');            /* "INSERT oid rows" */
        return sp ? tag_count(sp + 1) : -1;
    }
    for (size_t i = 0; i < sizeof counted / sizeof counted[0]; i++) {
        size_t n = strlen(counted[i]);
        if (strncmp(t, counted[i], n) == 0)
            return tag_count(t + n);
    }
    return -1;
}

PB_API const char *pb_error_field(const pb_result *r, int code)
{
    if (!r || !r->err || code <= 0 || code > 255)
        return NULL;
    for (const char *p = r->err; *p; ) {
        const char *v = p + 1;
        if ((unsigned char)*p == (unsigned)code)
            return v;
        p = v + strlen(v) + 1;
    }
    return NULL;
}

PB_API const char *pb_error_message(const pb_result *r)
{
    const char *m = pb_error_field(r, 'M');
    return m ? m : "";
}

/* ============================================================== decoding */

static uint32_t rd32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static unsigned rd16(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (unsigned)u[0] << 8 | u[1];
}

void pgp_dec_init(pgp_dec *d)
{
    memset(d, 0, sizeof *d);
    d->txn_status = 'I';
}

void pgp_dec_reset(pgp_dec *d)
{
    pgp_notice_fn notice = d->notice;
    pgp_notify_fn notify = d->notify;
    void *notice_arg = d->notice_arg, *notify_arg = d->notify_arg;
    pb_buf_free(&d->partial);
    pb_result_free(d->cur);
    pb_result_free(d->last);
    free(d->row);
    pgp_dec_init(d);
    d->notice = notice;
    d->notice_arg = notice_arg;
    d->notify = notify;
    d->notify_arg = notify_arg;
}

pb_result *pgp_take_result(pgp_dec *d)
{
    pb_result *r = d->last;
    d->last = NULL;
    d->done = 0;
    return r;
}

/* One statement's result is finished.  The last one wins, except that an
 * error is never replaced: it is what stopped the command. */
static void finish(pgp_dec *d, pb_result *r)
{
    if (d->last && d->last->status == PB_RES_ERROR) {
        pb_result_free(r);
        return;
    }
    pb_result_free(d->last);
    d->last = r;
}

/* Check error/notice fields: code byte, NUL-terminated string, ..., 0 byte,
 * and nothing after it. */
static int check_fields(const char *b, size_t n)
{
    size_t p = 0;
    for (;;) {
        if (p >= n)
            return PB_EPROTO;                   /* no terminator */
        if (b[p] == 0)
            return p + 1 == n ? PB_OK : PB_EPROTO;
        p++;
        const char *z = memchr(b + p, 0, n - p);
        if (!z)
            return PB_EPROTO;
        p = (size_t)(z - b) + 1;
    }
}

/* 'T' RowDescription. */
static int on_row_description(pgp_dec *d, const char *b, size_t n)
{
    if (n < 2)
        return PB_EPROTO;
    unsigned u = rd16(b);
    if (u > 0x7fff)
        return PB_EPROTO;
    int nf = (int)u;
    size_t p = 2;
    for (int i = 0; i < nf; i++) {
        const char *z = memchr(b + p, 0, n - p);
        if (!z)
            return PB_EPROTO;
        p = (size_t)(z - b) + 1;
        if (n - p < 18)
            return PB_EPROTO;
        p += 18;
    }
    if (p != n)
        return PB_EPROTO;
    /* Field array, then the names (at most n bytes of them). */
    pgp_field *f = malloc((size_t)nf * sizeof *f + n);
    if (!f)
        return PB_ENOMEM;
    char *names = (char *)(f + nf);
    p = 2;
    for (int i = 0; i < nf; i++) {
        size_t l = strlen(b + p);
        memcpy(names, b + p, l + 1);
        f[i].name = names;
        names += l + 1;
        p += l + 1;
        f[i].table_oid = rd32(b + p);
        f[i].attnum = (int16_t)rd16(b + p + 4);
        f[i].type_oid = rd32(b + p + 6);
        f[i].typlen = (int16_t)rd16(b + p + 10);
        f[i].typmod = (int32_t)rd32(b + p + 12);
        f[i].format = (int16_t)rd16(b + p + 16);
        p += 18;
    }
    if (!d->cur) {
        d->cur = result_new(PB_RES_TUPLES_OK);
        if (!d->cur) {
            free(f);
            return PB_ENOMEM;
        }
    } else if (d->cur->ntuples > 0) {
        free(f);                                /* a new description mid-rows */
        return PB_EPROTO;
    }
    /* A second description before any row (Describe statement, then portal)
     * replaces the first. */
    free(d->cur->fields);
    d->cur->fields = f;
    d->cur->nfields = nf;
    d->cur->has_desc = 1;
    return PB_OK;
}

/* 'D' DataRow: values are copied once, into the arena, NUL-terminated. */
static int on_data_row(pgp_dec *d, const char *b, size_t n)
{
    pb_result *r = d->cur;
    if (!r || !r->has_desc || n < 2 || rd16(b) != (unsigned)r->nfields)
        return PB_EPROTO;
    if (r->ntuples == INT_MAX)
        return PB_ENOMEM;
    size_t nf = (size_t)r->nfields, row = (size_t)r->ntuples;
    if (nf && row + 1 > SIZE_MAX / nf)
        return PB_ENOMEM;
    /* Values take at most n bytes in the arena: each NUL replaces 4 bytes of
     * length on the wire. */
    if (grow((void **)&r->rows, &r->rows_cap, row + 2, sizeof *r->rows) ||
        grow((void **)&r->voff, &r->voff_cap, (row + 1) * nf, sizeof *r->voff))
        return PB_ENOMEM;
    if (r->data_cap - r->data_len < n) {
        pb_buf a = {r->data, r->data_len, r->data_cap};
        if (pb_buf_reserve(&a, n))
            return PB_ENOMEM;
        r->data = a.data;
        r->data_cap = a.cap;
    }
    if (row == 0)
        r->rows[0] = r->data_len;
    char *base = r->data + r->data_len;
    uint32_t *v = nf ? r->voff + row * nf : NULL;
    size_t p = 2, w = 0;
    for (size_t i = 0; i < nf; i++) {
        if (n - p < 4)
            return PB_EPROTO;
        uint32_t l = rd32(b + p);
        p += 4;
        if (l == 0xffffffffu) {
            v[i] = (uint32_t)w | VAL_NULL;
            continue;
        }
        if (l > n - p)
            return PB_EPROTO;                   /* also catches other negatives */
        memcpy(base + w, b + p, l);
        base[w + l] = 0;
        v[i] = (uint32_t)w;
        w += (size_t)l + 1;
        p += l;
    }
    if (p != n)
        return PB_EPROTO;
    r->data_len += w;
    r->ntuples++;
    r->rows[r->ntuples] = r->data_len;
    return PB_OK;
}

/* 'C' CommandComplete. */
static int on_command_complete(pgp_dec *d, const char *b, size_t n)
{
    const char *z = memchr(b, 0, n);
    if (!z)
        return PB_EPROTO;
    size_t l = (size_t)(z - b);
    pb_result *r = d->cur ? d->cur : result_new(PB_RES_COMMAND_OK);
    if (!r)
        return PB_ENOMEM;
    d->cur = r;
    free(r->cmd);
    r->cmd = malloc(l + 1);
    if (!r->cmd)
        return PB_ENOMEM;
    memcpy(r->cmd, b, l + 1);
    r->status = r->has_desc ? PB_RES_TUPLES_OK : PB_RES_COMMAND_OK;
    d->cur = NULL;
    finish(d, r);
    return PB_OK;
}

/* 'E' ErrorResponse: rows received so far for the statement are dropped. */
static int on_error(pgp_dec *d, const char *b, size_t n)
{
    if (check_fields(b, n))
        return PB_EPROTO;
    pb_result *r = result_new(PB_RES_ERROR);
    if (!r)
        return PB_ENOMEM;
    r->err = malloc(n);
    if (!r->err) {
        free(r);
        return PB_ENOMEM;
    }
    memcpy(r->err, b, n);
    pb_result_free(d->cur);
    d->cur = NULL;
    finish(d, r);
    return PB_OK;
}

/* 'N' NoticeResponse: shown to the callback, never kept. */
static int on_notice(pgp_dec *d, const char *b, size_t n)
{
    if (check_fields(b, n))
        return PB_EPROTO;
    if (d->notice) {
        pb_result tmp;
        memset(&tmp, 0, sizeof tmp);
        tmp.status = PB_RES_COMMAND_OK;
        tmp.err = (char *)b;                    /* read-only here; never freed */
        d->notice(d->notice_arg, &tmp);
    }
    return PB_OK;
}

/* 'A' NotificationResponse. */
static int on_notify(pgp_dec *d, const char *b, size_t n)
{
    if (n < 4)
        return PB_EPROTO;
    const char *chan = b + 4;
    const char *z = memchr(chan, 0, n - 4);
    if (!z)
        return PB_EPROTO;
    const char *payload = z + 1;
    if (!memchr(payload, 0, n - (size_t)(payload - b)))
        return PB_EPROTO;
    if (d->notify)
        d->notify(d->notify_arg, (int)rd32(b), chan, payload);
    return PB_OK;
}

/* 'G' / 'H': overall format, column count, one format per column. */
static int check_copy_response(const char *b, size_t n)
{
    return n >= 3 && n == 3 + 2 * (size_t)rd16(b + 1) ? PB_OK : PB_EPROTO;
}

/* 'Z' ReadyForQuery: the command is over; settle its result. */
static int on_ready(pgp_dec *d, const char *b, size_t n)
{
    if (n != 1 || (b[0] != 'I' && b[0] != 'T' && b[0] != 'E'))
        return PB_EPROTO;
    if (!d->last) {
        /* Nothing finished: a Describe without Execute, a suspended portal,
         * or an empty Sync.  An unfinished result carries what there is. */
        pb_result *r = d->cur;
        if (r)
            r->status = r->ntuples > 0 ? PB_RES_TUPLES_OK : PB_RES_COMMAND_OK;
        else if (!(r = result_new(PB_RES_COMMAND_OK)))
            return PB_ENOMEM;
        d->cur = NULL;
        d->last = r;
    }
    pb_result_free(d->cur);
    d->cur = NULL;
    d->txn_status = b[0];
    d->copy_in = 0;
    d->copy_out = 0;
    d->done = 1;
    return PGP_READY;
}

/* Whether type is a backend message we understand. */
static int known_type(unsigned char t)
{
    static const unsigned char known[256] = {
        ['T'] = 1, ['D'] = 1, ['C'] = 1, ['I'] = 1, ['E'] = 1, ['N'] = 1, ['A'] = 1,
        ['S'] = 1, ['K'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['n'] = 1, ['t'] = 1,
        ['s'] = 1, ['G'] = 1, ['H'] = 1, ['d'] = 1, ['c'] = 1, ['Z'] = 1,
    };
    return known[t];
}

/* Handle one whole message.  Returns PB_OK, PGP_READY, PGP_COPY_IN or an error. */
static int dispatch(pgp_dec *d, unsigned char type, const char *b, size_t n)
{
    if (d->done && type != 'A' && type != 'N' && type != 'S') {
        /* The previous command's result was not taken: the next command's
         * replies have begun, so it goes. */
        pb_result_free(d->last);
        d->last = NULL;
        d->done = 0;
    }
    switch (type) {
    case 'T': return on_row_description(d, b, n);
    case 'D': return on_data_row(d, b, n);
    case 'C': return on_command_complete(d, b, n);
    case 'I': {
        pb_result *r = result_new(PB_RES_EMPTY_QUERY);
        if (!r)
            return PB_ENOMEM;
        pb_result_free(d->cur);
        d->cur = NULL;
        finish(d, r);
        return PB_OK;
    }
    case 'E': return on_error(d, b, n);
    case 'N': return on_notice(d, b, n);
    case 'A': return on_notify(d, b, n);
    case 'G':
        if (check_copy_response(b, n))
            return PB_EPROTO;
        d->copy_in = 1;
        return PGP_COPY_IN;
    case 'H':
        if (check_copy_response(b, n))
            return PB_EPROTO;
        d->copy_out = 1;
        return PGP_COPY_OUT;
    case 'd':
        if (!d->copy_out)
            return PB_OK;           /* stray CopyData: nothing to give it to */
        free(d->row);
        d->row = malloc(n ? n : 1);
        if (!d->row)
            return PB_ENOMEM;
        memcpy(d->row, b, n);
        d->row_len = n;
        return PGP_COPY_ROW;
    case 'c':
        d->copy_out = 0;
        return PB_OK;
    case '1':
        d->parse_complete++;
        return PB_OK;
    case 'Z': return on_ready(d, b, n);
    case 'S': case 'K': case '2': case '3': case 'n': case 't': case 's':
        return PB_OK;
    default:
        return PB_EPROTO;
    }
}

/* A header's length field is plausible and its type known. */
static int check_header(const char *h)
{
    uint32_t l = rd32(h + 1);
    if (!known_type((unsigned char)h[0]) || l < 4 || l > PGP_MAX_MESSAGE)
        return PB_EPROTO;
    return PB_OK;
}

int pgp_feed(pgp_dec *d, const char *data, size_t len, size_t *consumed)
{
    size_t pos = 0, dummy;
    int rc = PB_OK;
    if (!consumed)
        consumed = &dummy;
    if (!d || (!data && len)) {
        *consumed = 0;
        return PB_EINVAL;
    }
    pb_buf *pb = &d->partial;
    while (pos < len) {
        if (pb->len == 0 && len - pos >= 5) {
            /* Header in hand: parse in place when the whole message is here. */
            const char *h = data + pos;
            if ((rc = check_header(h)) != PB_OK)
                break;
            size_t total = 1 + (size_t)rd32(h + 1);
            if (total <= len - pos) {
                rc = dispatch(d, (unsigned char)h[0], h + 5, total - 5);
                if (rc < 0)
                    break;
                pos += total;
                if (rc > 0)
                    break;
                continue;
            }
        }
        /* Assemble a split message: first its header, then its body. */
        if (pb->len < 5) {
            size_t take = 5 - pb->len < len - pos ? 5 - pb->len : len - pos;
            if (pb_buf_append(pb, data + pos, take)) {
                rc = PB_ENOMEM;
                break;
            }
            pos += take;
            if (!known_type((unsigned char)pb->data[0])) {
                rc = PB_EPROTO;
                break;
            }
            if (pb->len < 5)
                continue;
            if ((rc = check_header(pb->data)) != PB_OK)
                break;
        }
        size_t total = 1 + (size_t)rd32(pb->data + 1);
        size_t take = total - pb->len < len - pos ? total - pb->len : len - pos;
        if (pb_buf_append(pb, data + pos, take)) {
            rc = PB_ENOMEM;
            break;
        }
        pos += take;
        if (pb->len < total)
            continue;
        rc = dispatch(d, (unsigned char)pb->data[0], pb->data + 5, total - 5);
        pb->len = 0;
        if (pb->cap > PARTIAL_KEEP)
            pb_buf_free(pb);
        if (rc != PB_OK)
            break;
    }
    *consumed = pos;
    return rc;
}
