/*
 * shmstat_fixture.c — build a fake poolbroker segment for testing shmstat.
 *
 *   shmstat_fixture NAME good|garbage|badversion|remove [SEED]
 *
 * good        a segment laid out as broker/shm.c lays it out: two pools
 *             ("main", postgres, 4 slots; "cache", redis, 3 slots, in
 *             transaction mode: its slots are handles, with two backend rows,
 *             one bound to handle 4 and one idle, and 2 statements queued),
 *             three client records and slots in most states, including a
 *             lease whose owner id no longer matches its client record
 *             (shmstat must print "?" for its pid).  The broker pid is our parent's
 *             (the test shell), so the broker looks alive; the heartbeat is
 *             stamped now, so it looks responding for about 5 s.
 * garbage     the same header layout, but every pool, client, slot and
 *             backend byte random (SEED, default 1), except that "cache" keeps
 *             its slot range and transaction mode, so that its random backend
 *             rows are read: shmstat must not crash, and must print "?" where
 *             values are impossible.
 * badversion  a good segment whose version is PB_SHM_VERSION + 1: shmstat
 *             must refuse it with exit status 3.
 * remove      shm_unlink NAME.
 *
 * The segment is left in place (mode 0600) for shmstat to read; remove it
 * with "remove" afterwards.  Exit status 0, or 1 with a message.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "pb_shm.h"

#define ALIGN_UP(x, a) (((x) + ((uint64_t)(a) - 1)) & ~((uint64_t)(a) - 1))
#define NPOOLS      2
#define NCLIENTS    3
#define BUF_SIZE    4096            /* request and reply buffer per slot */

static const struct {
    const char *name;
    uint32_t type, min_size, max_size;
} pools[NPOOLS] = {
    { "main", PB_POOL_POSTGRES, 2, 4 },
    { "cache", PB_POOL_REDIS, 1, 3 },
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t real_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Fill n bytes at p with pseudo-random bytes from *seed (xorshift64). */
static void fill_random(void *p, size_t n, uint64_t *seed)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        b[i] = (unsigned char)*seed;
    }
}

/* Lay out the header the way broker/shm.c does; returns the segment size. */
static uint64_t layout(pb_shm_header *h, uint32_t nslots)
{
    uint64_t off = ALIGN_UP(sizeof(pb_shm_header), PB_CACHELINE);
    h->pool_off = off;
    off += ALIGN_UP((uint64_t)NPOOLS * sizeof(pb_shm_pool), PB_CACHELINE);
    h->client_off = off;
    off += ALIGN_UP((uint64_t)NCLIENTS * sizeof(pb_shm_client), PB_CACHELINE);
    h->slot_off = off;
    off += ALIGN_UP((uint64_t)nslots * sizeof(pb_shm_slot), PB_CACHELINE);
    h->backend_off = off;
    off += ALIGN_UP((uint64_t)nslots * sizeof(pb_shm_backend), PB_CACHELINE);
    h->buf_off = ALIGN_UP(off, 4096);
    return h->buf_off + (uint64_t)nslots * 2 * BUF_SIZE;
}

/* now - ms, but never 0 or below (on a machine up less than ms). */
static uint64_t ago(uint64_t now, uint64_t ms)
{
    return now > ms ? now - ms : 1;
}

/* Set one slot's word and status. */
static void set_slot(pb_shm_slot *s, unsigned state, uint32_t owner, uint64_t now, int32_t backend,
                     const char *preview)
{
    atomic_store(&s->word, PB_WORD(state, owner, 7));
    if (state != PB_SLOT_EMPTY && state != PB_SLOT_CONNECTING) {
        atomic_store(&s->backend_pid, backend);
        atomic_store(&s->conn_created_ms, ago(now, 3723000)); /* 1h02m03s ago */
        atomic_store(&s->uses, 42);
    }
    if (owner) {
        atomic_store(&s->lease_ms, ago(now, 1500));
        if (preview)
            memcpy(s->preview, preview, strnlen(preview, sizeof s->preview));
    }
}

