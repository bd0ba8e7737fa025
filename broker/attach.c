/*
 * attach.c — the checks of an attach request that need no socket: the
 * message itself and the peer's credentials against allowed_uids /
 * allowed_gids.  control.c gets the bytes and SO_PEERCRED, calls these,
 * logs and answers; tests/fuzz/fuzz_attach.c calls them on arbitrary bytes.
 */
#include <string.h>

#include "attach.h"
#include "poolbroker.h"

int attach_check_req(const void *buf, size_t len, pb_attach_req *out)
{
    if (len != sizeof *out)
        return PB_EPROTO;
    /* A copy: the receive buffer has no alignment we can rely on. */
    memcpy(out, buf, sizeof *out);
    if (out->magic != PB_ATTACH_MAGIC)
        return PB_EPROTO;
    if (out->version != PB_SHM_VERSION || out->fingerprint != PB_SHM_FINGERPRINT)
        return PB_EVERSION;
    return PB_OK;
}

int attach_uid_allowed(const conf *cf, uid_t euid, uid_t uid, gid_t gid)
{
    if (cf->n_allowed_uids == 0 && cf->n_allowed_gids == 0)
        return uid == euid;
    for (int i = 0; i < cf->n_allowed_uids; i++)
        if (cf->allowed_uids[i] == uid)
            return 1;
    for (int i = 0; i < cf->n_allowed_gids; i++)
        if (cf->allowed_gids[i] == gid)
            return 1;
    return 0;
}
