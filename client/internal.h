/*
 * internal.h — libpoolbroker's private structures, shared by client.c (attach,
 * leases, waiting), pg.c (PostgreSQL commands) and redis.c (Redis commands).
 */
#ifndef PB_CLIENT_INTERNAL_H
#define PB_CLIENT_INTERNAL_H

#include <stdint.h>
#include <sys/types.h>

#include "pb_shm.h"
#include "pgproto.h"
#include "poolbroker.h"

/* A statement prepared by this client (pb_pg_prepare). */
typedef struct pb_stmt {
    char *name;                      /* the caller's name */
    char *sql;
    unsigned int *types;
    int nparams;
    uint64_t hash;                   /* of (sql, types): the server-side name is pb_<hash> */
    struct pb_stmt *next;
} pb_stmt;

struct pb_notify {
    int be_pid;
    char *channel;
    char *payload;
    struct pb_notify *next;
};

struct pb_client {
    char *socket_path;
    unsigned fork_gen;               /* pb_fork_gen when we attached */
    int attached;                    /* mapping and fds valid */
    int broken;                      /* broker gone: re-attach on next acquire */
    int ctrl_fd, doorbell_fd;
    pb_shm_header *hdr;
    size_t shm_size;
    uint64_t buf_off;               /* slot buffers start here (attach answer) */
    pb_shm_pool *pools;
    pb_shm_slot *slots;
    pb_shm_client *rec;              /* our record */
    uint32_t id, generation, npools, nslots;
    uint32_t lifeline_tid;           /* the broker's lifeline tid (attach answer); 0 none */
    uint32_t epoch;                  /* attachments so far; leases remember theirs */
    uint32_t sq_tail;                /* private producer position */
    uint32_t ticket;
    /* last pool looked up by name */
    char last_pool[PB_NAME_MAX];
    uint32_t last_pool_idx;
    pb_lease *leases;                /* live leases (doubly linked) */
    pb_lease *retired_head;          /* released handles, oldest first: reused */
    pb_lease *retired_tail;          /* only after RETIRED_MIN others, so a double */
    uint32_t nretired;               /* release or use-after-release says PB_ESTALE */
    pb_buf scratch;                  /* request encoding */
    pgp_notice_fn notice_fn;
    void *notice_arg;
    pb_stmt *stmts;                  /* prepared statements (pb_pg_prepare) */
    uint32_t spin_ns;                /* adaptive spin budget before sleeping for a reply */
    uint32_t acq_spin_ns;            /* ... and for a slot (adapts separately: under
                                        contention a queued waiter rarely wins by spinning) */
    struct pb_nb *nb;                /* non-blocking API state (async.c); NULL until used */
};

