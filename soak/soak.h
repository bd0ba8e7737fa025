/*
 * soak.h — what the parts of the soak program (`make soak`, soak/run) share:
 * the per-worker statistics file layout, the operation names, small time and
 * file helpers.
 *
 * A worker keeps its counters in a file it maps MAP_SHARED (wNN.I.stats), so
 * that what it acknowledged survives a SIGKILL: the checker reads them after
 * the fact.  Events that need a time or an id go to a text log (wNN.I.log),
 * one write(2) per line, for the same reason.
 */
#ifndef SOAK_H
#define SOAK_H

#include <stdint.h>
#include <stddef.h>

#define SOAK_MAGIC     0x534f414b31u   /* "SOAK1" */
#define SOAK_NKEYS     16              /* Redis counters soak:ctr:0..15 */
#define SOAK_NACCOUNTS 100             /* soak_accounts rows */
#define SOAK_BALANCE   1000            /* initial balance of each */
#define SOAK_BIG_BYTES (2 * 1024 * 1024)

/* Operation types, each timed separately (worst call, calls past the limit). */
enum soak_op {
    OP_ACQUIRE, OP_RELEASE, OP_TRANSFER, OP_INSERT, OP_UNCOMMITTED, OP_BIG,
    OP_PG_PIPE, OP_INCR, OP_REDIS_PIPE, OP_N
};
extern const char *const soak_op_name[OP_N];

/* One worker incarnation's counters.  Written only by that worker (plain
 * stores, it is the only writer); read by the checker after it is gone. */
struct soak_stats {
    uint64_t magic;                      /* SOAK_MAGIC once initialised */
    int32_t  wid, inc, pid, clean_exit;  /* worker id, incarnation, pid; 1 when it ran to its end */
    int64_t  start_ms, last_ok_ms;       /* wall clock (ms): started, last successful operation */
    uint64_t ok[OP_N], err[OP_N];        /* calls that succeeded / failed */
    uint64_t worst_us[OP_N];             /* longest call not spanning a SIGSTOP */
    uint64_t stopped[OP_N];              /* calls that spanned a SIGSTOP (not timed) */
    uint64_t over_limit[OP_N];           /* calls longer than their timeout + 1 s */
    int64_t  incr_acked[SOAK_NKEYS];     /* INCRs answered with an integer */
    int64_t  incr_unknown[SOAK_NKEYS];   /* INCRs whose answer was lost */
    int64_t  incr_pending[SOAK_NKEYS];   /* sent, answer not processed yet (killed: unknown) */
    int64_t  incr_refused[SOAK_NKEYS];   /* answered with an error (not applied) */
};

int64_t soak_wall_ms(void);
uint64_t soak_mono_us(void);
void soak_sleep_ms(unsigned ms);
/* Short name of a libpoolbroker error code ("PB_ETIMEDOUT"). */
const char *soak_code_name(int rc);

int soak_worker_main(int argc, char **argv);
int soak_sampler_main(int argc, char **argv);
int soak_check_main(int argc, char **argv);
int soak_scale_main(int argc, char **argv);

#endif /* SOAK_H */
