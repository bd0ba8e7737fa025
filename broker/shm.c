/*
 * shm.c — creating the shared segment and laying out its tables.
 *
 * The broker is the only creator.  A segment left by a previous broker (clean
 * exit or crash) is replaced, never reused: workers still mapping the old one
 * see its broker gone and re-attach to the new one.  The new segment's
 * generation is one more than the old one's, so workers can tell them apart.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"

#define ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((uint64_t)(a) - 1))

/* The generation of a segment previously created under this name, or 0.
 * A segment left by a broker that died is marked stopped on the way, so
 * workers still mapping it notice on their next acquire and re-attach. */
static uint32_t previous_generation(const char *name)
{
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0)
        return 0;
    uint32_t gen = 0;
    struct stat st;
    if (fstat(fd, &st) == 0 && (size_t)st.st_size >= sizeof(pb_shm_header)) {
        pb_shm_header *h = mmap(NULL, sizeof *h, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (h != MAP_FAILED) {
            if (h->magic == PB_SHM_MAGIC) {
                gen = atomic_load(&h->generation);
                atomic_store(&h->state, PB_BROKER_STOPPED);
            }
            munmap(h, sizeof *h);
        }
    }
    close(fd);
    return gen;
}

int shm_create(broker *b)
{
    conf *cf = b->cf;
    uint64_t off = ALIGN_UP(sizeof(pb_shm_header), PB_CACHELINE);
    uint64_t pool_off = off;
    /* The pool table always has room for PB_MAX_POOLS: a reload can add. */
    off += ALIGN_UP((uint64_t)PB_MAX_POOLS * sizeof(pb_shm_pool), PB_CACHELINE);
    uint64_t client_off = off;
    off += ALIGN_UP((uint64_t)cf->max_clients * sizeof(pb_shm_client), PB_CACHELINE);
    uint64_t slot_off = off;
    uint32_t nslots = cf->spare_slots;
    for (int i = 0; i < cf->npools; i++)
        nslots += conf_pool_slots(&cf->pools[i]);
    off += ALIGN_UP((uint64_t)nslots * sizeof(pb_shm_slot), PB_CACHELINE);
    uint64_t backend_off = off;
    off += ALIGN_UP((uint64_t)nslots * sizeof(pb_shm_backend), PB_CACHELINE);
    uint64_t buf_off = ALIGN_UP(off, 4096);
    off = buf_off;
    for (int i = 0; i < cf->npools; i++)
        off += (uint64_t)conf_pool_slots(&cf->pools[i]) *
               (ALIGN_UP(cf->pools[i].request_buffer, 4096) + ALIGN_UP(cf->pools[i].reply_buffer, 4096));
    off += (uint64_t)cf->spare_slots * (SPARE_REQ + SPARE_REP);
    uint64_t total = ALIGN_UP(off, 4096);

    uint32_t gen = previous_generation(cf->shm_name) + 1;
    if (shm_unlink(cf->shm_name) == 0)
        log_info("replaced the segment %s left by a previous broker (generation %u)", cf->shm_name, gen - 1);
    int fd = shm_open(cf->shm_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, cf->shm_mode);
    if (fd < 0) {
        log_errno(LOG_LVL_ERROR, errno, "shm_open %s", cf->shm_name);
        return -1;
    }
    if (fchmod(fd, cf->shm_mode) < 0 ||
        (cf->n_allowed_gids > 0 && (cf->shm_mode & 070) && fchown(fd, (uid_t)-1, cf->allowed_gids[0]) < 0)) {
        log_errno(LOG_LVL_ERROR, errno, "setting mode/group of %s", cf->shm_name);
        goto fail;
    }
    if (ftruncate(fd, (off_t)total) < 0) {
        log_errno(LOG_LVL_ERROR, errno, "ftruncate %s to %llu bytes", cf->shm_name, (unsigned long long)total);
        goto fail;
    }
    void *base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        log_errno(LOG_LVL_ERROR, errno, "mmap %s", cf->shm_name);
        goto fail;
    }

    pb_shm_header *h = base;            /* ftruncate gave us zeroes */
    h->magic = PB_SHM_MAGIC;
    h->version = PB_SHM_VERSION;
    h->fingerprint = PB_SHM_FINGERPRINT;
    h->total_size = total;
    atomic_store(&h->generation, gen);
    atomic_store(&h->state, PB_BROKER_STARTING);
    atomic_store(&h->broker_pid, (int32_t)getpid());
    h->npools = (uint32_t)cf->npools;
    h->nslots = nslots;
    h->max_clients = cf->max_clients;
    h->pool_off = pool_off;
    h->client_off = client_off;
    h->slot_off = slot_off;
    h->buf_off = buf_off;
    h->backend_off = backend_off;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    h->start_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    snprintf(h->shm_name, sizeof h->shm_name, "%s", cf->shm_name);

    /* Slots and their buffers, pool by pool. */
    pb_shm_slot *slots = pb_shm_slots(h);
    uint64_t boff = buf_off;
    uint32_t s = 0;
    for (int i = 0; i < cf->npools; i++) {
        conf_pool *cp = &cf->pools[i];
        for (uint32_t k = 0; k < conf_pool_slots(cp); k++, s++) {
            pb_shm_slot *sl = &slots[s];
            sl->pool = (uint32_t)i;
            sl->index = s;
            sl->req_off = boff;
            sl->req_size = cp->request_buffer;
            boff += ALIGN_UP(cp->request_buffer, 4096);
            sl->rep_off = boff;
            sl->rep_size = cp->reply_buffer;
            boff += ALIGN_UP(cp->reply_buffer, 4096);
            atomic_store(&sl->word, PB_WORD(PB_SLOT_EMPTY, 0, 1));
        }
    }
    /* Spare slots, for pools a reload adds: no pool yet. */
    b->spare_first = s;
    for (uint32_t k = 0; k < cf->spare_slots; k++, s++) {
        pb_shm_slot *sl = &slots[s];
        sl->pool = PB_MAX_POOLS;
        sl->index = s;
        sl->req_off = boff;
        sl->req_size = SPARE_REQ;
        boff += SPARE_REQ;
        sl->rep_off = boff;
        sl->rep_size = SPARE_REP;
        boff += SPARE_REP;
        atomic_store(&sl->word, PB_WORD(PB_SLOT_EMPTY, 0, 1));
    }
    b->hdr = h;
    b->shm_pools = (pb_shm_pool *)((char *)base + pool_off);
    b->shm_clients = (pb_shm_client *)((char *)base + client_off);
    b->shm_slots = slots;
    b->shm_backends = pb_shm_backends(h);
    memcpy(&b->hdr_copy, h, sizeof *h);
    b->shm_size = total;
    b->shm_fd = fd;
    b->nslots = nslots;
    log_info("segment %s: %llu bytes, %u slots, %u client records, generation %u", cf->shm_name,
             (unsigned long long)total, nslots, cf->max_clients, gen);
    return 0;
