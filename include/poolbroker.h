/*
 * poolbroker.h — the client library of poolbroker (libpoolbroker).
 *
 * A worker process attaches to a running broker, leases a connection slot
 * from a named pool, runs commands on it and releases it.  The broker owns
 * every backend connection; this library encodes requests and decodes replies
 * in the calling process, and talks to the broker only through shared memory
 * (and, to attach, a Unix socket).
 *
 * This header is the whole API: anything not declared here is not part of it.
 *
 * Conventions
 *   - Functions that can fail return PB_OK (0) or a negative PB_E* code;
 *     pb_strerror() names every code.  Nothing is printed, errno is not used
 *     as a side channel.
 *   - Handles are opaque.  Freeing or closing a NULL handle is a no-op.
 *   - A pb_client is not thread-safe: use one per thread (each is one
 *     attachment).  A pb_client inherited across fork() re-attaches in the
 *     child on first use; leases never cross a fork (PB_ESTALE in the child).
 *   - Results (pb_result, redisReply) belong to the caller and stay valid
 *     after the lease is released.
 */
#ifndef POOLBROKER_H
#define POOLBROKER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && defined(PB_BUILDING_LIBRARY)
#define PB_API __attribute__((visibility("default")))
#else
#define PB_API
#endif

#define PB_VERSION_MAJOR  0
#define PB_VERSION_MINOR  1
#define PB_VERSION_PATCH  0
#define PB_VERSION        "0.1.0"
#define PB_VERSION_NUMBER (PB_VERSION_MAJOR * 1000000 + PB_VERSION_MINOR * 1000 + PB_VERSION_PATCH)

/* Error codes.  PB_OK is 0; every error is negative. */
enum {
    PB_OK        =   0,
    PB_ETIMEDOUT =  -1,  /* no slot (or no reply) within the timeout */
    PB_ENOPOOL   =  -2,  /* no pool of that name */
    PB_EBROKER   =  -3,  /* broker not running, died, or refused the attach */
    PB_EBACKEND  =  -4,  /* backend unreachable, or the connection broke mid-command */
    PB_ETOOBIG   =  -5,  /* request larger than the pool's max_request_size (a request
                            larger than request_buffer streams through it in parts);
                            pb_lease_error names the size and the limit */
    PB_ESTALE    =  -6,  /* lease no longer valid (released, reclaimed, forked) */
    PB_EINVAL    =  -7,  /* bad argument */
    PB_ENOMEM    =  -8,  /* out of memory */
    PB_ESHUTDOWN =  -9,  /* broker is draining: no new leases */
    PB_EPROTO    = -10,  /* malformed request or reply; protocol violated */
    PB_ETYPE     = -11,  /* PostgreSQL call on a Redis lease or the reverse */
    PB_EVERSION  = -12,  /* library and broker disagree on the shared layout */
    PB_EPERM     = -13,  /* the broker refused this process (uid/gid, max_clients) */
    PB_EBUSY     = -14,  /* the lease is in a state that forbids the call (e.g. mid-COPY) */
    PB_ESERVER   = -15,  /* the server refused the statement: pb_pg_get_result returns why */
    PB_EINPROGRESS = -16, /* non-blocking call: not done yet; wait for pb_client_fd, call again */
};

typedef struct pb_client pb_client;
typedef struct pb_lease  pb_lease;
typedef struct pb_result pb_result;

/* The library's version string ("0.1.0") and number (PB_VERSION_NUMBER's
 * value); compare with the macros to detect a header/library mismatch. */
PB_API const char *pb_version(void);
PB_API int pb_version_number(void);

/* A static, human-readable description of an error code (never NULL). */
PB_API const char *pb_strerror(int err);

/* ------------------------------------------------------------------ attach */

/* Attach to the broker listening on socket_path (NULL: $POOLBROKER_SOCKET, or
 * else "/run/poolbroker/poolbroker.sock").  On success *out is a new client.
 * Errors: PB_EBROKER (no broker there), PB_EPERM (refused: uid/gid not
 * allowed, socket permissions, too many clients), PB_ESHUTDOWN (the broker
 * is draining), PB_EVERSION (other shared layout), PB_EPROTO (the broker's
 * answer describes an impossible segment), PB_EINVAL (out NULL, path too
 * long), PB_ENOMEM. */
