/*
 * pb_shm.h — the layout of poolbroker's shared-memory segment.
 *
 * This header is the contract between the broker (which creates and owns the
 * segment), libpoolbroker (linked into every worker process) and shmstat
 * (which only reads).  It is not installed: applications see only
 * poolbroker.h.
 *
 * Layout of one segment, every part aligned to a cache line:
 *
 *   pb_shm_header                     magic, version, fingerprint, broker state
 *   pb_shm_pool     [npools]          per pool: limits, state, counters, free map
 *   pb_shm_client   [max_clients]     per attached process: wait word, SQ ring
 *   pb_shm_slot     [nslots]          per connection slot: slot word, I/O words
 *   pb_shm_backend  [nslots]          per transaction-mode backend connection: what
 *                                     it is doing, for shmstat (broker-written)
 *   slot buffers                      per slot: request buffer (req_size) and
 *                                     reply ring (rep_size, SPSC byte ring)
 *
 * Who writes what is said next to every field.  "broker" fields are written
 * only by the broker; "client" fields by the process that holds the lease (or
 * owns the client record); "granter" fields by whoever grants a lease (the
 * client itself on the fast path, the broker when it hands a slot to a
 * waiter: pb_slot_stamp_lease).  Every reader of a field a client can write
 * treats it as untrusted input: the broker checks it at run time and never
 * asserts on it.  All cross-process fields are C11 atomics; memory orders are
 * given where they matter.  Everything is a plain fixed-width type so that a
 * 32-bit-free, padding-free layout can be fingerprinted (PB_SHM_FINGERPRINT).
 */
#ifndef PB_SHM_H
#define PB_SHM_H

#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PB_SHM_MAGIC      0x314B52424C4F4F50ULL   /* "POOLBRK1", little endian */
#define PB_SHM_VERSION    4u
#define PB_CACHELINE      64
#define PB_NAME_MAX       32                      /* pool name incl. NUL */
#define PB_MAX_POOLS      64
#define PB_MAX_POOL_SLOTS 4096                    /* per pool (free map bits) */
#define PB_FREEMAP_WORDS  (PB_MAX_POOL_SLOTS / 64)
#define PB_SQ_ENTRIES     256                     /* per client, power of two */
#define PB_HIST_BUCKETS   16                      /* latency histograms */
#define PB_CMD_PREVIEW    48                      /* first bytes of the command */
#define PB_SERVER_MAX     64                      /* "host:port" of a pool's current server incl. NUL */

/* ---------------------------------------------------------------- slot word
 * 64 bits: state:8 | owner:24 | generation:32.  The single source of truth for
 * who holds a slot.  Changed only by compare-and-swap; every transition bumps
 * the generation, so a lease handle (which remembers the word it was granted)
 * can never act on a later lease of the same slot.
 */
enum pb_slot_state {
    PB_SLOT_EMPTY = 0,      /* no connection; broker may start one */
    PB_SLOT_CONNECTING,     /* broker is connecting (owner 0) */
    PB_SLOT_FREE,           /* idle connection, may be leased by anyone */
    PB_SLOT_LEASED,         /* held by client <owner> */
    PB_SLOT_RELEASING,      /* <owner> gave it back; broker must look at it */
    PB_SLOT_RESETTING,      /* broker is cleaning it (rollback, reset query) */
    PB_SLOT_RECLAIMING,     /* owner died or overstayed; broker is taking it back */
    PB_SLOT_BROKEN,         /* connection lost; broker will reconnect */
    PB_SLOT_CLOSING,        /* being retired (lifetime, uses, idle, removed pool) */
    PB_SLOT_STATE_MAX
};

#define PB_WORD(state, owner, gen) \
    (((uint64_t)(state) << 56) | ((uint64_t)((owner) & 0xFFFFFFu) << 32) | (uint64_t)(uint32_t)(gen))
#define PB_WORD_STATE(w) ((unsigned)((w) >> 56))
#define PB_WORD_OWNER(w) ((uint32_t)(((w) >> 32) & 0xFFFFFFu))
#define PB_WORD_GEN(w)   ((uint32_t)(w))
/* The next word for a transition to <state> by <owner>: generation + 1. */
#define PB_WORD_NEXT(w, state, owner) PB_WORD((state), (owner), PB_WORD_GEN(w) + 1u)

/* Client ids are 24 bits: the low PB_CLIENT_INDEX_BITS are the index of the
 * client record, the rest count how often that record was reused, so a dead
 * client's id is not handed to its successor at once.  0 means "nobody". */
#define PB_CLIENT_INDEX_BITS 12
#define PB_MAX_CLIENTS       ((1u << PB_CLIENT_INDEX_BITS) - 1)
#define PB_CLIENT_INDEX(id)  (((id) & ((1u << PB_CLIENT_INDEX_BITS) - 1)) - 1)
#define PB_SQ_READY_WORDS    ((PB_MAX_CLIENTS + 63) / 64)   /* header.sq_ready: a bit per record */
_Static_assert(PB_SQ_READY_WORDS <= 64, "header.sq_ready_sum has one bit per sq_ready word");

/* The broker's lifeline (header.lifeline): the tid of a broker thread that
 * lives exactly as long as the broker process, with FUTEX_WAITERS always set
 * so that the kernel, walking that thread's robust-futex list when it exits
 * (kill -9 included), replaces the word with FUTEX_WAITERS | FUTEX_OWNER_DIED
 * (the tid cleared) and wakes one
 * sleeper; a client that sees FUTEX_OWNER_DIED wakes all the others
 * (FUTEX_WAKE, INT_MAX).  A waiting client sleeps with futex_waitv on its
 * wait word and this one, so it needs no timer to notice the broker's death.
 * On a clean stop the broker sets the bit and wakes everyone itself. */
