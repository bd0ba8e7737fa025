/*
 * lifeline.c — the broker's lifeline: how a sleeping worker learns that the
 * broker died without waking up to look.
 *
 * A worker waiting for a slot or a reply sleeps on a futex word the broker
 * bumps.  A broker that dies bumps nothing, so the worker used to wake every
 * 100 ms to check the broker (kill(pid, 0), a poll of the control socket).
 * With 2,000 waiters that was 20,000 wake-ups a second on 2 cores, enough to
 * keep the run queue full and leave granted waiters unscheduled for seconds
 * (issue #19).  Instead each sleeper waits with futex_waitv on two words: its
 * own, and header.lifeline — a robust futex "held" by a broker thread that
 * exists only to hold it.  When that thread exits (the broker exiting, or
 * killed with any signal, SIGKILL included), the kernel walks its robust
 * list, finds the word still holding its tid, replaces it with
 * FUTEX_WAITERS | FUTEX_OWNER_DIED and,
 * because FUTEX_WAITERS is always set, wakes one sleeper; a client that sees
 * the bit wakes the rest (client/wait.c).  A value that changed also stops
 * anyone from going to sleep on it afterwards.
 *
 * Why a thread of its own: set_robust_list replaces the calling thread's list,
 * which glibc uses for its robust mutexes; this thread has none.  The list
 * entry is in the broker's private memory and only the word is in the
 * segment (futex_offset points from one to the other), so a worker can
 * scribble the word but never the list the kernel walks.  A scribbled word
 * is put back by the janitor (lifeline_republish); a client checks the word's
 * tid against the one the broker gave it at attach and, for a word that does
 * not match, falls back to sleeping in slices.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"

static struct robust_list_head lifeline_head;  /* the lifeline thread's robust list */
static struct robust_list lifeline_entry;      /* its one entry: futex_offset leads to the word */
static _Atomic uint32_t lifeline_ready;        /* tid once published, UINT32_MAX on failure */

static void *lifeline_thread(void *arg)
{
    broker *b = arg;
    lifeline_entry.next = &lifeline_head.list;
    lifeline_head.list.next = &lifeline_entry;
    lifeline_head.futex_offset = (long)((char *)&b->hdr->lifeline - (char *)&lifeline_entry);
    lifeline_head.list_op_pending = NULL;
    if (syscall(SYS_set_robust_list, &lifeline_head, sizeof lifeline_head) != 0) {
        log_errno(LOG_LVL_WARN, errno, "set_robust_list: no lifeline (waiting workers check the broker "
                                       "every 100 ms instead)");
        atomic_store(&lifeline_ready, UINT32_MAX);
        return NULL;
    }
    uint32_t tid = (uint32_t)syscall(SYS_gettid) & FUTEX_TID_MASK;
    atomic_store(&b->hdr->lifeline, PB_LIFELINE_WORD(tid));
    atomic_store(&lifeline_ready, tid);
    for (;;)
        pause();                    /* every signal is blocked: until the process ends */
    return NULL;
}

int lifeline_start(broker *b)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 64 * 1024);
    int rc = pthread_create(&t, &at, lifeline_thread, b);
    pthread_attr_destroy(&at);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        log_errno(LOG_LVL_WARN, rc, "lifeline thread: none (waiting workers check the broker every 100 ms "
                                    "instead)");
        return 0;
    }
    uint32_t tid;
    while ((tid = atomic_load(&lifeline_ready)) == 0)
        usleep(100);
    b->lifeline_tid = tid == UINT32_MAX ? 0 : tid;
    return 0;
}

void lifeline_republish(broker *b)
{
    if (!b->lifeline_tid)
        return;
    uint32_t want = PB_LIFELINE_WORD(b->lifeline_tid);
    uint32_t w = atomic_load(&b->hdr->lifeline);
    if (w == want)
        return;
    log_warn("header lifeline %08x scribbled (want %08x): rewritten", w, want);
    shm_note_repair(b);
    atomic_store(&b->hdr->lifeline, want);
    /* Anyone asleep on the scribbled value would miss our death: wake them
     * to go back to sleep on the right one. */
    syscall(SYS_futex, &b->hdr->lifeline, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void lifeline_cut(broker *b)
{
    /* The kernel reads the list only when the thread exits: emptied now, it
     * will not touch whatever is mapped at the word's address by then. */
    lifeline_head.list.next = &lifeline_head.list;
    atomic_fetch_or(&b->hdr->lifeline, FUTEX_OWNER_DIED);
    syscall(SYS_futex, &b->hdr->lifeline, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