struct pb_lease {
    pb_client *c;
    uint32_t epoch;                  /* c->epoch at grant */
    unsigned fork_gen;               /* pb_fork_gen at grant */
    uint32_t slot;
    uint32_t local;                  /* slot's index within its pool (checked at grant) */
    uint32_t pool;
    int type;                        /* PB_POOL_POSTGRES | PB_POOL_REDIS */
    uint64_t word;                   /* slot word of this lease */
    pb_shm_slot *s;
    uint8_t *req, *rep;              /* buffers (checked against the segment size) */
    uint32_t req_size, rep_size;
    uint64_t rep_tail;               /* our consumer position in the reply ring */
    uint32_t seq;                    /* our last request sequence (slot req_seq is a copy) */
    uint32_t stream_off;             /* bytes of a streamed request handed to the broker so far
                                        (0: none in progress; see pbi_submit_nowait) */
    char errtext[128];               /* pb_lease_error: what the last PB_ETOOBIG was about */
    uint64_t done_target;            /* slot reply_done once every reply we asked for is in */
    uint32_t pending;                /* replies submitted and not yet read */
    int desync;                      /* a reply could not be parsed: connection unusable */
    int released;                    /* handle is in the retired list */
    int copy;                        /* LC_NONE, LC_IN, LC_OUT */
    pb_buf cbuf;                     /* COPY IN data not yet submitted */
    pb_buf pipe;                     /* pipelined statements not yet submitted */
    pb_buf pends;                    /* uint32 end offset in pipe of each one */
    uint32_t pqueued;                /* statements in pipe */
    pb_result *held;                 /* a result for pb_pg_get_result (refused COPY, COPY end) */
    pb_notify *nq_head, *nq_tail;    /* notifications not yet taken */
    int watching;                    /* asked the broker for unasked messages */
    pgp_dec dec;                     /* PostgreSQL reply decoder */
    void *rreader;                   /* Redis: redisReader */
    pb_buf rqueue;                   /* Redis: appended commands, not yet sent */
    pb_buf rends;                    /* Redis: uint32 end offset of each queued command */
    uint32_t rqueued;                /* Redis: commands in rqueue */
    void *rheld;                     /* Redis: a reply pb_is_busy parsed, not yet taken */
    pb_buf rmsgs;                    /* Redis: Pub/Sub messages read and not yet taken
                                        (redisReply *), the oldest at rmsg_head */
    size_t rmsg_head;                /* index in rmsgs of the first message not taken */
    uint32_t rnsub, rnssub;          /* Redis: subscriptions (channels + patterns; shard
                                        channels) as the server last counted them */
    int rsub_sent;                   /* Redis: a (P|S)(UN)SUBSCRIBE went out on this lease */
    int nb_armed;                    /* async.c: a futex wait on rep_futex is outstanding */
    pb_lease *prev, *next;
};

enum { LC_NONE = 0, LC_IN, LC_OUT };

extern unsigned pb_fork_gen;

/* client.c: shared by the protocol halves */
int pbi_lease_check(pb_lease *l);                                /* PB_OK | PB_ESTALE | PB_EBROKER */
int pbi_lease_usable(pb_lease *l, unsigned type);                /* ... | PB_EINVAL | PB_ETYPE | PB_EPROTO */
/* Hand the request req (len bytes, nreplies replies owed) to the broker,
 * through the request buffer: in one part when it fits, else streamed in
 * parts of req_size (include/pb_shm.h, "Streamed requests"), waiting for the
 * broker to take each.  PB_ETOOBIG when len is over the pool's
 * max_request_size (pb_lease_error says by how much), or when the broker
 * refused it mid-stream. */
int pbi_submit(pb_lease *l, const void *req, size_t len, uint32_t nreplies);
/* As pbi_submit, but PB_EBUSY instead of waiting for the request buffer: a
 * streamed request may then be partly handed over; call again with the same
 * req and len (its ack wakes rep_futex) until PB_OK or an error. */
int pbi_submit_nowait(pb_lease *l, const void *req, size_t len, uint32_t nreplies);
/* PB_OK if a request of len bytes is within the pool's max_request_size,
 * else PB_ETOOBIG with pb_lease_error's text set. */
int pbi_request_fits(pb_lease *l, size_t len);
/* The most bytes of whole messages (pipelined statements or commands, COPY
 * data) to put in one request: the request buffer, or max_request_size
 * when that is smaller.  A single message over it goes by itself. */
uint32_t pbi_group_limit(pb_lease *l);
/* Bytes waiting in the reply ring, without waiting (0 if none); errors as pbi_reply_wait. */
int pbi_reply_peek(pb_lease *l, const uint8_t **p, size_t *avail);
/* Wait once for the broker to publish something on the slot (reply bytes,
 * an ack, an error) or until deadline_ns (0: a slice).  PB_OK, PB_ETIMEDOUT,
 * PB_EBROKER. */
int pbi_wait(pb_lease *l, uint32_t seen, uint64_t deadline_ns);
int pbi_push_watch(pb_lease *l);
/* Wait until the reply ring has bytes (or an error); *avail = contiguous bytes at *p. */
int pbi_reply_wait(pb_lease *l, const uint8_t **p, size_t *avail);
void pbi_reply_consume(pb_lease *l, size_t n);
/* redis.c: a reply the reader produced is a Pub/Sub message (1: queued on
 * the lease for pb_redis_get_message; the caller reads on) or a reply (0:
 * the caller returns it), by the broker's rule (broker/redis.c, Pub/Sub);
 * PB_ENOMEM (rep freed).  Free the queue with pbi_redis_free_messages. */
