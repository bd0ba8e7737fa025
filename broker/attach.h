/*
 * attach.h — the broker's verdict on an attach request, apart from the
 * socket: is the message a poolbroker attach of our layout, and may this peer
 * attach.  Pure functions (no I/O, no logging), so that control.c and the
 * fuzz target (tests/fuzz/fuzz_attach.c) run the same code.
 */
#ifndef PB_ATTACH_H
#define PB_ATTACH_H

#include <stddef.h>
#include <sys/types.h>

#include "conf.h"
#include "pb_shm.h"

/*
 * Check the len bytes a client sent on the control socket as a
 * pb_attach_req.  Returns PB_OK; PB_EPROTO when len is not exactly
 * sizeof(pb_attach_req) or the magic is not PB_ATTACH_MAGIC (not one of
 * ours); PB_EVERSION when the version or the layout fingerprint is not this
 * build's.  Whenever len is right, *out holds the request (also on an error,
 * so that the caller can log what was sent); otherwise *out is untouched.
 */
int attach_check_req(const void *buf, size_t len, pb_attach_req *out);

/*
 * May a peer with credentials uid/gid (SO_PEERCRED) attach?  With neither
 * allowed_uids nor allowed_gids configured, only the broker's own effective
 * uid (euid) may; otherwise a uid in allowed_uids or a gid in allowed_gids.
 * Only the one gid SO_PEERCRED reports counts, not supplementary groups.
 * Returns 1 if allowed, 0 if not.
 */
int attach_uid_allowed(const conf *cf, uid_t euid, uid_t uid, gid_t gid);

#endif /* PB_ATTACH_H */
