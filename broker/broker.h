/*
 * broker.h — the broker's private state, shared by its modules:
 *
 *   main.c     command line, signals, the main loop
 *   shm.c      creating and laying out the shared segment
 *   control.c  the control socket: attach, client records, pidfds
 *   pool.c     pools: shm entry, sizing, the queue of waiting acquirers
 *   slot.c     every slot-word write and the free map (the CAS rules)
 *   conn.c     connection phases: connect, idle watch, close, failure
 *   connio.c   requests out, replies in (the reply ring or the sink)
 *   release.c  release, reclaim, reset, validation
 *   pg.c       PostgreSQL driver: connect with libpq, frame, count replies,
 *              session state from tags and ParameterStatus
 *   pgstmt.c   its record of the library's prepared statements per backend
 *   redis.c    Redis driver: connect with hiredis, frame, count replies
 *              (both below the pool: driver.h is all they share with it)
 *   janitor.c  periodic work: sizing, recycling, repairs, leak warnings
 *   failover.c following a failover: which server each connection reached,
 *              draining a failed server's connections, the failover count
 *   sentinel.c Redis Sentinel: a thread that asks the sentinels where the
 *              master is and listens for +switch-master
 *   cancel.c   PostgreSQL cancel requests, off the event loop
 *   tls.c      backend I/O through OpenSSL for TLS connections
 *   reload.c   SIGHUP: the new configuration, pool by pool
 *   metrics.c  the Prometheus endpoint
 *
 * conn.h is what pool.c, conn.c, connio.c and release.c share among
 * themselves; invariant.h has ALWAYS()/NEVER().  Nothing here is visible to
 * clients: what they see is pb_shm.h.
 */
#ifndef PB_BROKER_H
#define PB_BROKER_H

#include <stdint.h>
#include <sys/types.h>

#include "conf.h"
#include "driver.h"
#include "loop.h"
#include "pb_shm.h"

struct pool;
struct conn;

/* A connect error as the drivers report it: libpq's multi-host message
 * (every host's reason) fits whole for 6 or so hosts; longer ones end in
 * "...". */
#define CONN_ERROR_MAX 1024

/* What the broker is doing with a connection.  Every change goes through
 * conn_set_phase() (conn.c), which refuses a move the diagram below does not
 * have; event handlers record what happened (a reply, a completed send, a
 * delivered cancel) and conn_next() decides what the connection does next.
 *
 * The slot word in shared memory says who holds the slot; the phase says what
 * the broker is doing with the connection behind it.  In PH_READY a client
 * may lease a free slot and give it back on its own (the fast paths), so
 * "idle" and "leased" are the slot word's to say, not the phase's.
 *
 *   EMPTY ─▶ CONNECTING ─▶ READY ─▶ DRAINING ─▶ AWAIT_CANCEL
 *              │             │         │             │
 *              ▼             ▼         ▼             ▼
 *            EMPTY     RESETTING / VALIDATING / READY (release done)
 *                            │
 *                            ▼
 *   every connected phase ─▶ CLOSING ─▶ EMPTY
 */
enum conn_phase {
    PH_EMPTY = 0,            /* no connection */
    PH_CONNECTING,           /* driver handshake in progress (libpq, hiredis) */
    PH_READY,                /* in service: free, leased, or being handed on */
    PH_DRAINING,             /* released with replies still owed: they go to the
                                sink, then the release resumes */
    PH_AWAIT_CANCEL,         /* released, nothing owed, but a cancel request may
                                still land: held until it is delivered */
    PH_RESETTING,            /* the replies to our reset commands are pending */
    PH_VALIDATING,           /* the reply to our liveness check is pending */
    PH_CLOSING,              /* shut down: waiting for in-flight operations */
    PH_COUNT
};

/* Connected and not closing: the phases in which the socket carries traffic. */
#define PH_UP(ph) ((ph) >= PH_READY && (ph) <= PH_VALIDATING)

/* A TCP server as conn.server and pool.server name it: host (cut to fit) and port. */
#define SERVER_FMT "%.48s:%d"

