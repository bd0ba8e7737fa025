/*
 * conf.c — poolbroker.conf: a small hand-written INI parser and the checks on
 * every key (see conf.h; the keys are documented in poolbroker.conf(5) and
 * docs/operations.md).
 *
 * The text is split into lines in place; each line is blank, a comment, a
 * [section] header or "key = value".  A comment starts with ';' or '#' at the
 * start of a line or right after whitespace, so "password=a;b" in a conninfo
 * survives while "max_size = 20  ; note" loses its note; a value in double
 * quotes keeps everything between them ("RESET ALL ; SELECT 1").  Every key is one row
 * of a static table (kind, range, field offset, pool types that accept it), so
 * what differs between keys is data, not code.  Checks that need the whole
 * section (keys that do not fit the pool's type, min_size <= max_size, the
 * required keys) run when the section ends.  The first error stops the parse;
 * its message names the file, the line and the key, and never holds a secret:
 * values of secret-bearing keys (conninfo, password files) are never echoed.
 *
 * Longer than the broker's other files on purpose: the key table, the parser
 * and each key's checks are one concern, and splitting them would put a key's
 * rules in several places.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <libpq-fe.h>

#include "conf.h"
#include "log.h"

#define CONF_FILE_MAX   (1u << 20)  /* larger config files are refused */
#define SECRET_LINE_MAX 4096        /* longest first line of a password_file */
#define SHM_NAME_LEN    60          /* longest shm_name (pb_shm_header has 64) */
#define SOCK_PATH_LEN   (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)
#define KEYS_MAX        32          /* room in parser.seen for either table */

#define KIB 1024u
#define MIB (1024u * 1024u)
#define GIB (1024u * 1024u * 1024u)

enum { SEC_NONE, SEC_BROKER, SEC_POOL };

/* Pool types that accept a key, one bit per PB_POOL_* value. */
#define T_PG    (1u << PB_POOL_POSTGRES)
#define T_REDIS (1u << PB_POOL_REDIS)
#define T_ANY   (T_PG | T_REDIS)

enum key_kind {
    K_STR,        /* char *: any non-empty text */
    K_PATH,       /* char *: a unix socket path (fits sun_path) */
    K_CHOICE,     /* char *: one of keydef.choices */
    K_INT,        /* int: decimal in min..max */
    K_U32,        /* uint32_t: decimal in min..max */
    K_U64,        /* uint64_t: decimal */
    K_SIZE,       /* uint32_t: decimal with optional k/m/g suffix, in min..max */
    K_SIZE_POW2,  /* K_SIZE, then rounded up to a power of two */
    K_MODE,       /* unsigned: octal permission bits, at most 0777 */
    K_FUNC,       /* keydef.fn does the work */
};

typedef struct parser parser;
typedef struct keydef keydef;

/* A key-specific setter: obj is the conf or conf_pool being filled.  Returns
 * 0, or -1 after writing the error. */
typedef int (*key_fn)(parser *p, void *obj, const keydef *k, char *val);

struct keydef {
    const char *name;               /* the key as written in the file */
    enum key_kind kind;             /* how the value is parsed and stored */
    unsigned types;                 /* pool keys: T_* that accept it; broker keys: 0 */
    size_t off;                     /* field offset in conf or conf_pool */
    uint64_t min, max;              /* range of numeric kinds */
    const char *const *choices;     /* K_CHOICE: NULL-terminated list */
    key_fn fn;                      /* K_FUNC */
};

struct parser {
    const char *name;               /* file name used in messages */
    const char *basedir;            /* relative password_file paths start here; NULL: cwd */
    char *err;                      /* caller's error buffer (may be NULL) */
    size_t errlen;
    int line;                       /* line being parsed, 1-based */
    conf *c;                        /* what we fill */
    int section;                    /* SEC_* */
    conf_pool *pool;                /* current pool when section == SEC_POOL */
    int seen[KEYS_MAX];             /* line each key of this section was set on; 0: not set */
    int broker_line;                /* line of the [broker] header; 0: none yet */
};

static int set_shm_name(parser *p, void *obj, const keydef *k, char *val);
static int set_uids(parser *p, void *obj, const keydef *k, char *val);
static int set_gids(parser *p, void *obj, const keydef *k, char *val);
static int set_log_level(parser *p, void *obj, const keydef *k, char *val);
static int set_metrics_listen(parser *p, void *obj, const keydef *k, char *val);
static int set_type(parser *p, void *obj, const keydef *k, char *val);
static int set_password_file(parser *p, void *obj, const keydef *k, char *val);
static int set_reset(parser *p, void *obj, const keydef *k, char *val);
static int set_pool_mode(parser *p, void *obj, const keydef *k, char *val);
static int set_conninfo(parser *p, void *obj, const keydef *k, char *val);
static int set_sentinels(parser *p, void *obj, const keydef *k, char *val);
static int set_sentinel_password_file(parser *p, void *obj, const keydef *k, char *val);
static int set_sentinel_role(parser *p, void *obj, const keydef *k, char *val);

static const char *const log_targets[] = { "stderr", "syslog", NULL };
static const char *const io_backends[] = { "auto", "io_uring", "epoll", NULL };

enum {
    BK_SOCKET, BK_SOCKET_MODE, BK_SHM_NAME, BK_SHM_MODE, BK_ALLOWED_UIDS,
    BK_ALLOWED_GIDS, BK_LOG_LEVEL, BK_LOG_TARGET, BK_SHUTDOWN_TIMEOUT_MS,
    BK_METRICS_LISTEN, BK_IO_BACKEND, BK_MAX_CLIENTS, BK_SPARE_SLOTS, BK_COUNT
};

#define BF(field) offsetof(conf, field)
static const keydef broker_keys[BK_COUNT] = {
    [BK_SOCKET]              = { "socket", K_PATH, 0, BF(socket), 0, 0, NULL, NULL },
    [BK_SOCKET_MODE]         = { "socket_mode", K_MODE, 0, BF(socket_mode), 0, 0777, NULL, NULL },
    [BK_SHM_NAME]            = { "shm_name", K_FUNC, 0, 0, 0, 0, NULL, set_shm_name },
    [BK_SHM_MODE]            = { "shm_mode", K_MODE, 0, BF(shm_mode), 0, 0777, NULL, NULL },
    [BK_ALLOWED_UIDS]        = { "allowed_uids", K_FUNC, 0, 0, 0, 0, NULL, set_uids },
    [BK_ALLOWED_GIDS]        = { "allowed_gids", K_FUNC, 0, 0, 0, 0, NULL, set_gids },
    [BK_LOG_LEVEL]           = { "log_level", K_FUNC, 0, 0, 0, 0, NULL, set_log_level },
    [BK_LOG_TARGET]          = { "log_target", K_CHOICE, 0, BF(log_target), 0, 0, log_targets, NULL },
    [BK_SHUTDOWN_TIMEOUT_MS] = { "shutdown_timeout_ms", K_U32, 0, BF(shutdown_timeout_ms), 0, UINT32_MAX, NULL, NULL },
    [BK_METRICS_LISTEN]      = { "metrics_listen", K_FUNC, 0, 0, 0, 0, NULL, set_metrics_listen },
    [BK_IO_BACKEND]          = { "io_backend", K_CHOICE, 0, BF(io_backend), 0, 0, io_backends, NULL },
    [BK_MAX_CLIENTS]         = { "max_clients", K_U32, 0, BF(max_clients), 1, PB_MAX_CLIENTS, NULL, NULL },
    [BK_SPARE_SLOTS]         = { "spare_slots", K_U32, 0, BF(spare_slots), 0, PB_MAX_POOL_SLOTS, NULL, NULL },
};
#undef BF