int pbi_redis_sort(pb_lease *l, void *rep);
/* The next reply from what the reader holds and the ring has, Pub/Sub
 * messages set aside: PB_OK with *out the reply (the caller's), or *out
 * NULL when none is complete: at once without wait, or with wait only when
 * none is owed (l->pending 0).  Errors (PB_EPROTO, PB_ENOMEM, the ring's as
 * pbi_reply_wait) mark the lease out of step. */
int pbi_redis_next(pb_lease *l, int wait, struct redisReply **out);
void pbi_redis_free_messages(pb_lease *l);
void pbi_set_preview(pb_lease *l, const char *text, size_t len);
uint64_t pbi_now_us(void);

/* client.c, for async.c: the pieces of pb_acquire and of waiting that the
 * non-blocking API reuses (each is the static function of the same name). */
int pbi_ensure_attached(pb_client *c);
int pbi_find_pool(pb_client *c, const char *name, uint32_t *idx);
int pbi_try_take_free(pb_client *c, uint32_t pi, uint32_t *slot, uint64_t *word);
int pbi_make_lease(pb_client *c, uint32_t pi, uint32_t s, uint64_t w, pb_lease **out);
int pbi_sq_push(pb_client *c, uint64_t e);
int pbi_broker_alive(pb_client *c);
uint64_t pbi_coarse_ms(void);

/* wait.c: sleep until *word moves from seen (the broker's FUTEX_WAKE), the
 * deadline passes (CLOCK_MONOTONIC ns; 0: none, but wake within 500 ms),
 * or the broker dies — with no periodic wake-up while the broker has a
 * lifeline (see wait.c).  *sleeping is 1 while asleep.  PB_OK (woken, or
 * time to look again), PB_ETIMEDOUT (deadline already passed), PB_EBROKER. */
int pbi_sleep(pb_client *c, _Atomic uint32_t *word, _Atomic uint32_t *sleeping, uint32_t seen,
              uint64_t deadline_ns);
/* wait.c: 1 when a CPU is idle (fewer runnable tasks than CPUs), so that
 * spinning before a sleep costs nobody else their CPU; sampled every few ms. */
int pbi_core_idle(void);

/* pg.c, for async.c: submit what fits of the queued statements without
 * waiting; feed the decoder what the ring holds without waiting (a PGP_* or
 * a negative code).  (Session state is the broker's to see: it reads what
 * the server reports.) */
int pbi_pg_flush(pb_lease *l);
int pbi_pg_pump(pb_lease *l);

/* async.c: the client's non-blocking state, freed by pb_disconnect; whether
 * a non-blocking acquire is queued with the broker (the one wait word is
 * then taken, and pb_acquire must not wait). */
void pbi_nb_free(pb_client *c);
/* A lease handle is retired: cancel its armed futex wait, if any. */
void pbi_nb_lease_gone(pb_lease *l);
int pbi_nb_waiting(const pb_client *c);

/* attachcheck.c: the attach-time checks, pure so that the fuzz target runs them */
/* The broker's answer, n bytes of it received: PB_OK, PB_EBROKER (short, not
 * a poolbroker answer, or a status that is no PB_E* code), PB_EVERSION (the
 * broker's layout is not ours), the PB_E* code the broker refused with, or
 * PB_EPROTO (the layout it sent fails pbi_check_layout). */
int pbi_attach_resp_check(const pb_attach_resp *resp, ssize_t n);
/* The layout of a segment of shm_size bytes, for client client_id: PB_OK
 * only when the pool table (PB_MAX_POOLS entries), the client table
 * (max_clients), the slot table (nslots) lie in that order, cache-line
 * aligned, between the header and buf_off, buf_off within the segment, and
 * our own record exists; else PB_EPROTO. */
int pbi_check_layout(const pb_shm_layout *L, uint64_t shm_size, uint32_t client_id);

#endif /* PB_CLIENT_INTERNAL_H */
