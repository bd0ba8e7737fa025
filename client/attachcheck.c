/*
 * attachcheck.c — what libpoolbroker believes of the broker at attach time:
 * its answer on the control socket, including the layout of the segment it
 * passed.  Pure functions (no I/O, no pb_client), so that client.c and the
 * fuzz target (tests/fuzz/fuzz_attach.c) run the same code.  The answer comes
 * from whoever listens on the socket path; the segment's own header is not
 * consulted at all, since any attached worker can write to it.
 */
#include "internal.h"

/* Does [off, off + n*size) lie inside [lo, hi)?  No overflow for any input:
 * n < 2^32 and size < 2^32, so their product fits in 64 bits. */
static int table_fits(uint64_t off, uint64_t n, uint64_t size, uint64_t lo, uint64_t hi)
{
    return off >= lo && off <= hi && n * size <= hi - off;
}

int pbi_check_layout(const pb_shm_layout *L, uint64_t shm_size, uint32_t client_id)
{
    /* The broker lays the tables out in this order, each on a cache line
     * (the atomics in them need at least their natural alignment), and the
     * slot buffers after them all. */
    if (L->pool_off % PB_CACHELINE || L->client_off % PB_CACHELINE || L->slot_off % PB_CACHELINE ||
        L->max_clients > PB_MAX_CLIENTS)
        return PB_EPROTO;
    if (L->buf_off > shm_size ||
        !table_fits(L->pool_off, PB_MAX_POOLS, sizeof(pb_shm_pool), sizeof(pb_shm_header), L->buf_off) ||
        !table_fits(L->client_off, L->max_clients, sizeof(pb_shm_client),
                    L->pool_off + (uint64_t)PB_MAX_POOLS * sizeof(pb_shm_pool), L->buf_off) ||
        !table_fits(L->slot_off, L->nslots, sizeof(pb_shm_slot),
                    L->client_off + (uint64_t)L->max_clients * sizeof(pb_shm_client), L->buf_off))
        return PB_EPROTO;
    if (client_id == 0 || PB_CLIENT_INDEX(client_id) >= L->max_clients)
        return PB_EPROTO;
    return PB_OK;
}

int pbi_attach_resp_check(const pb_attach_resp *resp, ssize_t n)
{
    /* Look at no field the read did not reach.  The fields up to the
     * fingerprint are the same in every version, so that a broker of another
     * version gets PB_EVERSION, not a short-answer PB_EBROKER. */
    if (n < (ssize_t)offsetof(pb_attach_resp, client_id) || resp->magic != PB_ATTACH_MAGIC)
        return PB_EBROKER;
    if (resp->status != PB_OK)
        return resp->status < 0 && resp->status >= PB_ESERVER ? resp->status : PB_EBROKER;
    if (resp->version != PB_SHM_VERSION || resp->fingerprint != PB_SHM_FINGERPRINT)
        return PB_EVERSION;
    if (n != (ssize_t)sizeof *resp)
        return PB_EBROKER;
    return pbi_check_layout(&resp->layout, resp->shm_size, resp->client_id);
}
