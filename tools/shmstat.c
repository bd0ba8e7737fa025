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
 * Which segment: -s NAME; else -c FILE (the shm_name of the broker's
 * config, read with the parser's comment and quote rules, without reading
 * anything else of it: the file may name secrets shmstat need not see);
 * else $POOLBROKER_SHM; else the poolbroker segments this user can read in
 * /dev/shm (a magic check): the only one, or a list to choose from.
 *
 * Exit codes: 0 ok; 1 usage, no such pool, several segments to choose from,
 * a config without a readable shm_name, or output failed; 2 cannot open the
 * segment; 3 not a poolbroker segment, another layout version, or a corrupt
 * header.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
#define SHM_DIR            "/dev/shm"
#define MAX_FOUND          64

enum out_format { FMT_TEXT, FMT_JSON, FMT_PROM };

typedef struct options {
    const char *shm_name;           /* -s, -c's shm_name, $POOLBROKER_SHM, the only segment
                                       found, or DEFAULT_SHM_NAME */
    const char *config;             /* -c: broker config to take shm_name from, or NULL */
    int list;                       /* -l: list the segments found and exit */
    char name_buf[80];              /* shm_name read from -c or found in /dev/shm */
    const char *pool;               /* -p: only this pool, or NULL */
    unsigned watch_s;               /* -w: refresh period, 0 = print once */
    enum out_format format;
} options;

/* ------------------------------------------------------------ main */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: shmstat [-s SHM_NAME | -c CONFIG] [-p POOL] [-w SECONDS] [--json | --prometheus] [-l] [-h] [-V]\n"
            "Show the state of a poolbroker shared-memory segment (read-only).\n"
            "  -s, --shm NAME      segment name (default: $POOLBROKER_SHM, else the only\n"
            "                      poolbroker segment readable in " SHM_DIR ", else %s)\n"
            "  -c, --config FILE   take the segment name from the broker's config (shm_name)\n"
            "  -l, --list          list the poolbroker segments readable in " SHM_DIR "\n"
            "  -p, --pool POOL     show only this pool and its slots\n"
            "  -w, --watch SECS    refresh every SECS seconds until interrupted\n"
            "      --json          print one JSON object (one per refresh with -w)\n"
            "      --prometheus    print Prometheus text exposition format\n"
            "  -h, --help          show this help\n"
            "  -V, --version       show the shared layout version shmstat was built for\n"
            "exit status: 0 ok, 1 usage, unknown pool, several segments, bad config or\n"
            "             write error, 2 cannot open\n"
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
        { "version", no_argument, NULL, 'V' },     { "config", required_argument, NULL, 'c' },
        { "list", no_argument, NULL, 'l' },        { NULL, 0, NULL, 0 },
    };
    o->shm_name = NULL;
    o->config = NULL;
    o->list = 0;
    o->pool = NULL;
    o->watch_s = 0;
    o->format = FMT_TEXT;
    int formats = 0, c;
    while ((c = getopt_long(argc, argv, "s:c:p:w:lhV", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            o->shm_name = optarg;
            break;
        case 'c':
            o->config = optarg;
            break;
        case 'l':
            o->list = 1;
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
    if (o->shm_name && o->config) {
        fprintf(stderr, "shmstat: -s and -c exclude each other\n");
        return EXIT_USAGE;
    }
    if (o->shm_name && !*o->shm_name) {
        fprintf(stderr, "shmstat: empty segment name\n");
        return EXIT_USAGE;
    }
    return -1;
}

/* ------------------------------------------------------------ -c FILE */

/* The shm_name of [broker] in the config at path, by the parser's rules
 * (broker/conf.c): a comment starts with ';' or '#' at the start of a line
 * or after whitespace; a value in double quotes keeps what is between them;
 * the default is DEFAULT_SHM_NAME.  Nothing else of the file is looked at.
 * Returns 0, or EXIT_USAGE after printing "FILE[:LINE]: what is wrong". */
static int shm_name_from_config(const char *path, char *out, size_t outlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "shmstat: %s: cannot open: %s\n", path, strerror(errno));
        return EXIT_USAGE;
    }
    char line[4096];
    int lineno = 0, in_broker = 0, found = 0;
    snprintf(out, outlen, "%s", DEFAULT_SHM_NAME);
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *s = line;
        if (lineno == 1 && strncmp(s, "\xEF\xBB\xBF", 3) == 0)
            s += 3;
        s[strcspn(s, "\r\n")] = 0;
        while (isspace((unsigned char)*s))
            s++;
        if (*s == ';' || *s == '#' || !*s)
            continue;
        if (*s == '[') {
            char *end = strchr(s, ']');
            if (end)
                *end = 0;
            char *name = s + 1;
            while (isspace((unsigned char)*name))
                name++;
            size_t n = strlen(name);
            while (n && isspace((unsigned char)name[n - 1]))
                name[--n] = 0;
            in_broker = strcmp(name, "broker") == 0;
            continue;
        }
        char *eq = strchr(s, '=');
        if (!in_broker || !eq)
            continue;
        char *k = s, *kend = eq;
        while (kend > k && isspace((unsigned char)kend[-1]))
            kend--;
        if ((size_t)(kend - k) != 8 || strncmp(k, "shm_name", 8) != 0)
            continue;
        char *v = eq + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        if (*v == '"') {
            char *q = strchr(v + 1, '"');
            if (!q) {
                fprintf(stderr, "shmstat: %s:%d: key 'shm_name': unterminated quote\n", path, lineno);
                fclose(f);
                return EXIT_USAGE;
            }
            *q = 0;
            v++;
        } else {
            for (char *c = v; *c; c++)
                if ((*c == ';' || *c == '#') && (c == v || c[-1] == ' ' || c[-1] == '\t')) {
                    *c = 0;
                    break;
                }
            size_t n = strlen(v);
            while (n && isspace((unsigned char)v[n - 1]))
                v[--n] = 0;
        }
        if (v[0] != '/' || strlen(v) < 2 || strlen(v) >= outlen || strchr(v + 1, '/')) {
            fprintf(stderr, "shmstat: %s:%d: key 'shm_name': '%.64s' is not a segment name like /poolbroker\n",
                    path, lineno, v);
            fclose(f);
            return EXIT_USAGE;
        }
        snprintf(out, outlen, "%s", v);
        found = 1;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        fprintf(stderr, "shmstat: %s: read error\n", path);
        return EXIT_USAGE;
    }
    (void)found;                    /* not set: the broker's default, as the broker reads it */
    return 0;
}