#define PB_LIFELINE_WORD(tid) ((uint32_t)(tid) | FUTEX_WAITERS)

/* ------------------------------------------------------- submission entries
 * 64 bits: op:8 | arg:24 | val:32, pushed by a client on its own SPSC ring.
 */
enum pb_sq_op {
    PB_SQ_NOP = 0,
    PB_SQ_SUBMIT,           /* arg: slot, val: lease generation — request ready */
    PB_SQ_RELEASE,          /* arg: slot, val: generation of the RELEASING word */
    PB_SQ_WAIT,             /* arg: pool, val: ticket — queue me for a slot */
    PB_SQ_DRAINED,          /* arg: slot, val: lease generation — I made room in the reply ring */
    PB_SQ_CANCEL_WAIT,      /* arg: pool, val: ticket — I gave up waiting */
    PB_SQ_WATCH,            /* arg: slot, val: lease generation — read what the server
                               sends unasked (LISTEN) until my next command */
};
#define PB_SQE(op, arg, val) \
    (((uint64_t)(op) << 56) | ((uint64_t)((arg) & 0xFFFFFFu) << 32) | (uint64_t)(uint32_t)(val))
#define PB_SQE_OP(e)  ((unsigned)((e) >> 56))
#define PB_SQE_ARG(e) ((uint32_t)(((e) >> 32) & 0xFFFFFFu))
#define PB_SQE_VAL(e) ((uint32_t)(e))

/* ------------------------------------------------------------- wait word
 * A client's one outstanding acquire wait, 64 bits: state:8 | slot:24 | ticket:32.
 * The client sets WAITING; the broker CASes WAITING→GRANTED(slot) or →FAILED;
 * the client CASes WAITING→CANCELLED on timeout.  Whoever's CAS wins decides.
 */
enum pb_wait_state {
    PB_WAIT_NONE = 0,
    PB_WAIT_WAITING,
    PB_WAIT_GRANTED,        /* slot field: the slot now LEASED to this client */
    PB_WAIT_CANCELLED,
    PB_WAIT_FAILED,         /* slot field: a PB_E* code, negated (backend down, shutdown) */
};
#define PB_WAITW(state, slot, ticket) \
    (((uint64_t)(state) << 56) | ((uint64_t)((slot) & 0xFFFFFFu) << 32) | (uint64_t)(uint32_t)(ticket))
#define PB_WAITW_STATE(w)  ((unsigned)((w) >> 56))
#define PB_WAITW_SLOT(w)   ((uint32_t)(((w) >> 32) & 0xFFFFFFu))
#define PB_WAITW_TICKET(w) ((uint32_t)(w))

enum pb_broker_state { PB_BROKER_STARTING = 0, PB_BROKER_RUNNING, PB_BROKER_DRAINING, PB_BROKER_STOPPED };
enum pb_pool_type    { PB_POOL_POSTGRES = 1, PB_POOL_REDIS = 2 };
/* REMOVED: a reload removed the pool (or replaced it: pool_mode switch);
 * PENDING: the new pool of a pool_mode switch, not serving until a
 * connection of it is up.  Lookups by name skip both. */
enum pb_pool_health  { PB_HEALTH_HEALTHY = 0, PB_HEALTH_DEGRADED, PB_HEALTH_DOWN, PB_HEALTH_REMOVED,
                       PB_HEALTH_PENDING };
enum pb_io_backend   { PB_IO_NONE = 0, PB_IO_URING, PB_IO_EPOLL };

/* Pool modes (pool_mode key): a lease owns a backend connection for the
 * whole lease, or only while a transaction runs (PgBouncer's terms). */
enum pb_pool_mode { PB_MODE_SESSION = 0, PB_MODE_TRANSACTION };

/* Reset policies (pool reset key).  AUTO undoes exactly the session state
 * the server reported (conn.sstate); ROLLBACK, the opt-out, only ends an
 * open transaction (and undoes LISTEN and pb_pin); the others run every
 * release.  A client may release straight to the free map (no reset) under
 * AUTO and ROLLBACK only. */
enum pb_reset_policy { PB_RESET_ROLLBACK = 0, PB_RESET_DISCARD_ALL, PB_RESET_CUSTOM, PB_RESET_AUTO };

/* ------------------------------------------------- library-named statements
 * pb_pg_prepare's statements go to the server named PB_STMT_PREFIX and 16
 * lowercase hex digits of pb_stmt_hash() over the Parse message's own query
 * text and parameter types, so one name always means one text.  The broker
 * recomputes the hash from the Parse it forwards and only then treats the
 * name as its own (drops a Parse the backend already has, closes one it may
 * have): a name that does not match its text is forwarded untouched. */
#define PB_STMT_PREFIX    "pb_"
#define PB_STMT_NAME_LEN  19                      /* "pb_" + 16 hex digits, without the NUL */