fail:
    close(fd);
    shm_unlink(cf->shm_name);
    return -1;
}

void shm_note_repair(broker *b)
{
    b->repairs++;
    atomic_store(&b->hdr->repairs, b->repairs);
}

/* Store v into a plain field / an atomic one only when it differs: a reader
 * of a field the broker republishes must never see anything but the value
 * (issue #19), and an unchanged cache line is not dirtied for every
 * attached process each pass. */
#define SET_IF(field, v)                                                    \
    do {                                                                    \
        if ((field) != (v))                                                 \
            (field) = (v);                                                  \
    } while (0)
#define ASET_IF(field, v)                                                   \
    do {                                                                    \
        if (atomic_load_explicit(&(field), memory_order_relaxed) != (v))    \
            atomic_store(&(field), (v));                                    \
    } while (0)

/* Rewrite every field of the segment that only the broker owns, from its
 * private copies (janitor, each pass; the client records a slice a pass, see
 * control_sweep).  A worker that scribbles over the segment can break its
 * own leases, but not the segment's description: within a janitor period
 * (the client table: within one round of the sweep) everything is as the
 * broker made it again.  A field
 * is written only when it differs from the copy, so a concurrent reader sees
 * either the scribble or the repair, never a value in between; the pool
 * names (several bytes) go through the pool's seqlock (pb_pool_ident). */
