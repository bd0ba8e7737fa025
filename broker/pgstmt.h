/*
 * pgstmt.h — the PostgreSQL driver's record of the library-named prepared
 * statements (pb_<hash>, pb_shm.h) each backend has, and the queue that
 * matches the server's ParseComplete messages to the Parses they answer.
 * pg.c owns one per connection; pgstmt.c is the only one that looks inside.
 */
#ifndef PB_PGSTMT_H
#define PB_PGSTMT_H

#include <stdint.h>

#include "driver.h"

#define PG_STMT_MAX    128          /* library-named statements remembered per connection
                                       (PgBouncer's max_prepared_statements default is 200);
                                       the least recently used one is closed to make room */
#define PG_DROPS_MAX   8            /* dropped Parses remembered per group, for the error rule */

struct pgstmt;

/* A big-endian 32-bit field of a protocol message (lengths, OIDs). */
static inline uint32_t pg_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* Per connection; all zero is an empty record (a new connection). */
typedef struct pgstmts {
    /* The parse queue, stmtq[q_head..q_len): PQ_* (pgstmt.c) or a
     * statement hash per Parse and Sync forwarded, kept only while tracked
     * Parses may be in flight; q_lead counts the ReadyForQuery of requests
     * not queued, which all come before the queue's first entry. */
    uint64_t *stmtq;
    uint32_t q_head, q_len, q_cap;
    uint32_t q_lead;
    /* Statements whose Parse was dropped in the group being answered: an
     * error in the group makes them unknown again (the record may have
     * been wrong: a DEALLOCATE no tag reported), so the next execution
     * sends Parse.  More than PG_DROPS_MAX: all of them. */
    uint64_t drops[PG_DROPS_MAX];
    uint32_t ndrops;
    struct pgstmt *stmts;    /* the record: PG_STMT_MAX entries, NULL until first needed */
    uint64_t stmt_clock;     /* bumped per use */
    uint32_t req_stamp;      /* bumped per request rewritten */
} pgstmts;

/* The hash a library statement name names ("pb_" + 16 lowercase hex
 * digits, NUL-terminated, within room bytes), else 0. */
uint64_t pgstmt_lib_name(const uint8_t *name, uint32_t room);

/* The hash a Parse message's body b[0..n) (name, query, types) names, if it
 * is a library statement whose name is the hash of that text and those
 * types (what pgstmt tracks); else 0. */
uint64_t pgstmt_parse_tracked(const uint8_t *b, uint32_t n);

/* A valid request (framing checked) with nparse Parse and nsync Sync or
 * Query messages, ntracked of the Parses library-named, nclose of its
 * Close messages for a library name; idle: no reply owed for an earlier
 * request can have deallocated a statement (none is owed, or only shared
 * statements are: pg_frame_request).  Drops each library-named Parse
 * whose name matches its text and that the backend has (in place), puts a
 * Close of the same name before one it may have (the request is then a
 * new buffer), and queues what the replies will answer.  PB_OK, or PB_ENOMEM (nothing to send;
 * the record is forgotten). */
int pgstmt_frame(pgstmts *s, drv_buf *rq, uint32_t nparse, uint32_t ntracked, uint32_t nclose, uint32_t nsync,
                 int parse_open, int idle);
/* n ReadyForQuery of the broker's own queries to come; PB_OK or PB_ENOMEM. */
int pgstmt_own_queries(pgstmts *s, uint32_t n);

/* From the reply stream, in order: a ParseComplete; a ReadyForQuery
 * (errors: ErrorResponses in its group); a tag that deallocates (DEALLOCATE,
 * DEALLOCATE ALL, DISCARD ALL): every statement unknown. */
void pgstmt_parse_complete(pgstmts *s);
void pgstmt_ready(pgstmts *s, uint32_t errors);
void pgstmt_forget_all(pgstmts *s);

/* Free the record and queue (the struct itself is the caller's). */
void pgstmt_free(pgstmts *s);

#endif /* PB_PGSTMT_H */