/* Fill the tables of a good segment (zeroed, header laid out). */
static void fill_good(pb_shm_header *h)
{
    uint64_t now = mono_ms();
    pb_shm_pool *p = pb_shm_pools(h);
    pb_shm_client *c = pb_shm_clients(h);
    pb_shm_slot *s = pb_shm_slots(h);

    atomic_store(&h->generation, 3);
    atomic_store(&h->state, PB_BROKER_RUNNING);
    atomic_store(&h->broker_pid, (int32_t)getppid());
    h->io_backend = PB_IO_URING;
    h->start_ms = real_ms() - 3720000;                          /* up 1h02m */
    atomic_store(&h->heartbeat_ms, now);
    atomic_store(&h->clients_attached, 2);

    uint32_t first = 0;
    for (int i = 0; i < NPOOLS; i++) {
        snprintf(p[i].name, sizeof p[i].name, "%s", pools[i].name);
        p[i].type = pools[i].type;
        p[i].first_slot = first;
        p[i].slot_capacity = pools[i].max_size;
        atomic_store(&p[i].min_size, pools[i].min_size);
        atomic_store(&p[i].max_size, pools[i].max_size);
        atomic_store(&p[i].accepting, 1);
        atomic_store(&p[i].acquires, 1000u * (unsigned)(i + 1));
        atomic_store(&p[i].waits, 12);
        atomic_store(&p[i].timeouts, 1);
        atomic_store(&p[i].reclaims, 2);
        atomic_store(&p[i].connects, 5);
        for (uint64_t us = 5; us < 400000; us = us * 3 + 1) {
            pb_shm_hist_add(&p[i].acquire_wait, us);
            pb_shm_hist_add(&p[i].command_latency, us / 2);
        }
        for (uint32_t k = 0; k < pools[i].max_size; k++) {
            s[first + k].pool = (uint32_t)i;
            s[first + k].index = first + k;
        }
        first += pools[i].max_size;
    }
    atomic_store(&p[0].health, PB_HEALTH_HEALTHY);
    atomic_store(&p[0].size, 3);
    atomic_store(&p[0].nwaiters, 1);
    atomic_store(&p[1].health, PB_HEALTH_DEGRADED);
    atomic_store(&p[1].size, 2);
    atomic_store(&p[1].errors, 3);
    snprintf(p[1].last_error, sizeof p[1].last_error, "connect to \"redis\\1\": Connection refused\n");

    /* Client ids as broker/control.c makes them: reuse << 12 | (index + 1). */
    uint32_t id1 = (1u << PB_CLIENT_INDEX_BITS) | 1, id2 = (2u << PB_CLIENT_INDEX_BITS) | 2;
    atomic_store(&c[0].id, id1);
    atomic_store(&c[0].pid, 4242);
    atomic_store(&c[1].id, id2);
    atomic_store(&c[1].pid, 4343);
    uint32_t stale = (5u << PB_CLIENT_INDEX_BITS) | 3;          /* record 2 is free (id 0) */

    set_slot(&s[0], PB_SLOT_LEASED, id1, now, 9001, "SELECT * FROM users WHERE id = $1");
    set_slot(&s[1], PB_SLOT_FREE, 0, now, 9002, NULL);
    set_slot(&s[2], PB_SLOT_RELEASING, id2, now, 9003, "BEGIN;\tUPDATE t SET x = 1");
    set_slot(&s[3], PB_SLOT_EMPTY, 0, now, 0, NULL);
    set_slot(&s[4], PB_SLOT_LEASED, stale, now, 17, "GET session:\"42\"\r\n");
    set_slot(&s[5], PB_SLOT_BROKEN, 0, now, 18, NULL);
    set_slot(&s[6], PB_SLOT_CONNECTING, 0, now, 0, NULL);

    /* "cache" in transaction mode: backend 0 bound to handle 4, backend 1
     * idle (rows first_slot + k of the backend table). */
    atomic_store(&p[1].pool_mode, PB_MODE_TRANSACTION);
    atomic_store(&p[1].txn_queued, 2);
    pb_shm_backend *b = pb_shm_backends(h);
    uint32_t cf = p[1].first_slot;
    b[cf] = (pb_shm_backend){ .state = PB_BACKEND_BOUND, .backend_pid = 77, .handle = 4,
                              .created_ms = ago(now, 9000), .uses = 417 };
    b[cf + 1] = (pb_shm_backend){ .state = PB_BACKEND_IDLE, .backend_pid = 78, .handle = UINT32_MAX,
                                  .created_ms = ago(now, 9000), .uses = 380 };
    snprintf(b[cf].server, sizeof b[cf].server, "127.0.0.1:6379");
    snprintf(b[cf + 1].server, sizeof b[cf + 1].server, "127.0.0.1:6379");
}