void shm_republish(broker *b)
{
    pb_shm_header *h = b->hdr, *o = &b->hdr_copy;
    SET_IF(h->magic, o->magic);
    SET_IF(h->version, o->version);
    SET_IF(h->fingerprint, o->fingerprint);
    SET_IF(h->total_size, o->total_size);
    SET_IF(h->pool_off, o->pool_off);
    SET_IF(h->client_off, o->client_off);
    SET_IF(h->slot_off, o->slot_off);
    SET_IF(h->buf_off, o->buf_off);
    SET_IF(h->backend_off, o->backend_off);
    SET_IF(h->nslots, o->nslots);
    SET_IF(h->max_clients, o->max_clients);
    SET_IF(h->start_ms, o->start_ms);
    uint32_t io = b->io_backend == LOOP_URING ? PB_IO_URING : PB_IO_EPOLL;
    SET_IF(h->io_backend, io);
    /* shmstat reads the name; only a scribbled one is rewritten, and then
     * byte by byte to the same bytes where they agree. */
    if (memcmp(h->shm_name, o->shm_name, sizeof h->shm_name) != 0)
        for (size_t i = 0; i < sizeof h->shm_name; i++)
            SET_IF(h->shm_name[i], o->shm_name[i]);
    ASET_IF(h->generation, atomic_load(&o->generation));
    ASET_IF(h->broker_pid, (int32_t)getpid());
    ASET_IF(h->npools, b->npools);
    ASET_IF(h->clients_attached, b->nattached);
    ASET_IF(h->repairs, b->repairs);
    ASET_IF(h->state, (uint32_t)(b->draining ? PB_BROKER_DRAINING : PB_BROKER_RUNNING));
    lifeline_republish(b);
    for (uint32_t i = 0; i < b->npools; i++)
        pool_republish(&b->pools[i]);
    for (uint32_t s = 0; s < b->nslots; s++) {
        pb_shm_slot *sl = &b->shm_slots[s];
        conn *c = b->slots[s];
        SET_IF(sl->index, s);
        if (!c)
            continue;               /* spare: no pool yet */
        SET_IF(sl->pool, c->pool->index);
        SET_IF(sl->req_off, (uint64_t)(c->req - (uint8_t *)h));
        SET_IF(sl->rep_off, (uint64_t)(c->rep - (uint8_t *)h));
        SET_IF(sl->req_size, c->req_size);
        SET_IF(sl->rep_size, c->rep_size);
        /* The broker's side of the slot's I/O words, too: a client waiting
         * on a scribbled one sees the truth again within a pass. */
        if (PH_UP(c->phase)) {
            ASET_IF(sl->rep_head, c->rep_head);
            ASET_IF(sl->req_ack, c->acked_seq);
            ASET_IF(sl->reply_done, c->reply_done);
            if (!c->to_sink)
                ASET_IF(sl->rep_owed, c->expect);
        }
    }
    /* The client records: a slice of them each pass (control_sweep), so
     * that this pass's work does not grow with max_clients. */
}

void shm_republish_client(broker *b, uint32_t i)
{
    client *cl = &b->clients[i];
    pb_shm_client *sc = &b->shm_clients[i];
    int live = cl->attached && !cl->dead;
    ASET_IF(sc->id, live ? cl->id : 0);
    ASET_IF(sc->pid, live ? (int32_t)cl->pid : 0);
    if (live)
        ASET_IF(sc->sq_head, cl->sq_head);
}

/* Store the broker's private work counters (broker.work) in the header
 * (janitor, each pass). */
void shm_publish_work(broker *b)
{
    pb_shm_header *h = b->hdr;
    atomic_store_explicit(&h->work_loop_passes, b->work.loop_passes, memory_order_relaxed);
    atomic_store_explicit(&h->work_scans, b->work.scans, memory_order_relaxed);
    atomic_store_explicit(&h->work_scan_words, b->work.scan_words, memory_order_relaxed);
    atomic_store_explicit(&h->work_scan_rings, b->work.scan_rings, memory_order_relaxed);
    atomic_store_explicit(&h->work_sq_entries, b->work.sq_entries, memory_order_relaxed);
    atomic_store_explicit(&h->work_janitor_passes, b->work.janitor_passes, memory_order_relaxed);
    atomic_store_explicit(&h->work_sweep_records, b->work.sweep_records, memory_order_relaxed);
    atomic_store_explicit(&h->work_sweep_rings, b->work.sweep_rings, memory_order_relaxed);
}

void shm_destroy(broker *b, int unlink_it)
{
    if (!b->hdr)
        return;
    atomic_store(&b->hdr->state, PB_BROKER_STOPPED);
    lifeline_cut(b);
    if (unlink_it)
        shm_unlink(b->cf->shm_name);
    munmap(b->hdr, b->shm_size);
    close(b->shm_fd);
    b->hdr = NULL;
}
