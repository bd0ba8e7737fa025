/*
 * compat.c — what a program ported from libpq reaches for besides queries:
 * PQescapeLiteral / PQescapeIdentifier, PQtransactionStatus and
 * PQresultVerboseErrorMessage, under pb_ names and with libpq's behaviour.
 *
 * Escaping depends on the connection's encoding and on
 * standard_conforming_strings in libpq.  The broker's connections are UTF-8
 * with standard_conforming_strings on (the server default since 9.1), so
 * these functions need no lease: they escape for exactly that, and refuse
 * (PB_EINVAL) a string that is not valid UTF-8 — as libpq does since its
 * CVE-2025-1094 fix — instead of passing bytes a server could misread.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Length of the valid UTF-8 character at s (at most avail bytes), or 0 when
 * the bytes there are not one: a stray continuation byte, an overlong form,
 * a surrogate, a code point past U+10FFFF, a NUL inside, or a character cut
 * off by the end (PostgreSQL's pg_utf8_islegal rules). */
static size_t utf8_char(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0];
    size_t n;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        n = 3;
    else if (c >= 0xF0 && c <= 0xF4)
        n = 4;
    else
        return 0;
    if (avail < n)
        return 0;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] > 0x9F) || (c == 0xF0 && s[1] < 0x90) ||
        (c == 0xF4 && s[1] > 0x8F))
        return 0;
    return n;
}

/* libpq's PQescapeInternal: the text up to length bytes or the first NUL,
 * in quote_char quotes with quote_char doubled; a literal with backslashes
 * also doubles them and gets libpq's " E" prefix. */
static char *escape(const char *str, size_t length, int as_ident, int *err)
{
    int dummy;
    if (!err)
        err = &dummy;
    *err = PB_OK;
    if (!str) {
        *err = PB_EINVAL;
        return NULL;
    }
    const char quote = as_ident ? '"' : '\'';
    size_t quotes = 0, backslashes = 0, n = 0;
    while (n < length && str[n] != '\0') {
        size_t cl = utf8_char((const unsigned char *)str + n, length - n);
        if (cl == 0) {
            *err = PB_EINVAL;       /* invalid or incomplete UTF-8 */
            return NULL;
        }
        if (cl == 1 && str[n] == quote)
            quotes++;
        else if (cl == 1 && str[n] == '\\')
            backslashes++;
        n += cl;
    }
    int e_prefix = !as_ident && backslashes > 0;
    size_t out_len = n + quotes + (as_ident ? 0 : backslashes) + 2 + (e_prefix ? 2 : 0);
    char *out = malloc(out_len + 1);
    if (!out) {
        *err = PB_ENOMEM;
        return NULL;
    }
    char *w = out;
    if (e_prefix) {
        *w++ = ' ';
        *w++ = 'E';
    }
    *w++ = quote;
    for (size_t i = 0; i < n; i++) {
        char ch = str[i];
        if (ch == quote || (!as_ident && ch == '\\'))
            *w++ = ch;
        *w++ = ch;
    }
    *w++ = quote;
    *w = '\0';
    return out;
}

PB_API char *pb_escape_literal(const char *str, size_t length, int *err)
{
    return escape(str, length, 0, err);
}

PB_API char *pb_escape_identifier(const char *str, size_t length, int *err)
{
    return escape(str, length, 1, err);
}

PB_API int pb_transaction_status(const pb_lease *l)
{
    if (!l || l->type != PB_POOL_POSTGRES || pbi_lease_check((pb_lease *)l) != PB_OK)
        return PB_TRANS_UNKNOWN;
    /* A command, a pipeline or a COPY under way: libpq's PQTRANS_ACTIVE. */
    if (l->pending || l->pqueued || l->copy)
        return PB_TRANS_ACTIVE;
    /* The broker stores the ReadyForQuery status before it publishes the
     * message, so once we have read it this is at least as new. */
    switch (atomic_load_explicit(&l->s->txn_status, memory_order_acquire)) {
    case 'I': return PB_TRANS_IDLE;
    case 'T': return PB_TRANS_INTRANS;
    case 'E': return PB_TRANS_INERROR;
    }
    return PB_TRANS_UNKNOWN;
}

/* A growable string; a failed allocation sets oom and later appends do
 * nothing. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_add(sbuf *b, const char *s)
{
    size_t n = strlen(s);
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 128;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n + 1);
    b->len += n;
}

/* sb_add(label), sb_add(value), sb_add(tail) when value is there. */
static void sb_field(sbuf *b, const char *label, const char *value, const char *tail)
{
    if (!value)
        return;
    sb_add(b, label);
    sb_add(b, value);
    sb_add(b, tail);
}

PB_API char *pb_result_verbose_error_message(const pb_result *r, int verbosity, int show_context)
{
    sbuf b = { 0 };
    const char *sev = r ? pb_error_field(r, 'S') : NULL;
    if (!r || (pb_result_status(r) != PB_RES_ERROR && !sev)) {
        sb_add(&b, "PGresult is not an error result\n");
        return b.oom ? (free(b.p), NULL) : b.p;
    }
    const char *state = pb_error_field(r, 'C');
    sb_field(&b, "", sev, ":  ");
    if (verbosity == PB_ERRORS_SQLSTATE && state) {
        sb_add(&b, state);
        sb_add(&b, "\n");
        return b.oom ? (free(b.p), NULL) : b.p;
    }
    if (verbosity == PB_ERRORS_SQLSTATE)
        verbosity = PB_ERRORS_TERSE;
    if (verbosity == PB_ERRORS_VERBOSE)
        sb_field(&b, "", state, ": ");
    sb_field(&b, "", pb_error_field(r, 'M'), "");
    /* libpq draws the statement with a caret when it has the query text;
     * a pb_result does not keep it, so the position is given as a number,
     * as libpq does without the text. */
    const char *pos = pb_error_field(r, 'P');
    if (!pos)
        pos = pb_error_field(r, 'p');
    sb_field(&b, " at character ", pos, "");
    sb_add(&b, "\n");
    if (verbosity != PB_ERRORS_TERSE) {
        sb_field(&b, "DETAIL:  ", pb_error_field(r, 'D'), "\n");
        sb_field(&b, "HINT:  ", pb_error_field(r, 'H'), "\n");
        sb_field(&b, "QUERY:  ", pb_error_field(r, 'q'), "\n");
        if (show_context == PB_SHOW_CONTEXT_ALWAYS ||
            (show_context == PB_SHOW_CONTEXT_ERRORS && pb_result_status(r) == PB_RES_ERROR))
            sb_field(&b, "CONTEXT:  ", pb_error_field(r, 'W'), "\n");
    }
    if (verbosity == PB_ERRORS_VERBOSE) {
        sb_field(&b, "SCHEMA NAME:  ", pb_error_field(r, 's'), "\n");
        sb_field(&b, "TABLE NAME:  ", pb_error_field(r, 't'), "\n");
        sb_field(&b, "COLUMN NAME:  ", pb_error_field(r, 'c'), "\n");
        sb_field(&b, "DATATYPE NAME:  ", pb_error_field(r, 'd'), "\n");
        sb_field(&b, "CONSTRAINT NAME:  ", pb_error_field(r, 'n'), "\n");
        const char *fn = pb_error_field(r, 'R'), *file = pb_error_field(r, 'F'), *line = pb_error_field(r, 'L');
        if (fn || file || line) {
            sb_add(&b, "LOCATION:  ");
            sb_field(&b, "", fn, ", ");
            if (file && line) {
                sb_add(&b, file);
                sb_add(&b, ":");
                sb_add(&b, line);
            }
            sb_add(&b, "\n");
        }
    }
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
