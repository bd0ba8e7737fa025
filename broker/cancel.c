/*
 * cancel.c — PostgreSQL query cancellation off the event loop.
 *
 * PQcancel() in libpq 15 is blocking (it opens a new connection to the
 * server and waits for it to close), so the loop never calls it: it takes a
 * PGcancel with PQgetCancel() (cheap, no I/O) and queues it here; one
 * thread, started on first use, sends the requests one after another.  The
 * loop learns the outcome the usual way: the cancelled command ends with
 * SQLSTATE 57014, or the janitor closes the connection after a grace period.
 *
 * A cancel request names a backend, not a statement: if the statement ends
 * on its own before the request arrives, the request would cancel whatever
 * that backend runs next.  So each connection counts its undelivered
 * cancels, and the broker gives it no new command (and no new holder) until
 * the count is back to zero (conn_settle).
 */
#define _GNU_SOURCE
#include <libpq-fe.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"

typedef struct creq {
    PGcancel *cancel;
    int backend_pid;
    _Atomic int *inflight;  /* the connection's count of cancels not yet delivered */
    int wake_fd;            /* eventfd to ring when delivered (the broker's doorbell) */
    struct creq *next;
} creq;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static creq *head, *tail;
static int started, stopping;
static pthread_t thread;
static _Atomic unsigned delivered;  /* cancels delivered so far */

unsigned cancel_delivered(void)
{
    return atomic_load(&delivered);
}

static void *cancel_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!head && !stopping)
            pthread_cond_wait(&cv, &mu);
        if (!head)
            break;
        creq *r = head;
        head = r->next;
        if (!head)
            tail = NULL;
        pthread_mutex_unlock(&mu);
        char err[256];
        if (!PQcancel(r->cancel, err, sizeof err))
            log_warn("cancel request for backend=%d failed: %s", r->backend_pid, err);
        PQfreeCancel(r->cancel);
        /* PQcancel has returned: the server has signalled the backend, so
         * this cancel cannot land on a later statement.  Tell the loop:
         * the connection may be handed on (or take its next command). */
        atomic_fetch_sub(r->inflight, 1);
        atomic_fetch_add(&delivered, 1);
        uint64_t one = 1;
        (void)!write(r->wake_fd, &one, sizeof one);
        free(r);
        pthread_mutex_lock(&mu);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

int cancel_request(void *pgconn, int backend_pid, _Atomic int *inflight, int wake_fd)
{
    PGcancel *cn = PQgetCancel(pgconn);
    if (!cn)
        return -1;
    creq *r = malloc(sizeof *r);
    if (!r) {
        PQfreeCancel(cn);
        return -1;
    }
    r->cancel = cn;
    r->backend_pid = backend_pid;
    r->inflight = inflight;
    r->wake_fd = wake_fd;
    r->next = NULL;
    atomic_fetch_add(inflight, 1);
    pthread_mutex_lock(&mu);
    if (!started) {
        if (pthread_create(&thread, NULL, cancel_main, NULL) != 0) {
            pthread_mutex_unlock(&mu);
            atomic_fetch_sub(inflight, 1);
            PQfreeCancel(cn);
            free(r);
            return -1;
        }
        started = 1;
    }
    if (tail)
        tail->next = r;
    else
        head = r;
    tail = r;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    return 0;
}

void cancel_shutdown(void)
{
    pthread_mutex_lock(&mu);
    stopping = 1;
    int was_started = started;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    if (was_started)
        pthread_join(thread, NULL);
}
