/*
 * pgshare.h — which PostgreSQL statements may share a backend connection
 * in transaction mode (txn.c's pipelining), learnt from what the server
 * reports about each one.
 *
 * Sharing puts a statement of one lease on the wire behind the statements
 * of others on the same backend before their replies are in, so it must be
 * known beforehand that the statements in front leave nothing behind: no
 * open transaction, no session state.  The broker does not parse SQL.  It
 * keys what it learns on the query text of a simple Query message, or of
 * the Parse of the library's Parse/Bind/Describe/Execute/Sync, for the
 * unnamed statement (pb_pg_exec_params) or a library-named one
 * (pb_pg_exec_prepared) (the same text is the same statements, parsed the
 * same way; parameters change values, not what kind of command runs), and
 * watches the server's answer to each execution, shared or not:
 *
 *   - exactly one CommandComplete, tagged SELECT, INSERT, UPDATE, DELETE
 *     or MERGE (one statement; a second statement or any other tag is
 *     another kind of command: BEGIN, SET, LISTEN, PREPARE, DECLARE, COPY,
 *     CREATE, CALL, DO, ...);
 *   - no ParameterStatus, no session state the driver tracks (driver.h
 *     SS_*), ReadyForQuery 'I' (nothing left open);
 *   - answered within PGSHARE_SLOW_MS of reaching the server (a slow
 *     statement would hold up the ones queued behind it; the bound is
 *     loose because on a busy machine a 1 ms statement takes 10 ms now
 *     and then, waiting for a CPU).
 *
 * A text is shared once PGSHARE_PROVEN executions in a row passed, each
 * alone on its connection outside a transaction (an execution that failed
 * with an error proves nothing; one inside a transaction is not judged).  One
 * that leaves state or a transaction behind, or has another tag, is never
 * shared again; a slow one starts counting again.  What the server does
 * not report is not seen here, as nowhere else (docs/pooling.md): a
 * function that sets an unreported setting, creates a temporary table or
 * takes a session advisory lock.
 *
 * pg.c calls these; the table is the process's, shared by every pool.
 */
#ifndef PB_PGSHARE_H
#define PB_PGSHARE_H

#include <stdint.h>

#define PGSHARE_TEXT_MAX 1024       /* longest query text learnt (bytes, NUL excluded) */
#define PGSHARE_SLOTS    4096       /* texts remembered (power of two); when full, new ones are not learnt */
#define PGSHARE_PROVEN   2          /* clean executions in a row before a text is shared */
#define PGSHARE_SLOW_MS  50         /* an execution slower than this (ms) starts the count again */
#define PGSHARE_QUICK_MS 1          /* a shared text whose last run took at most this (ms, on
                                       the loop's clock: under 2 ms) is quick (pgshare_ok) */
#define PGSHARE_RUNS     32         /* per connection: request runs awaiting their ReadyForQuery */

struct pgshare_ent;

/* Per connection, all zero when new: the requests sent, oldest first, as
 * runs of ReadyForQuery owed (ent: the learnt text of a single-Query
 * request, or NULL), and what the server said since the last
 * ReadyForQuery. */
typedef struct pgshare_conn {
    struct {
        struct pgshare_ent *ent;
        uint32_t n;          /* ReadyForQuery owed for this run */
        uint64_t sent_ms;    /* when it was framed */
        uint8_t alone;       /* nothing else was in flight then, outside a transaction:
                                only such a run may count towards PROVEN */
        uint8_t in_txn;      /* framed inside a transaction: not judged at all */
    } run[PGSHARE_RUNS];
    uint32_t head, len;
    uint64_t last_ready_ms;  /* the last ReadyForQuery: when the next request reached the server */
    uint32_t tags;           /* CommandComplete messages since the last ReadyForQuery */
    uint8_t other;           /* one of them was not SELECT/INSERT/UPDATE/DELETE/MERGE, or
                                a ParameterStatus or tracked session state came */
    uint8_t no_proof;        /* a COPY in or both began here: the count of ReadyForQuery
                                may be off from now on (the server skips a Sync or a
                                Query in COPY), so nothing on this connection proves */
} pgshare_conn;

/* 1 if req[0..len) is one whole simple Query, or one
 * Parse/Bind/Describe/Execute/Sync of the unnamed or a library-named
 * statement, as the worker wrote it, whose text has been proven
 * (shareable); 2 if, besides, its last run was quick (PGSHARE_QUICK_MS: it
 * may join a busy backend rather than take an idle one, txn.c); else 0. */
int pgshare_ok(const uint8_t *req, uint32_t len);

/* The entry of req's text, added (LEARNING) if new, when req is one
 * statement of a kind pgshare_ok knows; else NULL.  Entries stay where they
 * are for the process's life.  pg_frame_request takes it before the
 * statement rewrite (pgstmt.c may drop the Parse that holds the text). */
struct pgshare_ent *pgshare_learn(const uint8_t *req, uint32_t len);

/* A client request with nready ReadyForQuery to come, of text e
 * (pgshare_learn; ignored unless nready is 1), was framed at now_ms
 * (pg_frame_request), on a connection whose last status was txn ('I',
 * 'T', 'E'): remember it in order.
 *
 * What keeps a wrong ReadyForQuery from proving a text: only a run framed
 * alone (nothing else in flight, status 'I') counts towards PROVEN, so a
 * count that slipped (a Sync the server skipped after an error, a Query
 * swallowed by COPY) leaves a run in the queue for good and the
 * connection proves nothing more; a COPY in proves nothing either.  A
 * wrong ReadyForQuery can still ban a text, which only costs sharing. */
void pgshare_framed(pgshare_conn *s, struct pgshare_ent *e, uint32_t nready, char txn, uint64_t now_ms);

/* A CopyInResponse or CopyBothResponse arrived (pgshare_conn.no_proof). */
void pgshare_copy(pgshare_conn *s);

/* A CommandComplete tag of a client request (NUL-terminated, maybe cut). */
void pgshare_tag(pgshare_conn *s, const char *tag);

/* A ParameterStatus, or session state the driver noted, in a client reply. */
void pgshare_state(pgshare_conn *s);

/* A client request's ReadyForQuery (status st, errors since the last one)
 * at now_ms: judge the text it answers, if one is learnt. */
void pgshare_ready(pgshare_conn *s, char st, uint32_t errors, uint64_t now_ms);

#endif