PB_API int pb_connect(const char *socket_path, pb_client **out);

/* pb_connect, and on failure a sentence in errbuf (errlen bytes, always
 * NUL-terminated; "" on success) saying what failed and why, as libpq's
 * PQerrorMessage would: the uid and gid the broker refused, max_clients
 * reached, the socket's mode and owner against this process's ids, no
 * broker at the path, a layout mismatch.  errbuf may be NULL. */
PB_API int pb_connect_err(const char *socket_path, pb_client **out, char *errbuf, size_t errlen);

/* Detach and free the client.  Leases still held are released first. */
PB_API void pb_disconnect(pb_client *c);

/* ------------------------------------------------------------------ leases */

/* Lease a connection of pool <pool>.  timeout_ms < 0 uses the pool's
 * acquire_timeout_ms (its whole range, 0 to 4294967295 ms, which an int
 * argument cannot carry); 0 means "only if one is free now".  The fast path takes
 * no syscall; otherwise the caller is queued (first come, first served) while
 * the broker grows the pool.  Errors: PB_ENOPOOL, PB_ETIMEDOUT, PB_EBACKEND
 * (backend known down: fails at once), PB_ESHUTDOWN, PB_EBROKER. */
PB_API int pb_acquire(pb_client *c, const char *pool, int timeout_ms, pb_lease **out);

/* Return a lease and free the handle; never waits for the backend.  An open
 * or failed transaction is rolled back (and the pool's reset policy applied)
 * by the broker before anyone else gets the connection.  PB_ESTALE when the
 * lease was already taken back; PB_EBROKER when the library has seen the
 * broker die or restart since the lease began (the connection went with
 * it).  Either way the handle is freed all the same.  NULL is a no-op returning PB_EINVAL. */
PB_API int pb_release(pb_lease *l);

/* Backend process id of a lease's connection (for logs); -1 if stale.  In a
 * pool_mode = transaction pool, the backend that ran the lease's latest
 * statement (a lease is bound per transaction), which before its first
 * statement may be 0 or the backend of the slot's previous statement. */
PB_API int pb_lease_backend_pid(const pb_lease *l);

/* What the last PB_ETOOBIG on this lease was about, one line: "request of
 * N bytes is over the pool's max_request_size of M bytes" (or, when the
 * broker refused a request the library let through — a reload lowered the
 * limit meanwhile — "request refused by the broker: over the pool's
 * max_request_size of M bytes").  "" before any (and for NULL).  The text
 * belongs to the lease and lives until its release; it does not change on
 * later successful calls. */
PB_API const char *pb_lease_error(const pb_lease *l);

/* Say that this lease leaves session state the server does not report, so
 * the broker cannot see it: a session advisory lock (pg_advisory_lock),
 * set_config() of a setting the server does not report, sequence state
 * (currval), state left by a function.  From this
 * call on the lease is pinned to its connection, and its release goes
 * through the broker, which resets the whole session: DISCARD ALL on
 * PostgreSQL (whatever the pool's reset policy),
 * RESET and the set-up on Redis.  What the server does report (SET,
 * PREPARE, LISTEN, DECLARE CURSOR, CREATE TEMP TABLE, CREATE TEMP TABLE
 * ... AS, whose "SELECT n" comes without rows) needs no pin:
 * docs/pooling.md has the list.  Idempotent.  PB_OK; PB_EINVAL (NULL),
 * PB_ESTALE (released or taken back), PB_EBROKER. */
PB_API int pb_pin(pb_lease *l);

/* -------------------------------------------------------------- PostgreSQL */

/* Run sql (one or more statements, simple query protocol).  Returns PB_OK
 * whenever the server answered, SQL errors included (see pb_result_status);
 * *out then holds the result of the last statement, or the error.  A negative
 * code only when no answer came: PB_ESTALE, PB_ETYPE, PB_ETOOBIG, PB_EBACKEND,
 * PB_EBROKER, PB_ETIMEDOUT (command_timeout_ms), PB_EPROTO, PB_ENOMEM. */
PB_API int pb_pg_exec(pb_lease *l, const char *sql, pb_result **out);

/* Run one statement with parameters (extended protocol, unnamed statement).
 * param_types may be NULL (server infers); values[i] NULL is SQL NULL;
 * lengths is needed only for binary parameters (formats[i] == 1); formats NULL
 * means all text.  result_format 0 = text, 1 = binary.  Returns as pb_pg_exec. */