typedef struct conn {
    struct pool *pool;
    uint32_t index;          /* global slot index */
    pb_shm_slot *slot;
    uint8_t *req;            /* request buffer in shm (private copy of its address) */
    uint8_t *rep;            /* reply ring in shm */
    uint32_t req_size, rep_size;
    enum conn_phase phase;   /* change only through conn_set_phase() */
    int fd;
    int backend_pid;
    void *drv;               /* the driver's state for this connection (PGconn *, Redis
                                rconn *): only the driver looks inside */
    const conf_pool *cset;   /* whose connection settings (conninfo, host, port, password,
                                user, db) the driver connects with: the pool's cset when the
                                handshake started (a reload's may still be on trial) */
    char error[CONN_ERROR_MAX]; /* last connect error, one line (pg_error_flatten), for the
                                log and the pool's last_error */
    char server[PB_SERVER_MAX]; /* the driver, on connect: "host:port" (or socket path) this
                                   connection reached; "" while not connected */
    /* Not a phase: its server failed (failover.c).  The connection is
     * closed when it comes back to the broker, never mid-lease (PB_SF_RETIRE
     * makes the holder release through us); cleared by a new connect. */
    int suspect;

    ev_op send_op, recv_op, poll_op;
    void *ssl;               /* SSL* of a TLS connection (I/O goes through tls.c), or NULL */
    ev_op tls_poll_op;       /* tls.c: waits for the socket OpenSSL asked for */
    struct conn *tls_next;   /* tls.c: ready list */
    int tls_queued;

    /* sending: a private copy of the validated request (or reset commands) */
    drv_buf sbuf;            /* what to send: sbuf.p[soff..sbuf.len) is still to go */
    uint32_t soff;
    int sending;

    /* receiving */
    uint32_t reply_errors;   /* error replies since our reset or check started (PostgreSQL) */
    uint32_t expect;         /* replies still to come */
    uint64_t rep_head;       /* our copy of slot->rep_head */
    uint32_t acked_seq;      /* our copy of slot->req_ack */
    uint64_t reply_done;     /* our copy of slot->reply_done */
    uint32_t unpublished;    /* replies scanned in the chunk not yet published */
    uint8_t *scratch;        /* private sink for replies nobody will read */
    /* Not a phase: set on entering the broker's own phases (their replies
     * are nobody's), and also in PH_READY when the lease that sent the
     * command is gone or its ring is unusable (the phase has not changed:
     * the release is still on its way). */
    int to_sink;             /* replies go to scratch */
    /* Not a phase: where the one recv in flight was pointed when armed
     * (to_sink may change while it is in flight). */
    int recv_sink;           /* the recv in flight reads into scratch (else the ring) */
    int watch;               /* the holder waits for unasked messages (LISTEN) */
    uint64_t cmd_word;       /* slot word of the lease whose command is in flight */
    char txn;                /* last ReadyForQuery status: 'I','T','E' */
    /* Not a phase: session state the backend now carries that a later lease
     * must not see (SS_* bits, driver.h), as the driver saw the server
     * report it.  Nonzero pins a transaction-mode lease to this connection;
     * build_reset undoes exactly these and clears them. */
    uint32_t sstate;
    /* Not a phase: the last request ended mid-way through an extended-query
     * exchange (Parse/Bind/Execute with no Sync yet: a pipeline sent in
     * pieces), so the backend holds state the next piece needs.  Set by the
     * driver's frame_request; pins a transaction-mode lease like sstate. */
    uint8_t partial;
    /* Not a phase: a property of the connection in any connected phase (a
     * leased one stays leased until its holder has read io_error). */
    int broken;              /* I/O failed: close as soon as nobody holds it */
    int idle_async;          /* idle: an asynchronous message (driver idle_data) is half read;
                                the broker holds the slot (RESETTING) until it is whole */
    /* Not a phase: an event recorded in PH_READY (the holder asked while
     * the connection was busy); cleared on leaving PH_READY. */
    int submit_deferred;     /* a SUBMIT waits for the previous replies */

    /* lifecycle */
    uint64_t created_ms, retire_at_ms, cmd_start_ms;
    uint64_t leak_logged_word;
    uint64_t suspect_word;   /* janitor: a slot word that made no sense last pass */
    int cancel_sent;         /* a cancel request went out for the command in flight */
    const char *cancel_why;  /* why, when not a command timeout (conn_command_timeout) */
    _Atomic int cancel_inflight; /* cancel requests queued or being sent (the cancel thread
                                    decrements once the server has signalled the backend) */
    uint64_t cancel_deadline_ms; /* close the connection if it has not answered by then */
    uint32_t settings_gen;   /* the pool's settings_gen when this connection was started */

    /* Transaction pooling (txn.c).  In a pool_mode = transaction pool the
     * slots clients lease are handles (handle = 1: a request buffer and a
     * reply ring, never a backend of their own) and the backend connections
     * are separate conns whose slot record is private to the broker (home).
     * A backend serving a handle takes the handle's slot view (slot, index,
     * req, rep, ring positions) for as long as it is bound: everything in
     * connio.c and release.c then works on it as on a session-mode slot. */
    struct conn *bound;      /* handle: its backend, or NULL; backend: its handle, or NULL */
    pb_shm_slot *home;       /* backend: its private slot record; NULL elsewhere */
    uint32_t home_index;     /* backend: its number in the pool, for the log while home */
    uint8_t handle;          /* this conn is a handle (transaction mode) */
    uint8_t queued;          /* handle: its statement waits in the pool's queue for a backend */
    uint64_t queued_ms;      /* handle: when it started waiting */
    /* Pipelining (txn.c, drivers with shareable: Redis).  A backend in mux
     * use is not bound: it carries the shareable requests of several
     * handles at once, in order, and routes each reply to the handle whose
     * request it answers (the FIFO mq of mux_ent); its recvs go to scratch
     * (to_sink) and are copied into each handle's reply ring. */
    uint8_t mux;             /* backend: in mux use (its home record broker-held) */
    uint8_t mux_listed;      /* backend: on B.mux_flush, to send mux_out before the loop sleeps */
    struct mux_ent *mq;      /* backend: requests in flight, oldest first (ring of mq_cap) */
    uint32_t mq_head, mq_len, mq_cap;
    drv_buf mux_out;         /* backend: requests taken since the send in flight (sbuf) began */
    uint32_t mux_pos, mux_len; /* backend: scratch[mux_pos..mux_len) received, not yet routed
                                  (the head handle's ring was full: mux_paused) */
    uint8_t mux_paused;      /* backend: waiting for the head handle's holder to drain its ring */
    uint8_t mux_tainted;     /* backend: a reply in mux use left state behind (logged once) */
    uint32_t mq_slow;        /* backend: entries of mq not quick (driver.shareable 1) */
    struct conn *mux_next;   /* backend: next on B.mux_flush */
    struct conn *mux_back;   /* handle: the backend its requests in flight went to (all on one,
                                so its replies stay in order), NULL when none is */
    uint32_t mux_ents;       /* handle: its requests in flight there, of any lease */
    uint32_t mux_owed;       /* handle: replies owed to the lease mux_word (its rep_owed) */
    uint64_t mux_word;       /* handle: the lease mux_owed counts for */
    uint8_t mux_deferred;    /* handle: a request that cannot share waits for those in flight */

    /* A request larger than the request buffer, streamed in parts
     * (connio.c, "Streamed requests" in pb_shm.h).  Kept on the conn the
     * lease holds (a session-mode conn, or the handle in transaction mode,
     * so that no backend is bound while a slow writer streams); freed when
     * the lease ends or the request is sent. */
    drv_buf stream;          /* the parts taken so far: at most max_request_size bytes */
    uint32_t stream_total;   /* bytes of the whole request (req_total of its first part) */
    uint32_t stream_seq;     /* req_seq of the last part, once stream_ready */
    uint64_t stream_word;    /* slot word of the lease that streams it */
    uint8_t stream_ready;    /* every part is here: the request waits to be checked and sent */
} conn;

