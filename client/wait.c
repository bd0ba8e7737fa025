/*
 * wait.c — how a worker sleeps until the broker has something for it.
 *
 * A waiter (for a slot: the client record's wait_futex; for a reply: the
 * slot's rep_futex) announces itself in the matching "sleeping" word, checks
 * the futex word has not moved, and sleeps; the broker changes the word
 * first and pays for FUTEX_WAKE only when "sleeping" is set (pb_futex_wake).
 *
 * It must also wake when the broker dies, which changes no word of ours.  It
 * used to sleep in 100 ms slices and check the broker between them
 * (kill(pid, 0), a poll of the control socket): with 2,000 waiters on 2 cores
 * those 20,000 wake-ups a second kept the run queue full, and granted
 * waiters sat unscheduled for 10 s and more (issue #19).  Now a waiter sleeps
 * with futex_waitv (Linux 5.16) on two words at once: its own, and the
 * header's lifeline, a robust futex held by a broker thread
 * (broker/lifeline.c) that the kernel marks FUTEX_OWNER_DIED — waking one
 * sleeper — when the broker dies, however it dies; whoever sees the mark
 * wakes the others.  So a waiter wakes exactly when it is granted or failed,
 * when its deadline passes, or when the broker dies; nothing polls.
 *
 * Other mechanisms considered: an io_uring per waiter with FUTEX_WAIT plus a
 * POLL_ADD on the control socket (what the non-blocking API does, async.c) —
 * exact too, but a ring per blocking waiter costs an fd and locked memory in
 * each of thousands of processes, and io_uring is often denied (seccomp);
 * growing slices — still polling, and a dead broker is noticed late.
 *
 * A waiter with no deadline (a lease holder waiting for its reply: at most one
 * per slot) still wakes twice a second (IDLE_CHECK_MS): its caller re-sends a
 * request whose ring entry a scribbler destroyed (pbi_reply_wait), and that
 * second also bounds the one case the lifeline cannot cover — a worker
 * scribbled the lifeline and the broker died before its janitor put it back.
 *
 * Fallback, when futex_waitv is missing (ENOSYS) or refused, or the broker has no
 * lifeline (lifeline_tid 0) or the word is not the one the broker gave us at
 * attach (scribbled, until the janitor puts it back): the old way, slices of
 * SLICE_MS with a check of the broker between them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define SLICE_MS        100         /* fallback: longest sleep before checking the broker */
#define IDLE_CHECK_MS   500         /* longest sleep with no deadline */
#define CORE_SAMPLE_MS  5           /* /proc/loadavg is read at most this often per thread */

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#ifndef FUTEX_32
#define FUTEX_32 2                  /* futex2 size flag: a 32-bit word; not FUTEX_PRIVATE_FLAG */
#endif

static _Atomic int have_waitv = 1;  /* cleared when the kernel has no (usable) futex_waitv */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Does lifeline word w say the broker died?  The kernel replaces the word
 * with FUTEX_WAITERS | FUTEX_OWNER_DIED (the tid gone); the broker's clean
 * stop sets the bit over its tid.  Then make sure every other sleeper knows
 * (the kernel wakes only one of us).  A worker can forge the bit, but no
 * more harmfully than it can set header.state to stopped, which the library
 * believes as well. */
