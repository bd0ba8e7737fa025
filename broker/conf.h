/*
 * conf.h — poolbroker.conf: the parsed configuration.
 *
 * The file is INI: a [broker] section and one [pool NAME] section per pool.
 * Durations carry their unit in the key name (_ms, _s); sizes accept k/m
 * suffixes.  Unknown keys, sections and bad values are errors that name the
 * file, the line and the key.
 */
#ifndef PB_CONF_H
#define PB_CONF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pb_shm.h"

#define CONF_MAX_UIDS 16
#define CONF_ERR_MAX  512

/* What a pool does when its server fails over (conf_pool.follow). */
enum {
    PB_FOLLOW_NONE = 0,             /* one server: a lost connection is only that connection */
    PB_FOLLOW_HOSTS,                /* several hosts (libpq's host=a,b) or a Sentinel replica pool: a
                                       lost connection, 57P01/57P02/57P03 or -MASTERDOWN makes the
                                       broker drain every connection to that server */
    PB_FOLLOW_PRIMARY,              /* the pool wants the primary (target_session_attrs read-write or
                                       primary; a Sentinel master pool): SQLSTATE 25006 (read-only
                                       transaction) and -READONLY count as well */
};

typedef struct conf_pool {
    char name[PB_NAME_MAX];         /* [pool NAME]; [A-Za-z0-9_.-], 1..31 chars */
    int type;                       /* PB_POOL_POSTGRES | PB_POOL_REDIS (key: type) */
    /* postgres */
    char *conninfo;                 /* libpq conninfo string (required for postgres) */
    /* redis */
    char *host;                     /* default "127.0.0.1" */
    int port;                       /* default 6379 */
    char *unix_socket;              /* overrides host/port when set */
    char *password_file;            /* file holding the password (first line) */
    char *password;                 /* read from password_file; never in shm or logs */
    char *user;                     /* ACL user for AUTH, optional */
    int db;                         /* default 0 */
    /* redis behind Sentinel (instead of host/port/unix_socket): sentinel.c */
    char *sentinels;                /* "host:port,host:port,..." (key sentinels), checked; or NULL */
    char *sentinel_master;          /* the master's name at the sentinels (required with sentinels) */
    char *sentinel_password_file;   /* file holding the sentinels' password (first line) */
    char *sentinel_password;        /* read from it; never in shm or logs */
    int sentinel_replica;           /* sentinel_role = replica: connect to a replica, not the master */
    /* failover (both types): what makes the broker drop a server's connections,
     * worked out from conninfo or sentinels (PB_FOLLOW_*) */
    int follow;
    /* generic */
    uint32_t min_size;              /* default 0 */
    uint32_t max_size;              /* default 10; 1..PB_MAX_POOL_SLOTS; >= min_size */
    uint32_t slots;                 /* slots reserved at start (buffers, free-map room): a reload
                                       can raise max_size up to it; 0 = not set: the default
                                       headroom (conf_pool_slots) */
    uint32_t acquire_timeout_ms;    /* default 5000 */
    uint32_t command_timeout_ms;    /* default 0 = none */
    uint32_t max_lifetime_s;        /* default 3600; 0 = unlimited */
    uint32_t idle_timeout_s;        /* default 300; 0 = never */
    uint64_t max_uses;              /* default 0 = unlimited */
    uint32_t validate_after_idle_ms;/* default 30000; 0 = never */
    int pool_mode;                  /* PB_MODE_*; key pool_mode: session (default) | transaction */
    int reset_policy;               /* PB_RESET_*; key reset: auto (default) | rollback | discard_all
                                       | <SQL> */
    char *reset_sql;                /* the custom SQL when PB_RESET_CUSTOM */
    uint32_t leak_threshold_ms;     /* default 10000; 0 = off */
    uint32_t max_lease_ms;          /* default 0 = off */
    uint32_t request_buffer;        /* default 64k; 1k..64m */
    uint32_t reply_buffer;          /* default 256k; 4k..256m; rounded up to a power of two */
    uint32_t max_request_size;      /* bytes: the largest request a lease may send (it streams
                                       through request_buffer in parts); 1k..2g; default 1g for
                                       postgres (the server's message limit), 512m for redis
                                       (its proto-max-bulk-len default) */
    int line;                       /* line of the [pool] header (for messages) */
} conf_pool;

