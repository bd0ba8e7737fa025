/*
 * shmview.c — read a poolbroker shared-memory segment and render it (see
 * shmview.h): the reading and printing half of shmstat, shared with the
 * broker's /metrics and /health endpoint (broker/metrics.c).
 *
 * The segment is untrusted input.  Clients map it read-write, so any byte may
 * be garbage, and it may change (or shrink) while we read it.  So we copy the
 * header, validate it, then copy the tables into private memory (under a
 * SIGBUS guard, when the program asked for one) and work only on those
 * copies: nothing validated can change afterwards.  The header's layout
 * fields must be sane or the segment is refused; record fields that are
 * impossible print as "?" (null in JSON).  Strings are read with bounded
 * length and printed as printable ASCII only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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
} broker_view;

typedef struct pool_view {
    const pb_shm_pool *p;           /* counters are read straight from the copy */
    char name[PB_NAME_MAX];         /* printable ASCII, NUL-terminated */
    char last_error[sizeof(((pb_shm_pool *)0)->last_error)];
    const char *type, *health;      /* NULL = impossible value */
    int selected;                   /* passes -p */
    int64_t by_state[PB_SLOT_STATE_MAX]; /* slot counts, V_UNKNOWN when the range is bad */
    int64_t oldest_lease_ms;        /* V_NONE when nothing is leased */
} pool_view;

typedef struct slot_view {
    uint32_t index;                 /* position in the slot table */
    const char *pool;               /* pool name, NULL = impossible pool index */
    const char *state;              /* NULL = impossible state */
    int64_t owner_pid;              /* V_NONE: no owner; V_UNKNOWN: owner not a live client */
    int64_t lease_age_ms, conn_age_ms;
    int64_t backend_pid;            /* V_NONE when 0 */
    uint64_t uses;
    char command[PB_CMD_PREVIEW + 1]; /* printable ASCII, "" without an owner */
} slot_view;

typedef struct view {
    const snapshot *s;
    broker_view broker;
    pool_view *pools;               /* s->hdr.npools entries */
    slot_view *slots;               /* only the slots to print */
    uint32_t nslots;
} view;

/* What shmview_load hands out: the copy, its view, and the segment's name. */
struct shmview {
    snapshot s;
    view v;                         /* v.s points at s */
    char *shm_name;                 /* as given to shmview_load */
};

/* ------------------------------------------------------------ names
 * Each returns the lower-case name of an enum value, or NULL for a value
 * outside the enum (printed as "?" or null). */

static const char *slot_state_name(unsigned st)
{
    static const char *const names[PB_SLOT_STATE_MAX] = {
        "empty", "connecting", "free", "leased", "releasing",
        "resetting", "reclaiming", "broken", "closing",
    };
    return st < PB_SLOT_STATE_MAX ? names[st] : NULL;
}

static const char *broker_state_name(uint32_t st)
{
    static const char *const names[] = { "starting", "running", "draining", "stopped" };
    return st < sizeof names / sizeof names[0] ? names[st] : NULL;
}

static const char *pool_type_name(uint32_t t)
{
    return t == PB_POOL_POSTGRES ? "postgres" : t == PB_POOL_REDIS ? "redis" : NULL;
}

static const char *health_name(uint32_t h)
{
    static const char *const names[] = { "healthy", "degraded", "down", "removed" };
    return h < sizeof names / sizeof names[0] ? names[h] : NULL;
}

static const char *io_backend_name(uint32_t b)
{
    static const char *const names[] = { "none", "io_uring", "epoll" };
    return b < sizeof names / sizeof names[0] ? names[b] : NULL;
}

/* ------------------------------------------------------------ helpers */