/* ------------------------------------------------------------ discovery */

typedef struct found_seg {
    char name[80];                  /* "/NAME" as shm_open takes it */
    pb_shm_header h;                /* its header as read (checked only for magic) */
} found_seg;

/* The poolbroker segments in SHM_DIR this process can read: regular files
 * at least a header long that start with PB_SHM_MAGIC.  Returns how many
 * (at most max), sorted by name. */
static int find_segments(found_seg *out, int max)
{
    DIR *d = opendir(SHM_DIR);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < max) {
        if (e->d_name[0] == '.' || strlen(e->d_name) + 2 > sizeof out[n].name)
            continue;
        int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct stat st;
        ssize_t got = -1;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (size_t)st.st_size >= sizeof(pb_shm_header))
            got = pread(fd, &out[n].h, sizeof out[n].h, 0);
        close(fd);
        if (got != (ssize_t)sizeof out[n].h || out[n].h.magic != PB_SHM_MAGIC)
            continue;
        snprintf(out[n].name, sizeof out[n].name, "/%s", e->d_name);
        n++;
    }
    closedir(d);
    for (int i = 1; i < n; i++)                     /* a few names: insertion sort */
        for (int j = i; j > 0 && strcmp(out[j - 1].name, out[j].name) > 0; j--) {
            found_seg t = out[j];
            out[j] = out[j - 1];
            out[j - 1] = t;
        }
    return n;
}

static void print_found(FILE *out, const found_seg *f, int n)
{
    static const char *const states[] = { "starting", "running", "draining", "stopped" };
    for (int i = 0; i < n; i++) {
        const pb_shm_header *h = &f[i].h;
        uint32_t st = atomic_load_explicit(&((pb_shm_header *)h)->state, memory_order_relaxed);
        int32_t pid = atomic_load_explicit(&((pb_shm_header *)h)->broker_pid, memory_order_relaxed);
        uint32_t np = atomic_load_explicit(&((pb_shm_header *)h)->npools, memory_order_relaxed);
        fprintf(out, "  %-32s broker pid %-8d %-9s pools %-3u layout %u%s\n", f[i].name, (int)pid,
                st < 4 ? states[st] : "?", np, h->version,
                h->version == PB_SHM_VERSION && h->fingerprint == PB_SHM_FINGERPRINT ? "" : " (not this shmstat's)");
    }
}

/* Settle o->shm_name: -s, -c, $POOLBROKER_SHM, or what /dev/shm holds.
 * Returns -1 to go on, or an exit status (-l, or nothing to choose). */
static int choose_segment(options *o)
{
    if (o->list) {
        found_seg f[MAX_FOUND];
        int n = find_segments(f, MAX_FOUND);
        if (n == 0)
            printf("no poolbroker segment readable in %s\n", SHM_DIR);
        print_found(stdout, f, n);
        return 0;
    }
    if (o->shm_name)
        return -1;
    if (o->config) {
        int rc = shm_name_from_config(o->config, o->name_buf, sizeof o->name_buf);
        if (rc)
            return rc;
        o->shm_name = o->name_buf;
        return -1;
    }
    const char *env = getenv("POOLBROKER_SHM");
    if (env && *env) {
        o->shm_name = env;
        return -1;
    }
    found_seg f[MAX_FOUND];
    int n = find_segments(f, MAX_FOUND);
    if (n == 1) {
        snprintf(o->name_buf, sizeof o->name_buf, "%s", f[0].name);
        o->shm_name = o->name_buf;
        return -1;
    }
    if (n > 1) {
        fprintf(stderr, "shmstat: %d poolbroker segments in %s; choose one with -s NAME (or -c CONFIG):\n", n,
                SHM_DIR);
        print_found(stderr, f, n);
        return EXIT_USAGE;
    }
    o->shm_name = DEFAULT_SHM_NAME;  /* none readable: say so about the default */
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
    if ((rc = choose_segment(&o)) >= 0)
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