typedef struct conf {
    char *path;                     /* file it was read from */
    char *socket;                   /* default "/run/poolbroker/poolbroker.sock" */
    unsigned socket_mode;           /* default 0660 (octal in the file) */
    char *shm_name;                 /* default "/poolbroker"; must start with '/' */
    unsigned shm_mode;              /* default 0600 */
    uid_t allowed_uids[CONF_MAX_UIDS];
    int n_allowed_uids;             /* 0: only the broker's own uid */
    gid_t allowed_gids[CONF_MAX_UIDS];
    int n_allowed_gids;
    int log_level;                  /* LOG_DEBUG..LOG_ERROR of log.h; default info */
    char *log_target;               /* "stderr" (default) | "syslog" */
    uint32_t shutdown_timeout_ms;   /* default 30000 */
    char *metrics_listen;           /* "host:port" or NULL */
    char *io_backend;               /* "auto" (default) | "io_uring" | "epoll" */
    uint32_t max_clients;           /* default 1024; 1..PB_MAX_CLIENTS */
    uint32_t spare_slots;           /* default 32: slots (64k/256k buffers) kept for pools
                                       that a reload adds or grows */
    conf_pool *pools;
    int npools;
} conf;

/* Parse the file at path into a freshly allocated conf.  On error returns
 * NULL and writes "FILE:LINE: key 'KEY': what is wrong" into err. */
conf *conf_load(const char *path, char *err, size_t errlen);

/* Parse from a string (name is used in messages only); for tests and fuzzing. */
conf *conf_parse(const char *name, const char *text, char *err, size_t errlen);

/* Free a conf and everything it owns (wipes passwords first).  NULL is fine. */
void conf_free(conf *c);

/* The pool named name, or NULL. */
conf_pool *conf_find_pool(conf *c, const char *name);

/* Without `slots`, a pool reserves room: in session mode (a slot is a
 * connection) for a reload to raise max_size to 4 times what it started
 * with, and to 64 at least; in transaction mode (a slot is a lease handle)
 * 8 handles per connection, at least 64.  At most 4096 either way.  The
 * room is address space more than memory: a slot's request buffer and reply
 * ring are pages of the segment that /dev/shm allocates only once they are
 * used, and the broker and the library never touch an unused slot's
 * buffers.  What is paid at once is the slot's entry in the slot table (448
 * bytes) and the broker's record for it. */
#define CONF_SLOTS_HEADROOM     4u
#define CONF_SLOTS_MIN_DEFAULT  64u
#define TXN_HANDLES_PER_CONN    8u
#define TXN_MIN_HANDLES         64u

/* How many slots the pool gets when the segment is made: connections in
 * session mode, lease handles in transaction mode; `slots`, else the room
 * above.  Never less than max_size. */
static inline uint32_t conf_pool_slots(const conf_pool *cp)
{
    if (cp->slots)
        return cp->slots > cp->max_size ? cp->slots : cp->max_size;
    int txn = cp->pool_mode == PB_MODE_TRANSACTION;
    uint64_t n = (uint64_t)cp->max_size * (txn ? TXN_HANDLES_PER_CONN : CONF_SLOTS_HEADROOM);
    if (n < (txn ? TXN_MIN_HANDLES : CONF_SLOTS_MIN_DEFAULT))
        n = txn ? TXN_MIN_HANDLES : CONF_SLOTS_MIN_DEFAULT;
    if (n > PB_MAX_POOL_SLOTS)
        n = PB_MAX_POOL_SLOTS;
    return n > cp->max_size ? (uint32_t)n : cp->max_size;
}

#endif /* PB_CONF_H */
