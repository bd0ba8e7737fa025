/*
 * redis.c — Redis commands on a lease.  Placeholder until the Redis issue
 * lands: every call answers PB_ETYPE on PostgreSQL leases and PB_EINVAL
 * otherwise.
 */
#define _GNU_SOURCE
#include <stdarg.h>

#include "internal.h"

static int not_yet(pb_lease *l)
{
    if (!l)
        return PB_EINVAL;
    int rc = pbi_lease_check(l);
    if (rc != PB_OK)
        return rc;
    return l->type == PB_POOL_REDIS ? PB_EINVAL : PB_ETYPE;
}

PB_API int pb_redis_command(pb_lease *l, redisReply **out, const char *fmt, ...)
{
    (void)fmt;
    if (out)
        *out = NULL;
    return not_yet(l);
}

PB_API int pb_redis_command_argv(pb_lease *l, int argc, const char **argv, const size_t *argvlen, redisReply **out)
{
    (void)argc; (void)argv; (void)argvlen;
    if (out)
        *out = NULL;
    return not_yet(l);
}

PB_API int pb_redis_append_command(pb_lease *l, const char *fmt, ...)
{
    (void)fmt;
    return not_yet(l);
}

PB_API int pb_redis_append_command_argv(pb_lease *l, int argc, const char **argv, const size_t *argvlen)
{
    (void)argc; (void)argv; (void)argvlen;
    return not_yet(l);
}

PB_API int pb_redis_get_reply(pb_lease *l, redisReply **out)
{
    if (out)
        *out = NULL;
    return not_yet(l);
}
