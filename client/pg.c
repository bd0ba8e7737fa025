/*
 * pg.c — PostgreSQL commands on a lease: encode with pgproto.c, submit
 * through the slot, decode the reply stream as it arrives in the reply ring
 * (in pieces as small as the ring makes them: a 100 MB result streams through
 * a 256 KiB ring while the broker pauses the backend socket).
 */
#define _GNU_SOURCE
#include <string.h>

#include "internal.h"

static int pg_lease(pb_lease *l)
{
    if (!l)
        return PB_EINVAL;
    int rc = pbi_lease_check(l);
    if (rc != PB_OK)
        return rc;
    if (l->type != PB_POOL_POSTGRES)
        return PB_ETYPE;
    if (l->desync)
        return PB_EPROTO;
    return PB_OK;
}

/* Read replies up to the next ReadyForQuery and return its result. */
static int read_result(pb_lease *l, pb_result **out)
{
    for (;;) {
        const uint8_t *p;
        size_t n, used = 0;
        int rc = pbi_reply_wait(l, &p, &n);
        if (rc != PB_OK) {
            l->desync = 1;          /* what is left of this reply is unknown */
            return rc;
        }
        int r = pgp_feed(&l->dec, (const char *)p, n, &used);
        pbi_reply_consume(l, used);
        if (r == PGP_READY) {
            l->pending--;
            *out = pgp_take_result(&l->dec);
            return *out ? PB_OK : PB_ENOMEM;
        }
        if (r == PGP_COPY_IN) {
            /* A COPY FROM STDIN through pb_pg_exec: refuse it the protocol's
             * way, so the server ends the command with an error. */
            pb_buf *b = &l->c->scratch;
            b->len = 0;
            if (pgp_copy_fail(b, "COPY FROM STDIN needs pb_pg_copy_in_begin, not pb_pg_exec") != PB_OK ||
                (rc = pbi_submit(l, b->data, b->len, 0)) != PB_OK) {
                l->desync = 1;
                return rc ? rc : PB_ENOMEM;
            }
            continue;
        }
        if (r < 0) {
            l->desync = 1;
            return r;
        }
    }
}

static int run(pb_lease *l, const char *sql, pb_result **out)
{
    pb_buf *b = &l->c->scratch;
    pbi_set_preview(l, sql, strlen(sql));
    uint64_t t0 = pbi_now_us();
    int rc = pbi_submit(l, b->data, b->len, 1);
    if (rc == PB_OK)
        rc = read_result(l, out);
    if (rc == PB_OK)
        pb_shm_hist_add(&l->c->pools[l->pool].command_latency, pbi_now_us() - t0);
    else
        atomic_fetch_add_explicit(&l->c->pools[l->pool].errors, 1, memory_order_relaxed);
    return rc;
}

PB_API int pb_pg_exec(pb_lease *l, const char *sql, pb_result **out)
{
    if (!sql || !out)
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    pb_buf *b = &l->c->scratch;
    b->len = 0;
    if ((rc = pgp_query(b, sql)) != PB_OK)
        return rc;
    return run(l, sql, out);
}

PB_API int pb_pg_exec_params(pb_lease *l, const char *sql, int nparams, const unsigned int *param_types,
                             const char *const *values, const int *lengths, const int *formats,
                             int result_format, pb_result **out)
{
    if (!sql || !out || nparams < 0 || (nparams > 0 && !values) || (result_format != 0 && result_format != 1))
        return PB_EINVAL;
    *out = NULL;
    int rc = pg_lease(l);
    if (rc != PB_OK)
        return rc;
    pb_buf *b = &l->c->scratch;
    b->len = 0;
    if ((rc = pgp_parse(b, "", sql, nparams, param_types)) != PB_OK ||
        (rc = pgp_bind(b, "", "", nparams, values, lengths, formats, result_format)) != PB_OK ||
        (rc = pgp_describe(b, 'P', "")) != PB_OK || (rc = pgp_execute(b, "", 0)) != PB_OK ||
        (rc = pgp_sync(b)) != PB_OK)
        return rc;
    return run(l, sql, out);
}