enum {
    PK_TYPE, PK_CONNINFO, PK_HOST, PK_PORT, PK_UNIX_SOCKET, PK_PASSWORD_FILE,
    PK_USER, PK_DB, PK_MIN_SIZE, PK_MAX_SIZE, PK_SLOTS, PK_ACQUIRE_TIMEOUT_MS,
    PK_COMMAND_TIMEOUT_MS, PK_MAX_LIFETIME_S, PK_IDLE_TIMEOUT_S, PK_MAX_USES,
    PK_VALIDATE_AFTER_IDLE_MS, PK_RESET, PK_LEAK_THRESHOLD_MS, PK_MAX_LEASE_MS,
    PK_REQUEST_BUFFER, PK_REPLY_BUFFER, PK_MAX_REQUEST_SIZE, PK_POOL_MODE, PK_SENTINELS, PK_SENTINEL_MASTER,
    PK_SENTINEL_PASSWORD_FILE, PK_SENTINEL_ROLE, PK_COUNT
};

#define PF(field) offsetof(conf_pool, field)
static const keydef pool_keys[PK_COUNT] = {
    [PK_TYPE]                  = { "type", K_FUNC, T_ANY, 0, 0, 0, NULL, set_type },
    [PK_CONNINFO]              = { "conninfo", K_FUNC, T_PG, PF(conninfo), 0, 0, NULL, set_conninfo },
    [PK_HOST]                  = { "host", K_STR, T_REDIS, PF(host), 0, 0, NULL, NULL },
    [PK_PORT]                  = { "port", K_INT, T_REDIS, PF(port), 1, 65535, NULL, NULL },
    [PK_UNIX_SOCKET]           = { "unix_socket", K_PATH, T_REDIS, PF(unix_socket), 0, 0, NULL, NULL },
    [PK_PASSWORD_FILE]         = { "password_file", K_FUNC, T_REDIS, 0, 0, 0, NULL, set_password_file },
    [PK_USER]                  = { "user", K_STR, T_REDIS, PF(user), 0, 0, NULL, NULL },
    [PK_DB]                    = { "db", K_INT, T_REDIS, PF(db), 0, 1000, NULL, NULL },
    [PK_MIN_SIZE]              = { "min_size", K_U32, T_ANY, PF(min_size), 0, PB_MAX_POOL_SLOTS, NULL, NULL },
    [PK_MAX_SIZE]              = { "max_size", K_U32, T_ANY, PF(max_size), 1, PB_MAX_POOL_SLOTS, NULL, NULL },
    [PK_SLOTS]                 = { "slots", K_U32, T_ANY, PF(slots), 1, PB_MAX_POOL_SLOTS, NULL, NULL },
    [PK_ACQUIRE_TIMEOUT_MS]    = { "acquire_timeout_ms", K_U32, T_ANY, PF(acquire_timeout_ms), 0, UINT32_MAX, NULL, NULL },
    [PK_COMMAND_TIMEOUT_MS]    = { "command_timeout_ms", K_U32, T_ANY, PF(command_timeout_ms), 0, UINT32_MAX, NULL, NULL },
    [PK_MAX_LIFETIME_S]        = { "max_lifetime_s", K_U32, T_ANY, PF(max_lifetime_s), 0, UINT32_MAX, NULL, NULL },
    [PK_IDLE_TIMEOUT_S]        = { "idle_timeout_s", K_U32, T_ANY, PF(idle_timeout_s), 0, UINT32_MAX, NULL, NULL },
    [PK_MAX_USES]              = { "max_uses", K_U64, T_ANY, PF(max_uses), 0, UINT64_MAX, NULL, NULL },
    [PK_VALIDATE_AFTER_IDLE_MS]= { "validate_after_idle_ms", K_U32, T_ANY, PF(validate_after_idle_ms), 0, UINT32_MAX, NULL, NULL },
    [PK_RESET]                 = { "reset", K_FUNC, T_PG, 0, 0, 0, NULL, set_reset },
    [PK_LEAK_THRESHOLD_MS]     = { "leak_threshold_ms", K_U32, T_ANY, PF(leak_threshold_ms), 0, UINT32_MAX, NULL, NULL },
    [PK_MAX_LEASE_MS]          = { "max_lease_ms", K_U32, T_ANY, PF(max_lease_ms), 0, UINT32_MAX, NULL, NULL },
    [PK_REQUEST_BUFFER]        = { "request_buffer", K_SIZE, T_ANY, PF(request_buffer), 1 * KIB, 64 * MIB, NULL, NULL },
    [PK_REPLY_BUFFER]          = { "reply_buffer", K_SIZE_POW2, T_ANY, PF(reply_buffer), 4 * KIB, 256 * MIB, NULL, NULL },
    [PK_MAX_REQUEST_SIZE]      = { "max_request_size", K_SIZE, T_ANY, PF(max_request_size), 1 * KIB, 2 * GIB, NULL, NULL },
    [PK_POOL_MODE]             = { "pool_mode", K_FUNC, T_ANY, 0, 0, 0, NULL, set_pool_mode },
    [PK_SENTINELS]             = { "sentinels", K_FUNC, T_REDIS, 0, 0, 0, NULL, set_sentinels },
    [PK_SENTINEL_MASTER]       = { "sentinel_master", K_STR, T_REDIS, PF(sentinel_master), 0, 0, NULL, NULL },
    [PK_SENTINEL_PASSWORD_FILE]= { "sentinel_password_file", K_FUNC, T_REDIS, 0, 0, 0, NULL, set_sentinel_password_file },
    [PK_SENTINEL_ROLE]         = { "sentinel_role", K_FUNC, T_REDIS, 0, 0, 0, NULL, set_sentinel_role },
};
#undef PF

_Static_assert(BK_COUNT <= KEYS_MAX && PK_COUNT <= KEYS_MAX, "parser.seen too small");

/* ------------------------------------------------------------ errors */

static int vfail(parser *p, int line, const char *key, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));

/* Write "NAME[:LINE]: [key 'KEY': ]message" into the caller's buffer.
 * line 0 means a file-level message.  Always returns -1. */
static int vfail(parser *p, int line, const char *key, const char *fmt, va_list ap)
{
    if (p->err == NULL || p->errlen == 0)
        return -1;
    int n;
    if (line > 0 && key)
        n = snprintf(p->err, p->errlen, "%s:%d: key '%.64s': ", p->name, line, key);
    else if (line > 0)
        n = snprintf(p->err, p->errlen, "%s:%d: ", p->name, line);
    else
        n = snprintf(p->err, p->errlen, "%s: ", p->name);
    if (n >= 0 && (size_t)n < p->errlen)
        vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
    return -1;
}