/* FNV-1a, 64 bits: step over n bytes of query text. */
static inline uint64_t pb_stmt_hash_bytes(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

/* The whole hash: sql (its len bytes), then each of the nparams parameter
 * type OIDs, then nparams; never 0, 1 or 2 (the broker's records use those). */
static inline uint64_t pb_stmt_hash_end(uint64_t h, uint32_t nparams)
{
    h = (h ^ (uint64_t)nparams) * 1099511628211ull;
    return h > 2 ? h : h + 3;
}
#define PB_STMT_HASH_INIT 1469598103934665603ull
#define PB_STMT_HASH_TYPE(h, oid) (((h) ^ (uint64_t)(uint32_t)(oid)) * 1099511628211ull)

/* Slot I/O error codes the broker reports in pb_shm_slot.io_error: a PB_E*
 * code (negative) or 0. */

typedef struct pb_shm_header {
    uint64_t magic;                 /* PB_SHM_MAGIC; broker, at creation */
    uint32_t version;               /* PB_SHM_VERSION; broker, at creation */
    uint32_t fingerprint;           /* PB_SHM_FINGERPRINT of the creator's build; broker */
    uint64_t total_size;            /* bytes in the segment; broker */
    _Atomic uint32_t generation;    /* broker: start count for this segment name */
    _Atomic uint32_t state;         /* broker: enum pb_broker_state; release stores */
    _Atomic int32_t  broker_pid;    /* broker: its pid, left in place when it stops (see state) */
    uint32_t io_backend;            /* broker: enum pb_io_backend */
    _Atomic uint32_t npools;        /* pool table entries in use (incl. removed); the table
                                       has room for PB_MAX_POOLS; a reload adds (release) */
    uint32_t nslots;                /* broker: slot table entries */
    uint32_t max_clients;           /* broker: client table entries */
    uint32_t pad0;
    uint64_t pool_off;              /* broker: byte offsets from the segment base (for */
    uint64_t client_off;            /*   shmstat; the broker and the library never read */
    uint64_t slot_off;              /*   them back: see pb_shm_layout) */
    uint64_t buf_off;               /* broker: start of the slot buffers */
    uint64_t backend_off;           /* broker: the backend table (pb_shm_backend, nslots rows;
                                       shmstat only) */
    uint64_t start_ms;              /* broker: CLOCK_REALTIME ms at start */
    _Atomic uint64_t heartbeat_ms;  /* CLOCK_MONOTONIC ms, broker, each loop tick */
    _Atomic uint32_t clients_attached; /* broker */
    _Atomic uint32_t repairs;       /* broker: scribbles it found and undid (slot words taken
                                       back, rings resynchronised, bad entries or requests) */
    char shm_name[64];              /* broker: as configured */
    _Atomic uint32_t lifeline;      /* broker: the robust futex of its lifeline thread,
                                       PB_LIFELINE_WORD(tid); the kernel sets FUTEX_OWNER_DIED
                                       and wakes a sleeper when the broker dies (see below) */
    /* --- hot: doorbell (own cache line) --- */
    _Alignas(PB_CACHELINE)
    _Atomic uint32_t broker_sleeping; /* broker sets 1 before it sleeps; a client that
                                         CASes it 1→0 writes the doorbell eventfd */
    _Atomic uint32_t sq_seq;          /* clients: bump after each SQ push (broker skips
                                         looking at sq_ready when unchanged) */
    _Atomic uint64_t sq_ready_sum;    /* clients: bit w set (fetch_or) after setting a bit of
                                         sq_ready[w]; the broker exchanges it with 0 and
                                         reads only the words it names */
    /* Which submission rings have entries: bit i = client record i pushed
     * since the broker last looked.  A client sets its bit (fetch_or, after
     * the release store of its tail), then its word's bit in sq_ready_sum;
     * the broker exchanges the summary, then each word it names, with 0 and
     * drains only those rings, so its work per submission grows neither with
     * the number of attached processes nor with max_clients.  Untrusted: any
     * worker can set or clear any bit; a set bit of a record that is not
     * attached is ignored, and a cleared one is found by the janitor's sweep. */
    _Alignas(PB_CACHELINE)
    _Atomic uint64_t sq_ready[PB_SQ_READY_WORDS];
    /* The broker's work, counted so that it can be shown not to grow with the
     * number of attached processes (issue #19): the broker counts in private
     * and stores the totals here at each janitor pass, so they lag by up to
     * one pass (100 ms).  Compare differences over a run, divided by the
     * queries of that run.  Broker-written, relaxed stores; shmstat and
     * /metrics show them. */
    _Alignas(PB_CACHELINE)
    _Atomic uint64_t work_loop_passes;   /* main-loop iterations */
    _Atomic uint64_t work_scans;         /* doorbell scans: iterations that found sq_seq moved */
    _Atomic uint64_t work_scan_words;    /* sq_ready words those scans read (the words
                                            sq_ready_sum named, not max_clients / 64) */
    _Atomic uint64_t work_scan_rings;    /* rings those scans drained: the set bits of
                                            attached records */
    _Atomic uint64_t work_sq_entries;    /* submission entries handled, however found */
    _Atomic uint64_t work_janitor_passes;/* janitor passes */
    _Atomic uint64_t work_sweep_records; /* client records the janitor's sweep looked at: a
                                            fixed number a pass (SWEEP_RECORDS,
                                            broker/broker.h), whatever is attached */
    _Atomic uint64_t work_sweep_rings;   /* rings that sweep found entries on (a doorbell bit
                                            cleared by a worker, or set after the scan looked) */
} pb_shm_header;

/* Fixed-bucket histograms: bucket i counts values < 2^i * 16 µs (the last is
 * open ended): 16µs, 32µs, ... ~262 ms, +Inf. */
typedef struct pb_hist {
    _Atomic uint64_t bucket[PB_HIST_BUCKETS];
    _Atomic uint64_t sum_us;
    _Atomic uint64_t count;
} pb_hist;

typedef struct pb_shm_pool {
    /* Every field down to the counters is the broker's.  The identity
     * (name, type, first_slot, slot_capacity) is written before the pool is
     * published (npools), then only to undo a scribble, under ident_seq; read
     * it with pb_shm_pool_ident_read().  The janitor rewrites the rest from
     * private copies each pass (pool_republish), writing only what differs, so
     * a worker's scribble lasts one pass at most. */
    char name[PB_NAME_MAX];         /* broker, NUL-terminated */
    uint32_t type;                  /* broker: enum pb_pool_type */
    uint32_t first_slot;            /* broker: slots [first_slot, +slot_capacity) are this pool's */
    _Atomic uint32_t min_size;      /* broker; may change on reload */
    _Atomic uint32_t max_size;      /* broker; may change on reload */
    uint32_t slot_capacity;         /* broker: slots reserved for the pool (>= max_size) */
    _Atomic uint32_t acquire_timeout_ms; /* broker */
    _Atomic uint32_t reset_policy;  /* broker: enum pb_reset_policy */
    _Atomic uint32_t health;        /* broker: enum pb_pool_health */
    _Atomic uint32_t consecutive_failures; /* broker: connects failed in a row */
    _Atomic uint32_t size;          /* broker: live connections (free+leased+busy) */
    _Atomic uint32_t nwaiters;      /* broker: queued acquire waiters */
    _Atomic uint32_t accepting;     /* broker: 0 while draining or removed: acquire fails */
    _Atomic uint64_t max_uses;      /* broker; 0 = unlimited (a lease reaching it releases via the broker) */
    _Atomic uint32_t validate_after_idle_ms; /* broker; 0 = never: a slot idle longer is checked
                                       by the broker before anyone may use it */
    _Atomic uint32_t ident_seq;     /* broker: seqlock over the identity fields above, odd
                                       while it rewrites them (pb_shm_pool_ident_publish) */
    _Atomic uint32_t max_request_size; /* broker: bytes, the largest request a lease may send
                                       (it streams through req_size in parts); the library
                                       refuses a larger one itself, the broker checks again */
    uint32_t pad1;                  /* nobody: explicit padding (the counters below are 8-byte aligned) */
    char last_error[512];           /* broker; last connect/backend error, one line (every host's
                                       reason of a multi-host conninfo, as far as it fits),
                                       NUL-terminated */
    char server[PB_SERVER_MAX];     /* broker: "host:port" (or socket path) of the server the
                                       pool's newest connection reached; "" before the first;
                                       NUL-terminated, cut to fit */
    _Atomic uint32_t pool_mode;     /* broker: enum pb_pool_mode */
    _Atomic uint32_t txn_queued;    /* broker, transaction mode: statements waiting for a backend
                                       (the pool's FIFO); janitor-published, each pass */

    /* counters: relaxed fetch_add by whoever does the thing.  Clients:
     * acquires, timeouts, errors (acquires that failed); broker: waits,
     * reclaims, resets, connects, connect_failures, handoffs, wakeups, leaks,
     * retired, errors (connections lost), failovers (times the pool moved
     * to another server after its server failed: broker/failover.c). */
    _Atomic uint64_t acquires, waits, timeouts, errors, reclaims, resets;
    _Atomic uint64_t connects, connect_failures, handoffs, wakeups, leaks, retired;
    _Atomic uint64_t failovers;
    pb_hist acquire_wait;           /* client, on acquire that waited */
    pb_hist command_latency;        /* client, per exec */

    /* free map: bit i set = slot first_slot+i may be FREE.  A hint, never
     * truth: an acquirer clears a bit and then must still win the CAS on the
     * slot word.  A bit lost by a process killed between the two is put back
     * by the broker's janitor.  Own cache lines: it is the contended part. */
    _Alignas(PB_CACHELINE)
    _Atomic uint64_t freemap[PB_FREEMAP_WORDS];
} pb_shm_pool;

typedef struct pb_shm_client {
    _Atomic uint32_t id;            /* broker: current 24-bit client id, 0 = free record */
    _Atomic int32_t  pid;           /* broker: from SO_PEERCRED */
    _Atomic uint64_t attach_ms;     /* broker: CLOCK_MONOTONIC ms */
    _Atomic uint64_t wait_word;     /* client+broker by CAS, see enum pb_wait_state */
    _Atomic uint32_t wait_futex;    /* broker: bumps after deciding wait_word (pb_futex_wake) */
    _Atomic uint32_t wait_sleeping; /* client: 1 while asleep on wait_futex */
    /* submission ring, SPSC: client produces at tail, broker consumes at head */
    _Alignas(PB_CACHELINE)
    _Atomic uint32_t sq_tail;       /* client, release store after writing the entry */
    _Alignas(PB_CACHELINE)
    _Atomic uint32_t sq_head;       /* broker, release store after reading the entry */
    _Alignas(PB_CACHELINE)
    _Atomic uint64_t sq[PB_SQ_ENTRIES];
} pb_shm_client;

/* Flags in pb_shm_slot.flags (broker-written, read by the lease holder). */
#define PB_SF_RETIRE      0x01u     /* release through the broker: connection retires */
#define PB_SF_RESET       0x02u     /* release through the broker: the backend carries session
                                       state the server reported (conn.sstate != 0); stored
                                       before the reply bytes that reported it are published */

/* Flags in pb_shm_slot.client_flags (lease holder sets, broker reads on release). */
#define PB_CF_DIRTY       0x01u     /* Redis library: a command that changes session state (the
                                       broker's own tracking decides; this only adds to it) */
#define PB_CF_PIN         0x02u     /* pb_pin: state the server does not report; the broker resets
                                       it as SS_PIN (DISCARD ALL / RESET) on release */

/* Streamed requests.  A request larger than the slot's request buffer
 * (req_size) goes through it in parts, in order: for each part the holder
 * waits until req_ack == its last req_seq (the buffer is free), copies the
 * part in, stores req_len (the part's bytes, 1..req_size), req_total (the
 * whole request's bytes, the same for every part) and req_pos (the part's
 * offset: 0, then the sum of the parts before), bumps req_seq (release) and
 * pushes PB_SQ_SUBMIT.  A request that fits is one part (req_pos 0,
 * req_total == req_len).  The broker copies each part into a private buffer
 * bounded by the pool's max_request_size and acks it (req_ack) at once,
 * with io_error 0 after the first part, so the holder writes the next; at
 * the last part (req_pos + req_len == req_total) it checks and sends the
 * whole request as it would one that fitted.  Any part out of order, a
 * length or total that changes or does not add up, or a total over
 * max_request_size fails the request (io_error, acked): the holder stops
 * writing parts.  Nothing of the request reaches the backend before its
 * last part, so a holder that dies, stops or releases mid-stream leaves the
 * connection clean; the broker frees the parts when the lease ends. */
typedef struct pb_shm_slot {
    _Atomic uint64_t word;          /* slot word, CAS only (see above) */
    uint32_t pool;                  /* broker, fixed: pool index */
    uint32_t index;                 /* broker, fixed: own index */
    /* Buffers, fixed at creation.  The broker keeps its own copy and never
     * reads these back; a client checks them against the segment size. */
    uint64_t req_off;               /* request buffer: offset from segment base */
    uint64_t rep_off;               /* reply ring: offset from segment base */
    uint32_t req_size;              /* bytes */
    uint32_t rep_size;              /* bytes, a power of two */
    /* -- broker-written status -- */
    _Atomic int32_t  backend_pid;   /* broker: PostgreSQL backend pid / Redis client id */
    _Atomic uint32_t txn_status;    /* broker: last ReadyForQuery status byte ('I','T','E'), 0 if none */
    _Atomic uint32_t flags;         /* broker: PB_SF_* */
    _Atomic int32_t  io_error;      /* broker: PB_E* code for the command in flight, or 0 */
    _Atomic uint64_t conn_created_ms; /* broker: CLOCK_MONOTONIC ms */
    _Atomic uint64_t uses;          /* granter: leases of this connection, counted as granted
                                       (the broker zeroes it for a new connection) */
    _Atomic uint64_t reply_done;    /* broker: complete replies (RFQ / RESP) received */
    _Atomic uint32_t rep_owed;      /* broker: replies it still expects for the holder's commands
                                       (stored before req_ack, after rep_head/reply_done) */
    _Atomic uint32_t req_waiting;   /* client: 1 while it waits for req_ack (its request buffer
                                       busy): only then does the broker's ack wake it, so a
                                       holder asleep for its reply is woken once, by the reply */
    _Atomic uint64_t idle_ms;       /* CLOCK_MONOTONIC(_COARSE) ms when last freed: broker, or
                                       the client that released it straight to the free map */
    /* -- lease holder-written (the first two stamped by the granter) -- */
    _Atomic uint64_t lease_ms;      /* granter: CLOCK_MONOTONIC(_COARSE) ms when leased */
    _Atomic uint32_t client_flags;  /* granter zeroes, holder sets: PB_CF_* */
    _Atomic uint32_t req_len;       /* client: bytes of request in the request buffer (this part) */
    _Atomic uint32_t req_seq;       /* client: bumps per submit (release order) */
    _Atomic uint32_t req_ack;       /* broker: last req_seq it took (buffer free again) */
    _Atomic uint32_t req_total;     /* client: bytes of the whole request; req_len < req_total:
                                       it streams in parts (see "Streamed requests" above) */
    _Atomic uint32_t req_pos;       /* client: offset of this part in the request (0: the first) */
    uint8_t preview[PB_CMD_PREVIEW];/* client: first bytes of the current command, for shmstat */

    /* reply ring: broker produces (rep_head), lease holder consumes (rep_tail) */
    _Alignas(PB_CACHELINE)
    _Atomic uint64_t rep_head;      /* broker: bytes ever written, release store */
    _Atomic uint32_t rep_futex;     /* broker bumps after each publish; client futex-waits */
    _Atomic uint32_t rep_sleeping;  /* client: 1 while asleep on rep_futex */
    _Atomic uint32_t rep_paused;    /* broker: 1 while it stopped reading for want of room */
    _Alignas(PB_CACHELINE)
    _Atomic uint64_t rep_tail;      /* client: bytes consumed, release store */
} pb_shm_slot;

/* --------------------------------------------------------------- backends
 * A transaction-mode pool's backend connections live outside the slot table
 * (the slots are lease handles, broker/txn.c).  So that shmstat can show
 * them, the broker's janitor publishes one row per backend each pass (every
 * 100 ms by default): backend k of a pool is row first_slot + k of this
 * table (a pool never has more backends than slots).  Rows of session-mode
 * pools and of unused backends are PB_BACKEND_NONE.  Broker-written, read
 * only by shmstat and /metrics, under the row's seqlock: copy the row
 * between two reads of an even, unchanged seq. */
enum pb_backend_state {
    PB_BACKEND_NONE = 0,    /* no connection */
    PB_BACKEND_CONNECTING,  /* handshake running */
    PB_BACKEND_IDLE,        /* connected, bound to no handle, free to take */
    PB_BACKEND_BOUND,       /* serving the handle in `handle` (its statement, transaction or
                               pinned session) */
    PB_BACKEND_BUSY,        /* the broker's own work: a reset, a check, closing */
    PB_BACKEND_SHARED,      /* carrying pipelined commands of several handles (Redis, bound to
                               none of them: see "pipelining" in broker/txn.c) */
    PB_BACKEND_STATE_MAX
};

typedef struct pb_shm_backend {
    _Atomic uint32_t seq;           /* broker: odd while it rewrites the row */
    uint32_t state;                 /* broker: enum pb_backend_state */
    int32_t backend_pid;            /* broker: the server's pid for it, 0 none */
    uint32_t handle;                /* broker: BOUND: the handle's slot index (its owner is the
                                       worker); else UINT32_MAX */
    uint64_t created_ms;            /* broker: CLOCK_MONOTONIC ms it connected, 0 none */
    uint64_t uses;                  /* broker: binds so far */
    char server[PB_SERVER_MAX];     /* broker: "host:port" (or socket path) it reached, NUL-terminated */
} pb_shm_backend;

/* The size fingerprint: a client or shmstat built against another layout
 * refuses to attach.  Mixing in every struct size catches a changed layout even
 * when someone forgets to bump PB_SHM_VERSION. */
#define PB_SHM_FINGERPRINT \
    ((uint32_t)(sizeof(pb_shm_header) * 2654435761u) ^ \
     (uint32_t)(sizeof(pb_shm_pool) * 40503u) ^ \
     (uint32_t)(sizeof(pb_shm_client) * 9973u) ^ \
     (uint32_t)(sizeof(pb_shm_slot) * 131u) ^ \
     (uint32_t)(sizeof(pb_shm_backend) * 7919u) ^ \
     (uint32_t)(PB_SQ_ENTRIES << 20) ^ (uint32_t)(PB_HIST_BUCKETS << 26))

static inline uint32_t pb_shm_hist_bucket(uint64_t us)
{
    uint32_t b = 0;
    uint64_t lim = 16;
    while (b < PB_HIST_BUCKETS - 1 && us >= lim) {
        lim <<= 1;
        b++;
    }
    return b;
}

static inline void pb_shm_hist_add(pb_hist *h, uint64_t us)
{
    atomic_fetch_add_explicit(&h->bucket[pb_shm_hist_bucket(us)], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_us, us, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
}

/* ------------------------------------------------------- protocol halves
 * Both sides of each cross-process step, for the library and the broker alike.
 */

/* Spin-wait hint for a CPU polling a shared word. */
static inline void pb_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Futex pair.  The waiter sets *sleeping, checks the word is still the value
 * it saw, waits (pb_futex_wait), then clears *sleeping.  The waker changes the
 * word first and makes the syscall only if someone sleeps (pb_futex_wake):
 * whichever order the two run in, the waiter either sees the new value or is
 * woken. */
static inline long pb_futex_wait(_Atomic uint32_t *word, uint32_t seen, int ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };
    return syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
}

static inline void pb_futex_wake(_Atomic uint32_t *word, _Atomic uint32_t *sleeping)
{
    atomic_fetch_add(word, 1);
    if (atomic_load(sleeping))
        syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Lease stamp: whoever grants a lease stamps the slot, so the broker's
 * janitor can time it (max_lease_ms, leak_threshold_ms).  The client does it
 * on the fast path right after winning the slot word; the broker, for a
 * waiter, before the CAS that hands the slot over. */
static inline void pb_slot_stamp_lease(pb_shm_slot *sl, uint64_t now_ms)
{
    atomic_store_explicit(&sl->lease_ms, now_ms, memory_order_relaxed);
    atomic_store_explicit(&sl->client_flags, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&sl->uses, 1, memory_order_relaxed);
}

/* ------------------------------------------------------ streamed requests
 * Broker: what one part of a request is (see "Streamed requests" above),
 * from the holder's req_len, req_total and req_pos (read once each,
 * untrusted) and what the broker holds of the request so far: have bytes
 * of a request of want bytes (0 and 0 when none is in progress).  req_size
 * is the slot's buffer, cap the pool's max_request_size.  Pure, so that
 * fuzz_shm can drive it with any values. */
enum pb_part {
    PB_PART_WHOLE = 0,      /* a request that fits: one part, nothing in progress */
    PB_PART_FIRST,          /* the first part of a streamed one: start it (dropping any in
                               progress: the holder started over), want = total */
    PB_PART_NEXT,           /* the next part, in order: append it */
    PB_PART_BAD_LEN,        /* len is 0 or over req_size */
    PB_PART_BAD_ORDER,      /* not the next part (pos, total), or a total under its first part */
    PB_PART_OVERRUN,        /* pos + len past the request's total */
    PB_PART_TOO_BIG,        /* the request is over cap */
};

static inline enum pb_part pb_req_part(uint32_t len, uint32_t total, uint32_t pos, uint32_t have,
                                       uint32_t want, uint32_t req_size, uint32_t cap)
{
    if (len == 0 || len > req_size)
        return PB_PART_BAD_LEN;
    if (pos == 0) {
        if (total < len)
            return PB_PART_BAD_ORDER;
        if (total > cap)
            return PB_PART_TOO_BIG;
        return total == len && have == 0 ? PB_PART_WHOLE : PB_PART_FIRST;
    }
    if (have == 0 || pos != have || total != want)
        return PB_PART_BAD_ORDER;
    if (len > want - have)
        return PB_PART_OVERRUN;
    return PB_PART_NEXT;
}

/* ------------------------------------------------------------ pool identity
 * A pool's name, type and slot range never change once the pool is published
 * (a reload appends pools, it never reuses an entry).  The broker rewrites
 * them only when they differ from its private copy — a worker scribbled on
 * them — and then under the seqlock ident_seq, so that a reader never sees a
 * half-written name: it copies the fields between two reads of an even,
 * unchanged ident_seq (issue #19: a name rewritten on every janitor pass made
 * find_pool see "" and return PB_ENOPOOL for a pool that exists). */
typedef struct pb_pool_ident {
    char name[PB_NAME_MAX];         /* NUL-terminated (forced) */
    uint32_t type, first_slot, slot_capacity;
} pb_pool_ident;

/* Broker: make sp's identity (name, type, first, cap), writing nothing when
 * it already is.  An odd ident_seq left by a scribbler is made even. */
static inline void pb_shm_pool_ident_publish(pb_shm_pool *sp, const char *name, uint32_t type,
                                             uint32_t first, uint32_t cap)
{
    char want[PB_NAME_MAX] = { 0 };
    for (size_t i = 0; i < PB_NAME_MAX - 1 && name[i]; i++)
        want[i] = name[i];
    uint32_t seq = atomic_load_explicit(&sp->ident_seq, memory_order_relaxed);
    int same = __builtin_memcmp(sp->name, want, sizeof want) == 0 && sp->type == type &&
               sp->first_slot == first && sp->slot_capacity == cap;
    if (same && !(seq & 1))
        return;
    seq |= 1;                       /* odd: readers retry */
    atomic_store_explicit(&sp->ident_seq, seq, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    __builtin_memcpy(sp->name, want, sizeof want);
    sp->type = type;
    sp->first_slot = first;
    sp->slot_capacity = cap;
    atomic_store_explicit(&sp->ident_seq, seq + 1, memory_order_release);
}

/* Reader (client library): a consistent copy of sp's identity.  Retries
 * while the broker rewrites it; returns 0, or -1 when ident_seq stayed odd
 * for `tries` reads (a scribbled seqlock: the broker's next janitor pass
 * makes it even again) — *out then holds the last, possibly torn, copy. */
static inline int pb_shm_pool_ident_read(pb_shm_pool *sp, pb_pool_ident *out, unsigned tries)
{
    for (unsigned i = 0;; i++) {
        uint32_t s1 = atomic_load_explicit(&sp->ident_seq, memory_order_acquire);
        __builtin_memcpy(out->name, sp->name, sizeof out->name);
        out->type = sp->type;
        out->first_slot = sp->first_slot;
        out->slot_capacity = sp->slot_capacity;
        atomic_thread_fence(memory_order_acquire);
        uint32_t s2 = atomic_load_explicit(&sp->ident_seq, memory_order_relaxed);
        out->name[PB_NAME_MAX - 1] = 0;
        if (s1 == s2 && !(s1 & 1))
            return 0;
        if (i + 1 >= tries)
            return -1;
    }
}

/* ---------------------------------------------------------------- free map
 * Shared by the client library (the lease fast path), the broker (handing
 * slots to waiters, its janitor) and the unit tests.  `slots` points at the
 * pool's first slot; `cap` is its slot count (<= PB_MAX_POOL_SLOTS). */

/* Put slot `local` back in the map. */
static inline void pb_freemap_put(pb_shm_pool *p, uint32_t local)
{
    atomic_fetch_or(&p->freemap[local / 64], 1ull << (local % 64));
}

/* Take a FREE slot: clear a bit, then CAS the slot word FREE → state(owner)
 * with the generation bumped.  A set bit whose slot is not FREE (a duplicate,
 * or a stale hint) is simply dropped.  Returns the local index and stores
 * the new word in *word, or returns -1 when the map has nothing usable. */
static inline int pb_freemap_take(pb_shm_pool *p, pb_shm_slot *slots, uint32_t cap, unsigned state,
                                  uint32_t owner, uint64_t *word)
{
    for (uint32_t wi = 0; wi < (cap + 63) / 64; wi++) {
        uint64_t m = atomic_load_explicit(&p->freemap[wi], memory_order_acquire);
        while (m) {
            uint32_t bit = (uint32_t)__builtin_ctzll(m);
            if (!atomic_compare_exchange_weak(&p->freemap[wi], &m, m & ~(1ull << bit)))
                continue;               /* m now holds the current map word */
            uint32_t local = wi * 64 + bit;
            if (local < cap) {
                pb_shm_slot *sl = &slots[local];
                uint64_t w = atomic_load_explicit(&sl->word, memory_order_acquire);
                uint64_t mine = PB_WORD_NEXT(w, state, owner);
                if (PB_WORD_STATE(w) == PB_SLOT_FREE && atomic_compare_exchange_strong(&sl->word, &w, mine)) {
                    *word = mine;
                    return (int)local;
                }
            }
            m = atomic_load_explicit(&p->freemap[wi], memory_order_acquire);
        }
    }
    return -1;
}

/* Re-push FREE slots whose bit was lost (a process killed between clearing
 * a bit and winning the slot's CAS).  Returns how many were put back. */
static inline uint32_t pb_freemap_repair(pb_shm_pool *p, pb_shm_slot *slots, uint32_t cap)
{
    uint32_t fixed = 0;
    for (uint32_t i = 0; i < cap; i++) {
        if (PB_WORD_STATE(atomic_load(&slots[i].word)) != PB_SLOT_FREE)
            continue;
        if (!(atomic_load(&p->freemap[i / 64]) & (1ull << (i % 64)))) {
            pb_freemap_put(p, i);
            fixed++;
        }
    }
    return fixed;
}

/* Accessors, from the offsets in the header.  They do no bounds checks: the
 * caller must have checked the offsets against the segment size itself
 * (shmstat's loader does), or wrote them (the broker, at creation).  The
 * library never uses them (it takes the layout from the attach answer). */
#define PB_SHM_AT(hdr, off) ((void *)((char *)(hdr) + (off)))
static inline pb_shm_pool *pb_shm_pools(pb_shm_header *h)
{ return (pb_shm_pool *)PB_SHM_AT(h, h->pool_off); }
static inline pb_shm_client *pb_shm_clients(pb_shm_header *h)
{ return (pb_shm_client *)PB_SHM_AT(h, h->client_off); }
static inline pb_shm_slot *pb_shm_slots(pb_shm_header *h)
{ return (pb_shm_slot *)PB_SHM_AT(h, h->slot_off); }
static inline pb_shm_backend *pb_shm_backends(pb_shm_header *h)
{ return (pb_shm_backend *)PB_SHM_AT(h, h->backend_off); }

/* ------------------------------------------------------- attach handshake
 * Over the control socket (SOCK_STREAM, AF_UNIX): the client sends one
 * pb_attach_req; the broker answers one pb_attach_resp, and on success passes
 * two fds with SCM_RIGHTS: the segment (O_RDWR) and the doorbell eventfd.
 * The socket then stays open for the life of the attachment; its EOF tells
 * each side the other has gone. */
#define PB_ATTACH_MAGIC 0x50424154u     /* "PBAT" */
typedef struct pb_attach_req {
    uint32_t magic;                     /* PB_ATTACH_MAGIC */
    uint32_t version;                   /* PB_SHM_VERSION */
    uint32_t fingerprint;               /* PB_SHM_FINGERPRINT */
    int32_t  pid;                       /* informational; the broker uses SO_PEERCRED */
} pb_attach_req;

/* Where the tables are.  The header holds the same numbers (for shmstat),
 * but every attached worker can write the header, and a client that attached
 * the instant a buggy one scribbled its offsets would put its submission ring
 * or its requests somewhere the broker never looks.  So the library takes the
 * layout from the attach answer (the broker's private copy, over the socket)
 * and never derives an address from the header. */
typedef struct pb_shm_layout {
    uint64_t pool_off;                  /* pool table: room for PB_MAX_POOLS */
    uint64_t client_off;                /* client table: max_clients records */
    uint64_t slot_off;                  /* slot table: nslots */
    uint64_t buf_off;                   /* slot buffers: buf_off .. shm_size */
    uint32_t max_clients;
    uint32_t nslots;
    uint32_t lifeline_tid;              /* tid in header.lifeline; 0: no lifeline (a client
                                           then sleeps in slices and checks the broker) */
    uint32_t pad;
} pb_shm_layout;

/* Why an attach was refused (pb_attach_refusal.reason), so that the client
 * can say it, not only the broker's log (issue #18). */
enum pb_attach_reason {
    PB_REFUSED_UNSAID = 0,              /* an older broker: the status code only */
    PB_REFUSED_UID,                     /* uid/gid not in allowed_uids/allowed_gids; uid, gid */
    PB_REFUSED_MAX_CLIENTS,             /* all max_clients records in use; limit */
    PB_REFUSED_VERSION,                 /* layout version/fingerprint differ */
    PB_REFUSED_DRAINING,                /* the broker is shutting down */
    PB_REFUSED_MALFORMED,               /* not a poolbroker attach request */
    PB_REFUSED_TRACKING,                /* the broker cannot watch the process (pidfd_open) */
};

typedef struct pb_attach_refusal {
    uint32_t reason;                    /* enum pb_attach_reason */
    uint32_t uid, gid;                  /* PB_REFUSED_UID: the peer's, from SO_PEERCRED */
    uint32_t limit;                     /* PB_REFUSED_MAX_CLIENTS: max_clients */
} pb_attach_refusal;

typedef struct pb_attach_resp {
    uint32_t magic;                     /* PB_ATTACH_MAGIC */
    int32_t  status;                    /* PB_OK or a PB_E* code */
    uint32_t version;                   /* broker's PB_SHM_VERSION */
    uint32_t fingerprint;               /* broker's PB_SHM_FINGERPRINT */
    uint32_t client_id;                 /* 24-bit id, owner field of slot words */
    uint32_t generation;                /* broker generation */
    uint64_t shm_size;                  /* bytes to map */
    union {
        pb_shm_layout layout;           /* on success */
        pb_attach_refusal refusal;      /* on a refusal (status != PB_OK) */
    };
} pb_attach_resp;

#endif /* PB_SHM_H */
