/*
 * pgproto.h — PostgreSQL v3 wire protocol for the client library: encoding
 * frontend messages into a byte buffer, and decoding backend messages (fed in
 * arbitrary pieces, as they come out of the slot's reply ring) into pb_result.
 *
 * Nothing here touches shared memory or the broker; it is pure and unit-tested
 * on its own (tests/test_pgproto.c).  The decoder never trusts its input: every
 * length and count is checked against the bytes actually present, and bad
 * input yields PB_EPROTO, never an over-read.
 */
#ifndef PB_PGPROTO_H
#define PB_PGPROTO_H

#include <stddef.h>
#include <stdint.h>

#include "poolbroker.h"

/* The largest message either side may send: the value of the length field
 * (which counts itself) may not exceed it.  It is the server's own limit. */
#define PGP_MAX_MESSAGE (1u << 30)

/* A growable byte buffer (private memory). */
typedef struct pb_buf {
    char *data;
    size_t len;
    size_t cap;
} pb_buf;

int  pb_buf_reserve(pb_buf *b, size_t extra);      /* PB_OK | PB_ENOMEM */
int  pb_buf_append(pb_buf *b, const void *p, size_t n);
void pb_buf_free(pb_buf *b);

/* ------------------------------------------------------------- encoding
 * Each appends one complete frontend message to b and returns PB_OK,
 * PB_ENOMEM, or PB_EINVAL (NULL sql, negative nparams, a length over 1 GB). */
int pgp_query(pb_buf *b, const char *sql);                                   /* 'Q' */
int pgp_parse(pb_buf *b, const char *stmt, const char *sql,
              int nparams, const unsigned int *param_types);                 /* 'P' */
int pgp_bind(pb_buf *b, const char *portal, const char *stmt, int nparams,
             const char *const *values, const int *lengths, const int *formats,
             int result_format);                                             /* 'B' */
int pgp_describe(pb_buf *b, char kind /* 'S' or 'P' */, const char *name);   /* 'D' */
int pgp_execute(pb_buf *b, const char *portal, int max_rows);                /* 'E' */
int pgp_close(pb_buf *b, char kind, const char *name);                       /* 'C' */
int pgp_sync(pb_buf *b);                                                     /* 'S' */
int pgp_flush(pb_buf *b);                                                    /* 'H' */
int pgp_copy_data(pb_buf *b, const void *data, size_t len);                  /* 'd' */
int pgp_copy_done(pb_buf *b);                                                /* 'c' */
int pgp_copy_fail(pb_buf *b, const char *msg);                               /* 'f' */

/* ------------------------------------------------------------- decoding */

/* Called for each NoticeResponse; n is valid only during the call. */
typedef void (*pgp_notice_fn)(void *arg, const pb_result *n);
/* Called for each NotificationResponse. */
typedef void (*pgp_notify_fn)(void *arg, int be_pid, const char *channel, const char *payload);

typedef struct pgp_dec {
    /* a message split across feeds is assembled here */
    pb_buf partial;
    /* the result under construction, and the one to hand out at ReadyForQuery */
    pb_result *cur;
    pb_result *last;
    int done;                       /* last is a finished command's (RFQ seen); a result
                                       not taken is dropped when the next command's
                                       replies begin */
    char txn_status;                /* from the last ReadyForQuery: 'I','T','E' */
    int copy_in;                    /* set by CopyInResponse until the next RFQ */
    int copy_out;                   /* set by CopyOutResponse until CopyDone */
    int parse_complete;             /* ParseComplete messages seen (caller may reset) */
    char *row;                      /* after PGP_COPY_ROW: the row, malloc'ed; caller takes it */
    size_t row_len;
    pgp_notice_fn notice;           /* may be NULL */
    void *notice_arg;
    pgp_notify_fn notify;           /* may be NULL */
    void *notify_arg;
} pgp_dec;

/* Results of pgp_feed. */
enum {
    PGP_MORE  = 0,                  /* all input consumed, no ReadyForQuery yet */
    PGP_READY = 1,                  /* ReadyForQuery reached: *consumed stops right after it */
    PGP_COPY_IN = 2,                /* CopyInResponse seen: *consumed stops right after it */
    PGP_COPY_OUT = 3,               /* CopyOutResponse seen: *consumed stops right after it */
    PGP_COPY_ROW = 4,               /* a CopyData row is in d->row / d->row_len */
};

void pgp_dec_init(pgp_dec *d);
/* Free everything the decoder holds (results not yet taken included). */
void pgp_dec_reset(pgp_dec *d);

/* Feed len bytes.  Consumes bytes up to and including the first
 * ReadyForQuery (returns PGP_READY) or CopyInResponse (PGP_COPY_IN), or all of
 * them (PGP_MORE).  *consumed is set in every case, errors included.  Errors:
 * PB_EPROTO (malformed message: bad length, truncated field, unknown type,
 * counts that do not match), PB_ENOMEM.  After an error the decoder must be
 * reset. */
int pgp_feed(pgp_dec *d, const char *data, size_t len, size_t *consumed);

/* After PGP_READY: the command's result and ownership of it.  With several
 * statements in one Query it is the last one's (or the error that stopped
 * them); never NULL after PGP_READY (an empty reply gives PB_RES_EMPTY_QUERY
 * only if the server said so, otherwise a PB_RES_COMMAND_OK with no tag).
 * When nothing finished but a result was begun (Describe without Execute, a
 * suspended portal), that result is returned with its fields (and rows) and
 * no tag.  A result not taken is freed when the next command's replies begin. */
pb_result *pgp_take_result(pgp_dec *d);

/* An error result not from the server (e.g. "COPY not supported here"),
 * with SQLSTATE and message set; NULL on ENOMEM. */
pb_result *pgp_make_error(const char *sqlstate, const char *message);

#endif /* PB_PGPROTO_H */