static uint64_t clock_ms(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Milliseconds from then to now; V_NONE when then is 0 (never stamped),
 * V_UNKNOWN when then lies in the future beyond clock slack. */
static int64_t age_ms(uint64_t now, uint64_t then)
{
    if (then == 0)
        return V_NONE;
    if (then > now)
        return then - now <= CLOCK_SLACK_MS ? 0 : V_UNKNOWN;
    uint64_t d = now - then;
    return d > INT64_MAX ? V_UNKNOWN : (int64_t)d;
}

/* Copy at most n bytes of src (which need not be NUL-terminated) into dst
 * (n + 1 bytes), stopping at a NUL and replacing every byte that is not
 * printable ASCII with '.'. */
static void printable(char *dst, const void *src, size_t n)
{
    const unsigned char *s = src;
    size_t i;
    for (i = 0; i < n && s[i]; i++)
        dst[i] = s[i] >= 0x20 && s[i] < 0x7f ? (char)s[i] : '.';
    dst[i] = '\0';
}

/* Whether [off, off + count * elem) lies inside size bytes, without overflow. */
static int range_ok(uint64_t off, uint64_t count, uint64_t elem, uint64_t size)
{
    return off <= size && count <= (size - off) / elem;
}

/* Format a duration compactly ("850ms", "12.3s", "5m03s", "1h02m", "3d04h"),
 * or "-" / "?" for V_NONE / V_UNKNOWN. */
static const char *fmt_age(char *buf, size_t n, int64_t ms)
{
    if (ms == V_NONE)
        return "-";
    if (ms < 0)
        return "?";
    uint64_t s = (uint64_t)ms / 1000;
    if (ms < 1000)
        snprintf(buf, n, "%" PRId64 "ms", ms);
    else if (s < 60)
        snprintf(buf, n, "%" PRIu64 ".%" PRIu64 "s", s, (uint64_t)ms % 1000 / 100);
    else if (s < 3600)
        snprintf(buf, n, "%" PRIu64 "m%02" PRIu64 "s", s / 60, s % 60);
    else if (s < 86400)
        snprintf(buf, n, "%" PRIu64 "h%02" PRIu64 "m", s / 3600, s / 60 % 60);
    else
        snprintf(buf, n, "%" PRIu64 "d%02" PRIu64 "h", s / 86400, s / 3600 % 24);
    return buf;
}

/* Format an optional number: "-" for V_NONE, "?" for V_UNKNOWN. */
static const char *fmt_num(char *buf, size_t n, int64_t v)
{
    if (v == V_NONE)
        return "-";
    if (v < 0)
        return "?";
    snprintf(buf, n, "%" PRId64, v);
    return buf;
}

/* ------------------------------------------------------------ reading the segment */

/* The SIGBUS guard (see shmview_catch_sigbus).  The jump buffer and the
 * armed flag are per thread: a SIGBUS from a memory access is delivered to
 * the thread that faulted, so a handler running on it jumps back into that
 * thread's own copy.  (Thread-local storage of an executable is static TLS,
 * which a signal handler may use.)  bus_guard is set once, before threads. */
static _Thread_local sigjmp_buf bus_jmp;
static _Thread_local volatile sig_atomic_t bus_armed;
static int bus_guard;               /* the handler is installed */

/* SIGBUS: the segment shrank under us (someone truncated it).  Abandon the
 * copy in progress; outside a copy it is a real fault, so die of it. */
static void on_sigbus(int sig)
{
    if (bus_armed)
        siglongjmp(bus_jmp, 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

int shmview_catch_sigbus(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigbus;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, NULL) < 0)
        return -errno;
    bus_guard = 1;
    return 0;
}

/* Run fn(arg), which reads the mapping; returns 0, or -1 when a read faulted
 * with SIGBUS.  fn must not allocate or take locks.  Without the handler
 * installed it simply runs fn: a fault then kills the process, as it would
 * have anyway. */
static int guarded(void (*fn)(void *), void *arg)
{
    if (!bus_guard) {
        fn(arg);
        return 0;
    }
    if (sigsetjmp(bus_jmp, 1)) {
        bus_armed = 0;
        return -1;
    }
    bus_armed = 1;
    fn(arg);
    bus_armed = 0;
    return 0;
}

typedef struct copy_job {
    const char *base;               /* the mapping */
    snapshot *s;                    /* header already copied and validated */
} copy_job;

static void copy_header(void *arg)
{
    copy_job *j = arg;
    memcpy(&j->s->hdr, j->base, sizeof j->s->hdr);
}

static void copy_tables(void *arg)
{
    copy_job *j = arg;
    const pb_shm_header *h = &j->s->hdr;
    memcpy(j->s->pools, j->base + h->pool_off, (size_t)h->npools * sizeof(pb_shm_pool));
    memcpy(j->s->slots, j->base + h->slot_off, (size_t)h->nslots * sizeof(pb_shm_slot));
    for (uint32_t i = 0; i < h->max_clients; i++) {
        const char *rec = j->base + h->client_off + (uint64_t)i * sizeof(pb_shm_client);
        memcpy(&j->s->clients[i].id, rec + offsetof(pb_shm_client, id), sizeof(uint32_t));
        memcpy(&j->s->clients[i].pid, rec + offsetof(pb_shm_client, pid), sizeof(int32_t));
    }
}

/* Check the copied header of a segment of size bytes.  Returns 0, or
 * SHMVIEW_ELAYOUT with a message in err. */
static int check_header(const pb_shm_header *h, uint64_t size, char *err, size_t errlen)
{
    if (h->magic != PB_SHM_MAGIC) {
        snprintf(err, errlen, "not a poolbroker segment (bad magic)");
        return SHMVIEW_ELAYOUT;
    }
    if (h->version != PB_SHM_VERSION || h->fingerprint != PB_SHM_FINGERPRINT) {
        snprintf(err, errlen,
                 "segment layout version %" PRIu32 " (fingerprint 0x%08" PRIx32 "), shmstat built for %u "
                 "(fingerprint 0x%08" PRIx32 "): use the shmstat of the same poolbroker build",
                 h->version, h->fingerprint, PB_SHM_VERSION, (uint32_t)PB_SHM_FINGERPRINT);
        return SHMVIEW_ELAYOUT;
    }
    const char *bad = NULL;
    if (h->total_size > size)
        bad = "total size larger than the segment (truncated?)";
    else if (h->total_size < sizeof *h)
        bad = "total size smaller than the header";
    else if (h->npools > PB_MAX_POOLS)
        bad = "pool count above PB_MAX_POOLS";
    else if (h->max_clients > PB_MAX_CLIENTS)
        bad = "client count above PB_MAX_CLIENTS";
    else if (h->nslots > MAX_TOTAL_SLOTS)
        bad = "slot count above PB_MAX_POOLS * PB_MAX_POOL_SLOTS";
    else if (h->pool_off % PB_CACHELINE || h->client_off % PB_CACHELINE || h->slot_off % PB_CACHELINE)
        bad = "table offset not aligned to a cache line";
    else if (h->pool_off < sizeof *h || h->client_off < sizeof *h || h->slot_off < sizeof *h)
        bad = "table offset inside the header";
    else if (!range_ok(h->pool_off, h->npools, sizeof(pb_shm_pool), h->total_size))
        bad = "pool table outside the segment";
    else if (!range_ok(h->client_off, h->max_clients, sizeof(pb_shm_client), h->total_size))
        bad = "client table outside the segment";
    else if (!range_ok(h->slot_off, h->nslots, sizeof(pb_shm_slot), h->total_size))
        bad = "slot table outside the segment";
    if (bad) {
        snprintf(err, errlen, "corrupt segment header: %s", bad);
        return SHMVIEW_ELAYOUT;
    }
    return 0;
}

/* Free what snapshot_load allocated; safe on a zeroed or freed snapshot. */
static void snapshot_free(snapshot *s)
{
    free(s->pools);
    free(s->slots);
    free(s->clients);
    s->pools = NULL;
    s->slots = NULL;
    s->clients = NULL;
}

/* Allocate n elements of elem bytes aligned to a cache line (the shared
 * structs are _Alignas(PB_CACHELINE)); elem must be a multiple of it. */
static void *alloc_lines(size_t n, size_t elem)
{
    return aligned_alloc(PB_CACHELINE, (n ? n : 1) * elem);
}

/* Copy the segment called name into s.  Returns 0, or SHMVIEW_EOPEN or
 * SHMVIEW_ELAYOUT with a message in err. */
static int snapshot_load(const char *name, snapshot *s, char *err, size_t errlen)
{
    memset(s, 0, sizeof *s);
    int fd = shm_open(name, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot open shared memory segment %s: %s (%s)", name, strerror(e),
                 e == ENOENT ? "the broker creates it when it starts; is it running, with this shm_name?"
                 : e == EACCES ? "run as the broker's user, or a member of its group"
                               : "see shm_open(3)");
        return SHMVIEW_EOPEN;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        snprintf(err, errlen, "cannot stat shared memory segment %s: %s", name, strerror(errno));
        close(fd);
        return SHMVIEW_EOPEN;
    }
    if (st.st_size < (off_t)sizeof(pb_shm_header)) {
        snprintf(err, errlen, "%s: not a poolbroker segment (%lld bytes, smaller than the header)", name,
                 (long long)st.st_size);
        close(fd);
        return SHMVIEW_ELAYOUT;
    }
    uint64_t size = (uint64_t)st.st_size;
    void *base = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
    int map_errno = errno;
    close(fd);
    if (base == MAP_FAILED) {
        snprintf(err, errlen, "cannot map shared memory segment %s: %s", name, strerror(map_errno));
        return SHMVIEW_EOPEN;
    }

    int rc = 0;
    char why[256];
    copy_job job = { base, s };
    if (guarded(copy_header, &job) < 0) {
        snprintf(err, errlen, "%s: segment shrank while being read", name);
        rc = SHMVIEW_EOPEN;
    } else if ((rc = check_header(&s->hdr, size, why, sizeof why)) != 0) {
        snprintf(err, errlen, "%s: %s", name, why);
    } else {
        s->pools = alloc_lines(s->hdr.npools, sizeof(pb_shm_pool));
        s->slots = alloc_lines(s->hdr.nslots, sizeof(pb_shm_slot));
        s->clients = calloc(s->hdr.max_clients ? s->hdr.max_clients : 1, sizeof(client_ref));
        if (!s->pools || !s->slots || !s->clients) {
            snprintf(err, errlen, "out of memory copying %s", name);
            rc = SHMVIEW_EOPEN;
        } else if (guarded(copy_tables, &job) < 0) {
            snprintf(err, errlen, "%s: segment shrank while being read", name);
            rc = SHMVIEW_EOPEN;
        }
    }
    s->mono_ms = clock_ms(CLOCK_MONOTONIC);
    s->real_ms = clock_ms(CLOCK_REALTIME);
    munmap(base, (size_t)size);
    if (rc)
        snapshot_free(s);
    return rc;
}

