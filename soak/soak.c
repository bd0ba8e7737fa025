/*
 * soak.c — the soak program's entry point and shared helpers.
 *
 *   soak worker  ...   one workload process (worker.c)
 *   soak sampler ...   samples pg_stat_activity against max_size (sampler.c)
 *   soak check   ...   the invariant checks and the summary (check.c)
 *   soak scale   ...   the scale step: many attached processes (scale.c)
 *
 * soak/run starts the servers, the broker, the workers and the fault
 * injector, and calls these; see docs/soak.md.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <poolbroker.h>

#include "soak.h"

const char *const soak_op_name[OP_N] = {
    "acquire", "release", "transfer", "insert", "uncommitted", "big_2MB",
    "pg_pipeline", "incr", "redis_pipeline",
};

int64_t soak_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t soak_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void soak_sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0)
        ;
}

const char *soak_code_name(int rc)
{
    static const char *const names[] = {
        "PB_OK", "PB_ETIMEDOUT", "PB_ENOPOOL", "PB_EBROKER", "PB_EBACKEND", "PB_ETOOBIG",
        "PB_ESTALE", "PB_EINVAL", "PB_ENOMEM", "PB_ESHUTDOWN", "PB_EPROTO", "PB_ETYPE",
        "PB_EVERSION", "PB_EPERM", "PB_EBUSY", "PB_ESERVER",
    };
    if (rc <= 0 && -rc < (int)(sizeof names / sizeof names[0]))
        return names[-rc];
    return "PB_E?";
}

static void usage(FILE *f)
{
    fputs("usage: soak worker|sampler|check|scale [options]   (see soak/run and docs/soak.md)\n", f);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const char *cmd = argv[1];
    if (strcmp(cmd, "worker") == 0)
        return soak_worker_main(argc - 1, argv + 1);
    if (strcmp(cmd, "sampler") == 0)
        return soak_sampler_main(argc - 1, argv + 1);
    if (strcmp(cmd, "check") == 0)
        return soak_check_main(argc - 1, argv + 1);
    if (strcmp(cmd, "scale") == 0)
        return soak_scale_main(argc - 1, argv + 1);
    usage(stderr);
    return 2;
}
