/*
 * test_slots.c — unit tests of the shared-memory primitives in pb_shm.h:
 * slot words and their generations, the free map (with duplicate and lost
 * entries, and its repair), and the same under real concurrency: forked
 * processes hammering one anonymous shared mapping, some of them SIGKILLed
 * mid-loop.  No broker, no server.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pb_shm.h"

#define NSLOTS 8

typedef struct fixture {
    pb_shm_pool pool;
    pb_shm_slot slots[NSLOTS];
    _Atomic uint64_t holders[NSLOTS];   /* test's own check: who thinks it holds a slot */
    _Atomic uint64_t violations;
    _Atomic uint64_t ops;
} fixture;

static fixture *new_fixture(void)
{
    fixture *f = mmap(NULL, sizeof *f, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(f != MAP_FAILED);
    memset(f, 0, sizeof *f);
    for (uint32_t i = 0; i < NSLOTS; i++) {
        atomic_store(&f->slots[i].word, PB_WORD(PB_SLOT_FREE, 0, 1));
        pb_freemap_put(&f->pool, i);
    }
    return f;
}

static void free_fixture(fixture *f)
{
    munmap(f, sizeof *f);
}

static void test_word_fields(void **state)
{
    (void)state;
    uint64_t w = PB_WORD(PB_SLOT_LEASED, 0xABCDEF, 0xFFFFFFFFu);
    assert_int_equal(PB_WORD_STATE(w), PB_SLOT_LEASED);
    assert_int_equal(PB_WORD_OWNER(w), 0xABCDEF);
    assert_int_equal(PB_WORD_GEN(w), 0xFFFFFFFFu);
    /* The owner field is 24 bits: a larger id cannot spill into the state. */
    w = PB_WORD(PB_SLOT_FREE, 0x1ABCDEF, 7);
    assert_int_equal(PB_WORD_STATE(w), PB_SLOT_FREE);
    assert_int_equal(PB_WORD_OWNER(w), 0xABCDEF);
    /* Every transition bumps the generation, and it wraps. */
    uint64_t n = PB_WORD_NEXT(PB_WORD(PB_SLOT_LEASED, 5, 0xFFFFFFFFu), PB_SLOT_FREE, 0);
    assert_int_equal(PB_WORD_GEN(n), 0);
    assert_int_equal(PB_WORD_STATE(n), PB_SLOT_FREE);
    assert_int_equal(PB_WORD_OWNER(n), 0);
    /* Wait and submission words. */
    uint64_t ww = PB_WAITW(PB_WAIT_GRANTED, 1234, 99);
    assert_int_equal(PB_WAITW_STATE(ww), PB_WAIT_GRANTED);
    assert_int_equal(PB_WAITW_SLOT(ww), 1234);
    assert_int_equal(PB_WAITW_TICKET(ww), 99);
    uint64_t e = PB_SQE(PB_SQ_SUBMIT, 77, 0xDEADBEEF);
    assert_int_equal(PB_SQE_OP(e), PB_SQ_SUBMIT);
    assert_int_equal(PB_SQE_ARG(e), 77);
    assert_int_equal(PB_SQE_VAL(e), 0xDEADBEEF);
    /* Client ids: index in the low bits, reuse count above, 0 is nobody. */
    uint32_t id = (3u << PB_CLIENT_INDEX_BITS) | (41 + 1);
    assert_int_equal(PB_CLIENT_INDEX(id), 41);
}

static void test_stale_generation_cannot_release(void **state)
{
    (void)state;
    fixture *f = new_fixture();
    uint64_t w1 = 0;
    int s = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 7, &w1);
    assert_true(s >= 0);
    /* Release (as the client does), lease again by someone else. */
    uint64_t exp = w1;
    assert_true(atomic_compare_exchange_strong(&f->slots[s].word, &exp, PB_WORD_NEXT(w1, PB_SLOT_FREE, 0)));
    pb_freemap_put(&f->pool, (uint32_t)s);
    uint64_t w2 = 0;
    int s2;
    do
        s2 = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 9, &w2);
    while (s2 >= 0 && s2 != s);
    assert_int_equal(s2, s);
    assert_int_not_equal(PB_WORD_GEN(w2), PB_WORD_GEN(w1));
    /* The first holder's stale handle cannot touch the new lease. */
    exp = w1;
    assert_false(atomic_compare_exchange_strong(&f->slots[s].word, &exp, PB_WORD_NEXT(w1, PB_SLOT_FREE, 0)));
    assert_int_equal(atomic_load(&f->slots[s].word), w2);
    free_fixture(f);
}