/* ------------------------------------------------------------ interpreting it */

/* Whether the broker process named in h exists, by kill(pid, 0): EPERM means
 * it exists under another user.  Never signals a group (pid <= 0). */
static int pid_alive(int32_t pid)
{
    return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

static void broker_view_fill(broker_view *b, const snapshot *s)
{
    const pb_shm_header *h = &s->hdr;
    int32_t pid = h->broker_pid;
    b->pid = pid > 0 ? pid : pid == 0 ? 0 : V_UNKNOWN;
    b->generation = h->generation;
    b->state = broker_state_name(h->state);
    b->io_backend = io_backend_name(h->io_backend);
    b->alive = pid_alive(pid) && h->state != PB_BROKER_STOPPED;
    b->heartbeat_age_ms = age_ms(s->mono_ms, h->heartbeat_ms);
    b->uptime_ms = h->start_ms ? age_ms(s->real_ms, h->start_ms) : V_UNKNOWN;
    b->clients_attached = h->clients_attached;
    b->repairs = h->repairs;
    int starting = h->state == PB_BROKER_STARTING && b->heartbeat_age_ms == V_NONE;
    b->responding = b->alive && (starting || (b->heartbeat_age_ms >= 0 &&
                                              b->heartbeat_age_ms <= HEARTBEAT_STALE_MS));
}

/* The pid of the client whose id is owner: V_NONE for no owner, V_UNKNOWN
 * when no client record currently carries that id. */
static int64_t owner_pid(const snapshot *s, uint32_t owner)
{
    if (owner == 0)
        return V_NONE;
    uint32_t idx = PB_CLIENT_INDEX(owner);
    if (idx >= s->hdr.max_clients || s->clients[idx].id != owner || s->clients[idx].pid <= 0)
        return V_UNKNOWN;
    return s->clients[idx].pid;
}

/* Fill pool i's view: names, and slot counts by state from the slot words of
 * its range [first_slot, first_slot + slot_capacity). */
static void pool_view_fill(pool_view *pv, const snapshot *s, uint32_t i, const char *filter)
{
    const pb_shm_pool *p = &s->pools[i];
    pv->p = p;
    printable(pv->name, p->name, sizeof p->name - 1);
    printable(pv->last_error, p->last_error, sizeof p->last_error - 1);
    pv->type = pool_type_name(p->type);
    pv->health = health_name(p->health);
    pv->selected = !filter || (strnlen(p->name, sizeof p->name) == strlen(filter) &&
                               memcmp(p->name, filter, strlen(filter)) == 0);
    pv->oldest_lease_ms = V_NONE;

    uint64_t first = p->first_slot, cap = p->slot_capacity;
    int range_valid = cap <= PB_MAX_POOL_SLOTS && first <= s->hdr.nslots && cap <= s->hdr.nslots - first;
    for (unsigned st = 0; st < PB_SLOT_STATE_MAX; st++)
        pv->by_state[st] = range_valid ? 0 : V_UNKNOWN;
    if (!range_valid)
        return;
    for (uint64_t k = first; k < first + cap; k++) {
        const pb_shm_slot *sl = &s->slots[k];
        uint64_t w = sl->word;
        unsigned st = PB_WORD_STATE(w);
        if (st < PB_SLOT_STATE_MAX)
            pv->by_state[st]++;
        if (PB_WORD_OWNER(w) != 0) {
            int64_t age = age_ms(s->mono_ms, sl->lease_ms);
            if (age >= 0 && age > pv->oldest_lease_ms)
                pv->oldest_lease_ms = age;
        }
    }
}

static void slot_view_fill(slot_view *sv, const snapshot *s, const pool_view *pools, uint32_t i)
{
    const pb_shm_slot *sl = &s->slots[i];
    uint64_t w = sl->word;
    unsigned st = PB_WORD_STATE(w);
    uint32_t owner = PB_WORD_OWNER(w);
    sv->index = i;
    sv->pool = sl->pool < s->hdr.npools ? pools[sl->pool].name : NULL;
    sv->state = slot_state_name(st);
    sv->owner_pid = owner_pid(s, owner);
    sv->lease_age_ms = owner ? age_ms(s->mono_ms, sl->lease_ms) : V_NONE;
    sv->conn_age_ms = st == PB_SLOT_EMPTY ? V_NONE : age_ms(s->mono_ms, sl->conn_created_ms);
    sv->backend_pid = sl->backend_pid > 0 ? sl->backend_pid : sl->backend_pid == 0 ? V_NONE : V_UNKNOWN;
    sv->uses = sl->uses;
    if (owner)
        printable(sv->command, sl->preview, sizeof sl->preview);
    else
        sv->command[0] = '\0';
}

/* Build the view of s, restricted to pool filter when not NULL.  Returns 0,
 * -1 when out of memory, or SHMVIEW_ENOPOOL when filter names no pool. */
static int view_build(view *v, const snapshot *s, const char *filter)
{
    memset(v, 0, sizeof *v);
    v->s = s;
    broker_view_fill(&v->broker, s);
    v->pools = calloc(s->hdr.npools ? s->hdr.npools : 1, sizeof *v->pools);
    v->slots = calloc(s->hdr.nslots ? s->hdr.nslots : 1, sizeof *v->slots);
    if (!v->pools || !v->slots)
        return -1;
    int found = 0;
    for (uint32_t i = 0; i < s->hdr.npools; i++) {
        pool_view_fill(&v->pools[i], s, i, filter);
        found |= v->pools[i].selected;
    }
    if (filter && !found)
        return SHMVIEW_ENOPOOL;
    for (uint32_t i = 0; i < s->hdr.nslots; i++) {
        const pb_shm_slot *sl = &s->slots[i];
        if (PB_WORD_STATE(sl->word) == PB_SLOT_EMPTY)
            continue;               /* no connection: counted, not listed */
        if (filter && (sl->pool >= s->hdr.npools || !v->pools[sl->pool].selected))
            continue;
        slot_view_fill(&v->slots[v->nslots++], s, v->pools, i);
    }
    return 0;
}

static void view_free(view *v)
{
    free(v->pools);
    free(v->slots);
    v->pools = NULL;
    v->slots = NULL;
}

/* ------------------------------------------------------------ text output */

static void text_broker(FILE *out, const char *shm_name, const broker_view *b)
{
    char age[32];
    fprintf(out, "segment %s: ", shm_name);
    if (!b->alive) {
        if (b->pid == 0)
            fputs("broker", out);
        else if (b->pid < 0)
            fputs("broker pid ?:", out);
        else
            fprintf(out, "broker pid %" PRId64 ":", b->pid);
        fprintf(out, " not running (%ssegment left from generation %" PRIu32 ")\n",
                b->state && strcmp(b->state, "stopped") == 0 ? "stopped cleanly, " : "", b->generation);
        return;
    }
    fprintf(out, "broker pid %" PRId64 " (%s, gen %" PRIu32 ", %s) ", b->pid, b->state ? b->state : "?",
            b->generation, b->io_backend ? b->io_backend : "?");
    if (b->responding)
        fprintf(out, "up %s", fmt_age(age, sizeof age, b->uptime_ms));
    else if (b->heartbeat_age_ms >= 0)
        fprintf(out, "not responding (heartbeat %" PRId64 " s old)", b->heartbeat_age_ms / 1000);
    else
        fprintf(out, "not responding (heartbeat %s)", b->heartbeat_age_ms == V_NONE ? "never" : "?");
    fprintf(out, ", %" PRIu32 " client%s attached", b->clients_attached, b->clients_attached == 1 ? "" : "s");
    if (b->repairs)
        fprintf(out, ", %" PRIu32 " segment repair%s (see the broker log)", b->repairs, b->repairs == 1 ? "" : "s");
    fputc('\n', out);
}

/* Width of the pool-name column: the longest selected name, at least 4. */
static int name_width(const view *v)
{
    size_t w = 4;
    for (uint32_t i = 0; i < v->s->hdr.npools; i++)
        if (v->pools[i].selected && strlen(v->pools[i].name) > w)
            w = strlen(v->pools[i].name);
    return (int)w;
}

static void text_pools(FILE *out, const view *v)
{
    char n[12][24];
    int nw = name_width(v);
    fprintf(out, "\n%-*s %-8s %-8s %5s %5s %5s %5s %6s %4s %6s %10s %8s %8s %7s %8s\n", nw, "POOL", "TYPE", "HEALTH",
            "SIZE", "MIN", "MAX", "FREE", "LEASED", "WAIT", "BROKEN", "ACQUIRES", "WAITS", "TIMEOUTS", "ERRORS",
            "RECLAIMS");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        const pb_shm_pool *p = pv->p;
        if (!pv->selected)
            continue;
        fprintf(out, "%-*s %-8s %-8s %5" PRIu32 " %5" PRIu32 " %5" PRIu32 " %5s %6s %4" PRIu32 " %6s %10" PRIu64
                " %8" PRIu64 " %8" PRIu64 " %7" PRIu64 " %8" PRIu64 "\n",
                nw, pv->name, pv->type ? pv->type : "?", pv->health ? pv->health : "?", (uint32_t)p->size,
                (uint32_t)p->min_size, (uint32_t)p->max_size,
                fmt_num(n[0], sizeof n[0], pv->by_state[PB_SLOT_FREE]),
                fmt_num(n[1], sizeof n[1], pv->by_state[PB_SLOT_LEASED]), (uint32_t)p->nwaiters,
                fmt_num(n[2], sizeof n[2], pv->by_state[PB_SLOT_BROKEN]), (uint64_t)p->acquires,
                (uint64_t)p->waits, (uint64_t)p->timeouts, (uint64_t)p->errors, (uint64_t)p->reclaims);
        if (pv->last_error[0])
            fprintf(out, "  %s last error: %s\n", pv->name, pv->last_error);
    }
}