PB_API int pb_pg_exec_params(pb_lease *l, const char *sql, int nparams,
                             const unsigned int *param_types, const char *const *values,
                             const int *lengths, const int *formats, int result_format,
                             pb_result **out);

enum { PB_RES_COMMAND_OK, PB_RES_TUPLES_OK, PB_RES_EMPTY_QUERY, PB_RES_ERROR };

/* Result accessors, as libpq's PQ* of the same name.  Out-of-range row or
 * column give NULL / 0 / -1 rather than undefined behaviour. */
PB_API int         pb_result_status(const pb_result *r);
PB_API int         pb_ntuples(const pb_result *r);
PB_API int         pb_nfields(const pb_result *r);
PB_API const char *pb_fname(const pb_result *r, int col);
PB_API unsigned    pb_ftype(const pb_result *r, int col);
PB_API int         pb_fformat(const pb_result *r, int col);
/* Value of (row, col): NUL-terminated for text; for binary use pb_getlength.
 * NULL values read as "" (check pb_getisnull). */
PB_API const char *pb_getvalue(const pb_result *r, int row, int col);
PB_API int         pb_getlength(const pb_result *r, int row, int col);
PB_API int         pb_getisnull(const pb_result *r, int row, int col);
/* Command tag, e.g. "INSERT 0 1"; "" if none. */
PB_API const char *pb_cmd_status(const pb_result *r);
/* Rows affected per the command tag, -1 if it carries no count. */
PB_API long long   pb_cmd_tuples(const pb_result *r);
/* An error (or notice) field by its PostgreSQL code: 'S' severity,
 * 'V' severity (unlocalised), 'C' SQLSTATE, 'M' message, 'D' detail, 'H' hint,
 * 'P' position, 'p' internal position, 'q' internal query, 'W' where,
 * 's' schema, 't' table, 'c' column, 'd' data type, 'n' constraint,
 * 'F' file, 'L' line, 'R' routine.  NULL if absent. */
PB_API const char *pb_error_field(const pb_result *r, int code);
/* The primary error message ("" when the result is not an error). */
PB_API const char *pb_error_message(const pb_result *r);
PB_API void        pb_result_free(pb_result *r);

/* ------------------------------------------- PostgreSQL beyond simple queries */

/* Prepare sql under name for this client.  The statement then works on any
 * later lease of the pool, whichever connection it lands on: the library
 * knows (from a per-connection record in shared memory, cleared when the
 * connection is reset or replaced) whether that connection already has it,
 * and sends Parse in the same write when it does not — no extra round trip
 * when it does.  Re-preparing a name replaces it.  *out is the server's
 * answer to the Parse (PB_RES_COMMAND_OK, or the SQL error). */
PB_API int pb_pg_prepare(pb_lease *l, const char *name, const char *sql, int nparams,
                         const unsigned int *param_types, pb_result **out);
/* Execute a statement this client prepared; arguments as pb_pg_exec_params.
 * PB_EINVAL if name was never prepared by this client. */
PB_API int pb_pg_exec_prepared(pb_lease *l, const char *name, int nparams, const char *const *values,
                               const int *lengths, const int *formats, int result_format, pb_result **out);

/* Pipelining.  pb_pg_send_params queues one statement (with its own Sync,
 * so an error in one does not affect the others); pb_pg_get_result sends
 * what is queued — as few writes as the request buffer allows, interleaved
 * with reading so any number of statements flow through bounded buffers — and
 * returns the results in order.  When every result has been returned it
 * gives PB_OK with *out = NULL.  Other calls on the lease give PB_EBUSY while
 * results are outstanding. */
PB_API int pb_pg_send_params(pb_lease *l, const char *sql, int nparams, const unsigned int *param_types,
                             const char *const *values, const int *lengths, const int *formats,
                             int result_format);
PB_API int pb_pg_get_result(pb_lease *l, pb_result **out);

/* COPY ... FROM STDIN.  pb_pg_copy_in_begin returns PB_OK when the server
 * waits for data, PB_ESERVER when it refused (pb_pg_get_result has the
 * error).  Data is sent in request-buffer-sized pieces as it is put, so any
 * amount streams through bounded memory.  pb_pg_put_copy_end finishes (or,
 * with errmsg, aborts) the COPY and returns the command's result. */
