/*
 * test_idle_scan.c — attached-but-idle processes do not make the broker work
 * more per query (issue #19), on a real PostgreSQL.
 *
 * The broker counts its own work (header.work_*, include/pb_shm.h): doorbell
 * scans, the sq_ready words they read, the rings they drained, submission
 * entries, and the client records its janitor's sweep looked at.  These are
 * counts, not times, so the test can assert on them on a busy machine.
 *
 *   - test_work_flat_beside_idle: BUSY processes run QUERIES queries each
 *     (acquire, SELECT 1, release) on a pool of 2, alone and then beside
 *     IDLE attached processes that do nothing.  Beside them, the rings
 *     drained per query and the bitmap words read per doorbell scan stay
 *     where they were alone (a scan of every attached ring would drain about
 *     IDLE more per scan), and a doorbell scan reads at most the two words
 *     the busy processes' records sit in (a scan of the whole bitmap would
 *     read max_clients / 64 = 16); a ring is drained from the bitmap at most
 *     once per entry pushed; and the janitor's sweep looks at no more than
 *     SWEEP_RECORDS (256) client records a pass, attached or not.
 *
 * shmstat --json shows the same counters.  Children block on a pipe until
 * the parent lets them go (the idle ones until the test ends); every child is
 * killed by the teardown.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "pb_shm.h"
#include "poolbroker.h"
#include "pbtest.h"

static th_env env_pg;

#define POOLS \
    "shutdown_timeout_ms = 5000\n" \
    "max_clients = 1024\n" \
    "\n" \
    "[pool busy]\n" \
    "type = postgres\n" \
    "conninfo = host=127.0.0.1 port=@PGPORT@ user=postgres dbname=postgres sslmode=disable " \
    "application_name=pbidlescan\n" \
    "min_size = 2\n" \
    "max_size = 2\n" \
    "acquire_timeout_ms = 60000\n"

#define IDLE      200               /* attached, idle */
#define BUSY      4                 /* processes running queries */
#define QUERIES   400               /* each, per measurement */
#define MAX_KIDS  (IDLE + 2 * BUSY)
#define SWEEP     256               /* the broker's SWEEP_RECORDS (broker/broker.h) */
#define PUBLISH_MS 300              /* the counters are stored at each janitor pass (100 ms) */

struct shared {
    _Atomic int ready;              /* children attached (and, for the idle ones, leased once) */
    _Atomic int ok, errors;
    _Atomic int first_err;          /* the first failing call's code (or 1: SQL error) */
};

static struct shared *sh;
static pid_t kids[MAX_KIDS];
static int nkids;
static int go_w = -1;               /* the write end of the current pipe: the parent's only */

/* The broker's work counters, as in the header. */
typedef struct work {
    uint64_t loop_passes, scans, scan_words, scan_rings, sq_entries, janitor_passes, sweep_records;
} work;

static int group_setup(void **state)
{
    (void)state;
    return pbt_group_start(&env_pg, 1, 0, POOLS);
}

static int group_teardown(void **state)
{
    (void)state;
    return pbt_group_stop(&env_pg);
}

static int test_setup(void **state)
{
    (void)state;
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        return -1;
    memset(sh, 0, sizeof *sh);
    nkids = 0;
    return 0;
}

static int test_teardown(void **state)
{
    for (int i = 0; i < nkids; i++)
        if (kids[i] > 0) {
            kill(kids[i], SIGKILL);
            waitpid(kids[i], NULL, 0);
        }
    nkids = 0;
    munmap(sh, sizeof *sh);
    return pbt_cleanup(state);
}

static void note_err(int rc)
{
    int zero = 0;
    atomic_compare_exchange_strong(&sh->first_err, &zero, rc);
}

/* Fork a child running fn(go_fd); it never returns into cmocka. */
static pid_t spawn(void (*fn)(int), int go_fd)
{
    assert_true(nkids < MAX_KIDS);
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        fail_msg("fork: %s", strerror(errno));
    if (pid == 0) {
        static const int sigs[] = { SIGINT, SIGTERM, SIGHUP, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };
        for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
            signal(sigs[i], SIG_DFL);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (go_w >= 0)
            close(go_w);            /* else the parent's close would be no EOF */
        fn(go_fd);
        _exit(0);
    }
    kids[nkids++] = pid;
    return pid;
}