static void test_take_all_then_empty(void **state)
{
    (void)state;
    fixture *f = new_fixture();
    int seen[NSLOTS] = { 0 };
    uint64_t w = 0;
    for (int i = 0; i < NSLOTS; i++) {
        int s = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 1, &w);
        assert_true(s >= 0 && s < NSLOTS);
        assert_int_equal(seen[s], 0);
        seen[s] = 1;
        assert_int_equal(PB_WORD_STATE(atomic_load(&f->slots[s].word)), PB_SLOT_LEASED);
    }
    assert_int_equal(pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 1, &w), -1);
    free_fixture(f);
}

static void test_duplicate_entries_harmless(void **state)
{
    (void)state;
    fixture *f = new_fixture();
    uint64_t w = 0;
    int s = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 1, &w);
    /* A stale duplicate hint for a leased slot: nobody may get that slot. */
    pb_freemap_put(&f->pool, (uint32_t)s);
    for (int i = 0; i < NSLOTS - 1; i++) {
        uint64_t w2 = 0;
        int t = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 2, &w2);
        assert_true(t >= 0);
        assert_int_not_equal(t, s);
    }
    uint64_t w3 = 0;
    assert_int_equal(pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 2, &w3), -1);
    assert_int_equal(PB_WORD_OWNER(atomic_load(&f->slots[s].word)), 1);
    /* Bits past the pool's capacity (scribbled) are ignored too. */
    atomic_fetch_or(&f->pool.freemap[0], 1ull << 63);
    assert_int_equal(pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 2, &w3), -1);
    free_fixture(f);
}

static void test_lost_entries_repaired(void **state)
{
    (void)state;
    fixture *f = new_fixture();
    /* A process died after clearing bits 2 and 5 but before its CAS. */
    atomic_fetch_and(&f->pool.freemap[0], ~((1ull << 2) | (1ull << 5)));
    uint64_t w = 0;
    int got = 0;
    while (pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 1, &w) >= 0)
        got++;
    assert_int_equal(got, NSLOTS - 2);
    /* Leased slots are not "repaired"; the two lost free ones are. */
    assert_int_equal(pb_freemap_repair(&f->pool, f->slots, NSLOTS), 2);
    assert_int_equal(pb_freemap_repair(&f->pool, f->slots, NSLOTS), 0);
    int a = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 1, &w);
    int b = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 1, &w);
    assert_true((a == 2 && b == 5) || (a == 5 && b == 2));
    free_fixture(f);
}

/* One worker: take, check exclusivity, release, N times. */
static void hammer(fixture *f, uint32_t id, int iters)
{
    for (int i = 0; i < iters; i++) {
        uint64_t w = 0;
        int s = pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, id, &w);
        if (s < 0)
            continue;
        uint64_t none = 0;
        if (!atomic_compare_exchange_strong(&f->holders[s], &none, id))
            atomic_fetch_add(&f->violations, 1);    /* two holders at once */
        atomic_fetch_add(&f->ops, 1);
        atomic_store(&f->holders[s], 0);
        uint64_t exp = w;
        if (!atomic_compare_exchange_strong(&f->slots[s].word, &exp, PB_WORD_NEXT(w, PB_SLOT_FREE, 0)))
            atomic_fetch_add(&f->violations, 1);    /* our lease changed under us */
        pb_freemap_put(&f->pool, (uint32_t)s);
    }
}