PB_API int pb_pg_copy_in_begin(pb_lease *l, const char *sql);
PB_API int pb_pg_put_copy_data(pb_lease *l, const void *buf, size_t len);
PB_API int pb_pg_put_copy_end(pb_lease *l, const char *errmsg, pb_result **out);

/* COPY ... TO STDOUT.  pb_pg_get_copy_data returns one row's length and sets
 * *buf (free it with pb_freemem), 0 when the COPY is over (the command's
 * result is then available from pb_pg_get_result), or a negative code. */
PB_API int pb_pg_copy_out_begin(pb_lease *l, const char *sql);
PB_API int pb_pg_get_copy_data(pb_lease *l, char **buf);
PB_API void pb_freemem(void *p);

/* LISTEN/NOTIFY.  Notifications that arrive during other commands are
 * queued on the lease; pb_pg_wait_notify returns the oldest, waiting up to
 * timeout_ms (< 0: forever) for one: PB_ETIMEDOUT if none came.  A connection
 * that ran LISTEN is reset (UNLISTEN *) on release, so the next holder hears
 * nothing. */
typedef struct pb_notify pb_notify;
PB_API int pb_pg_wait_notify(pb_lease *l, int timeout_ms, pb_notify **out);
PB_API const char *pb_notify_channel(const pb_notify *n);
PB_API const char *pb_notify_payload(const pb_notify *n);
PB_API int pb_notify_be_pid(const pb_notify *n);
PB_API void pb_notify_free(pb_notify *n);

/* Notices (NoticeResponse: warnings, RAISE NOTICE) go to fn, never into
 * results.  The pb_result passed is valid during the call only; read its
 * fields with pb_error_field.  fn NULL drops notices (the default).  Applies
 * to leases acquired afterwards and to those held now. */
typedef void (*pb_notice_handler)(void *arg, const pb_result *notice);
PB_API void pb_set_notice_handler(pb_client *c, pb_notice_handler fn, void *arg);

/* ------------------------------------------------------------------- Redis */

#include <hiredis/hiredis.h>   /* redisReply, freeReplyObject */

/* Run one command, formatted as hiredis's redisCommand (printf-like, %s %b).
 * Returns PB_OK with *out set when Redis answered — error replies included
 * (REDIS_REPLY_ERROR); free it with freeReplyObject().  Negative codes as
 * pb_pg_exec, plus PB_ETYPE on a PostgreSQL lease. */
PB_API int pb_redis_command(pb_lease *l, redisReply **out, const char *fmt, ...);
/* Run one command given as an argument vector; argvlen NULL means C strings. */
PB_API int pb_redis_command_argv(pb_lease *l, int argc, const char **argv,
                                 const size_t *argvlen, redisReply **out);
/* Pipelining, as hiredis: append commands, then pb_redis_get_reply() sends
 * what was appended in one write and returns the replies in order. */
PB_API int pb_redis_append_command(pb_lease *l, const char *fmt, ...);
PB_API int pb_redis_append_command_argv(pb_lease *l, int argc, const char **argv,
                                        const size_t *argvlen);
PB_API int pb_redis_get_reply(pb_lease *l, redisReply **out);

/* Pub/Sub, as pb_pg_wait_notify is LISTEN/NOTIFY: after SUBSCRIBE,
 * PSUBSCRIBE or SSUBSCRIBE (whose replies pb_redis_command returns, one per
 * channel), messages are delivered as they arrive.  *out gets the oldest as
 * hiredis parses it — an array ["message", channel, payload], ["pmessage",
 * pattern, channel, payload] or ["smessage", channel, payload] — to free with
 * freeReplyObject; messages that arrive during other commands (SUBSCRIBE
 * more, UNSUBSCRIBE, PING) are kept for it in order.  Waits up to
 * timeout_ms (< 0: forever, 0: not at all).  PB_OK; PB_ETIMEDOUT: none came;
 * PB_EBUSY: replies are still owed (read them with pb_redis_get_reply
 * first); PB_EINVAL: nothing is subscribed (the server's count after the last
 * (UN)SUBSCRIBE reply), or out is NULL; PB_EBACKEND: the connection broke.
 * Release unsubscribes (the broker's reset runs RESET), so the next holder
 * receives nothing.  Messages not read pile up in the slot's reply ring and
 * then in the server, which disconnects a subscriber past its
 * client-output-buffer-limit for pubsub (PB_EBACKEND). */