static void wait_go(int go_fd)
{
    char b;
    while (read(go_fd, &b, 1) < 0 && errno == EINTR)
        ;
}

/* Attach, lease once (so the library has looked the pool up), then do
 * nothing until the test ends. */
static void idle_child(int go_fd)
{
    pb_client *c;
    int rc = pb_connect(env_pg.sock_path, &c);
    if (rc == PB_OK) {
        pb_lease *l;
        if ((rc = pb_acquire(c, "busy", -1, &l)) == PB_OK)
            rc = pb_release(l);
    }
    if (rc != PB_OK) {
        atomic_fetch_add(&sh->errors, 1);
        note_err(rc);
    }
    atomic_fetch_add(&sh->ready, 1);
    wait_go(go_fd);
}

/* Attach, wait for the go, then QUERIES x (acquire, SELECT 1, release). */
static void busy_child(int go_fd)
{
    pb_client *c;
    int rc = pb_connect(env_pg.sock_path, &c);
    atomic_fetch_add(&sh->ready, 1);
    if (rc != PB_OK) {
        atomic_fetch_add(&sh->errors, QUERIES);
        note_err(rc);
        return;
    }
    wait_go(go_fd);
    for (int i = 0; i < QUERIES; i++) {
        pb_lease *l;
        if ((rc = pb_acquire(c, "busy", -1, &l)) != PB_OK) {
            atomic_fetch_add(&sh->errors, 1);
            note_err(rc);
            continue;
        }
        pb_result *r = NULL;
        rc = pb_pg_exec(l, "SELECT 1", &r);
        if (rc != PB_OK || pb_result_status(r) == PB_RES_ERROR) {
            atomic_fetch_add(&sh->errors, 1);
            note_err(rc != PB_OK ? rc : 1);
        } else {
            atomic_fetch_add(&sh->ok, 1);
        }
        pb_result_free(r);
        if ((rc = pb_release(l)) != PB_OK) {
            atomic_fetch_add(&sh->errors, 1);
            note_err(rc);
        }
    }
    pb_disconnect(c);
}