/* One request of a handle in flight on a backend in mux use. */
typedef struct mux_ent {
    conn *h;                 /* the handle */
    uint64_t word;           /* its lease word then: replies go to its ring only while it holds */
    uint32_t nrep;           /* replies still to come for it */
    uint64_t sent_ms;        /* when it was taken (command_timeout_ms counts from here) */
    uint8_t quick;           /* driver.shareable said 2 */
} mux_ent;

typedef struct waiter {
    uint32_t client_idx;
    uint32_t client_id;
    uint32_t ticket;
} waiter;

typedef struct pool {
    uint32_t index;
    uint32_t first_slot;     /* our own copy of shm->first_slot */
    conf_pool *cf;           /* owned by the broker's current conf */
    const driver *drv;
    pb_shm_pool *shm;
    conn *conns;             /* slot_capacity of them */
    uint32_t nconns;
    uint32_t connecting;     /* handshakes in flight */
    uint32_t live;           /* connections connecting or PH_UP */
    waiter *wq;              /* FIFO of waiters: ring of max_clients entries */
    uint32_t wq_head, wq_len, wq_cap;
    uint64_t backoff_until_ms;
    uint32_t backoff_ms;
    uint32_t health;         /* enum pb_pool_health, published in shm->health */
    uint32_t settings_gen;   /* bumped when cset changes: older connections retire */
    const conf_pool *cset;   /* connection settings new connections use: the start's, or a
                                reload's once a connection with them succeeded (reload.c) */
    struct settings_trial *trial; /* a reload's new connection settings, tried on a connection
                                outside the slots until one succeeds; NULL: none pending */
    uint32_t fails;          /* connects failed in a row, published in shm->consecutive_failures */
    int not_ready;           /* the server said "not ready yet" (DRV_NOT_READY) and has not
                                served a connect since: logged once, not every 20 */
    int removed;             /* dropped by a reload: close as leases return */
    /* A reload that changes pool_mode (reload.c) builds a new pool under the
     * same name beside this one (successor, its replaces = this); lookups
     * keep finding this one until the successor has a connection up, then
     * this one is removed with superseded set: no new leases, but the leases
     * held keep working in the old mode until released (in transaction mode
     * their statements still bind backends).  NULL / 0: no switch. */
    struct pool *successor;
    struct pool *replaces;
    int superseded;
    /* Transaction mode (txn.c): conns[] are the handles clients lease;
     * backs[] the backend connections.  Session mode: backs is NULL and
     * conns[] are both. */
    conn *backs;
    uint32_t nbacks;
    pb_shm_slot *homes;      /* the backends' private slot records (not in the segment) */
    conn **tq;               /* FIFO of handles whose statement waits for a backend (nconns) */
    uint32_t tq_head, tq_len;
    /* failover.c: following a failover (conf_pool.follow) */
    char server[PB_SERVER_MAX]; /* the server the newest connection reached ("" none yet) */
    char failed[PB_SERVER_MAX]; /* a server whose connections were drained and that no
                                   connection has reached since ("" none) */
    char failed_why[128];    /* why it was drained, for the log line of the switch */
    uint64_t failovers;      /* our copy of shm->failovers */
    /* sentinel.c (Redis Sentinel pools), read by the driver at connect */
    struct sentinel *sentinel; /* the thread asking the sentinels; NULL: not a Sentinel pool */
    char master_host[256];   /* where the sentinels say the server is now; "" not known yet */
    int master_port;
    int sentinel_reask;      /* failover.c asks sentinel.c to ask the sentinels again */
} pool;