/* Overwrite every table byte and every header field but the layout (magic,
 * version, sizes, counts, offsets) with random bytes. */
static void fill_garbage(pb_shm_header *h, uint64_t size, uint64_t seed)
{
    fill_random((char *)h + sizeof *h, size - sizeof *h, &seed);
    fill_random((char *)&h->generation, offsetof(pb_shm_header, npools) - offsetof(pb_shm_header, generation),
                &seed);
    fill_random((char *)&h->start_ms,
                offsetof(pb_shm_header, shm_name) + sizeof h->shm_name - offsetof(pb_shm_header, start_ms), &seed);
    /* "cache" keeps its range and mode: its random backend rows are read. */
    pb_shm_pool *p = pb_shm_pools(h);
    p[1].first_slot = pools[0].max_size;
    p[1].slot_capacity = pools[1].max_size;
    atomic_store(&p[1].pool_mode, PB_MODE_TRANSACTION);
}

static int create(const char *name, const char *mode, uint64_t seed)
{
    uint32_t nslots = pools[0].max_size + pools[1].max_size;
    pb_shm_header tmp;
    memset(&tmp, 0, sizeof tmp);
    uint64_t size = layout(&tmp, nslots);

    int fd = shm_open(name, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        fprintf(stderr, "shmstat_fixture: shm_open %s: %s\n", name, strerror(errno));
        return 1;
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        fprintf(stderr, "shmstat_fixture: ftruncate %s: %s\n", name, strerror(errno));
        close(fd);
        return 1;
    }
    pb_shm_header *h = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (h == MAP_FAILED) {
        fprintf(stderr, "shmstat_fixture: mmap %s: %s\n", name, strerror(errno));
        return 1;
    }
    memset(h, 0, size);
    memcpy(h, &tmp, sizeof tmp);
    h->magic = PB_SHM_MAGIC;
    h->version = strcmp(mode, "badversion") == 0 ? PB_SHM_VERSION + 1 : PB_SHM_VERSION;
    h->fingerprint = PB_SHM_FINGERPRINT;
    h->total_size = size;
    h->npools = NPOOLS;
    h->nslots = nslots;
    h->max_clients = NCLIENTS;
    snprintf(h->shm_name, sizeof h->shm_name, "%s", name);
    fill_good(h);
    if (strcmp(mode, "garbage") == 0)
        fill_garbage(h, size, seed ? seed : 1);
    munmap(h, size);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: shmstat_fixture NAME good|garbage|badversion|remove [SEED]\n");
        return 1;
    }
    const char *name = argv[1], *mode = argv[2];
    if (strcmp(mode, "remove") == 0) {
        if (shm_unlink(name) < 0 && errno != ENOENT) {
            fprintf(stderr, "shmstat_fixture: shm_unlink %s: %s\n", name, strerror(errno));
            return 1;
        }
        return 0;
    }
    if (strcmp(mode, "good") && strcmp(mode, "garbage") && strcmp(mode, "badversion")) {
        fprintf(stderr, "shmstat_fixture: unknown mode '%s'\n", mode);
        return 1;
    }
    uint64_t seed = argc == 4 ? strtoull(argv[3], NULL, 0) : 1;
    return create(name, mode, seed);
}
