/*
 * shmview_load.c — read a poolbroker shared-memory segment into a view (see
 * shmview.h): the loading half of shmstat, shared with the broker's /metrics
 * and /health endpoint (broker/metrics.c).  The renderings are
 * shmview_text.c, shmview_json.c (with the health report) and
 * shmview_prom.c.
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
#include "shmview_int.h"

/* ------------------------------------------------------------ names
 * Each returns the lower-case name of an enum value, or NULL for a value
 * outside the enum (printed as "?" or null). */

const char *sv_slot_state_name(unsigned st)
{
    static const char *const names[PB_SLOT_STATE_MAX] = {
        "empty", "connecting", "free", "leased", "releasing",
        "resetting", "reclaiming", "broken", "closing",
    };
    return st < PB_SLOT_STATE_MAX ? names[st] : NULL;
}

const char *sv_broker_state_name(uint32_t st)
{
    static const char *const names[] = { "starting", "running", "draining", "stopped" };
    return st < sizeof names / sizeof names[0] ? names[st] : NULL;
}

const char *sv_pool_type_name(uint32_t t)
{
    return t == PB_POOL_POSTGRES ? "postgres" : t == PB_POOL_REDIS ? "redis" : NULL;
}

const char *sv_health_name(uint32_t h)
{
    static const char *const names[] = { "healthy", "degraded", "down", "removed", "pending" };
    return h < sizeof names / sizeof names[0] ? names[h] : NULL;
}

const char *sv_pool_mode_name(uint32_t m)
{
    return m == PB_MODE_SESSION ? "session" : m == PB_MODE_TRANSACTION ? "transaction" : NULL;
}

const char *sv_backend_state_name(uint32_t st)
{
    static const char *const names[] = { "none", "connecting", "idle", "bound", "busy", "shared" };
    return st < sizeof names / sizeof names[0] ? names[st] : NULL;
}

const char *sv_io_backend_name(uint32_t b)
{
    static const char *const names[] = { "none", "io_uring", "epoll" };
    return b < sizeof names / sizeof names[0] ? names[b] : NULL;
}

/* ------------------------------------------------------------ helpers */

