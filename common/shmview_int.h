/*
 * shmview_int.h — what the parts of shmview share (the loader and the three
 * renderers); nothing outside common/ includes it.  A view is built once by
 * shmview_load.c and only read afterwards.
 */
#ifndef PB_SHMVIEW_INT_H
#define PB_SHMVIEW_INT_H

#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "pb_shm.h"
#include "shmview.h"


#define HEARTBEAT_STALE_MS 5000     /* a live broker ticks far more often */
#define CLOCK_SLACK_MS     100      /* clients may stamp with CLOCK_MONOTONIC_COARSE */
#define MAX_TOTAL_SLOTS    ((uint64_t)PB_MAX_POOLS * PB_MAX_POOL_SLOTS)

/* Derived numbers that may be absent or impossible. */
#define V_NONE    (-1)              /* not applicable: text "-", JSON 0 */
#define V_UNKNOWN (-2)              /* impossible value in the segment: text "?", JSON null */

/* The part of a client record a view needs: who owns a slot. */
typedef struct client_ref {
    uint32_t id;                    /* current client id, 0 = free record */
    int32_t pid;
} client_ref;

/* A private copy of the segment's header and tables.  Only the header's
 * layout fields are validated; every record field is still untrusted. */
typedef struct snapshot {
    pb_shm_header hdr;
    pb_shm_pool *pools;             /* hdr.npools entries */
    pb_shm_slot *slots;             /* hdr.nslots entries */
    pb_shm_backend *backends;       /* hdr.nslots rows; a row copied torn (the broker kept
                                       rewriting it) has state PB_BACKEND_STATE_MAX */
    client_ref *clients;            /* hdr.max_clients entries */
    uint64_t mono_ms;               /* CLOCK_MONOTONIC when copied */
    uint64_t real_ms;               /* CLOCK_REALTIME when copied */
} snapshot;

typedef struct broker_view {
    int64_t pid;                    /* 0 after a clean stop, V_UNKNOWN when negative */
    uint32_t generation;
    const char *state;              /* NULL = impossible value */
    const char *io_backend;         /* NULL = impossible value */
    int alive;                      /* the pid exists (kill(pid, 0)) and the state is not stopped */
    int responding;                 /* alive, and the heartbeat is fresh */
    int64_t heartbeat_age_ms;       /* V_NONE before the first tick */
    int64_t uptime_ms;
    uint32_t clients_attached;
    uint32_t repairs;               /* scribbles the broker found and undid */
    /* The broker's work counters (header.work_*, see pb_shm.h), as stored by
     * its last janitor pass. */
    uint64_t loop_passes, scans, scan_words, scan_rings, sq_entries;
    uint64_t janitor_passes, sweep_records, sweep_rings;
} broker_view;

typedef struct pool_view {
    const pb_shm_pool *p;           /* counters are read straight from the copy */
    char name[PB_NAME_MAX];         /* sv_printable ASCII, NUL-terminated */
    char last_error[sizeof(((pb_shm_pool *)0)->last_error)];
    char server[PB_SERVER_MAX];     /* sv_printable ASCII: the server it is connected to now */
    const char *type, *health;      /* NULL = impossible value */
    int selected;                   /* passes -p */
    int64_t by_state[PB_SLOT_STATE_MAX]; /* slot counts, V_UNKNOWN when the range is bad */
    int64_t oldest_lease_ms;        /* V_NONE when nothing is leased */
    const char *mode;               /* "session", "transaction"; NULL = impossible value */
    int txn;                        /* transaction mode: the backend figures below apply */
    int64_t backends, bound, idle;  /* transaction mode: backend rows connected (any state but
                                       none), bound to a handle, idle; V_UNKNOWN: bad range */
} pool_view;

/* One transaction-mode backend connection (a row of the backend table). */
typedef struct backend_view {
    const char *pool;               /* pool name */
    uint32_t number;                /* its number in the pool (row - first_slot) */
    const char *state;              /* "connecting", "idle", "bound", "busy", "shared"; NULL: torn or impossible */
    int64_t handle;                 /* bound: the handle's slot index; else V_NONE */
    int64_t worker_pid;             /* bound: the pid holding that handle; V_NONE: none */
    int64_t backend_pid;            /* V_NONE when 0 */
    int64_t conn_age_ms;
    uint64_t uses;
    char server[PB_SERVER_MAX];     /* sv_printable ASCII */
} backend_view;

typedef struct slot_view {
    uint32_t index;                 /* position in the slot table */
    const char *pool;               /* pool name, NULL = impossible pool index */
    const char *state;              /* NULL = impossible state */
    int64_t owner_pid;              /* V_NONE: no owner; V_UNKNOWN: owner not a live client */
    int64_t lease_age_ms, conn_age_ms;
    int64_t backend_pid;            /* V_NONE when 0 */
    uint64_t uses;
    char command[PB_CMD_PREVIEW + 1]; /* sv_printable ASCII, "" without an owner */
} slot_view;

typedef struct view {
    const snapshot *s;
    broker_view broker;
    pool_view *pools;               /* s->hdr.npools entries */
    slot_view *slots;               /* only the slots to print */
    uint32_t nslots;
    backend_view *backends;         /* only the backends to print (connected, selected pools) */
    uint32_t nbackends;
} view;

/* What shmview_load hands out: the copy, its view, and the segment's name. */
struct shmview {
    snapshot s;
    view v;                         /* v.s points at s */
    char *shm_name;                 /* as given to shmview_load */
};

/* Names of enum values, NULL for an impossible one (shmview_load.c). */
const char *sv_slot_state_name(unsigned st);
const char *sv_broker_state_name(uint32_t st);
const char *sv_pool_type_name(uint32_t t);
const char *sv_health_name(uint32_t h);
const char *sv_io_backend_name(uint32_t b);
const char *sv_pool_mode_name(uint32_t m);
const char *sv_backend_state_name(uint32_t st);
/* Helpers (shmview_load.c). */
uint64_t sv_clock_ms(clockid_t clk);
int64_t sv_age_ms(uint64_t now, uint64_t then);
void sv_printable(char *dst, const void *src, size_t n);
int sv_range_ok(uint64_t off, uint64_t count, uint64_t elem, uint64_t size);
const char *sv_fmt_age(char *buf, size_t n, int64_t ms);
const char *sv_fmt_num(char *buf, size_t n, int64_t v);

#endif /* PB_SHMVIEW_INT_H */
