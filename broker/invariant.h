/*
 * invariant.h — checks of the broker's own invariants (SQLite's ALWAYS() and
 * NEVER() in sqliteInt.h are the model).
 *
 * A debug or sanitizer build (PB_DEBUG defined: `make SANITIZE=...` or
 * `make DEBUG=1`) aborts on a broken invariant, so tests find it at once.  A
 * release build logs it and takes the defensive path the code provides:
 *
 *   if (NEVER(c->expect == 0)) { ...recover...; }
 *   if (ALWAYS(p->connecting > 0)) p->connecting--;
 *
 * Only for what the broker itself got wrong.  Anything a worker can write in
 * shared memory (slot words, ring entries, lengths, tails) is checked at run
 * time and repaired or refused, never asserted: a worker must not be able to
 * crash the broker.
 */
#ifndef PB_INVARIANT_H
#define PB_INVARIANT_H

/* Report a broken invariant (file, line, the expression); returns nothing.
 * Aborts in debug builds. */
void pb_invariant_failed(const char *file, int line, const char *expr);

/* ALWAYS(X): X is expected true; evaluates to X.  NEVER(X): X is expected
 * false; evaluates to X.  Either way the value is the real one, so the
 * defensive branch runs in release builds. */
#define ALWAYS(X) ((X) ? 1 : (pb_invariant_failed(__FILE__, __LINE__, "ALWAYS(" #X ")"), 0))
#define NEVER(X)  ((X) ? (pb_invariant_failed(__FILE__, __LINE__, "NEVER(" #X ")"), 1) : 0)

#endif /* PB_INVARIANT_H */