PB_API int pb_redis_get_message(pb_lease *l, int timeout_ms, redisReply **out);

/* ------------------------------------------------------ non-blocking use
 *
 * For event loops (asyncio, libuv, epoll servers): many logical requests in
 * one thread share one pb_client and one pool, with no thread per call.  The
 * model is libpq's asynchronous API: PQsocket → pb_client_fd,
 * PQsendQuery → pb_pg_send_query, PQconsumeInput → pb_consume_input,
 * PQisBusy → pb_is_busy, PQgetResult → pb_pg_get_result; acquiring a lease
 * is split the same way (pb_acquire_start / pb_acquire_poll).
 *
 * The loop:
 *   1. start work: pb_acquire_start, pb_pg_send_query / pb_pg_send_params,
 *      pb_redis_send_argv;
 *   2. poll it: pb_acquire_poll, pb_is_busy, pb_redis_poll_reply (and
 *      pb_pg_poll_notify, pb_redis_poll_message for LISTEN and Pub/Sub).  A call
 *      that answers "not yet" (PB_EINPROGRESS, or pb_is_busy's 1) has armed
 *      a notification for exactly that operation;
 *   3. wait until pb_client_fd(c) is readable (poll, epoll,
 *      loop.add_reader), call pb_client_consume(c), go to 2 for EVERY
 *      operation still in progress.  A notification that consume reaped is
 *      not delivered again (consume may even finish a queued acquire), so
 *      an operation not polled after a consume may wait forever: never
 *      consume in a loop that polls only one of several operations.
 *
 * Notification: the fd becomes readable once after a broker event that
 * concerns an armed operation (a slot granted or refused, reply bytes or an
 * error published, the request buffer taken, the broker's control socket
 * hung up) — one wake-up per event, no periodic polling.  It stays readable
 * (level-triggered) until pb_client_consume reaps it; a readable fd means
 * "something may be ready", so an operation may still answer "not yet" and
 * re-arm.  Underneath it is an io_uring whose FUTEX_WAIT requests sleep on
 * the same shared futex words the blocking calls sleep on (Linux >= 6.7).
 * Where that is unavailable (older kernel, io_uring denied by seccomp or
 * io_uring_disabled, or POOLBROKER_ASYNC_NOTIFY=timer in the environment)
 * the fd is a one-shot timerfd of PB_NB_TICK_MS armed while something is
 * armed: correct, but it polls at that granularity.  pb_client_fd_polls
 * says which.
 *
 * Timeouts are the caller's: nothing here waits, and nothing times out on
 * its own (the pool's acquire_timeout_ms is not applied).  Give up on an
 * acquire with pb_acquire_cancel; on a command by releasing the lease (the
 * broker cancels the query on the server and resets the connection).
 *
 * Rules: one pb_client per thread, as for the blocking calls.  While a
 * non-blocking acquire is queued with the broker, pb_acquire on the same
 * client takes a free slot or answers PB_EBUSY (a client has one wait word).
 * Blocking calls on a lease are allowed whenever nothing is outstanding on
 * it.  After fork() the child's pb_client_fd is a new fd: call it again.
 * io_uring completes a wait by interrupting the thread that armed it, as a
 * signal without a handler would: system calls that fail with EINTR on any
 * signal (socket calls with SO_RCVTIMEO/SO_SNDTIMEO, for instance) can do
 * so in that thread while an operation is armed; retry them (this library
 * does).
 */
#define PB_NB_TICK_MS 1

/* The fd to wait on for readability (created on first call, the same fd
 * afterwards; owned by the client, closed by pb_disconnect; never read or
 * close it yourself).  Returns the fd (>= 0) or PB_EINVAL, PB_ENOMEM (no
 * fd could be made). */
PB_API int pb_client_fd(pb_client *c);

/* 1 when pb_client_fd is the timerfd fallback (wakes every PB_NB_TICK_MS
 * while something is armed), 0 when it wakes only on events, PB_EINVAL. */
PB_API int pb_client_fd_polls(pb_client *c);

/* Reap what made the fd readable (never waits) and move queued acquires
 * along (when one is granted, the next is queued with the broker).  Returns
 * the number of notifications reaped (>= 0; 0 is fine: a spurious wake-up),
 * or PB_EINVAL.  A broker found dead here fails every pending acquire with
 * PB_EBROKER and makes lease calls answer PB_EBROKER. */