/* The backend connections of p: conns[] in session mode, backs[] in
 * transaction mode. */
#define POOL_BACKENDS(p)  ((p)->backs ? (p)->backs : (p)->conns)
#define POOL_NBACKENDS(p) ((p)->backs ? (p)->nbacks : (p)->nconns)
/* A slot record the broker alone sees (a transaction-mode backend at home):
 * no free-map bit, no client. */
#define CONN_AT_HOME(c)   ((c)->home && (c)->slot == (c)->home)

typedef struct client {
    uint32_t idx;            /* record index */
    uint32_t id;             /* 24-bit id, 0 = record unused */
    pid_t pid;
    uid_t uid;
    int ctrl_fd, pidfd;
    ev_op ctrl_op, pid_op;
    uint8_t ctrl_buf[64];
    uint32_t sq_head;        /* private consumer position */
    uint32_t reuse;          /* how often the record was reused (for ids) */
    int dead;                /* waiting for its ops to finish before reuse */
    int attached;            /* handshake done */
} client;

typedef struct broker {
    conf *cf;
    loop *lp;
    int io_backend;
    pb_shm_header *hdr;
    size_t shm_size;
    /* Where the tables are, computed once at creation: the offsets in the
     * header are writable by every worker, so the broker never reads them
     * back (the janitor rewrites them instead; see shm_republish). */
    pb_shm_pool *shm_pools;
    pb_shm_client *shm_clients;
    pb_shm_slot *shm_slots;
    pb_shm_backend *shm_backends; /* shmstat's rows of transaction-mode backends */
    pb_shm_header hdr_copy;  /* the header's fixed fields as created */
    int shm_fd;
    int doorbell_fd;         /* eventfd clients write when we sleep */
    ev_op doorbell_op;
    uint64_t doorbell_val;
    int listen_fd;
    ev_op accept_op;
    int signal_fd;
    ev_op signal_op;
    uint8_t siginfo[128];
    pool *pools;
    uint32_t npools;
    conn **slots;            /* global slot index -> conn (NULL: an unused spare slot) */
    uint32_t nslots;
    uint32_t spare_first;    /* first spare slot not yet given to a pool */
    conf **old_confs;        /* configurations replaced by reloads: removed pools */
    uint32_t nold_confs;     /* may still point into them, so they live until exit */
    client *clients;
    uint32_t max_clients;
    uint32_t nattached;
    uint32_t repairs;        /* shm_note_repair: published in hdr->repairs */
    uint32_t sweep_next;     /* the client record the janitor's sweep looks at next */
    uint32_t last_sq_seq;
    /* The broker's work (header.work_*, published by each janitor pass):
     * main-loop iterations; doorbell scans, the sq_ready words and rings they
     * read; submission entries; janitor passes, and the client records and
     * non-empty rings its sweep found. */
    struct {
        uint64_t loop_passes, scans, scan_words, scan_rings, sq_entries;
        uint64_t janitor_passes, sweep_records, sweep_rings;
    } work;
    uint32_t lifeline_tid;   /* tid of the lifeline thread (lifeline.c); 0 = none */
    uint32_t inflight;       /* connections with replies outstanding */
    conn *mux_flush;         /* backends in mux use with requests to send (txn_mux_flush) */
    unsigned cancels_seen;   /* cancel_delivered() when we last settled connections */
    int draining;
    uint64_t drain_deadline_ms;
    int stop;
    uint64_t next_janitor_ms;
    uint64_t now_ms;         /* CLOCK_MONOTONIC ms, updated each iteration */
    uint64_t watchdog_ms;    /* systemd watchdog ping interval, 0 = none */
    uint64_t last_watchdog_ms;
} broker;

