/*
 * janitor.c — the broker's periodic work (every JANITOR_MS):
 *
 *   - keep every pool at min_size, with at most a few connects in flight
 *     and backoff after failures (pool.c: pool_maybe_grow);
 *   - give up on handshakes that take too long;
 *   - close free connections idle past idle_timeout_s (down to min_size),
 *     above max_size (a reload lowered it), or past their own max_lifetime;
 *     mark leased ones (past their lifetime, or above max_size) to retire
 *     on release;
 *   - put back free-map bits lost by a process killed between clearing a
 *     bit and winning the slot CAS (the map is a hint; the slot word is truth);
 *   - warn once about leases held longer than leak_threshold_ms, and take
 *     back those held longer than max_lease_ms;
 *   - undo what a buggy worker scribbled over the segment: the broker-owned
 *     fields are rewritten from private copies (shm_republish; the client
 *     records SWEEP_RECORDS a pass, control_sweep, which also drains rings
 *     whose doorbell bit a worker cleared), and slot words that cannot be
 *     right are taken back (repair_word);
 *   - store the broker's work counters in the header (shm_publish_work).
 */
#define _GNU_SOURCE
#include <stdio.h>

#include "broker.h"
#include "log.h"

/* Could this slot word have been written by the broker or an honest
 * client, given what the broker knows of the connection? */
static int word_plausible(broker *b, const conn *c, uint64_t w)
{
    switch (PB_WORD_STATE(w)) {
    case PB_SLOT_LEASED:
    case PB_SLOT_RELEASING:
        return c->phase == PH_READY && client_by_id(b, PB_WORD_OWNER(w)) != NULL;
    case PB_SLOT_FREE:
        /* The broker puts a slot FREE (or hands it on) only in PH_READY, and
         * takes the word before the phase leaves it. */
        return c->phase == PH_READY;
    case PB_SLOT_EMPTY:
        return c->phase == PH_EMPTY;
    case PB_SLOT_CONNECTING:
        return c->phase == PH_CONNECTING;
    case PB_SLOT_CLOSING:
        return c->phase == PH_CLOSING || c->phase == PH_EMPTY;
    case PB_SLOT_RESETTING:
    case PB_SLOT_RECLAIMING:
        /* Broker-held: only while the broker is doing something with it. */
        return PH_UP(c->phase) &&
               (c->phase != PH_READY || c->expect || c->sending || c->tls_queued || c->mux || c->idle_async);
    }
    return 0;                       /* BROKEN is never written; anything else is garbage */
}

/* A slot word that makes no sense twice in a row (a worker scribbled it,
 * or died mid-way through something we cannot see) is taken back: the slot
 * is the broker's again and its connection, whose session state nobody can
 * vouch for, is closed and replaced.  Returns 1 if the slot is suspect or
 * was repaired (the janitor leaves it alone otherwise this pass).
 * c->suspect_word is shared with the stale-RELEASING check below, which
 * stores word + 1 so that the two never mistake each other's marks. */
static int repair_word(broker *b, conn *c)
{
    uint64_t w = atomic_load(&c->slot->word);
    if (word_plausible(b, c, w)) {
        if (c->suspect_word == w)
            c->suspect_word = 0;
        return 0;
    }
    if (c->suspect_word != w) {
        c->suspect_word = w;        /* maybe a transition in flight: look again next pass */
        return 1;
    }
    c->suspect_word = 0;
    slog(LOG_LVL_WARN, c, "slot word %016llx is impossible (connection %s): taking the slot back",
         (unsigned long long)w, conn_phase_name(c->phase));
    shm_note_repair(b);
    switch (c->phase) {
    case PH_READY:
    case PH_DRAINING:
    case PH_AWAIT_CANCEL:
    case PH_RESETTING:
    case PH_VALIDATING: {
        if (!slot_take(c, &w, PB_SLOT_RECLAIMING))
            return 1;               /* changed under us: judge it next pass */
        conn_freemap_clear(c);
        atomic_fetch_add_explicit(&c->pool->shm->reclaims, 1, memory_order_relaxed);
        conn_close(c, "slot word scribbled");
        return 1;
    }
    case PH_CONNECTING:
        slot_repair(c, w, PB_SLOT_CONNECTING);
        return 1;
    case PH_CLOSING:
        slot_repair(c, w, PB_SLOT_CLOSING);
        return 1;
    default:
        slot_repair(c, w, PB_SLOT_EMPTY);
        return 1;
    }
}