PB_API int pb_client_consume(pb_client *c);

/* A pending acquire: created by pb_acquire_start, gone once
 * pb_acquire_poll answers anything but PB_EINPROGRESS, after
 * pb_acquire_cancel, or (with the rest of the client) after pb_disconnect. */
typedef struct pb_acquiring pb_acquiring;

/* Start leasing a connection of pool <pool>.  Returns PB_OK with *out set
 * when a slot was free at once (no operation is created, *op is NULL), or
 * PB_EINPROGRESS with *op set: the request is queued — in this client first
 * come, first served, and with the broker behind other processes' waiters
 * (only the oldest of a client's acquires is with the broker at a time).
 * Errors (nothing created): PB_EINVAL, PB_ENOPOOL, PB_ESHUTDOWN, PB_EBROKER,
 * PB_ENOMEM, PB_EPROTO. */
PB_API int pb_acquire_start(pb_client *c, const char *pool, pb_acquiring **op, pb_lease **out);

/* Poll a pending acquire, never waiting.  PB_OK: *out is the lease and op
 * is freed.  PB_EINPROGRESS: still queued (notification armed).  Otherwise
 * the error that ended it (op is freed): PB_EBACKEND (backend down),
 * PB_ESHUTDOWN, PB_ENOPOOL (pool removed), PB_EBUSY (the broker's queue is
 * full), PB_EBROKER, PB_EPROTO, PB_ENOMEM, PB_EINVAL (NULL arguments; op
 * untouched). */
PB_API int pb_acquire_poll(pb_acquiring *op, pb_lease **out);

/* Give up a pending acquire (the caller's timeout) and free op.  A slot
 * the broker granted in the meantime is released.  NULL is a no-op. */
PB_API void pb_acquire_cancel(pb_acquiring *op);

/* Queue one simple-protocol Query (one or more statements; the result is
 * the last one's, as pb_pg_exec) and submit what the request buffer takes
 * now, without waiting (a query larger than the buffer goes in parts, one
 * each time pb_is_busy or pb_consume_input finds the buffer free).  Results
 * come from pb_pg_get_result in order, after any statements queued before
 * (pb_pg_send_params queues the same way).  Errors: PB_EINVAL, PB_ESTALE,
 * PB_ETYPE, PB_EBUSY (a COPY or a held result), PB_ETOOBIG (over the pool's
 * max_request_size), PB_ENOMEM, PB_EBROKER. */
PB_API int pb_pg_send_query(pb_lease *l, const char *sql);

/* Submit what is queued on the lease (PostgreSQL statements or appended
 * Redis commands) as far as the request buffer allows, and read the reply
 * bytes the broker has published into the lease's decoder; never waits.
 * PB_OK, or an error as pb_pg_get_result / pb_redis_get_reply would give it
 * (the lease is then unusable: release it). */
PB_API int pb_consume_input(pb_lease *l);

/* Would the next pb_pg_get_result / pb_redis_get_reply wait?  Consumes
 * input first (pb_consume_input).  0: no — a result (or, after the last
 * one, the end: *out NULL) is ready; 1: yes — notification armed; a
 * negative code: the error the get call would return.  For PostgreSQL, the
 * ready result is parsed already: pb_pg_get_result then returns at once. */
PB_API int pb_is_busy(pb_lease *l);

/* Redis: append a command (as pb_redis_append_command_argv) and submit what
 * fits at once, without waiting (a command larger than the request buffer
 * goes in parts, one each time pb_redis_poll_reply finds the buffer free).
 * Errors as pb_redis_append_command_argv. */
PB_API int pb_redis_send_argv(pb_lease *l, int argc, const char **argv, const size_t *argvlen);

/* Redis: the next reply without waiting.  PB_OK with *out (free it with
 * freeReplyObject; error replies included, as pb_redis_get_reply);
 * PB_EINPROGRESS when it is not complete yet (notification armed); PB_EINVAL
 * when nothing is outstanding; other errors as pb_redis_get_reply. */
PB_API int pb_redis_poll_reply(pb_lease *l, redisReply **out);