static const pb_shm_header *map_header(void)
{
    int fd = shm_open(env_pg.shm_name, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        fail_msg("shm_open %s: %s", env_pg.shm_name, strerror(errno));
    const pb_shm_header *h = mmap(NULL, sizeof *h, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    assert_true(h != MAP_FAILED);
    assert_true(h->magic == PB_SHM_MAGIC && h->version == PB_SHM_VERSION);
    return h;
}

/* The counters once the janitor has published what happened so far. */
static work read_work(const pb_shm_header *h)
{
    pbt_sleep_ms(PUBLISH_MS);
    return (work){
        .loop_passes = atomic_load(&h->work_loop_passes),
        .scans = atomic_load(&h->work_scans),
        .scan_words = atomic_load(&h->work_scan_words),
        .scan_rings = atomic_load(&h->work_scan_rings),
        .sq_entries = atomic_load(&h->work_sq_entries),
        .janitor_passes = atomic_load(&h->work_janitor_passes),
        .sweep_records = atomic_load(&h->work_sweep_records),
    };
}

static work work_sub(work a, work b)
{
    return (work){ a.loop_passes - b.loop_passes, a.scans - b.scans, a.scan_words - b.scan_words,
                   a.scan_rings - b.scan_rings, a.sq_entries - b.sq_entries, a.janitor_passes - b.janitor_passes,
                   a.sweep_records - b.sweep_records };
}

/* BUSY processes run their queries; returns the broker's work meanwhile and
 * checks that every query succeeded. */
static work measure(const pb_shm_header *h, const char *label)
{
    int go[2];
    assert_int_equal(pipe(go), 0);
    go_w = go[1];
    int first = nkids, base_ready = atomic_load(&sh->ready), base_ok = atomic_load(&sh->ok);
    for (int i = 0; i < BUSY; i++)
        spawn(busy_child, go[0]);
    close(go[0]);
    while (atomic_load(&sh->ready) < base_ready + BUSY)
        pbt_sleep_ms(5);
    work w0 = read_work(h);
    close(go[1]);
    go_w = -1;
    for (int i = first; i < first + BUSY; i++) {
        int st;
        assert_int_equal(waitpid(kids[i], &st, 0), kids[i]);
        kids[i] = 0;
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    work d = work_sub(read_work(h), w0);
    int queries = atomic_load(&sh->ok) - base_ok;
    if (atomic_load(&sh->errors))
        fail_msg("%d calls failed (first: %s)", atomic_load(&sh->errors), pb_strerror(atomic_load(&sh->first_err)));
    assert_int_equal(queries, BUSY * QUERIES);
    print_message("%-12s %d queries: per query %.2f entries, %.2f doorbell scans, %.2f rings drained, "
                  "%.2f bitmap words, %.2f loop passes; janitor %.0f records a pass\n",
                  label, queries, (double)d.sq_entries / queries, (double)d.scans / queries,
                  (double)d.scan_rings / queries, (double)d.scan_words / queries, (double)d.loop_passes / queries,
                  d.janitor_passes ? (double)d.sweep_records / (double)d.janitor_passes : 0.0);
    return d;
}

/* What holds alone and beside the idle ones alike. */
static void check_bounds(work d)
{
    /* A ring is drained from the bitmap only for a bit a push set, and a
     * push sets its bit once: never more drains than entries (a few pushed
     * at the window's edges aside). */
    assert_true(d.scan_rings <= d.sq_entries + BUSY);
    /* The summary names the words that have bits: the busy processes' few
     * records sit in one or two words, never the 16 of max_clients 1024. */
    assert_true(d.scan_words <= 2 * d.scans + BUSY);
    /* The sweep's work per pass is bounded, whatever is attached. */
    assert_true(d.janitor_passes > 0);
    assert_true(d.sweep_records <= (uint64_t)SWEEP * d.janitor_passes);
}

static void test_work_flat_beside_idle(void **state)
{
    (void)state;
    const pb_shm_header *h = map_header();
    work alone = measure(h, "alone:");
    check_bounds(alone);

    int go[2];
    assert_int_equal(pipe(go), 0);
    go_w = go[1];
    int base_ready = atomic_load(&sh->ready);
    for (int i = 0; i < IDLE; i++)
        spawn(idle_child, go[0]);
    close(go[0]);
    double deadline = pbt_now_ms() + 60000;
    while (atomic_load(&sh->ready) < base_ready + IDLE && pbt_now_ms() < deadline)
        pbt_sleep_ms(10);
    assert_int_equal(atomic_load(&sh->ready), base_ready + IDLE);
    if (atomic_load(&sh->errors))
        fail_msg("%d idle processes failed to attach and lease (first: %s)", atomic_load(&sh->errors),
                 pb_strerror(atomic_load(&sh->first_err)));
    assert_true(atomic_load(&h->clients_attached) >= IDLE);
    int idle_w = go_w;              /* kept open: the idle ones stay attached */
    go_w = -1;

    work beside = measure(h, "beside idle:");
    check_bounds(beside);
    double q = BUSY * QUERIES;
    double rings_alone = (double)alone.scan_rings / q, rings_beside = (double)beside.scan_rings / q;
    double words_alone = alone.scans ? (double)alone.scan_words / (double)alone.scans : 0;
    double words_beside = beside.scans ? (double)beside.scan_words / (double)beside.scans : 0;
    print_message("rings drained per query %.2f alone, %.2f beside %d idle; bitmap words per scan %.2f, %.2f\n",
                  rings_alone, rings_beside, IDLE, words_alone, words_beside);
    /* Flat: less than one more ring per query (how entries batch into a
     * scan moves it by a few tenths), where scanning every attached ring
     * would add about IDLE per scan.  (Words per scan are bounded by
     * check_bounds: the busy processes' records span one or two words
     * wherever the idle ones put them.) */
    assert_true(rings_beside < rings_alone + 1.0);

    /* shmstat shows the counters. */
    size_t jn = 1u << 20;
    char *json = malloc(jn);
    assert_non_null(json);
    assert_int_equal(pbt_shmstat_json(&env_pg, json, jn), 0);
    assert_non_null(strstr(json, "\"work\": {\"loop_passes\": "));
    assert_non_null(strstr(json, "\"scan_rings\": "));
    free(json);

    close(idle_w);
    munmap((void *)h, sizeof *h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_work_flat_beside_idle, test_setup, test_teardown),
    };
    pbt_apply_test_filter();
    return cmocka_run_group_tests_name("idle_scan", tests, group_setup, group_teardown);
}