static void check_conn(broker *b, pool *p, conn *c, uint32_t *live_free)
{
    conf_pool *cp = p->cf;
    uint64_t now = b->now_ms;

    /* A bound transaction-mode backend wears its handle's slot word: the
     * handle's checks judge that (txn.c). */
    if (!c->bound && repair_word(b, c))
        return;

    if (c->phase == PH_CONNECTING) {
        if (now - c->created_ms > CONNECT_TIMEOUT_MS)
            conn_connect_failed(c, "connect timed out");
        return;
    }
    if (!PH_UP(c->phase))
        return;
    /* A command (or our own reset) running too long. */
    uint32_t limit = cp->command_timeout_ms;
    if (c->expect && c->phase != PH_READY && (!limit || limit > 10000))
        limit = 10000;              /* nobody is waiting: do not wait forever either */
    if (c->expect && limit && now - c->cmd_start_ms > limit)
        conn_command_timeout(c, NULL);
    if (!PH_UP(c->phase))
        return;
    conn_settle(c);
    if (c->bound)
        return;
    uint64_t w = atomic_load(&c->slot->word);
    unsigned st = PB_WORD_STATE(w);

    if (st == PB_SLOT_FREE && c->phase == PH_READY) {
        uint64_t since = atomic_load(&c->slot->idle_ms);
        uint64_t idle_for = now > since ? now - since : 0;
        int retire = c->retire_at_ms && now >= c->retire_at_ms;
        int idle = cp->idle_timeout_s && idle_for > (uint64_t)cp->idle_timeout_s * 1000 &&
                   p->live > cp->min_size;
        /* A reload lowered max_size: free connections beyond it go now
         * (leased ones when they come back free). */
        int over = pool_over_max(p);
        int gone = pool_gone(p);
        if ((retire || idle || over || gone) && slot_take_free(c, PB_SLOT_CLOSING)) {
            atomic_fetch_add_explicit(&p->shm->retired, 1, memory_order_relaxed);
            /* conn_close wants the slot broker-held: CLOSING is. */
            conn_close(c, retire ? "max_lifetime reached" : idle ? "idle timeout" : over ? "above max_size"
                                                                                    : "pool removed");
            return;
        }
        /* Idle past validate_after_idle_ms: check it in the background. */
        if (cp->validate_after_idle_ms && idle_for > cp->validate_after_idle_ms &&
            slot_take_free(c, PB_SLOT_RESETTING)) {
            conn_validate_or_offer(c);
            return;
        }
        conn_watch_idle(c);
        (*live_free)++;
        return;
    }
    if (st == PB_SLOT_RELEASING) {
        /* Given back, but its RELEASE entry never reached us (a scribbled
         * or lost ring entry): the word itself says what to do. */
        if (c->suspect_word == w + 1) {
            c->suspect_word = 0;
            conn_release(c, w);
        } else {
            c->suspect_word = w + 1;
        }
        return;
    }
    if (st == PB_SLOT_LEASED) {
        /* Past its lifetime, or the pool is above max_size: the holder
         * must release through the broker (not straight to the free map),
         * which closes it (release.c: should_retire; pool.c: pool_offer). */
        if ((c->retire_at_ms && now >= c->retire_at_ms) || pool_over_max(p))
            atomic_fetch_or(&c->slot->flags, PB_SF_RETIRE);
        uint64_t since = atomic_load(&c->slot->lease_ms);
        /* Past max_lease_ms the lease is taken back from a live holder:
         * its command cancelled, its transaction rolled back; the holder's
         * next call on it answers PB_ESTALE. */
        if (cp->max_lease_ms && since && now > since && now - since > cp->max_lease_ms) {
            client *cl = client_by_id(b, PB_WORD_OWNER(w));
            slog(LOG_LVL_WARN, c, "lease held for %llu ms by worker=%d: past max_lease_ms %u, taking it back",
                 (unsigned long long)(now - since), cl ? (int)cl->pid : -1, cp->max_lease_ms);
            conn_take_back(c, w, "max_lease_ms exceeded");
            return;
        }
        if (cp->leak_threshold_ms && since && now > since && now - since > cp->leak_threshold_ms &&
            c->leak_logged_word != w) {
            client *cl = client_by_id(b, PB_WORD_OWNER(w));
            c->leak_logged_word = w;
            atomic_fetch_add_explicit(&p->shm->leaks, 1, memory_order_relaxed);
            slog(LOG_LVL_WARN, c, "lease held for %llu ms by worker=%d (leak_threshold_ms %u)",
                 (unsigned long long)(now - since), cl ? (int)cl->pid : -1, cp->leak_threshold_ms);
        }
    }
}

void janitor_run(broker *b)
{
    atomic_store(&b->hdr->heartbeat_ms, b->now_ms);
    b->work.janitor_passes++;
    shm_republish(b);
    control_sweep(b);
    for (uint32_t i = 0; i < b->npools; i++) {
        pool *p = &b->pools[i];
        uint32_t free_count = 0;
        conn *backs = POOL_BACKENDS(p);
        for (uint32_t k = 0; k < POOL_NBACKENDS(p); k++)
            check_conn(b, p, &backs[k], &free_count);
        if (p->backs)
            txn_janitor(b, p);
        uint32_t fixed = p->nconns ? pb_freemap_repair(p->shm, p->conns[0].slot, p->nconns) : 0;
        if (fixed)
            log_debug("pool %s: put %u lost free-map hint%s back", p->cf->name, fixed, fixed == 1 ? "" : "s");
        failover_tick(p);
        sentinel_tick(p, 0);
        if (p->wq_len)
            pool_serve_waiters(p);
        pool_maybe_grow(p);
        settings_trial_tick(p);
        reload_switch_tick(p);
    }
    shm_publish_work(b);
}
