/*
 * attachcheck.c — what libpoolbroker believes of the broker at attach time:
 * its answer on the control socket and the header of the segment it passed.
 * Pure functions (no I/O, no pb_client), so that client.c and the fuzz target
 * (tests/fuzz/fuzz_attach.c) run the same code.  Both inputs come from
 * outside the process: the answer from whoever listens on the socket path,
 * the header from a segment any attached worker can write to.
 */
#include "internal.h"

int pbi_attach_resp_check(const pb_attach_resp *resp, ssize_t n)
{
    /* A short read leaves the rest of *resp unset: look at nothing before
     * the length is right. */
    if (n != (ssize_t)sizeof *resp || resp->magic != PB_ATTACH_MAGIC)
        return PB_EBROKER;
    if (resp->status != PB_OK)
        return resp->status < 0 && resp->status >= PB_ESERVER ? resp->status : PB_EBROKER;
    if (resp->version != PB_SHM_VERSION || resp->fingerprint != PB_SHM_FINGERPRINT)
        return PB_EVERSION;
    return PB_OK;
}

int pbi_check_header(const pb_shm_header *h, uint64_t shm_size, uint32_t client_id)
{
    if (shm_size < sizeof *h || h->magic != PB_SHM_MAGIC)
        return PB_EBROKER;
    if (h->version != PB_SHM_VERSION || h->fingerprint != PB_SHM_FINGERPRINT)
        return PB_EVERSION;
    uint64_t sz = shm_size;
    /* The pool table is checked for all PB_MAX_POOLS entries, not npools:
     * a reload adds pools after we attached, and find_pool() follows. */
    if (h->total_size > sz || h->npools > PB_MAX_POOLS || h->max_clients > PB_MAX_CLIENTS ||
        h->pool_off > sz || (uint64_t)PB_MAX_POOLS * sizeof(pb_shm_pool) > sz - h->pool_off ||
        h->client_off > sz || (uint64_t)h->max_clients * sizeof(pb_shm_client) > sz - h->client_off ||
        h->slot_off > sz || (uint64_t)h->nslots * sizeof(pb_shm_slot) > sz - h->slot_off)
        return PB_EPROTO;
    uint32_t idx = PB_CLIENT_INDEX(client_id);
    if (client_id == 0 || idx >= h->max_clients)
        return PB_EPROTO;
    return PB_OK;
}