extern broker B;

/* A handshake still running after this long has failed ("connect timed out"). */
#define CONNECT_TIMEOUT_MS 10000

/* Tell whoever sleeps on the shared futex *word that it changed: bump it,
 * then wake only when the client said it sleeps (*sleeping; the pair is
 * pb_futex_wake's protocol, see pb_shm.h) — a worker that is spinning or
 * busy costs no system call.  The wake itself goes out with the loop's next
 * io_uring_enter where the kernel allows it (loop_futex_wake). */
static inline void broker_wake(_Atomic uint32_t *word, _Atomic uint32_t *sleeping)
{
    atomic_fetch_add(word, 1);
    if (atomic_load(sleeping))
        loop_futex_wake(B.lp, word);
}

/* Buffer sizes of spare slots (pools added by a reload use these). */
#define SPARE_REQ (64u * 1024)
#define SPARE_REP (256u * 1024)

/* time */
uint64_t now_ms(void);

/* shm.c */
int shm_create(broker *b);
void shm_destroy(broker *b, int unlink_it);
void shm_republish(broker *b);
/* Republish client record i's broker-owned fields (id, pid, sq_head); the
 * janitor's sweep calls it for a slice of the table each pass. */
void shm_republish_client(broker *b, uint32_t i);
/* Store broker.work into the header's work_* counters. */
void shm_publish_work(broker *b);
/* Count one thing a worker scribbled that the broker found and undid
 * (the caller logs what it was). */