static void text_slots(FILE *out, const view *v)
{
    char owner[24], lease[24], conn[24], backend[24];
    if (v->nslots == 0) {
        fprintf(out, "\nno connections\n");
        return;
    }
    int nw = name_width(v);
    fprintf(out, "\n%-*s %5s %-10s %8s %9s %8s %10s %9s  %s\n", nw, "POOL", "SLOT", "STATE", "OWNER", "LEASE_AGE",
            "USES", "BACKEND", "CONN_AGE", "COMMAND");
    for (uint32_t i = 0; i < v->nslots; i++) {
        const slot_view *sv = &v->slots[i];
        fprintf(out, "%-*s %5" PRIu32 " %-10s %8s %9s %8" PRIu64 " %10s %9s  %s\n", nw, sv->pool ? sv->pool : "?",
                sv->index, sv->state ? sv->state : "?", fmt_num(owner, sizeof owner, sv->owner_pid),
                fmt_age(lease, sizeof lease, sv->lease_age_ms), sv->uses,
                fmt_num(backend, sizeof backend, sv->backend_pid), fmt_age(conn, sizeof conn, sv->conn_age_ms),
                sv->command);
    }
}

void shmview_print_text(FILE *out, const shmview *sv)
{
    const view *v = &sv->v;
    text_broker(out, sv->shm_name, &v->broker);
    text_pools(out, v);
    text_slots(out, v);
}