/* LISTEN/NOTIFY without waiting: pb_pg_wait_notify with no wait.  PB_OK
 * with *out (free it with pb_notify_free); PB_EINPROGRESS when none has
 * arrived (notification armed: the fd wakes when the broker publishes
 * something for the lease); PB_EBUSY while a command or COPY is under way
 * on the lease (its notifications are kept; poll again after its results);
 * other errors as pb_pg_wait_notify (PB_EBACKEND: the connection broke). */
PB_API int pb_pg_poll_notify(pb_lease *l, pb_notify **out);

/* Pub/Sub without waiting: pb_redis_get_message with no wait.  PB_OK with
 * *out (freeReplyObject); PB_EINPROGRESS when no message has arrived
 * (notification armed); PB_EBUSY: replies are still owed (poll them with
 * pb_redis_poll_reply first); PB_EINVAL: nothing is subscribed; other
 * errors as pb_redis_get_message. */
PB_API int pb_redis_poll_message(pb_lease *l, redisReply **out);

/* ============================================================ libpq parity
 * What a program ported from libpq reaches for besides queries, with libpq's
 * behaviour under pb_ names (issue #18).  Kept in its own section. */

/* PQescapeLiteral / PQescapeIdentifier for the broker's connections (UTF-8,
 * standard_conforming_strings on).  Escapes str up to length bytes or its
 * first NUL: a literal in single quotes with ' doubled — and, when it holds
 * a backslash, \ doubled and libpq's " E" prefix (" E'a\\b'"); an
 * identifier in double quotes with " doubled.  Returns a new string (free it
 * with pb_freemem), or NULL with *err (err may be NULL) set to PB_EINVAL
 * (str NULL, or not valid UTF-8: an invalid or cut-off character) or
 * PB_ENOMEM.  No lease is needed: escaping does not depend on one. */
PB_API char *pb_escape_literal(const char *str, size_t length, int *err);
PB_API char *pb_escape_identifier(const char *str, size_t length, int *err);

/* PQtransactionStatus: the values are libpq's PQTRANS_* numbers. */
enum {
    PB_TRANS_IDLE    = 0,   /* no transaction open */
    PB_TRANS_ACTIVE  = 1,   /* a command, pipeline or COPY is under way on the lease */
    PB_TRANS_INTRANS = 2,   /* idle in a transaction block */
    PB_TRANS_INERROR = 3,   /* idle in a failed transaction block */
    PB_TRANS_UNKNOWN = 4,   /* NULL, stale, or not a PostgreSQL lease */
};
/* The transaction status of a PostgreSQL lease, from the last
 * ReadyForQuery of its connection (the slot's txn_status, written by the
 * broker).  Never blocks. */
PB_API int pb_transaction_status(const pb_lease *l);

/* PQresultVerboseErrorMessage.  verbosity and show_context take libpq's
 * PQERRORS_* and PQSHOW_CONTEXT_* values. */
enum { PB_ERRORS_TERSE = 0, PB_ERRORS_DEFAULT = 1, PB_ERRORS_VERBOSE = 2, PB_ERRORS_SQLSTATE = 3 };
enum { PB_SHOW_CONTEXT_NEVER = 0, PB_SHOW_CONTEXT_ERRORS = 1, PB_SHOW_CONTEXT_ALWAYS = 2 };
/* The error (or notice) of r as libpq formats it: "SEVERITY:  message\n",
 * then with PB_ERRORS_DEFAULT "DETAIL:  ...", "HINT:  ...", "QUERY:  ..."
 * lines; with PB_ERRORS_VERBOSE also the SQLSTATE after the severity, the
 * SCHEMA/TABLE/COLUMN/DATATYPE/CONSTRAINT NAME lines and "LOCATION:  routine,
 * file:line"; PB_ERRORS_SQLSTATE gives "SEVERITY:  SQLSTATE\n".  Unless
 * terse, "CONTEXT:" follows per show_context.  One difference: a pb_result does not keep the
 * query text, so a statement position is " at character N" (as libpq writes
 * it when it lacks the text) rather than a LINE with a caret.  A result that
 * is not an error gives "PGresult is not an error result\n", as libpq.
 * Returns a new string (pb_freemem), or NULL when out of memory. */
PB_API char *pb_result_verbose_error_message(const pb_result *r, int verbosity, int show_context);

#ifdef __cplusplus
}
#endif
#endif /* POOLBROKER_H */