void shm_note_repair(broker *b);

/* lifeline.c: the robust futex that tells sleeping workers the broker died */
/* Start the lifeline thread and publish header.lifeline; sets lifeline_tid
 * (0 when the kernel refuses: clients then check the broker in slices).
 * Call with the segment mapped.  Returns 0. */
int lifeline_start(broker *b);
/* Janitor: put back a scribbled header.lifeline (a repair). */
void lifeline_republish(broker *b);
/* Clean stop, before the segment is unmapped: mark the lifeline dead and
 * wake every sleeper, as the kernel does when the broker is killed. */
void lifeline_cut(broker *b);

/* control.c */
int control_listen(broker *b);
void control_close(broker *b);
/* Drain the submission rings whose doorbell bit is set (each loop pass). */
void control_scan_rings(broker *b);
/* Client records the janitor's sweep looks at per pass (control_sweep). */
#define SWEEP_RECORDS 256u
/* The janitor's sweep: the next SWEEP_RECORDS client records (round the
 * table): republish the broker's fields of each, drain the ring of each
 * attached one whatever its doorbell bit says (the backstop for a bit a
 * worker cleared).  Its work per pass is bounded whatever is attached; it
 * goes round the table every max_clients / SWEEP_RECORDS passes. */
void control_sweep(broker *b);
void client_gone(broker *b, client *cl, const char *why);
client *client_by_id(broker *b, uint32_t id);

/* reload.c */
void reload_config(broker *b);
/* The janitor's turn for a pool's pending connection settings: start the
 * next try once its backoff is over, give up on one past the connect
 * timeout. */
void settings_trial_tick(pool *p);
/* Process exit: free a pending trial whatever it is doing. */
void settings_trial_free(pool *p);
/* The janitor's turn for q, a pool_mode switch's pending successor: once
 * it has a connection up, the pool it replaces is removed (superseded). */
void reload_switch_tick(pool *q);

/* Slot index within its pool (its free-map bit). */
static inline uint32_t conn_local(const conn *c)
{
    return c->index - c->pool->first_slot;
}

/* slot.c: every slot-word write (the CAS rules are at the top of slot.c) */
int slot_take(conn *c, uint64_t *seen, unsigned state);
int slot_take_free(conn *c, unsigned state);
conn *slot_pop_free(pool *p);
void slot_set(conn *c, unsigned state);
void slot_put_free(conn *c);
int slot_grant(conn *c, uint32_t client_id, uint64_t *leased);
void slot_repair(conn *c, uint64_t seen, unsigned state);
void freemap_clear(pool *p, uint32_t local);
void conn_freemap_clear(conn *c);

/* pool.c */
int pools_init(broker *b);
int pool_setup(broker *b, pool *p, uint32_t index, conf_pool *cp, uint32_t first_slot);
void pool_publish_limits(pool *p);
void pool_republish(pool *p);
void pool_publish_health(pool *p);
void pools_free(broker *b);
void pool_maybe_grow(pool *p);
/* More connections live (connecting or connected) than max_size allows now
 * (a reload lowered it): one that comes back to the broker is closed, not
 * handed on, and the janitor flags leased ones PB_SF_RETIRE. */
int pool_over_max(const pool *p);
/* p's connections close as they come free: p was removed by a reload and
 * no lease needs them any more (a pool superseded by a pool_mode switch in
 * transaction mode keeps its backends while any handle is held). */
int pool_gone(const pool *p);
/* Slots of p (connections, or handles in transaction mode) held by a
 * worker: leased, or given back and not yet taken by the broker. */
uint32_t pool_leases_held(const pool *p);
void pool_serve_waiters(pool *p);
void pool_offer_handle(conn *h);
void pool_enqueue_waiter(pool *p, client *cl, uint32_t ticket);
void pool_cancel_waiter(pool *p, client *cl, uint32_t ticket);
void pool_drop_client_waiters(broker *b, client *cl);
void pool_fail_waiters(pool *p, int err);
void pool_fail_acquirers(pool *p, int err);
void conn_submit(conn *c, uint64_t lease_word, uint32_t seq);
void conn_fail_submit(conn *c, int err, uint32_t seq);
/* Free the streamed request a lease was sending through c (its parts so
 * far): the lease ended, or the request failed.  c may be a bound backend
 * (its handle's stream is dropped). */