/* ------------------------------------------------------------ JSON output */

void shmview_json_str(FILE *out, const char *s)
{
    if (!s) {
        fputs("null", out);
        return;
    }
    fputc('"', out);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(out, "\\%c", *c);
        else if (*c < 0x20 || *c >= 0x7f)
            fprintf(out, "\\u%04x", *c);
        else
            fputc(*c, out);
    }
    fputc('"', out);
}

/* An optional number in JSON: V_NONE as 0, V_UNKNOWN as null. */
static void json_num(FILE *out, int64_t v)
{
    if (v == V_NONE)
        fputs("0", out);
    else if (v < 0)
        fputs("null", out);
    else
        fprintf(out, "%" PRId64, v);
}

static void json_broker(FILE *out, const broker_view *b)
{
    fputs("\"broker\": {\"pid\": ", out);
    json_num(out, b->pid);
    fprintf(out, ", \"generation\": %" PRIu32 ", \"state\": ", b->generation);
    shmview_json_str(out, b->state);
    fputs(", \"io_backend\": ", out);
    shmview_json_str(out, b->io_backend);
    fprintf(out, ", \"alive\": %s, \"responding\": %s, \"heartbeat_age_ms\": ", b->alive ? "true" : "false",
            b->responding ? "true" : "false");
    json_num(out, b->heartbeat_age_ms == V_NONE ? V_UNKNOWN : b->heartbeat_age_ms);
    fputs(", \"uptime_ms\": ", out);
    json_num(out, b->uptime_ms);
    fprintf(out, ", \"clients_attached\": %" PRIu32 ", \"segment_repairs\": %" PRIu32 "}", b->clients_attached,
            b->repairs);
}

static void json_pool(FILE *out, const pool_view *pv)
{
    const pb_shm_pool *p = pv->p;
    fputs("{\"name\": ", out);
    shmview_json_str(out, pv->name);
    fputs(", \"type\": ", out);
    shmview_json_str(out, pv->type);
    fputs(", \"health\": ", out);
    shmview_json_str(out, pv->health);
    fprintf(out, ", \"size\": %" PRIu32 ", \"min_size\": %" PRIu32 ", \"max_size\": %" PRIu32 ", \"free\": ",
            (uint32_t)p->size, (uint32_t)p->min_size, (uint32_t)p->max_size);
    json_num(out, pv->by_state[PB_SLOT_FREE]);
    fputs(", \"leased\": ", out);
    json_num(out, pv->by_state[PB_SLOT_LEASED]);
    fprintf(out, ", \"waiting\": %" PRIu32 ", \"broken\": ", (uint32_t)p->nwaiters);
    json_num(out, pv->by_state[PB_SLOT_BROKEN]);
    fprintf(out, ", \"acquires\": %" PRIu64 ", \"waits\": %" PRIu64 ", \"timeouts\": %" PRIu64
            ", \"errors\": %" PRIu64 ", \"reclaims\": %" PRIu64 ", \"resets\": %" PRIu64
            ", \"connects\": %" PRIu64 ", \"connect_failures\": %" PRIu64 ", \"handoffs\": %" PRIu64
            ", \"wakeups\": %" PRIu64 ", \"leaks\": %" PRIu64 ", \"last_error\": ",
            (uint64_t)p->acquires, (uint64_t)p->waits, (uint64_t)p->timeouts, (uint64_t)p->errors,
            (uint64_t)p->reclaims, (uint64_t)p->resets, (uint64_t)p->connects, (uint64_t)p->connect_failures,
            (uint64_t)p->handoffs, (uint64_t)p->wakeups, (uint64_t)p->leaks);
    shmview_json_str(out, pv->last_error);
    fputc('}', out);
}

