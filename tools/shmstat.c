/*
 * shmstat.c — inspect a poolbroker shared-memory segment (read-only).
 *
 * shmstat maps the broker's segment with PROT_READ and prints who holds what:
 * the broker's liveness, a summary per pool and one line per connection slot
 * (shmstat(1)).  It needs nothing from the broker, so it works when the
 * broker is stopped, hung or gone — the cases where it is needed most.
 *
 * This file is the command line: options, the -w loop and exit statuses.
 * Reading the segment (it is untrusted input) and rendering it as text, JSON
 * or Prometheus live in common/shmview_*.c, which the broker's /metrics
 * endpoint uses too.
 *
 * Exit codes: 0 ok; 1 usage, no such pool, or output failed; 2 cannot open
 * the segment; 3 not a poolbroker segment, another layout version, or a
 * corrupt header.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pb_shm.h"
#include "shmview.h"

/* Exit statuses; shmview_load's codes are the same numbers. */
enum { EXIT_USAGE = 1, EXIT_OPEN = 2, EXIT_LAYOUT = 3 };
_Static_assert((int)EXIT_USAGE == (int)SHMVIEW_ENOPOOL && (int)EXIT_OPEN == (int)SHMVIEW_EOPEN &&
               (int)EXIT_LAYOUT == (int)SHMVIEW_ELAYOUT, "shmstat exit statuses are shmview_load's codes");

#define DEFAULT_SHM_NAME   "/poolbroker"
#define MAX_WATCH_S        86400

enum out_format { FMT_TEXT, FMT_JSON, FMT_PROM };

typedef struct options {
    const char *shm_name;           /* -s, $POOLBROKER_SHM, or DEFAULT_SHM_NAME */
    const char *pool;               /* -p: only this pool, or NULL */
    unsigned watch_s;               /* -w: refresh period, 0 = print once */
    enum out_format format;
} options;

/* ------------------------------------------------------------ main */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: shmstat [-s SHM_NAME] [-p POOL] [-w SECONDS] [--json | --prometheus] [-h] [-V]\n"
            "Show the state of a poolbroker shared-memory segment (read-only).\n"
            "  -s, --shm NAME      segment name (default: $POOLBROKER_SHM, else %s)\n"
            "  -p, --pool POOL     show only this pool and its slots\n"
            "  -w, --watch SECS    refresh every SECS seconds until interrupted\n"
            "      --json          print one JSON object (one per refresh with -w)\n"
            "      --prometheus    print Prometheus text exposition format\n"
            "  -h, --help          show this help\n"
            "  -V, --version       show the shared layout version shmstat was built for\n"
            "exit status: 0 ok, 1 usage, unknown pool or write error, 2 cannot open\n"
            "             the segment, 3 not a poolbroker segment or another layout version\n",
            DEFAULT_SHM_NAME);
}

/* Parse argv into o.  Returns -1 to go on, or an exit status. */
static int parse_args(int argc, char **argv, options *o)
{
    enum { OPT_JSON = 256, OPT_PROM };
    static const struct option longopts[] = {
        { "shm", required_argument, NULL, 's' },   { "pool", required_argument, NULL, 'p' },
        { "watch", required_argument, NULL, 'w' }, { "json", no_argument, NULL, OPT_JSON },
        { "prometheus", no_argument, NULL, OPT_PROM }, { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },     { NULL, 0, NULL, 0 },
    };
    const char *env = getenv("POOLBROKER_SHM");
    o->shm_name = env && *env ? env : DEFAULT_SHM_NAME;
    o->pool = NULL;
    o->watch_s = 0;
    o->format = FMT_TEXT;
    int formats = 0, c;
    while ((c = getopt_long(argc, argv, "s:p:w:hV", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            o->shm_name = optarg;
            break;
        case 'p':
            o->pool = optarg;
            break;
        case 'w': {
            char *end;
            errno = 0;
            unsigned long n = strtoul(optarg, &end, 10);
            if (errno || end == optarg || *end || n == 0 || n > MAX_WATCH_S || optarg[0] == '-') {
                fprintf(stderr, "shmstat: -w wants whole seconds from 1 to %d, not '%s'\n", MAX_WATCH_S, optarg);
                return EXIT_USAGE;
            }
            o->watch_s = (unsigned)n;
            break;
        }
        case OPT_JSON:
            o->format = FMT_JSON;
            formats++;
            break;
        case OPT_PROM:
            o->format = FMT_PROM;
            formats++;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("shmstat for poolbroker shared layout version %u (fingerprint 0x%08" PRIx32 ")\n",
                   PB_SHM_VERSION, (uint32_t)PB_SHM_FINGERPRINT);
            return 0;
        default:
            usage(stderr);
            return EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "shmstat: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return EXIT_USAGE;
    }
    if (formats > 1) {
        fprintf(stderr, "shmstat: --json and --prometheus exclude each other\n");
        return EXIT_USAGE;
    }
    if (!*o->shm_name) {
        fprintf(stderr, "shmstat: empty segment name\n");
        return EXIT_USAGE;
    }
    return -1;
}

/* Read the segment once and print it to out.  Returns 0 or an exit status;
 * errors are printed to err. */
static int show_once(const options *o, FILE *out, FILE *err)
{
    shmview *v;
    char msg[512];
    int rc = shmview_load(o->shm_name, o->pool, &v, msg, sizeof msg);
    if (rc) {
        fprintf(err, "shmstat: %s\n", msg);
        return rc;
    }
    if (o->format == FMT_JSON)
        shmview_print_json(out, v);
    else if (o->format == FMT_PROM)
        shmview_print_prometheus(out, v, 0);
    else
        shmview_print_text(out, v);
    shmview_free(v);
    return 0;
}

/* -w: print every o->watch_s seconds until interrupted.  Text output is
 * rendered to memory first and drawn in one write over a cleared screen;
 * errors (the broker restarting replaces the segment) are shown and retried. */
static int watch(const options *o)
{
    for (;;) {
        if (o->format == FMT_TEXT) {
            char *buf = NULL;
            size_t len = 0;
            FILE *mem = open_memstream(&buf, &len);
            if (!mem) {
                perror("shmstat: open_memstream");
                return EXIT_OPEN;
            }
            char stamp[32];
            time_t now = time(NULL);
            strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", localtime(&now));
            fprintf(mem, "shmstat every %us, %s (^C to stop)\n", o->watch_s, stamp);
            show_once(o, mem, mem);
            fclose(mem);
            fputs("\033[H\033[2J", stdout);
            fwrite(buf, 1, len, stdout);
            free(buf);
        } else {
            show_once(o, stdout, stderr);
        }
        fflush(stdout);
        sleep(o->watch_s);
    }
}

int main(int argc, char **argv)
{
    options o;
    int rc = parse_args(argc, argv, &o);
    if (rc >= 0)
        return rc;

    /* A segment truncated while we copy it is an error message, not a crash. */
    shmview_catch_sigbus();

    if (o.watch_s)
        return watch(&o);
    rc = show_once(&o, stdout, stderr);
    if (fflush(stdout) != 0 && rc == 0) {
        perror("shmstat: writing output");
        rc = EXIT_USAGE;
    }
    return rc;
}