static void test_concurrent_processes(void **state)
{
    (void)state;
    fixture *f = new_fixture();
    enum { PROCS = 6, ITERS = 200000 };
    pid_t pids[PROCS];
    for (int p = 0; p < PROCS; p++) {
        pids[p] = fork();
        assert_true(pids[p] >= 0);
        if (pids[p] == 0) {
            hammer(f, (uint32_t)(p + 1), ITERS);
            _exit(0);
        }
    }
    for (int p = 0; p < PROCS; p++) {
        int st;
        assert_int_equal(waitpid(pids[p], &st, 0), pids[p]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    assert_int_equal(atomic_load(&f->violations), 0);
    assert_true(atomic_load(&f->ops) > 0);
    /* Every slot ends free, and every one can be taken. */
    uint64_t w = 0;
    int got = 0;
    pb_freemap_repair(&f->pool, f->slots, NSLOTS);
    while (pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 99, &w) >= 0)
        got++;
    assert_int_equal(got, NSLOTS);
    free_fixture(f);
}

/* Processes SIGKILLed at random points: a slot may stay leased by a dead
 * owner (the broker reclaims those by pidfd) or lose its bit (the repair
 * puts it back) — but never be held twice, and never vanish. */
static void test_kill_storm(void **state)
{
    (void)state;
    fixture *f = new_fixture();
    srand(12345);
    for (int round = 0; round < 40; round++) {
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            hammer(f, (uint32_t)(100 + round), 1 << 30);
            _exit(0);
        }
        usleep((useconds_t)(200 + rand() % 2000));
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        /* What the broker does for a dead owner: take its slots back. */
        for (int s = 0; s < NSLOTS; s++) {
            uint64_t w = atomic_load(&f->slots[s].word);
            if (PB_WORD_STATE(w) == PB_SLOT_LEASED && PB_WORD_OWNER(w) == (uint32_t)(100 + round)) {
                atomic_store(&f->holders[s], 0);
                assert_true(atomic_compare_exchange_strong(&f->slots[s].word, &w, PB_WORD_NEXT(w, PB_SLOT_FREE, 0)));
                pb_freemap_put(&f->pool, (uint32_t)s);
            }
        }
        pb_freemap_repair(&f->pool, f->slots, NSLOTS);
    }
    assert_int_equal(atomic_load(&f->violations), 0);
    uint64_t w = 0;
    int got = 0;
    while (pb_freemap_take(&f->pool, f->slots, NSLOTS, PB_SLOT_LEASED, 99, &w) >= 0)
        got++;
    assert_int_equal(got, NSLOTS);
    free_fixture(f);
}

/* The pool identity seqlock (issue #19): a process republishing a pool's
 * name between two different values while another reads it never lets the
 * reader see anything but one of the two whole names; and republishing an
 * unchanged identity writes nothing (the seqlock does not move). */
static void test_pool_ident_seqlock(void **state)
{
    (void)state;
    fixture *f = new_fixture();
    static const char *const names[2] = { "pool07", "a-longer-name-for-pool-7" };
    pb_shm_pool_ident_publish(&f->pool, names[0], 1, 3, 5);
    uint32_t seq = atomic_load(&f->pool.ident_seq);
    pb_shm_pool_ident_publish(&f->pool, names[0], 1, 3, 5);
    assert_int_equal(atomic_load(&f->pool.ident_seq), seq);       /* unchanged: not written */
    pb_shm_pool_ident_publish(&f->pool, names[1], 1, 3, 5);
    assert_int_equal(atomic_load(&f->pool.ident_seq), seq + 2);
    atomic_store(&f->pool.ident_seq, 7);                          /* a scribbled, odd seqlock */
    pb_pool_ident id;
    assert_int_equal(pb_shm_pool_ident_read(&f->pool, &id, 4), -1);
    pb_shm_pool_ident_publish(&f->pool, names[1], 1, 3, 5);       /* the janitor makes it even */
    assert_int_equal(pb_shm_pool_ident_read(&f->pool, &id, 4), 0);
    assert_string_equal(id.name, names[1]);

    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        for (long i = 0; atomic_load(&f->ops) == 0; i++)
            pb_shm_pool_ident_publish(&f->pool, names[i & 1], 1, 3, 5);
        _exit(0);
    }
    long torn = 0, reads = 0, retried = 0;
    for (; reads < 2000000; reads++) {
        if (pb_shm_pool_ident_read(&f->pool, &id, 1000) < 0) {
            retried++;
            continue;
        }
        if (strcmp(id.name, names[0]) != 0 && strcmp(id.name, names[1]) != 0)
            torn++;
    }
    atomic_store(&f->ops, 1);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    print_message("%ld reads, %ld torn, %ld gave up\n", reads, torn, retried);
    assert_int_equal(torn, 0);
    munmap(f, sizeof *f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_word_fields),
        cmocka_unit_test(test_stale_generation_cannot_release),
        cmocka_unit_test(test_take_all_then_empty),
        cmocka_unit_test(test_duplicate_entries_harmless),
        cmocka_unit_test(test_lost_entries_repaired),
        cmocka_unit_test(test_concurrent_processes),
        cmocka_unit_test(test_kill_storm),
        cmocka_unit_test(test_pool_ident_seqlock),
    };
    return cmocka_run_group_tests_name("slots", tests, NULL, NULL);
}