static void json_slot(FILE *out, const slot_view *sv)
{
    fputs("{\"pool\": ", out);
    shmview_json_str(out, sv->pool);
    fprintf(out, ", \"index\": %" PRIu32 ", \"state\": ", sv->index);
    shmview_json_str(out, sv->state);
    fputs(", \"owner_pid\": ", out);
    json_num(out, sv->owner_pid);
    fputs(", \"lease_age_ms\": ", out);
    json_num(out, sv->lease_age_ms);
    fprintf(out, ", \"uses\": %" PRIu64 ", \"backend_pid\": ", sv->uses);
    json_num(out, sv->backend_pid);
    fputs(", \"conn_age_ms\": ", out);
    json_num(out, sv->conn_age_ms);
    fputs(", \"command\": ", out);
    shmview_json_str(out, sv->command);
    fputc('}', out);
}

/* One JSON object on one line (a stream of lines under shmstat -w). */
void shmview_print_json(FILE *out, const shmview *sv)
{
    const view *v = &sv->v;
    fputc('{', out);
    json_broker(out, &v->broker);
    fputs(", \"pools\": [", out);
    int first = 1;
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        if (!v->pools[i].selected)
            continue;
        fputs(first ? "" : ", ", out);
        json_pool(out, &v->pools[i]);
        first = 0;
    }
    fputs("], \"slots\": [", out);
    for (uint32_t i = 0; i < v->nslots; i++) {
        fputs(i ? ", " : "", out);
        json_slot(out, &v->slots[i]);
    }
    fputs("]}\n", out);
}

/* ------------------------------------------------------------ Prometheus output */

static void prom_head(FILE *out, const char *name, const char *type, const char *help)
{
    fprintf(out, "# HELP poolbroker_%s %s\n# TYPE poolbroker_%s %s\n", name, help, name, type);
}

/* Whether pool pv appears in Prometheus output: selected, and not removed
 * (a removed pool's entry stays in the table, and a pool re-added under the
 * same name would otherwise make duplicate series). */
static int prom_shown(const pool_view *pv)
{
    return pv->selected && pv->p->health != PB_HEALTH_REMOVED;
}

/* A pool name is printable ASCII already; escape what the label syntax needs. */
static void prom_label(FILE *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fputc('\\', out);
        fputc(*s, out);
    }
}

/* One sample per selected pool of a gauge or counter; samples whose value is
 * V_UNKNOWN are left out (Prometheus has no "unknown"). */
static void prom_pool_metric(FILE *out, const view *v, const char *name, const char *type, const char *help,
                             int64_t (*get)(const pool_view *))
{
    prom_head(out, name, type, help);
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        int64_t val = prom_shown(pv) ? get(pv) : V_UNKNOWN;
        if (val == V_UNKNOWN)
            continue;
        fprintf(out, "poolbroker_%s{pool=\"", name);
        prom_label(out, pv->name);
        fprintf(out, "\"} %" PRId64 "\n", val == V_NONE ? 0 : val);
    }
}

/* Counters are 64-bit; a garbage value above INT64_MAX is reported as unknown. */
#define CLAMP_U64(x) ((uint64_t)(x) > (uint64_t)INT64_MAX ? (int64_t)V_UNKNOWN : (int64_t)(uint64_t)(x))
#define POOL_GETTER(fn, expr) \
    static int64_t fn(const pool_view *pv) { return (expr); }
POOL_GETTER(get_size, (int64_t)pv->p->size)
POOL_GETTER(get_min, (int64_t)pv->p->min_size)
POOL_GETTER(get_max, (int64_t)pv->p->max_size)
POOL_GETTER(get_free, pv->by_state[PB_SLOT_FREE])
POOL_GETTER(get_leased, pv->by_state[PB_SLOT_LEASED])
POOL_GETTER(get_broken, pv->by_state[PB_SLOT_BROKEN])
POOL_GETTER(get_waiting, (int64_t)pv->p->nwaiters)
POOL_GETTER(get_oldest, pv->oldest_lease_ms == V_NONE ? 0 : pv->oldest_lease_ms / 1000)
POOL_GETTER(get_acquires, CLAMP_U64(pv->p->acquires))
POOL_GETTER(get_waits, CLAMP_U64(pv->p->waits))
POOL_GETTER(get_timeouts, CLAMP_U64(pv->p->timeouts))
POOL_GETTER(get_errors, CLAMP_U64(pv->p->errors))
POOL_GETTER(get_reclaims, CLAMP_U64(pv->p->reclaims))
POOL_GETTER(get_resets, CLAMP_U64(pv->p->resets))
POOL_GETTER(get_connects, CLAMP_U64(pv->p->connects))
POOL_GETTER(get_connfail, CLAMP_U64(pv->p->connect_failures))
POOL_GETTER(get_handoffs, CLAMP_U64(pv->p->handoffs))
POOL_GETTER(get_wakeups, CLAMP_U64(pv->p->wakeups))
POOL_GETTER(get_leaks, CLAMP_U64(pv->p->leaks))
POOL_GETTER(get_retired, CLAMP_U64(pv->p->retired))

/* A pb_hist as a Prometheus histogram in seconds: bucket i's upper bound is
 * 16 µs * 2^i, the last is +Inf; counts are cumulative (saturating).  The
 * +Inf bucket and _count are both the sum of the buckets, so they agree even
 * when the histogram was being updated while we copied it. */