void conn_stream_drop(conn *c);
void conn_release(conn *c, uint64_t word);
void conn_drained(conn *c);
void conn_watch(conn *c, uint64_t lease_word);
void conn_connect_failed(conn *c, const char *why);
void conn_close(conn *c, const char *why);
void conn_send_private(conn *c);
void conn_start_connect(conn *c);
void conn_take_back(conn *c, uint64_t word, const char *why);
int conn_set_phase(conn *c, enum conn_phase to);
int conn_phase_allowed(enum conn_phase from, enum conn_phase to);
const char *conn_phase_name(enum conn_phase ph);
void conn_shutdown(conn *c);
void conn_watch_idle(conn *c);
void conn_validate_or_offer(conn *c);

/* tls.c */
void tls_recv(conn *c, void *buf, size_t len);
void tls_send(conn *c, const void *buf, size_t len);
void tls_cancel(conn *c, ev_op *op);
int tls_has_ready(void);
int tls_run_ready(void);

/* cancel.c */
int cancel_request(void *pgconn, int backend_pid, _Atomic int *inflight, int wake_fd);
void conn_settle(conn *c);
unsigned cancel_delivered(void);
void cancel_shutdown(void);
void conn_command_timeout(conn *c, const char *why);

/* txn.c: transaction pooling */
int txn_setup(pool *p);
void txn_free(pool *p);
void txn_submit(conn *h, uint64_t lease_word, uint32_t seq);
void txn_release(conn *h, uint64_t word, int reclaim, const char *why);
void txn_watch(conn *h, uint64_t lease_word);
void txn_drained(conn *h);
int txn_offer_backend(conn *b);
void txn_maybe_unbind(conn *b);
void txn_return_handle(conn *b);
void txn_unbind_for_close(conn *b);
void txn_fail_queue(pool *p, int err);
void txn_janitor(broker *b, pool *p);
/* Pipelining on backends in mux use (shareable requests, txn.c). */
int txn_mux_flush(void);                    /* send what was taken this pass; 1 if anything went */
void txn_mux_recv(conn *b, size_t n);       /* n bytes arrived in b->scratch */
void txn_mux_sent(conn *b);                 /* b's send completed */
void txn_mux_fail(conn *b, int err);        /* b is lost: fail every request in flight */

/* janitor.c */
void janitor_run(broker *b);

/* failover.c: draining is a no-op for a pool with follow == PB_FOLLOW_NONE */
/* c is connected (c->server set by the driver): note the pool's current
 * server (every pool), and count and log a switch away from a failed one. */
void failover_connected(conn *c);
/* A connection of p to server (its c->server, copied) was lost under I/O
 * (why: how): drain the server's other connections. */
void failover_conn_lost(pool *p, const char *server, const char *why);
/* c's server said it is going away, or (readonly) that it is read-only (a
 * drv_reply's server_gone / server_readonly): drain its connections if the
 * pool follows failovers (read-only only counts for a pool that wants the
 * primary). */
void failover_reply(conn *c, const char *why, int readonly);
/* Drain every connection of p to server (free ones close now, leased ones
 * when they come back), reconnect through the host list, log why. */
void failover_drain(pool *p, const char *server, const char *why);
/* The janitor's pass: suspect connections leased again are flagged again,
 * a scribbled shm->server is rewritten. */
void failover_tick(pool *p);

/* sentinel.c */
/* Start, restart after a reload, or stop p's Sentinel thread as p->cf says;
 * apply what it learnt (a new master: failover_drain of the old one).
 * starting: the broker is starting; a thread started now is waited for
 * (up to 2 s) until it has asked the sentinels once. */
void sentinel_tick(pool *p, int starting);
/* Stop every Sentinel thread (process exit). */
void sentinel_shutdown(broker *b);

#endif /* PB_BROKER_H */