uint64_t sv_clock_ms(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Milliseconds from then to now; V_NONE when then is 0 (never stamped),
 * V_UNKNOWN when then lies in the future beyond clock slack. */
int64_t sv_age_ms(uint64_t now, uint64_t then)
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
 * sv_printable ASCII with '.'. */
void sv_printable(char *dst, const void *src, size_t n)
{
    const unsigned char *s = src;
    size_t i;
    for (i = 0; i < n && s[i]; i++)
        dst[i] = s[i] >= 0x20 && s[i] < 0x7f ? (char)s[i] : '.';
    dst[i] = '\0';
}

/* Whether [off, off + count * elem) lies inside size bytes, without overflow. */
int sv_range_ok(uint64_t off, uint64_t count, uint64_t elem, uint64_t size)
{
    return off <= size && count <= (size - off) / elem;
}

/* Format a duration compactly ("850ms", "12.3s", "5m03s", "1h02m", "3d04h"),
 * or "-" / "?" for V_NONE / V_UNKNOWN. */
const char *sv_fmt_age(char *buf, size_t n, int64_t ms)
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
const char *sv_fmt_num(char *buf, size_t n, int64_t v)
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
    /* Backend rows, each between two reads of its even, unchanged seqlock. */
    const pb_shm_backend *rows = (const pb_shm_backend *)(const void *)(j->base + h->backend_off);
    for (uint32_t i = 0; i < h->nslots; i++) {
        pb_shm_backend *dst = &j->s->backends[i];
        int ok = 0;
        for (int tries = 0; tries < 64 && !ok; tries++) {
            uint32_t s1 = atomic_load_explicit(&((pb_shm_backend *)&rows[i])->seq, memory_order_acquire);
            memcpy((char *)dst + sizeof dst->seq, (const char *)&rows[i] + sizeof dst->seq,
                   sizeof *dst - sizeof dst->seq);
            atomic_thread_fence(memory_order_acquire);
            uint32_t s2 = atomic_load_explicit(&((pb_shm_backend *)&rows[i])->seq, memory_order_relaxed);
            ok = s1 == s2 && !(s1 & 1);
        }
        if (!ok)
            dst->state = PB_BACKEND_STATE_MAX;
    }
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
    else if (h->pool_off % PB_CACHELINE || h->client_off % PB_CACHELINE || h->slot_off % PB_CACHELINE ||
             h->backend_off % PB_CACHELINE)
        bad = "table offset not aligned to a cache line";
    else if (h->pool_off < sizeof *h || h->client_off < sizeof *h || h->slot_off < sizeof *h ||
             h->backend_off < sizeof *h)
        bad = "table offset inside the header";
    else if (!sv_range_ok(h->pool_off, h->npools, sizeof(pb_shm_pool), h->total_size))
        bad = "pool table outside the segment";
    else if (!sv_range_ok(h->client_off, h->max_clients, sizeof(pb_shm_client), h->total_size))
        bad = "client table outside the segment";
    else if (!sv_range_ok(h->slot_off, h->nslots, sizeof(pb_shm_slot), h->total_size))
        bad = "slot table outside the segment";
    else if (!sv_range_ok(h->backend_off, h->nslots, sizeof(pb_shm_backend), h->total_size))
        bad = "backend table outside the segment";
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
    free(s->backends);
    free(s->clients);
    s->pools = NULL;
    s->slots = NULL;
    s->backends = NULL;
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
        s->backends = calloc(s->hdr.nslots ? s->hdr.nslots : 1, sizeof(pb_shm_backend));
        if (!s->pools || !s->slots || !s->clients || !s->backends) {
            snprintf(err, errlen, "out of memory copying %s", name);
            rc = SHMVIEW_EOPEN;
        } else if (guarded(copy_tables, &job) < 0) {
            snprintf(err, errlen, "%s: segment shrank while being read", name);
            rc = SHMVIEW_EOPEN;
        }
    }
    s->mono_ms = sv_clock_ms(CLOCK_MONOTONIC);
    s->real_ms = sv_clock_ms(CLOCK_REALTIME);
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
    b->state = sv_broker_state_name(h->state);
    b->io_backend = sv_io_backend_name(h->io_backend);
    b->alive = pid_alive(pid) && h->state != PB_BROKER_STOPPED;
    b->heartbeat_age_ms = sv_age_ms(s->mono_ms, h->heartbeat_ms);
    b->uptime_ms = h->start_ms ? sv_age_ms(s->real_ms, h->start_ms) : V_UNKNOWN;
    b->clients_attached = h->clients_attached;
    b->repairs = h->repairs;
    b->loop_passes = h->work_loop_passes;
    b->scans = h->work_scans;
    b->scan_words = h->work_scan_words;
    b->scan_rings = h->work_scan_rings;
    b->sq_entries = h->work_sq_entries;
    b->janitor_passes = h->work_janitor_passes;
    b->sweep_records = h->work_sweep_records;
    b->sweep_rings = h->work_sweep_rings;
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
    sv_printable(pv->name, p->name, sizeof p->name - 1);
    sv_printable(pv->last_error, p->last_error, sizeof p->last_error - 1);
    sv_printable(pv->server, p->server, sizeof p->server - 1);
    pv->type = sv_pool_type_name(p->type);
    pv->health = sv_health_name(p->health);
    pv->selected = !filter || (strnlen(p->name, sizeof p->name) == strlen(filter) &&
                               memcmp(p->name, filter, strlen(filter)) == 0);
    pv->oldest_lease_ms = V_NONE;

    pv->mode = sv_pool_mode_name(p->pool_mode);
    pv->txn = p->pool_mode == PB_MODE_TRANSACTION;

    uint64_t first = p->first_slot, cap = p->slot_capacity;
    int range_valid = cap <= PB_MAX_POOL_SLOTS && first <= s->hdr.nslots && cap <= s->hdr.nslots - first;
    for (unsigned st = 0; st < PB_SLOT_STATE_MAX; st++)
        pv->by_state[st] = range_valid ? 0 : V_UNKNOWN;
    pv->backends = pv->bound = pv->idle = range_valid ? 0 : V_UNKNOWN;
    if (!range_valid)
        return;
    for (uint64_t k = first; pv->txn && k < first + cap; k++) {
        uint32_t st = s->backends[k].state;
        pv->backends += st != PB_BACKEND_NONE;
        pv->bound += st == PB_BACKEND_BOUND;
        pv->idle += st == PB_BACKEND_IDLE;
    }
    for (uint64_t k = first; k < first + cap; k++) {
        const pb_shm_slot *sl = &s->slots[k];
        uint64_t w = sl->word;
        unsigned st = PB_WORD_STATE(w);
        if (st < PB_SLOT_STATE_MAX)
            pv->by_state[st]++;
        if (PB_WORD_OWNER(w) != 0) {
            int64_t age = sv_age_ms(s->mono_ms, sl->lease_ms);
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
    sv->state = sv_slot_state_name(st);
    sv->owner_pid = owner_pid(s, owner);
    sv->lease_age_ms = owner ? sv_age_ms(s->mono_ms, sl->lease_ms) : V_NONE;
    sv->conn_age_ms = st == PB_SLOT_EMPTY ? V_NONE : sv_age_ms(s->mono_ms, sl->conn_created_ms);
    sv->backend_pid = sl->backend_pid > 0 ? sl->backend_pid : sl->backend_pid == 0 ? V_NONE : V_UNKNOWN;
    sv->uses = sl->uses;
    if (owner)
        sv_printable(sv->command, sl->preview, sizeof sl->preview);
    else
        sv->command[0] = '\0';
}

/* Backend row k (of pool pv, whose first slot is first) for printing. */
static void backend_view_fill(backend_view *bv, const snapshot *s, const pool_view *pv, uint64_t first, uint64_t k)
{
    const pb_shm_backend *r = &s->backends[k];
    bv->pool = pv->name;
    bv->number = (uint32_t)(k - first);
    bv->state = r->state != PB_BACKEND_NONE ? sv_backend_state_name(r->state) : NULL;
    bv->handle = bv->worker_pid = V_NONE;
    if (r->state == PB_BACKEND_BOUND) {
        /* Its handle must be one of the pool's slots. */
        int ours = r->handle >= first && r->handle - first < pv->p->slot_capacity;
        bv->handle = ours ? (int64_t)r->handle : V_UNKNOWN;
        bv->worker_pid = ours ? owner_pid(s, PB_WORD_OWNER(s->slots[r->handle].word)) : V_UNKNOWN;
    }
    bv->backend_pid = r->backend_pid > 0 ? r->backend_pid : r->backend_pid == 0 ? V_NONE : V_UNKNOWN;
    bv->conn_age_ms = sv_age_ms(s->mono_ms, r->created_ms);
    bv->uses = r->uses;
    sv_printable(bv->server, r->server, sizeof r->server - 1);
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
    v->backends = calloc(s->hdr.nslots ? s->hdr.nslots : 1, sizeof *v->backends);
    if (!v->pools || !v->slots || !v->backends)
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
    for (uint32_t i = 0; i < s->hdr.npools; i++) {
        const pool_view *pv = &v->pools[i];
        if (!pv->selected || !pv->txn || pv->backends == V_UNKNOWN)
            continue;               /* a bad range counts V_UNKNOWN: no rows to trust */
        uint64_t first = pv->p->first_slot;
        for (uint64_t k = first; k < first + pv->p->slot_capacity; k++)
            if (s->backends[k].state != PB_BACKEND_NONE)
                backend_view_fill(&v->backends[v->nbackends++], s, pv, first, k);
    }
    return 0;
}

static void view_free(view *v)
{
    free(v->pools);
    free(v->slots);
    free(v->backends);
    v->pools = NULL;
    v->slots = NULL;
    v->backends = NULL;
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
