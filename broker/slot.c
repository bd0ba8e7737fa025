/*
 * slot.c — every write the broker makes to a slot word, and to the free map.
 *
 * The slot word (pb_shm.h: state, owner, generation in one 64-bit word) is
 * shared with every worker.  The rules for changing it, written once:
 *
 *   1. A word another process may write (FREE, LEASED, RELEASING) changes
 *      only by CAS from the value the broker read (slot_take, slot_take_free,
 *      slot_pop_free).  Losing the CAS means the other side moved first: the
 *      caller looks again or leaves the slot alone, never retries blindly.
 *   2. A word the broker holds (CONNECTING, RESETTING, RECLAIMING, CLOSING,
 *      EMPTY) moves by plain store (slot_set, slot_put_free): no honest
 *      worker writes it.  Handing it to a waiter (slot_grant) is still a CAS,
 *      so a word a worker scribbled meanwhile is not silently overwritten.
 *   3. Every write bumps the generation (PB_WORD_NEXT): a worker holding an
 *      old word can never CAS it back.
 *   4. A word that cannot be right is overwritten (slot_repair) only by the
 *      janitor, after it saw the same impossible value on two passes.
 *
 * The transitions, with who makes them:
 *
 *   EMPTY ─broker─▶ CONNECTING ─broker─▶ (pool_offer) FREE or LEASED(waiter)
 *   FREE ─client─▶ LEASED(c) ─client─▶ FREE                  (fast paths)
 *   LEASED(c) ─client─▶ RELEASING(c) ─broker, RELEASE─▶ RESETTING ─▶ pool_offer
 *   LEASED(c) ─broker, c died or overstayed─▶ RECLAIMING ─▶ pool_offer
 *   FREE ─broker─▶ RESETTING (validate, idle check) or CLOSING (retire)
 *   RESETTING / RECLAIMING / CONNECTING ─broker─▶ CLOSING ─broker─▶ EMPTY
 *
 * The free map (one bit per slot in the pool's shm entry) is a hint; the word
 * is the truth.  A bit is set only after the word is FREE, and cleared when
 * the broker takes a slot that may still have it.
 */
#define _GNU_SOURCE
#include "broker.h"

void freemap_clear(pool *p, uint32_t local)
{
    atomic_fetch_and(&p->shm->freemap[local / 64], ~(1ull << (local % 64)));
}

/* The free-map bit of c's slot, cleared; a transaction-mode backend at home
 * has a private record and no bit. */
void conn_freemap_clear(conn *c)
{
    if (!CONN_AT_HOME(c))
        freemap_clear(c->pool, conn_local(c));
}

/* Rule 1: *seen (as read) to state, owner 0; 1 if won.  On a loss *seen
 * holds the word that won. */
int slot_take(conn *c, uint64_t *seen, unsigned state)
{
    return atomic_compare_exchange_strong(&c->slot->word, seen, PB_WORD_NEXT(*seen, state, 0));
}

/* Rule 1: a FREE slot to the broker (state); clears its free-map bit.  1 if
 * we got it. */
int slot_take_free(conn *c, unsigned state)
{
    uint64_t w = atomic_load(&c->slot->word);
    if (PB_WORD_STATE(w) != PB_SLOT_FREE || !slot_take(c, &w, state))
        return 0;
    conn_freemap_clear(c);
    return 1;
}

/* Rule 1: pop a FREE slot of p off the free map for the broker (RESETTING). */
conn *slot_pop_free(pool *p)
{
    uint64_t w;
    int local = pb_freemap_take(p->shm, p->conns[0].slot, p->nconns, PB_SLOT_RESETTING, 0, &w);
    return local < 0 ? NULL : &p->conns[local];
}

/* Rule 2: move a broker-held slot to another broker state. */
void slot_set(conn *c, unsigned state)
{
    uint64_t w = atomic_load(&c->slot->word);
    atomic_store(&c->slot->word, PB_WORD_NEXT(w, state, 0));
}

/* Rule 2: a broker-held, clean slot goes FREE, then its free-map bit is set
 * (in that order: a client that finds the bit must find the word FREE). */
void slot_put_free(conn *c)
{
    slot_set(c, PB_SLOT_FREE);
    if (!CONN_AT_HOME(c))
        pb_freemap_put(c->pool->shm, conn_local(c));
}

/* Rule 2: hand a broker-held slot to client_id, stamped as a new lease.
 * Returns 1 with *leased the word written; 0 if the word was not ours any
 * more (a worker scribbled it). */
int slot_grant(conn *c, uint32_t client_id, uint64_t *leased)
{
    uint64_t held = atomic_load(&c->slot->word);
    *leased = PB_WORD_NEXT(held, PB_SLOT_LEASED, client_id);
    pb_slot_stamp_lease(c->slot, B.now_ms);
    atomic_store(&c->slot->rep_tail, c->rep_head);
    return atomic_compare_exchange_strong(&c->slot->word, &held, *leased);
}

/* Rule 4 (janitor): overwrite an impossible word with the broker state the
 * connection is really in; an EMPTY slot also loses its free-map bit. */
void slot_repair(conn *c, uint64_t seen, unsigned state)
{
    atomic_store(&c->slot->word, PB_WORD_NEXT(seen, state, 0));
    if (state == PB_SLOT_EMPTY)
        conn_freemap_clear(c);
}