static void prom_hist(FILE *out, const view *v, const char *name, const char *help, size_t field)
{
    prom_head(out, name, "histogram", help);
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!prom_shown(pv))
            continue;
        const pb_hist *h = (const pb_hist *)((const char *)pv->p + field);
        uint64_t cum = 0;
        for (unsigned b = 0; b < PB_HIST_BUCKETS; b++) {
            uint64_t n = h->bucket[b];
            cum = cum + n < cum ? UINT64_MAX : cum + n;     /* garbage must not wrap */
            fprintf(out, "poolbroker_%s_bucket{pool=\"", name);
            prom_label(out, pv->name);
            if (b + 1 < PB_HIST_BUCKETS)
                fprintf(out, "\",le=\"%.6f\"} %" PRIu64 "\n", 16e-6 * (double)(1u << b), cum);
            else
                fprintf(out, "\",le=\"+Inf\"} %" PRIu64 "\n", cum);
        }
        uint64_t sum_us = h->sum_us;
        fprintf(out, "poolbroker_%s_sum{pool=\"", name);
        prom_label(out, pv->name);
        fprintf(out, "\"} %" PRIu64 ".%06" PRIu64 "\n", sum_us / 1000000, sum_us % 1000000);
        fprintf(out, "poolbroker_%s_count{pool=\"", name);
        prom_label(out, pv->name);
        fprintf(out, "\"} %" PRIu64 "\n", cum);
    }
}

static void prom_broker(FILE *out, const view *v, unsigned flags)
{
    const broker_view *b = &v->broker;
    prom_head(out, "broker_up", "gauge", "1 when the broker process is alive and its heartbeat is fresh.");
    fprintf(out, "poolbroker_broker_up %d\n", b->responding);
    prom_head(out, "broker_info", "gauge", "Broker state and I/O backend (value always 1).");
    fprintf(out, "poolbroker_broker_info{state=\"%s\",io_backend=\"%s\"} 1\n", b->state ? b->state : "unknown",
            b->io_backend ? b->io_backend : "unknown");
    prom_head(out, "broker_generation", "gauge", "Broker start count for this segment name.");
    fprintf(out, "poolbroker_broker_generation %" PRIu32 "\n", b->generation);
    if (b->heartbeat_age_ms >= 0) {
        prom_head(out, "broker_heartbeat_age_seconds", "gauge", "Seconds since the broker's loop last ticked.");
        fprintf(out, "poolbroker_broker_heartbeat_age_seconds %" PRId64 ".%03" PRId64 "\n",
                b->heartbeat_age_ms / 1000, b->heartbeat_age_ms % 1000);
    }
    if (v->s->hdr.start_ms) {
        prom_head(out, "broker_start_time_seconds", "gauge", "Broker start time, seconds since the epoch.");
        fprintf(out, "poolbroker_broker_start_time_seconds %" PRIu64 "\n", v->s->hdr.start_ms / 1000);
    }
    prom_head(out, "broker_clients_attached", "gauge", "Worker processes attached to the broker.");
    fprintf(out, "poolbroker_broker_clients_attached %" PRIu32 "\n", b->clients_attached);
    prom_head(out, "segment_repairs_total", "counter",
              "Things a worker wrote into shared memory that the broker found impossible and undid.");
    fprintf(out, "poolbroker_segment_repairs_total %" PRIu32 "\n", b->repairs);
    if ((flags & SHMVIEW_PROM_UPTIME) && b->uptime_ms >= 0) {
        prom_head(out, "uptime_seconds", "gauge", "Seconds since the broker started.");
        fprintf(out, "poolbroker_uptime_seconds %" PRId64 ".%03" PRId64 "\n", b->uptime_ms / 1000,
                b->uptime_ms % 1000);
    }
}

static void prom_pool_info(FILE *out, const view *v)
{
    prom_head(out, "pool_info", "gauge", "Pool type and health (value always 1).");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!prom_shown(pv))
            continue;
        fputs("poolbroker_pool_info{pool=\"", out);
        prom_label(out, pv->name);
        fprintf(out, "\",type=\"%s\",health=\"%s\"} 1\n", pv->type ? pv->type : "unknown",
                pv->health ? pv->health : "unknown");
    }
    prom_head(out, "pool_slots", "gauge", "Slots of the pool by state.");
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        for (unsigned st = 0; st < PB_SLOT_STATE_MAX && prom_shown(pv); st++) {
            if (pv->by_state[st] < 0)
                continue;
            fputs("poolbroker_pool_slots{pool=\"", out);
            prom_label(out, pv->name);
            fprintf(out, "\",state=\"%s\"} %" PRId64 "\n", slot_state_name(st), pv->by_state[st]);
        }
    }
}

void shmview_print_prometheus(FILE *out, const shmview *sv, unsigned flags)
{
    const view *v = &sv->v;
    static const struct {
        const char *name, *type, *help;
        int64_t (*get)(const pool_view *);
    } metrics[] = {
        { "pool_size", "gauge", "Live connections of the pool.", get_size },
        { "pool_min_size", "gauge", "Configured minimum connections.", get_min },
        { "pool_max_size", "gauge", "Configured maximum connections.", get_max },
        { "pool_free", "gauge", "Idle connections ready to lease.", get_free },
        { "pool_leased", "gauge", "Connections leased by a worker.", get_leased },
        { "pool_broken", "gauge", "Connections lost, waiting to reconnect.", get_broken },
        { "pool_waiting", "gauge", "Workers queued for a connection.", get_waiting },
        { "pool_oldest_lease_seconds", "gauge", "Age of the oldest current lease (0 when none).", get_oldest },
        { "pool_acquires_total", "counter", "Leases granted.", get_acquires },
        { "pool_waits_total", "counter", "Acquires that had to wait.", get_waits },
        { "pool_timeouts_total", "counter", "Acquires that timed out.", get_timeouts },
        { "pool_errors_total", "counter", "Backend errors.", get_errors },
        { "pool_reclaims_total", "counter", "Leases taken back from dead or overstaying workers.", get_reclaims },
        { "pool_resets_total", "counter", "Connection resets after release.", get_resets },
        { "pool_connects_total", "counter", "Backend connections opened.", get_connects },
        { "pool_connect_failures_total", "counter", "Backend connection attempts that failed.", get_connfail },
        { "pool_handoffs_total", "counter", "Slots handed straight to a waiting worker.", get_handoffs },
        { "pool_wakeups_total", "counter", "Waiting workers woken.", get_wakeups },
        { "pool_leaks_total", "counter", "Leases held past the leak threshold.", get_leaks },
        { "pool_retired_total", "counter", "Connections retired (lifetime, uses, idle).", get_retired },
    };
    prom_broker(out, v, flags);
    prom_pool_info(out, v);
    for (size_t i = 0; i < sizeof metrics / sizeof metrics[0]; i++)
        prom_pool_metric(out, v, metrics[i].name, metrics[i].type, metrics[i].help, metrics[i].get);
    prom_hist(out, v, "pool_acquire_wait_seconds", "Time acquires spent waiting for a slot.",
              offsetof(pb_shm_pool, acquire_wait));
    prom_hist(out, v, "pool_command_latency_seconds", "Command round trip as seen by the worker.",
              offsetof(pb_shm_pool, command_latency));
}