static int fail(parser *p, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail_key(parser *p, int line, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A message about the file (line 0), a line or a section. */
static int fail(parser *p, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(p, line, NULL, fmt, ap);
    va_end(ap);
    return -1;
}

/* A message about a key on a given line. */
static int fail_key(parser *p, int line, const char *key, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(p, line, key, fmt, ap);
    va_end(ap);
    return -1;
}

static int oom(parser *p)
{
    return fail(p, p->line, "out of memory");
}

/* ------------------------------------------------------------ small helpers */

/* Zero a string (it may hold a secret) and free it. */
static void wipe_free(char *s)
{
    if (s) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

/* Cut the line at the first ';' or '#' that starts it or follows
 * whitespace, outside a quoted value (one that starts with '"' right after
 * the '='; unquote() takes it apart). */
static void strip_comment(char *s)
{
    int seen_eq = 0;
    for (size_t i = 0; s[i]; i++) {
        if (!seen_eq && s[i] == '=') {
            seen_eq = 1;
            size_t j = i + 1;
            while (s[j] == ' ' || s[j] == '\t')
                j++;
            if (s[j] == '"') {
                for (j++; s[j] && s[j] != '"'; j++)
                    if (s[j] == '\\' && s[j + 1])
                        j++;
                if (!s[j])
                    return;         /* unterminated: unquote() says so */
                i = j;              /* the closing quote */
            }
            continue;
        }
        if ((s[i] == ';' || s[i] == '#') && (i == 0 || s[i - 1] == ' ' || s[i - 1] == '\t')) {
            s[i] = '\0';
            return;
        }
    }
}

/* A value in double quotes keeps what is between them, comment characters
 * and surrounding spaces included; \" and \\ stand for " and \.  Unquotes
 * v in place.  0, or -1 with *why set. */
static int unquote(char *v, const char **why)
{
    if (*v != '"')
        return 0;
    char *w = v, *r = v + 1;
    for (; *r && *r != '"'; r++) {
        if (*r == '\\' && (r[1] == '"' || r[1] == '\\'))
            r++;
        *w++ = *r;
    }
    if (*r != '"') {
        *why = "unterminated quote";
        return -1;
    }
    if (r[1] != '\0') {
        *why = "text after the closing quote (a comment needs a space before it)";
        return -1;
    }
    *w = '\0';
    return 0;
}

/* Parse a string of decimal digits.  Returns 0, -1 if s is empty or holds
 * anything but digits, -2 if the number does not fit in 64 bits. */
static int parse_dec(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -2;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

/* "64k", "1m" or plain bytes, for messages about sizes. */
static const char *fmt_size(uint64_t v, char *buf, size_t len)
{
    if (v && v % GIB == 0)
        snprintf(buf, len, "%" PRIu64 "g", v / GIB);
    else if (v && v % MIB == 0)
        snprintf(buf, len, "%" PRIu64 "m", v / MIB);
    else if (v && v % KIB == 0)
        snprintf(buf, len, "%" PRIu64 "k", v / KIB);
    else
        snprintf(buf, len, "%" PRIu64, v);
    return buf;
}

/* The error for a value parse_dec (or the size parser) rejected. */
static int bad_number(parser *p, const keydef *k, const char *val, int rc)
{
    size_t n = strlen(k->name);
    const char *unit = NULL;
    if (n > 3 && strcmp(k->name + n - 3, "_ms") == 0)
        unit = "milliseconds";
    else if (n > 2 && strcmp(k->name + n - 2, "_s") == 0)
        unit = "seconds";

    if (val[0] == '-')
        return fail_key(p, p->line, k->name, "'%.32s' is negative; expected a non-negative integer", val);
    if (rc == -2)
        return fail_key(p, p->line, k->name, "'%.32s' is too large", val);
    if (unit && isdigit((unsigned char)val[0]))
        return fail_key(p, p->line, k->name,
                        "'%.32s' is not a plain number; the unit is in the key name (%s)", val, unit);
    if (k->kind == K_SIZE || k->kind == K_SIZE_POW2)
        return fail_key(p, p->line, k->name,
                        "'%.32s' is not a size (digits with an optional k, m or g suffix, e.g. 64k)", val);
    return fail_key(p, p->line, k->name, "'%.32s' is not a non-negative integer", val);
}

/* ------------------------------------------------------------ key setters */

/* Parse val by k->kind into the field at obj + k->off. */
static int set_generic(parser *p, void *obj, const keydef *k, char *val)
{
    char *field = (char *)obj + k->off;
    uint64_t v = 0;
    int rc;

    switch (k->kind) {
    case K_PATH:
        if (strlen(val) > SOCK_PATH_LEN)
            return fail_key(p, p->line, k->name, "path longer than %zu bytes (the limit of a unix socket address)",
                            SOCK_PATH_LEN);
        /* fall through */
    case K_STR: {
        char *s = strdup(val);
        if (s == NULL)
            return oom(p);
        free(*(char **)field);
        *(char **)field = s;
        return 0;
    }
    case K_CHOICE:
        for (const char *const *ch = k->choices; *ch; ch++)
            if (strcmp(val, *ch) == 0) {
                char *s = strdup(val);
                if (s == NULL)
                    return oom(p);
                free(*(char **)field);
                *(char **)field = s;
                return 0;
            }
        {
            char list[128] = "";
            size_t used = 0;
            for (const char *const *ch = k->choices; *ch && used < sizeof list; ch++) {
                int w = snprintf(list + used, sizeof list - used, "%s%s", used ? ", " : "", *ch);
                if (w < 0)
                    break;
                used += (size_t)w;
            }
            return fail_key(p, p->line, k->name, "unknown value '%.32s' (expected one of: %s)", val, list);
        }
    case K_MODE:
        for (const char *s = val; *s; s++)
            if (*s < '0' || *s > '7')
                return fail_key(p, p->line, k->name, "'%.32s' is not an octal mode (e.g. 0660)", val);
        if ((v = strtoull(val, NULL, 8)) > k->max)   /* overflow gives ULLONG_MAX */
            return fail_key(p, p->line, k->name, "'%.32s' is out of range (at most 0%" PRIo64 ")", val, k->max);
        *(unsigned *)field = (unsigned)v;
        return 0;
    case K_SIZE:
    case K_SIZE_POW2: {
        char digits[32];
        size_t n = strlen(val);
        uint64_t mult = 1;
        if (n > 0 && (val[n - 1] == 'k' || val[n - 1] == 'K'))
            mult = KIB, n--;
        else if (n > 0 && (val[n - 1] == 'm' || val[n - 1] == 'M'))
            mult = MIB, n--;
        else if (n > 0 && (val[n - 1] == 'g' || val[n - 1] == 'G'))
            mult = GIB, n--;
        if (n >= sizeof digits)
            return bad_number(p, k, val, strspn(val, "0123456789") == n ? -2 : -1);
        memcpy(digits, val, n);
        digits[n] = '\0';
        if ((rc = parse_dec(digits, &v)) < 0)
            return bad_number(p, k, val, rc);
        char lo[24], hi[24];
        if (v > k->max / mult || v * mult < k->min)
            return fail_key(p, p->line, k->name, "'%.32s' is out of range (%s..%s)", val,
                            fmt_size(k->min, lo, sizeof lo), fmt_size(k->max, hi, sizeof hi));
        v *= mult;
        if (k->kind == K_SIZE_POW2) {
            uint64_t r = 1;
            while (r < v)
                r <<= 1;
            v = r;          /* v <= max, a power of two, so r <= max */
        }
        *(uint32_t *)field = (uint32_t)v;
        return 0;
    }
    case K_INT:
    case K_U32:
    case K_U64:
        if ((rc = parse_dec(val, &v)) < 0)
            return bad_number(p, k, val, rc);
        if (v < k->min || v > k->max)
            return fail_key(p, p->line, k->name, "%" PRIu64 " is out of range (%" PRIu64 "..%" PRIu64 ")",
                            v, k->min, k->max);
        if (k->kind == K_INT)
            *(int *)field = (int)v;
        else if (k->kind == K_U32)
            *(uint32_t *)field = (uint32_t)v;
        else
            *(uint64_t *)field = v;
        return 0;
    case K_FUNC:
        return k->fn(p, obj, k, val);
    }
    return fail_key(p, p->line, k->name, "internal error: unknown key kind");
}

static int set_shm_name(parser *p, void *obj, const keydef *k, char *val)
{
    conf *c = obj;
    size_t n = strlen(val);
    if (val[0] != '/')
        return fail_key(p, p->line, k->name, "must start with '/' (e.g. /poolbroker)");
    if (n < 2)
        return fail_key(p, p->line, k->name, "needs a name after the '/'");
    if (strchr(val + 1, '/'))
        return fail_key(p, p->line, k->name, "may not contain '/' after the first character");
    if (n > SHM_NAME_LEN)
        return fail_key(p, p->line, k->name, "longer than %d characters", SHM_NAME_LEN);
    char *s = strdup(val);
    if (s == NULL)
        return oom(p);
    free(c->shm_name);
    c->shm_name = s;
    return 0;
}

/* A comma-separated list of numeric ids or names (users, or groups when
 * groups is set) into out[CONF_MAX_UIDS]. */
static int parse_ids(parser *p, const keydef *k, char *val, bool groups, uint32_t *out, int *count)
{
    int n = 0;
    /* Walk by hand rather than strtok: an empty entry (",,") is an error. */
    for (char *item = val;;) {
        char *comma = strchr(item, ',');
        if (comma)
            *comma = '\0';
        char *name = trim(item);
        if (*name == '\0')
            return fail_key(p, p->line, k->name, "empty entry in the list");
        if (n == CONF_MAX_UIDS)
            return fail_key(p, p->line, k->name, "more than %d entries", CONF_MAX_UIDS);
        uint64_t v;
        int rc = parse_dec(name, &v);
        if (rc == 0) {
            if (v >= UINT32_MAX)
                return fail_key(p, p->line, k->name, "id %.32s is out of range", name);
            out[n++] = (uint32_t)v;
        } else if (groups) {
            struct group *gr = getgrnam(name);
            if (gr == NULL)
                return fail_key(p, p->line, k->name, "no such group '%.32s'", name);
            out[n++] = (uint32_t)gr->gr_gid;
        } else {
            struct passwd *pw = getpwnam(name);
            if (pw == NULL)
                return fail_key(p, p->line, k->name, "no such user '%.32s'", name);
            out[n++] = (uint32_t)pw->pw_uid;
        }
        if (comma == NULL)
            break;
        item = comma + 1;
    }
    *count = n;
    return 0;
}

static int set_uids(parser *p, void *obj, const keydef *k, char *val)
{
    conf *c = obj;
    uint32_t ids[CONF_MAX_UIDS];
    int n;
    if (parse_ids(p, k, val, false, ids, &n) < 0)
        return -1;
    for (int i = 0; i < n; i++)
        c->allowed_uids[i] = (uid_t)ids[i];
    c->n_allowed_uids = n;
    return 0;
}

static int set_gids(parser *p, void *obj, const keydef *k, char *val)
{
    conf *c = obj;
    uint32_t ids[CONF_MAX_UIDS];
    int n;
    if (parse_ids(p, k, val, true, ids, &n) < 0)
        return -1;
    for (int i = 0; i < n; i++)
        c->allowed_gids[i] = (gid_t)ids[i];
    c->n_allowed_gids = n;
    return 0;
}

static int set_log_level(parser *p, void *obj, const keydef *k, char *val)
{
    conf *c = obj;
    int lvl = log_level_parse(val);
    if (lvl < 0)
        return fail_key(p, p->line, k->name, "unknown level '%.32s' (expected debug, info, warn (or warning) or error)", val);
    c->log_level = lvl;
    return 0;
}

/* host:port, the host a name, an IPv4 address or a bracketed IPv6 address. */
static int set_metrics_listen(parser *p, void *obj, const keydef *k, char *val)
{
    conf *c = obj;
    char *colon = strrchr(val, ':');
    if (colon == NULL)
        return fail_key(p, p->line, k->name, "'%.64s' is not host:port (e.g. 127.0.0.1:9187)", val);
    size_t hlen = (size_t)(colon - val);
    if (hlen == 0)
        return fail_key(p, p->line, k->name, "'%.64s' has no host before the ':'", val);
    if (val[0] == '[') {
        if (hlen < 3 || val[hlen - 1] != ']')
            return fail_key(p, p->line, k->name, "'%.64s': an IPv6 host needs both brackets, e.g. [::1]:9187", val);
    } else if (memchr(val, ':', hlen)) {
        return fail_key(p, p->line, k->name, "'%.64s': put an IPv6 host in brackets, e.g. [::1]:9187", val);
    }
    uint64_t port;
    if (parse_dec(colon + 1, &port) < 0 || port < 1 || port > 65535)
        return fail_key(p, p->line, k->name, "port '%.32s' is not a number in 1..65535", colon + 1);
    char *s = strdup(val);
    if (s == NULL)
        return oom(p);
    free(c->metrics_listen);
    c->metrics_listen = s;
    return 0;
}

static int set_type(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    if (strcmp(val, "postgres") == 0)
        cp->type = PB_POOL_POSTGRES;
    else if (strcmp(val, "redis") == 0)
        cp->type = PB_POOL_REDIS;
    else
        return fail_key(p, p->line, k->name, "unknown pool type '%.32s' (expected postgres or redis)", val);
    return 0;
}

static int set_pool_mode(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    if (strcmp(val, "session") == 0)
        cp->pool_mode = PB_MODE_SESSION;
    else if (strcmp(val, "transaction") == 0)
        cp->pool_mode = PB_MODE_TRANSACTION;
    else
        return fail_key(p, p->line, k->name, "unknown pool mode '%.32s' (expected session or transaction)", val);
    return 0;
}

static int set_reset(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    (void)k;
    free(cp->reset_sql);
    cp->reset_sql = NULL;
    if (strcmp(val, "auto") == 0) {
        cp->reset_policy = PB_RESET_AUTO;
    } else if (strcmp(val, "rollback") == 0) {
        cp->reset_policy = PB_RESET_ROLLBACK;
    } else if (strcmp(val, "discard_all") == 0) {
        cp->reset_policy = PB_RESET_DISCARD_ALL;
    } else {
        cp->reset_policy = PB_RESET_CUSTOM;
        if ((cp->reset_sql = strdup(val)) == NULL)
            return oom(p);
    }
    return 0;
}

/* ------------------------------------------------------------ conninfo
 * A conninfo is checked the way libpq and the server will read it, so that
 * `poolbroker -t` and a reload refuse what could never connect (issue #18:
 * `bogus_option=1` passed -t, and a reload with it took a healthy pool
 * down).  libpq's own parser (PQconninfoParse) rejects unknown keys and bad
 * syntax; then the values libpq would only reject at connect time are
 * checked here: ports, host/hostaddr/port list lengths, numeric addresses,
 * integers, and the keys with a fixed set of values.  Nothing is resolved
 * or contacted: a server that is down is not a configuration error. */

typedef struct ci_choice {
    const char *key;
    const char *values;             /* ",a,b,c," */
} ci_choice;

static const ci_choice ci_choices[] = {
    { "sslmode", ",disable,allow,prefer,require,verify-ca,verify-full," },
    { "gssencmode", ",disable,prefer,require," },
    { "channel_binding", ",disable,prefer,require," },
    { "target_session_attrs", ",any,read-write,read-only,primary,standby,prefer-standby," },
    { "load_balance_hosts", ",disable,random," },
    { "sslnegotiation", ",postgres,direct," },
    { "sslcertmode", ",disable,allow,require," },
};

/* libpq reads these with its integer parser (trailing blanks allowed). */
static const char *const ci_ints[] = { "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                                       "keepalives_count", "tcp_user_timeout", NULL };

/* The n bytes at v for an error message, or "(not shown)" unless they are
 * few and all of [A-Za-z0-9_.,-] and blanks: a value of any other shape
 * could be, or hold, a password (a quoted "password=..." inside another
 * key's value, a "user:secret" of a URI).  buf has 48 bytes. */
static const char *shown(const char *v, size_t n, char *buf)
{
    if (n > 40)
        return "(not shown)";
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)v[i]) && !strchr("_.,- ", v[i]))
            return "(not shown)";
    snprintf(buf, 48, "%.*s", (int)n, v);
    return buf;
}

/* Entries of a comma-separated list (libpq's multi-host form); empty
 * entries count. */
static int list_len(const char *v)
{
    int n = 1;
    for (; *v; v++)
        n += *v == ',';
    return n;
}

static int set_conninfo(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    char *errmsg = NULL, sbuf[48];
    PQconninfoOption *opts = PQconninfoParse(val, &errmsg);
    if (opts == NULL) {
        /* libpq's message, on one line; what it quotes from the string may
         * be a misplaced password, and may hold quotes itself.  For the
         * messages that quote a piece of the string, the piece is everything
         * between the template's prefix and suffix, shown only as shown()
         * allows (a word: no quote, ':', '/' or '@'); any other message that
         * quotes something is cut at its first quote.  (fuzz_conf found the
         * ways a quote-counting version leaked.) */
        static const char *const tmpl[][2] = {
            { "invalid connection option \"", "\"" },
            { "missing \"=\" after \"", "\" in connection info string" },
            { "invalid URI query parameter: \"", "\"" },
            { "invalid percent-encoded token: \"", "\"" },
        };
        char msg[256] = "out of memory";
        if (errmsg) {
            size_t len = strlen(errmsg);
            while (len && isspace((unsigned char)errmsg[len - 1]))
                errmsg[--len] = 0;
            int done = 0;
            for (size_t i = 0; i < sizeof tmpl / sizeof tmpl[0] && !done; i++) {
                size_t pl = strlen(tmpl[i][0]), sl = strlen(tmpl[i][1]);
                if (len >= pl + sl && strncmp(errmsg, tmpl[i][0], pl) == 0 &&
                    strcmp(errmsg + len - sl, tmpl[i][1]) == 0) {
                    /* With a password in the string, even a word may be a
                     * piece of it ("password=two words" makes libpq quote
                     * "words"). */
                    int secret = strcasestr(val, "password") || strstr(val, "://");
                    snprintf(msg, sizeof msg, "%s%s%s", tmpl[i][0],
                             secret ? "(not shown: the string holds a password)"
                                    : shown(errmsg + pl, len - pl - sl, sbuf),
                             tmpl[i][1]);
                    done = 1;
                }
            }
            if (!done) {
                const char *q = strchr(errmsg, '"');
                if (q)
                    snprintf(msg, sizeof msg, "%.*s(the rest not shown)", (int)(q - errmsg), errmsg);
                else
                    snprintf(msg, sizeof msg, "%s", errmsg);
            }
            for (char *r = msg; *r; r++)
                if (*r == '\n' || *r == '\r' || *r == '\t')
                    *r = ' ';
            trim(msg);
            PQfreemem(errmsg);
        }
        return fail_key(p, p->line, k->name, "%s", msg);
    }
    const char *host = NULL, *hostaddr = NULL, *port = NULL, *tsa = NULL;
    int rc = 0;
    for (PQconninfoOption *o = opts; o->keyword && rc == 0; o++) {
        const char *v = o->val;
        if (v == NULL)
            continue;
        if (strcmp(o->keyword, "host") == 0)
            host = v;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = v;
        else if (strcmp(o->keyword, "port") == 0)
            port = v;
        else if (strcmp(o->keyword, "replication") == 0) {
            if (strcmp(v, "0") != 0 && strcasecmp(v, "false") != 0 && strcasecmp(v, "off") != 0 &&
                strcasecmp(v, "no") != 0)
                rc = fail_key(p, p->line, k->name, "replication=%s: a pool's connections cannot be "
                              "replication connections", shown(v, strlen(v), sbuf));
        } else if (strcmp(o->keyword, "options") == 0) {
            /* The server reads -c name=value / --name=value settings; anything
             * else in it ends the session at startup. */
            const char *s = v;
            while (*s && rc == 0) {
                while (*s == ' ' || *s == '\t')
                    s++;
                if (!*s)
                    break;
                const char *tok = s;
                while (*s && *s != ' ' && *s != '\t')
                    s++;
                if (strncmp(tok, "-c", 2) == 0 && (size_t)(s - tok) == 2) {
                    while (*s == ' ' || *s == '\t')
                        s++;
                    tok = s;
                    while (*s && *s != ' ' && *s != '\t')
                        s++;
                    if (s == tok || !memchr(tok, '=', (size_t)(s - tok)))
                        rc = fail_key(p, p->line, k->name, "options: -c needs name=value");
                } else if (!((strncmp(tok, "-c", 2) == 0 || strncmp(tok, "--", 2) == 0) &&
                             memchr(tok, '=', (size_t)(s - tok)))) {
                    rc = fail_key(p, p->line, k->name, "options: '%s' is not a -c name=value setting",
                                  shown(tok, (size_t)(s - tok), sbuf));
                }
            }
        } else {
            if (strcmp(o->keyword, "target_session_attrs") == 0)
                tsa = v;
            for (size_t i = 0; i < sizeof ci_choices / sizeof ci_choices[0]; i++) {
                if (strcmp(o->keyword, ci_choices[i].key) != 0)
                    continue;
                char want[40];
                snprintf(want, sizeof want, ",%.36s,", v);
                if (strlen(v) > 36 || !strstr(ci_choices[i].values, want))
                    rc = fail_key(p, p->line, k->name, "%s=%s: not one of %.*s", o->keyword,
                                  shown(v, strlen(v), sbuf), (int)strlen(ci_choices[i].values) - 2,
                                  ci_choices[i].values + 1);
            }
            for (const char *const *ik = ci_ints; *ik && rc == 0; ik++) {
                if (strcmp(o->keyword, *ik) != 0)
                    continue;
                char *end;
                errno = 0;
                long n = strtol(v, &end, 10);
                while (*end == ' ')
                    end++;
                if (end == v || *end || errno || n < INT32_MIN || n > INT32_MAX)
                    rc = fail_key(p, p->line, k->name, "%s=%s: not an integer", o->keyword,
                                  shown(v, strlen(v), sbuf));
            }
        }
    }
    /* Ports: each 1..65535 (an empty entry means the default). */
    if (rc == 0 && port) {
        for (const char *s = port; rc == 0;) {
            size_t n = strcspn(s, ",");
            char one[16];
            uint64_t pv;
            if (n > 0) {
                size_t k1 = n < sizeof one - 1 ? n : sizeof one - 1;
                memcpy(one, s, k1);         /* not snprintf "%.*s": GCC's sanitizer build calls s null */
                one[k1] = 0;
                /* A port that is not digits is shown as such, never echoed:
                 * in a URI without '@' (postgresql://user:secret), libpq
                 * reads the password as host:port. */
                int digits = n > 0 && strspn(s, "0123456789") >= n;
                if (n >= sizeof one || parse_dec(one, &pv) < 0 || pv < 1 || pv > 65535)
                    rc = digits ? fail_key(p, p->line, k->name, "port '%s' is not a number in 1..65535",
                                           shown(s, n, sbuf))
                                : fail_key(p, p->line, k->name,
                                           "a port is not a number (value not shown; in a URI, "
                                           "'user:password' without '@host' reads as host:port)");
            }
            if (!s[n])
                break;
            s += n + 1;
        }
    }
    /* hostaddr: numeric addresses only (libpq does not resolve them). */
    if (rc == 0 && hostaddr) {
        for (const char *s = hostaddr; rc == 0;) {
            size_t n = strcspn(s, ",");
            char one[INET6_ADDRSTRLEN + 8];
            unsigned char buf[16];
            if (n > 0) {
                snprintf(one, sizeof one, "%.*s", (int)(n < sizeof one - 1 ? n : sizeof one - 1), s);
                if (n >= sizeof one || (inet_pton(AF_INET, one, buf) != 1 && inet_pton(AF_INET6, one, buf) != 1))
                    rc = fail_key(p, p->line, k->name, "hostaddr '%s' is not a numeric IPv4 or IPv6 address",
                                  shown(s, n, sbuf));
            }
            if (!s[n])
                break;
            s += n + 1;
        }
    }
    /* libpq's rules for multi-host lists. */
    if (rc == 0) {
        int nh = host ? list_len(host) : 0, na = hostaddr ? list_len(hostaddr) : 0;
        int hosts = nh ? nh : na ? na : 1;
        if (nh && na && nh != na)
            rc = fail_key(p, p->line, k->name, "%d host names but %d hostaddr values (libpq needs as many of each)",
                          nh, na);
        else if (port && list_len(port) > 1 && list_len(port) != hosts)
            rc = fail_key(p, p->line, k->name, "%d port numbers for %d hosts (libpq needs one, or one per host)",
                          list_len(port), hosts);
    }
    /* Following a failover: a pool that wants the primary drops a server
     * that turns read-only; one with several hosts drops a server that goes
     * away and reconnects through the list. */
    int follow = PB_FOLLOW_NONE;
    if (tsa && (strcmp(tsa, "read-write") == 0 || strcmp(tsa, "primary") == 0))
        follow = PB_FOLLOW_PRIMARY;
    else if ((host && list_len(host) > 1) || (hostaddr && list_len(hostaddr) > 1))
        follow = PB_FOLLOW_HOSTS;
    PQconninfoFree(opts);
    if (rc < 0)
        return -1;
    cp->follow = follow;
    char *s = strdup(val);
    if (s == NULL)
        return oom(p);
    wipe_free(cp->conninfo);
    cp->conninfo = s;
    return 0;
}

/* Read a password from the first line of a file that only its owner may
 * read into *secret, its path into *pathp.  Relative paths start at the
 * config file's directory.  Messages name the file, never its contents. */
static int read_secret_file(parser *p, const keydef *k, char *val, char **pathp, char **secret)
{
    char *path;
    if (val[0] != '/' && p->basedir) {
        if (asprintf(&path, "%s/%s", p->basedir, val) < 0)
            return oom(p);
    } else if ((path = strdup(val)) == NULL) {
        return oom(p);
    }
    free(*pathp);
    *pathp = path;

    /* O_NONBLOCK: a FIFO must not hang the parse; it is refused below. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return fail_key(p, p->line, k->name, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return fail_key(p, p->line, k->name, "cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return fail_key(p, p->line, k->name, "%s is not a regular file", path);
    }
    if (st.st_mode & 077) {
        close(fd);
        return fail_key(p, p->line, k->name,
                        "%s: secrets file %s by group or others (mode %04o); chmod 600 it", path,
                        (st.st_mode & 044) ? "readable" : "accessible", (unsigned)(st.st_mode & 07777));
    }

    /* Read until the first newline, EOF, or a full buffer. */
    char buf[SECRET_LINE_MAX + 1];
    size_t len = 0;
    int rc = 0;
    while (len < sizeof buf) {
        ssize_t r = read(fd, buf + len, sizeof buf - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = fail_key(p, p->line, k->name, "cannot read %s: %s", path, strerror(errno));
            break;
        }
        if (r == 0)
            break;
        bool has_nl = memchr(buf + len, '\n', (size_t)r) != NULL;
        len += (size_t)r;
        if (has_nl)
            break;
    }
    close(fd);
    if (rc == 0) {
        char *nl = memchr(buf, '\n', len);
        size_t n = nl ? (size_t)(nl - buf) : len;
        if (n > 0 && buf[n - 1] == '\r')
            n--;
        if (nl == NULL && len == sizeof buf)
            rc = fail_key(p, p->line, k->name, "%s: first line longer than %d bytes", path, SECRET_LINE_MAX);
        else if (n == 0)
            rc = fail_key(p, p->line, k->name, "%s: empty password (the first line is blank)", path);
        else if (memchr(buf, '\0', n))
            rc = fail_key(p, p->line, k->name, "%s: the password contains a NUL byte", path);
        else {
            wipe_free(*secret);
            if ((*secret = strndup(buf, n)) == NULL)
                rc = oom(p);
        }
    }
    explicit_bzero(buf, sizeof buf);
    return rc;
}

static int set_password_file(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    return read_secret_file(p, k, val, &cp->password_file, &cp->password);
}

static int set_sentinel_password_file(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    return read_secret_file(p, k, val, &cp->sentinel_password_file, &cp->sentinel_password);
}

/* ------------------------------------------------------------ Sentinel */

#define SENTINELS_MAX 16            /* entries of a sentinels list (sentinel.c has room for them) */

/* sentinels = host:port,host:port,...: each entry a host name or address
 * (an IPv6 one in brackets, [::1]:26379) and a port in 1..65535. */
static int set_sentinels(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    int n = 0;
    for (const char *s = val;;) {
        size_t len = strcspn(s, ",");
        char one[300];
        if (len == 0 || len >= sizeof one)
            return fail_key(p, p->line, k->name, "entry %d is %s (expected host:port,host:port,...)", n + 1,
                            len ? "too long" : "empty");
        memcpy(one, s, len);
        one[len] = 0;
        char *e = trim(one);
        char *colon = strrchr(e, ':');
        uint64_t pv;
        if (!colon || colon == e || parse_dec(colon + 1, &pv) < 0 || pv < 1 || pv > 65535)
            return fail_key(p, p->line, k->name, "entry '%.64s' is not host:port with a port in 1..65535", e);
        if (++n > SENTINELS_MAX)
            return fail_key(p, p->line, k->name, "more than %d sentinels", SENTINELS_MAX);
        if (!s[len])
            break;
        s += len + 1;
    }
    char *dup = strdup(val);
    if (!dup)
        return oom(p);
    free(cp->sentinels);
    cp->sentinels = dup;
    return 0;
}

static int set_sentinel_role(parser *p, void *obj, const keydef *k, char *val)
{
    conf_pool *cp = obj;
    if (strcmp(val, "master") == 0)
        cp->sentinel_replica = 0;
    else if (strcmp(val, "replica") == 0)
        cp->sentinel_replica = 1;
    else
        return fail_key(p, p->line, k->name, "unknown value '%.32s' (expected one of: master, replica)", val);
    return 0;
}

/* ------------------------------------------------------------ sections */

static const char *type_name(int type)
{
    return type == PB_POOL_POSTGRES ? "postgres" : type == PB_POOL_REDIS ? "redis" : "?";
}

/* Checks that need the whole [pool] section, and defaults that depend on
 * its type. */
static int finish_pool(parser *p)
{
    conf_pool *cp = p->pool;
    int *seen = p->seen;

    if (!seen[PK_TYPE])
        return fail(p, cp->line, "section [pool %s]: missing required key 'type' (postgres or redis)", cp->name);
    unsigned tbit = 1u << cp->type;
    int bad = -1;
    for (int i = 0; i < PK_COUNT; i++)
        if (seen[i] && !(pool_keys[i].types & tbit) && (bad < 0 || seen[i] < seen[bad]))
            bad = i;
    if (bad >= 0)
        return fail_key(p, seen[bad], pool_keys[bad].name, "does not apply to a %s pool (type on line %d)",
                        type_name(cp->type), seen[PK_TYPE]);

    if (cp->type == PB_POOL_POSTGRES && cp->conninfo == NULL)
        return fail(p, cp->line, "section [pool %s]: a postgres pool requires 'conninfo'", cp->name);
    if (cp->type == PB_POOL_REDIS) {
        if (seen[PK_UNIX_SOCKET] && (seen[PK_HOST] || seen[PK_PORT])) {
            int other = seen[PK_HOST] ? PK_HOST : PK_PORT;
            return fail_key(p, seen[PK_UNIX_SOCKET], "unix_socket",
                            "cannot be combined with '%s' (line %d); use either host/port or unix_socket",
                            pool_keys[other].name, seen[other]);
        }
        if (seen[PK_SENTINELS]) {
            for (int other = PK_HOST; other <= PK_UNIX_SOCKET; other++)
                if (seen[other])
                    return fail_key(p, seen[other], pool_keys[other].name,
                                    "cannot be combined with 'sentinels' (line %d): the sentinels say "
                                    "where the server is", seen[PK_SENTINELS]);
            if (!seen[PK_SENTINEL_MASTER])
                return fail_key(p, seen[PK_SENTINELS], "sentinels", "needs 'sentinel_master' (the name the "
                                "sentinels monitor the master by)");
            cp->follow = cp->sentinel_replica ? PB_FOLLOW_HOSTS : PB_FOLLOW_PRIMARY;
        } else {
            static const int needs[] = { PK_SENTINEL_MASTER, PK_SENTINEL_PASSWORD_FILE, PK_SENTINEL_ROLE };
            for (size_t i = 0; i < sizeof needs / sizeof needs[0]; i++)
                if (seen[needs[i]])
                    return fail_key(p, seen[needs[i]], pool_keys[needs[i]].name,
                                    "applies only with 'sentinels' (host:port,...)");
        }
        if (!seen[PK_SENTINELS] && cp->host == NULL && (cp->host = strdup("127.0.0.1")) == NULL)
            return oom(p);
    }
    if (cp->min_size > cp->max_size) {
        if (seen[PK_MAX_SIZE] > seen[PK_MIN_SIZE])
            return fail_key(p, seen[PK_MAX_SIZE], "max_size", "%" PRIu32 " is less than min_size %" PRIu32
                            " (line %d)", cp->max_size, cp->min_size, seen[PK_MIN_SIZE]);
        return fail_key(p, seen[PK_MIN_SIZE], "min_size", "%" PRIu32 " is greater than max_size %" PRIu32 "%s",
                        cp->min_size, cp->max_size, seen[PK_MAX_SIZE] ? "" : " (the default)");
    }
    if (seen[PK_SLOTS] && cp->slots < cp->max_size)
        return fail_key(p, seen[PK_SLOTS], "slots", "%" PRIu32 " is less than max_size %" PRIu32 "; slots is the room "
                        "reserved for max_size to grow into", cp->slots, cp->max_size);
    /* The server's own limit by default: PostgreSQL refuses a message over
     * 1 GiB, Redis a bulk string over proto-max-bulk-len (512 MiB). */
    if (!seen[PK_MAX_REQUEST_SIZE])
        cp->max_request_size = cp->type == PB_POOL_POSTGRES ? 1 * GIB : 512 * MIB;
    return 0;
}

static int end_section(parser *p)
{
    int rc = 0;
    if (p->section == SEC_POOL)
        rc = finish_pool(p);
    p->section = SEC_NONE;
    p->pool = NULL;
    memset(p->seen, 0, sizeof p->seen);
    return rc;
}

static void pool_defaults(conf_pool *cp)
{
    cp->port = 6379;
    cp->db = 0;
    cp->min_size = 0;
    cp->max_size = 10;
    cp->acquire_timeout_ms = 5000;
    cp->command_timeout_ms = 0;
    cp->max_lifetime_s = 3600;
    cp->idle_timeout_s = 300;
    cp->max_uses = 0;
    cp->validate_after_idle_ms = 30000;
    cp->reset_policy = PB_RESET_AUTO;
    cp->leak_threshold_ms = 10000;
    cp->max_lease_ms = 0;
    cp->request_buffer = 64 * KIB;
    cp->reply_buffer = 256 * KIB;
}

static bool valid_pool_name(const char *s)
{
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '.' && *s != '-')
            return false;
    return true;
}

/* A "[...]" line: end the previous section and start [broker] or [pool NAME]. */
static int parse_header(parser *p, char *s)
{
    size_t n = strlen(s);
    if (s[n - 1] != ']')
        return fail(p, p->line, "malformed section header (no closing ']')");
    s[n - 1] = '\0';
    char *inner = trim(s + 1);

    if (end_section(p) < 0)
        return -1;

    if (strcmp(inner, "broker") == 0) {
        if (p->broker_line)
            return fail(p, p->line, "section [broker]: duplicate section (first on line %d)", p->broker_line);
        p->broker_line = p->line;
        p->section = SEC_BROKER;
        return 0;
    }
    if (strncmp(inner, "pool", 4) != 0 || (inner[4] != '\0' && !isspace((unsigned char)inner[4])))
        return fail(p, p->line, "section [%.64s]: unknown section (expected [broker] or [pool NAME])", inner);

    char *name = trim(inner + 4);
    conf *c = p->c;
    if (*name == '\0')
        return fail(p, p->line, "section [pool]: missing pool name (e.g. [pool main])");
    if (strlen(name) >= PB_NAME_MAX)
        return fail(p, p->line, "section [pool %.64s]: pool name longer than %d characters", name, PB_NAME_MAX - 1);
    if (!valid_pool_name(name))
        return fail(p, p->line, "section [pool %.64s]: pool name may contain only letters, digits, '_', '.' and '-'",
                    name);
    for (int i = 0; i < c->npools; i++)
        if (strcmp(c->pools[i].name, name) == 0)
            return fail(p, p->line, "section [pool %s]: duplicate pool name (first defined on line %d)", name,
                        c->pools[i].line);
    if (c->npools == PB_MAX_POOLS)
        return fail(p, p->line, "section [pool %s]: too many pools (at most %d)", name, PB_MAX_POOLS);

    conf_pool *cp = &c->pools[c->npools++];
    snprintf(cp->name, sizeof cp->name, "%s", name);
    cp->line = p->line;
    pool_defaults(cp);
    p->pool = cp;
    p->section = SEC_POOL;
    return 0;
}

/* A "key = value" line in the current section. */
static int parse_assignment(parser *p, char *key, char *val)
{
    if (p->section == SEC_NONE)
        return fail_key(p, p->line, key, "outside any section (put it under [broker] or [pool NAME])");

    const keydef *tab = p->section == SEC_BROKER ? broker_keys : pool_keys;
    int count = p->section == SEC_BROKER ? BK_COUNT : PK_COUNT;
    int i;
    for (i = 0; i < count; i++)
        if (strcmp(tab[i].name, key) == 0)
            break;
    if (i == count) {
        if (p->section == SEC_BROKER)
            return fail_key(p, p->line, key, "unknown key in [broker]");
        return fail_key(p, p->line, key, "unknown key in [pool %s]", p->pool->name);
    }
    if (p->seen[i])
        return fail_key(p, p->line, key, "duplicate key (first set on line %d)", p->seen[i]);
    const char *why;
    if (unquote(val, &why) < 0)
        return fail_key(p, p->line, key, "%s", why);
    if (*val == '\0')
        return fail_key(p, p->line, key, "empty value");
    p->seen[i] = p->line;
    return set_generic(p, p->section == SEC_BROKER ? (void *)p->c : (void *)p->pool, &tab[i], val);
}

static int parse_line(parser *p, char *s)
{
    size_t n = strlen(s);
    if (n > 0 && s[n - 1] == '\r')
        s[n - 1] = '\0';
    strip_comment(s);
    s = trim(s);
    if (*s == '\0')
        return 0;
    if (*s == '[')
        return parse_header(p, s);
    char *eq = strchr(s, '=');
    if (eq == NULL)
        return fail(p, p->line, "expected 'key = value' or a [section] header");
    *eq = '\0';
    char *key = trim(s);
    if (*key == '\0')
        return fail(p, p->line, "missing key before '='");
    return parse_assignment(p, key, trim(eq + 1));
}

/* Parse text (modified in place) into a new conf.  NULL on error. */
static conf *parse_text(parser *p, char *text)
{
    conf *c = calloc(1, sizeof *c);
    if (c == NULL) {
        fail(p, 0, "out of memory");
        return NULL;
    }
    p->c = c;
    c->pools = calloc(PB_MAX_POOLS, sizeof *c->pools);
    c->path = strdup(p->name);
    c->socket = strdup("/run/poolbroker/poolbroker.sock");
    c->shm_name = strdup("/poolbroker");
    c->log_target = strdup("stderr");
    c->io_backend = strdup("auto");
    c->socket_mode = 0660;
    c->shm_mode = 0600;
    c->log_level = LOG_LVL_INFO;
    c->shutdown_timeout_ms = 30000;
    c->max_clients = 1024;
    c->spare_slots = 32;
    if (!c->pools || !c->path || !c->socket || !c->shm_name || !c->log_target || !c->io_backend) {
        fail(p, 0, "out of memory");
        goto bad;
    }

    if (strncmp(text, "\xEF\xBB\xBF", 3) == 0)  /* a UTF-8 byte order mark */
        text += 3;
    p->line = 0;
    for (char *s = text; s;) {
        char *nl = strchr(s, '\n');
        if (nl)
            *nl = '\0';
        p->line++;
        if (parse_line(p, s) < 0)
            goto bad;
        s = nl ? nl + 1 : NULL;
    }
    if (end_section(p) < 0)
        goto bad;
    if (c->npools == 0) {
        fail(p, 0, "no [pool NAME] section; at least one pool is required");
        goto bad;
    }
    return c;

bad:
    conf_free(c);
    p->c = NULL;
    return NULL;
}

/* ------------------------------------------------------------ public */

/* Does a libpq conninfo (keyword/value or URI) carry a password? */
static bool conninfo_has_password(const char *ci)
{
    const char *auth = NULL;
    if (strncmp(ci, "postgresql://", 13) == 0)
        auth = ci + 13;
    else if (strncmp(ci, "postgres://", 11) == 0)
        auth = ci + 11;
    if (auth) {
        size_t alen = strcspn(auth, "/?");
        const char *at = memrchr(auth, '@', alen);
        if (at && memchr(auth, ':', (size_t)(at - auth)))
            return true;
    }
    for (const char *s = ci; (s = strcasestr(s, "password")) != NULL; s += 8) {
        char before = s == ci ? ' ' : s[-1];
        if (!isspace((unsigned char)before) && before != '?' && before != '&')
            continue;
        const char *t = s + 8;
        while (*t == ' ' || *t == '\t')
            t++;
        if (*t == '=')
            return true;
    }
    return false;
}

conf *conf_parse(const char *name, const char *text, char *err, size_t errlen)
{
    parser p = { .name = name, .basedir = NULL, .err = err, .errlen = errlen };
    if (err && errlen)
        err[0] = '\0';
    char *copy = strdup(text);
    if (copy == NULL) {
        fail(&p, 0, "out of memory");
        return NULL;
    }
    conf *c = parse_text(&p, copy);
    explicit_bzero(copy, strlen(text));   /* a conninfo may hold a password */
    free(copy);
    return c;
}

conf *conf_load(const char *path, char *err, size_t errlen)
{
    parser p = { .name = path, .err = err, .errlen = errlen };
    if (err && errlen)
        err[0] = '\0';

    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        fail(&p, 0, "cannot open: %s", strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        fail(&p, 0, "cannot stat: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        fail(&p, 0, "not a regular file");
        close(fd);
        return NULL;
    }
    if (st.st_size > (off_t)CONF_FILE_MAX) {
        fail(&p, 0, "larger than %u bytes", CONF_FILE_MAX);
        close(fd);
        return NULL;
    }
    size_t cap = (size_t)st.st_size;
    char *text = malloc(cap + 1);
    if (text == NULL) {
        fail(&p, 0, "out of memory");
        close(fd);
        return NULL;
    }
    size_t len = 0;
    while (len < cap) {
        ssize_t r = read(fd, text + len, cap - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            fail(&p, 0, "cannot read: %s", strerror(errno));
            close(fd);
            free(text);
            return NULL;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    text[len] = '\0';

    conf *c = NULL;
    char *dir = NULL;
    if (memchr(text, '\0', len)) {
        fail(&p, 0, "contains a NUL byte (not a text file?)");
        goto out;
    }
    const char *slash = strrchr(path, '/');
    if (slash) {
        size_t dlen = slash == path ? 1 : (size_t)(slash - path);
        if ((dir = strndup(path, dlen)) == NULL) {
            fail(&p, 0, "out of memory");
            goto out;
        }
        p.basedir = dir;
    }
    c = parse_text(&p, text);
    if (c && (st.st_mode & S_IROTH)) {
        for (int i = 0; i < c->npools; i++)
            if (c->pools[i].conninfo && conninfo_has_password(c->pools[i].conninfo)) {
                fail(&p, 0, "readable by others (mode %04o) but the conninfo of pool '%s' holds a password; "
                     "chmod o-r the file or move the password to a passfile",
                     (unsigned)(st.st_mode & 07777), c->pools[i].name);
                conf_free(c);
                c = NULL;
                break;
            }
    }
out:
    explicit_bzero(text, len);
    free(text);
    free(dir);
    return c;
}

void conf_free(conf *c)
{
    if (c == NULL)
        return;
    if (c->pools) {
        for (int i = 0; i < c->npools; i++) {
            conf_pool *cp = &c->pools[i];
            wipe_free(cp->password);
            wipe_free(cp->conninfo);
            free(cp->host);
            free(cp->unix_socket);
            free(cp->password_file);
            wipe_free(cp->sentinel_password);
            free(cp->sentinel_password_file);
            free(cp->sentinels);
            free(cp->sentinel_master);
            free(cp->user);
            free(cp->reset_sql);
        }
        free(c->pools);
    }
    free(c->path);
    free(c->socket);
    free(c->shm_name);
    free(c->log_target);
    free(c->metrics_listen);
    free(c->io_backend);
    free(c);
}

conf_pool *conf_find_pool(conf *c, const char *name)
{
    if (c == NULL || name == NULL)
        return NULL;
    for (int i = 0; i < c->npools; i++)
        if (strcmp(c->pools[i].name, name) == 0)
            return &c->pools[i];
    return NULL;
}