static int lifeline_dead(pb_client *c, uint32_t w)
{
    if (!c->lifeline_tid || !(w & FUTEX_OWNER_DIED) ||
        ((w & FUTEX_TID_MASK) != 0 && (w & FUTEX_TID_MASK) != c->lifeline_tid))
        return 0;
    syscall(SYS_futex, &c->hdr->lifeline, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    return 1;
}

/* Sleep in one slice of at most SLICE_MS (to deadline_ns if sooner), then
 * check the broker: the fallback. */
static int sleep_slice(pb_client *c, _Atomic uint32_t *word, _Atomic uint32_t *sleeping, uint32_t seen,
                       uint64_t deadline_ns, uint64_t now)
{
    int ms = SLICE_MS;
    if (deadline_ns && (deadline_ns - now) / 1000000 < (uint64_t)ms)
        ms = (int)((deadline_ns - now + 999999) / 1000000);
    atomic_store(sleeping, 1);
    if (atomic_load(word) == seen)
        pb_futex_wait(word, seen, ms);
    atomic_store(sleeping, 0);
    if (atomic_load(word) == seen && !pbi_broker_alive(c))
        return PB_EBROKER;
    return PB_OK;
}

int pbi_sleep(pb_client *c, _Atomic uint32_t *word, _Atomic uint32_t *sleeping, uint32_t seen,
              uint64_t deadline_ns)
{
    uint64_t now = mono_ns();
    if (deadline_ns && now >= deadline_ns)
        return PB_ETIMEDOUT;
    uint32_t life = atomic_load(&c->hdr->lifeline);
    if (lifeline_dead(c, life))
        return atomic_load(word) == seen ? PB_EBROKER : PB_OK;
    if (!have_waitv || !c->lifeline_tid || life != PB_LIFELINE_WORD(c->lifeline_tid))
        return sleep_slice(c, word, sleeping, seen, deadline_ns, now);

    uint64_t until = deadline_ns ? deadline_ns : now + IDLE_CHECK_MS * 1000000ull;
    struct timespec ts = { .tv_sec = (time_t)(until / 1000000000ull), .tv_nsec = (long)(until % 1000000000ull) };
    struct futex_waitv v[2] = {
        { .val = seen, .uaddr = (uintptr_t)word, .flags = FUTEX_32 },
        { .val = life, .uaddr = (uintptr_t)&c->hdr->lifeline, .flags = FUTEX_32 },
    };
    atomic_store(sleeping, 1);
    long r = 0;
    int err = 0;
    if (atomic_load(word) == seen) {
        r = syscall(SYS_futex_waitv, v, 2, 0, &ts, CLOCK_MONOTONIC);
        err = r < 0 ? errno : 0;
    }
    atomic_store(sleeping, 0);
    if (r < 0 && err != EAGAIN && err != ETIMEDOUT && err != EINTR) {
        /* ENOSYS: the kernel predates futex_waitv (5.16); anything else
         * (EINVAL from a kernel that rejects our flags) would come back on
         * every call and turn the wait into a busy loop.  Slices from now on. */
        have_waitv = 0;
        return sleep_slice(c, word, sleeping, seen, deadline_ns, now);
    }
    if (lifeline_dead(c, atomic_load(&c->hdr->lifeline)) && atomic_load(word) == seen)
        return PB_EBROKER;
    /* Woken, timed out (the caller looks at the clock), EAGAIN (a word
     * moved before we slept), EINTR: the caller looks again. */
    return PB_OK;
}

/* ------------------------------------------------------------ spin or not
 * A waiter spins briefly before it sleeps (client.c, wait_change) because a
 * hand-off to a sleeping process costs a wake-up.  But a spinning waiter
 * holds a CPU: on 2 cores with 16 workers it takes the CPU the broker and
 * the server need to produce what it waits for.  So it spins only while a
 * core is idle: fewer runnable tasks than CPUs we may run on.  The count of
 * runnable tasks is the kernel's nr_running, the fourth field of
 * /proc/loadavg ("running/total", counting us), read with one pread on a
 * descriptor kept open, at most every CORE_SAMPLE_MS per thread.  It is the
 * whole machine's count; in a container limited to fewer CPUs it
 * overstates what is free, so the answer errs towards sleeping.  Where
 * /proc is not mounted, the answer is yes (the adaptive spin as before).
 * POOLBROKER_SPIN=always spins whatever the load (for measuring this). */

static int loadavg_fd = -1;
static unsigned online_cpus = 1;
static int spin_always;
static pthread_once_t core_once = PTHREAD_ONCE_INIT;

static void core_init(void)
{
    const char *e = getenv("POOLBROKER_SPIN");
    spin_always = e && strcmp(e, "always") == 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        online_cpus = (unsigned)CPU_COUNT(&set);
    loadavg_fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
}

static uint64_t coarse_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int pbi_core_idle(void)
{
    static _Thread_local uint64_t sampled_ms;
    static _Thread_local int idle = 1;
    pthread_once(&core_once, core_init);
    if (spin_always || loadavg_fd < 0)
        return 1;
    uint64_t now = coarse_ms();
    if (sampled_ms && now - sampled_ms < CORE_SAMPLE_MS)
        return idle;
    sampled_ms = now;
    char buf[128];
    ssize_t n = pread(loadavg_fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return idle = 1;
    buf[n] = 0;
    /* "0.52 0.58 0.59 3/512 12345": skip three fields, read the running count */
    char *p = buf;
    for (int f = 0; f < 3 && p; f++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    unsigned long running = p ? strtoul(p, NULL, 10) : 0;
    idle = running == 0 || running < online_cpus;
    return idle;
}