/* ------------------------------------------------------------ health */

/* One entry of "reasons", comma-separated from the ones before it. */
static void health_reason(FILE *out, int *n, const char *msg)
{
    fputs((*n)++ ? ", " : "", out);
    shmview_json_str(out, msg);
}

/* Whether the broker itself is well: alive, running (not starting or
 * draining) and its loop ticking. */
static int broker_healthy(const broker_view *b)
{
    return b->responding && b->state && strcmp(b->state, "running") == 0;
}

/* Whether pool pv counts for health: selected and not removed. */
static int health_counts(const pool_view *pv)
{
    return pv->selected && pv->p->health != PB_HEALTH_REMOVED;
}

int shmview_health_json(FILE *out, const shmview *sv)
{
    const view *v = &sv->v;
    const broker_view *b = &v->broker;
    int healthy = broker_healthy(b);
    for (uint32_t i = 0; i < v->s->hdr.npools; i++)
        if (health_counts(&v->pools[i]) && v->pools[i].p->health != PB_HEALTH_HEALTHY)
            healthy = 0;

    fprintf(out, "{\"status\": \"%s\", \"broker\": {\"pid\": ", healthy ? "ok" : "degraded");
    json_num(out, b->pid);
    fputs(", \"state\": ", out);
    shmview_json_str(out, b->state);
    fputs(", \"io_backend\": ", out);
    shmview_json_str(out, b->io_backend);
    fprintf(out, ", \"responding\": %s, \"uptime_ms\": ", b->responding ? "true" : "false");
    json_num(out, b->uptime_ms);
    fprintf(out, ", \"clients_attached\": %" PRIu32 "}, \"pools\": [", b->clients_attached);
    int first = 1;
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!health_counts(pv))
            continue;
        fputs(first ? "{\"name\": " : ", {\"name\": ", out);
        shmview_json_str(out, pv->name);
        fputs(", \"type\": ", out);
        shmview_json_str(out, pv->type);
        fputs(", \"health\": ", out);
        shmview_json_str(out, pv->health);
        fprintf(out, ", \"size\": %" PRIu32 ", \"last_error\": ", (uint32_t)pv->p->size);
        shmview_json_str(out, pv->last_error);
        fputc('}', out);
        first = 0;
    }

    fputs("], \"reasons\": [", out);
    int n = 0;
    char msg[sizeof v->pools[0].last_error + PB_NAME_MAX + 64], age[32];
    if (!b->alive) {
        health_reason(out, &n, "broker is not running");
    } else if (!broker_healthy(b)) {
        if (!b->responding)
            snprintf(msg, sizeof msg, "broker is not responding (heartbeat %s old)",
                     fmt_age(age, sizeof age, b->heartbeat_age_ms));
        else
            snprintf(msg, sizeof msg, "broker is %s", b->state ? b->state : "in an unknown state");
        health_reason(out, &n, msg);
    }
    for (uint32_t i = 0; i < v->s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!health_counts(pv) || pv->p->health == PB_HEALTH_HEALTHY)
            continue;
        snprintf(msg, sizeof msg, "pool '%s' is %s%s%s", pv->name, pv->health ? pv->health : "in an unknown state",
                 pv->last_error[0] ? ": " : "", pv->last_error);
        health_reason(out, &n, msg);
    }
    fputs("]}\n", out);
    return healthy;
}

/* ------------------------------------------------------------ loading */

int shmview_load(const char *shm_name, const char *pool, shmview **out, char *err, size_t errlen)
{
    *out = NULL;
    shmview *sv = calloc(1, sizeof *sv);
    if (!sv || !(sv->shm_name = strdup(shm_name))) {
        free(sv);
        snprintf(err, errlen, "out of memory");
        return SHMVIEW_EOPEN;
    }
    int rc = snapshot_load(shm_name, &sv->s, err, errlen);
    if (rc) {
        free(sv->shm_name);
        free(sv);
        return rc;
    }
    rc = view_build(&sv->v, &sv->s, pool);
    if (rc < 0) {
        snprintf(err, errlen, "out of memory");
        rc = SHMVIEW_EOPEN;
    } else if (rc == SHMVIEW_ENOPOOL) {
        snprintf(err, errlen, "no pool named '%s' in segment %s", pool, shm_name);
    }
    if (rc) {
        shmview_free(sv);
        return rc;
    }
    *out = sv;
    return SHMVIEW_OK;
}

void shmview_free(shmview *sv)
{
    if (!sv)
        return;
    view_free(&sv->v);
    snapshot_free(&sv->s);
    free(sv->shm_name);
    free(sv);
}
