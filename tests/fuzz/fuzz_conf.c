/*
 * fuzz_conf.c — libFuzzer target: the configuration parser, conf_parse() and
 * conf_free() (broker/conf.c).
 *
 * Input: the config text (a NUL-terminated copy is parsed).  Each input is
 * parsed twice: with a full CONF_ERR_MAX error buffer and with a tiny one
 * (truncation paths), both exact-size heap allocations.  Checked, beyond "no
 * sanitizer report" (ASan, UBSan, LeakSanitizer — conf_free must free all):
 *
 *   - both parses agree on success or failure;
 *   - a failure leaves a non-empty, NUL-terminated message starting with the
 *     name; a success leaves the error buffer empty;
 *   - a parsed conf honours every limit conf.h documents (pool names and
 *     count, sizes and their ranges, min_size <= max_size, power-of-two reply
 *     buffers, shm_name form, socket path length, modes, max_clients...),
 *     and conf_find_pool() finds every pool by its name;
 *   - secrets never reach the error message: when a conninfo line holds a
 *     password (key=value or URI form; at least 6 characters, occurring once
 *     in the text), the message does not contain it; a password read from a
 *     password_file is never in the message either.
 *
 * password_file makes the parser open files.  So that fuzzing cannot open
 * devices or /proc files (or read real secrets), open() is interposed below:
 * only paths under /tmp/poolbroker-fuzz-conf are allowed (fixtures made at
 * start-up: a good 0600 file, a 0644 one, an empty one, one with a NUL, one
 * with a 5000-byte line, a directory); anything else fails with EACCES.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "conf.h"

#define FIXTURE_PREFIX "/tmp/poolbroker-fuzz-conf"
#define FIXTURE_SECRET "FuzzFixtureSecret42"

int open(const char *path, int flags, ...);
int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    if (strncmp(path, FIXTURE_PREFIX, strlen(FIXTURE_PREFIX)) != 0 || strstr(path, "..")) {
        errno = EACCES;
        return -1;
    }
    return (int)syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}

static void fixture(const char *suffix, const void *data, size_t len, mode_t mode)
{
    char path[128];
    snprintf(path, sizeof path, "%s%s", FIXTURE_PREFIX, suffix);
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        perror(path);
        exit(1);
    }
    if (write(fd, data, len) != (ssize_t)len || fchmod(fd, mode) < 0) {
        perror(path);
        exit(1);
    }
    close(fd);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fixture(".pw", FIXTURE_SECRET "\nsecond line\n", strlen(FIXTURE_SECRET) + 13, 0600);
    fixture(".pw644", FIXTURE_SECRET "\n", strlen(FIXTURE_SECRET) + 1, 0644);
    fixture(".empty", "", 0, 0600);
    fixture(".nul", "ab\0cd\n", 6, 0600);
    fixture(".crlf", FIXTURE_SECRET "\r\n", strlen(FIXTURE_SECRET) + 2, 0600);
    static char longline[5000];
    memset(longline, 'x', sizeof longline);
    fixture(".long", longline, sizeof longline, 0600);
    mkdir(FIXTURE_PREFIX ".dir", 0700);
    return 0;
}

static int valid_name(const char *s)
{
    size_t n = strnlen(s, PB_NAME_MAX);
    if (n == 0 || n >= PB_NAME_MAX)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_' ||
              *s == '.' || *s == '-'))
            return 0;
    return 1;
}

static void check_conf(conf *c)
{
    assert(c->npools >= 1 && c->npools <= PB_MAX_POOLS);
    assert(c->socket && strlen(c->socket) >= 1 && strlen(c->socket) <= 107);
    assert(c->shm_name && c->shm_name[0] == '/' && strlen(c->shm_name) >= 2 && strlen(c->shm_name) <= 60 &&
           !strchr(c->shm_name + 1, '/'));
    assert(c->socket_mode <= 0777 && c->shm_mode <= 0777);
    assert(c->n_allowed_uids >= 0 && c->n_allowed_uids <= CONF_MAX_UIDS);
    assert(c->n_allowed_gids >= 0 && c->n_allowed_gids <= CONF_MAX_UIDS);
    assert(c->log_level >= 0 && c->log_level <= 3);
    assert(c->log_target && (!strcmp(c->log_target, "stderr") || !strcmp(c->log_target, "syslog")));
    assert(c->io_backend && (!strcmp(c->io_backend, "auto") || !strcmp(c->io_backend, "io_uring") ||
                             !strcmp(c->io_backend, "epoll")));
    assert(c->max_clients >= 1 && c->max_clients <= PB_MAX_CLIENTS);
    assert(c->spare_slots <= PB_MAX_POOL_SLOTS);
    for (int i = 0; i < c->npools; i++) {
        conf_pool *p = &c->pools[i];
        assert(valid_name(p->name));
        assert(conf_find_pool(c, p->name) == p);
        assert(p->type == PB_POOL_POSTGRES || p->type == PB_POOL_REDIS);
        assert(p->max_size >= 1 && p->max_size <= PB_MAX_POOL_SLOTS && p->min_size <= p->max_size);
        assert(p->request_buffer >= 1024 && p->request_buffer <= (64u << 20));
        assert(p->reply_buffer >= 4096 && p->reply_buffer <= (256u << 20) &&
               (p->reply_buffer & (p->reply_buffer - 1)) == 0);
        assert(p->reset_policy == PB_RESET_AUTO || p->reset_policy == PB_RESET_ROLLBACK ||
               p->reset_policy == PB_RESET_DISCARD_ALL || (p->reset_policy == PB_RESET_CUSTOM && p->reset_sql));
        if (p->type == PB_POOL_POSTGRES) {
            assert(p->conninfo && *p->conninfo);
            assert(!p->host && !p->unix_socket && !p->password_file && !p->password && !p->user);
            assert(!p->sentinels && !p->sentinel_master && !p->sentinel_password_file);
        } else {
            assert(!p->conninfo && p->reset_policy == PB_RESET_AUTO);
            assert(p->host || p->unix_socket || p->sentinels);
            /* Sentinel: the sentinels say where the server is; a name is required */
            assert(!p->sentinels == !p->sentinel_master && !(p->sentinels && (p->host || p->unix_socket)));
            assert(p->sentinels || (!p->sentinel_password_file && !p->sentinel_replica));
            assert(p->follow == (p->sentinels ? (p->sentinel_replica ? PB_FOLLOW_HOSTS : PB_FOLLOW_PRIMARY)
                                              : PB_FOLLOW_NONE));
            if (p->sentinel_password)
                assert(p->sentinel_password_file && strcmp(p->sentinel_password, FIXTURE_SECRET) == 0);
            assert(p->port >= 1 && p->port <= 65535 && p->db >= 0 && p->db <= 1000);
            assert(!(p->unix_socket && strlen(p->unix_socket) > 107));
            if (p->password) {
                assert(p->password_file && *p->password && !strchr(p->password, '\n'));
                assert(strcmp(p->password, FIXTURE_SECRET) == 0);    /* only fixture files are readable */
            } else {
                assert(!p->password_file);
            }
        }
    }
    assert(conf_find_pool(c, "") == NULL && conf_find_pool(c, NULL) == NULL && conf_find_pool(NULL, "x") == NULL);
}

/* The password of a conninfo line ("conninfo = ... password=TOKEN ..." or
 * "conninfo = postgresql://user:TOKEN@host"), if it is at least 6 characters
 * and occurs once in the whole text. */
static int secret_token(const char *text, char *tok, size_t toklen)
{
    for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        const char *p = line + strspn(line, " \t");
        if (strncmp(p, "conninfo", 8) != 0)
            continue;
        p += 8 + strspn(p + 8, " \t");
        if (*p != '=')
            continue;
        size_t linelen = strcspn(p, "\n");
        const char *t = NULL, *pw = strstr(p, "password=");
        if (pw && (size_t)(pw - p) < linelen)
            t = pw + 9;
        const char *scheme = strstr(p, "://");
        if (!t && scheme && (size_t)(scheme - p) < linelen) {
            const char *colon = scheme + 3 + strcspn(scheme + 3, ":@/\n");
            if (*colon == ':')
                t = colon + 1;
        }
        if (!t)
            continue;
        size_t n = strcspn(t, " \t\r\n;#'\"@");
        if (n < 6 || n >= toklen)
            continue;
        memcpy(tok, t, n);
        tok[n] = 0;
        const char *first = strstr(text, tok);
        if (first && strstr(first + 1, tok))
            continue;
        return 1;
    }
    return 0;
}

static conf *parse(const char *text, size_t errlen, char **errp)
{
    char *err = errlen ? malloc(errlen) : NULL;
    if (err)
        memset(err, 'Z', errlen);
    conf *c = conf_parse("fuzz", text, err, errlen);
    if (err) {
        assert(memchr(err, 0, errlen) != NULL);
        if (c)
            assert(err[0] == 0);
        else if (errlen > 4)
            assert(strncmp(err, "fuzz", 4) == 0);
        else
            assert(strncmp(err, "fuzz", errlen - 1) == 0);
    }
    *errp = err;
    return c;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > (1u << 20))
        return 0;
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;

    char *err, *err_small;
    conf *c = parse(text, CONF_ERR_MAX, &err);
    conf *c2 = parse(text, 1 + size % 24, &err_small);
    assert((c == NULL) == (c2 == NULL));
    if (c) {
        check_conf(c);
    } else {
        assert(strlen(err) > 0);
        char tok[256];
        if (secret_token(text, tok, sizeof tok) && strstr(err, tok)) {
            /* The message may hold the same characters for other reasons
             * ("[broker]" is in a message template): it leaks the password
             * only if it follows it.  Change the password and look again. */
            size_t tl = strlen(tok);
            char repl[256];
            const char *cand = "QZXJKVWqzxjkvw0123456789", *ch = cand;
            while (*ch && strchr(text, *ch))
                ch++;               /* a character the text does not hold */
            if (!*ch)
                goto no_leak_check;
            memset(repl, *ch, tl);
            repl[tl] = 0;
            char *text2 = strdup(text);
            memcpy(strstr(text2, tok), repl, tl);
            char *err2;
            conf *c3 = parse(text2, CONF_ERR_MAX, &err2);
            int leak = c3 == NULL && strstr(err2, repl) != NULL;
            if (leak) {
                fprintf(stderr, "conninfo password '%s' echoed in: %s\n", tok, err);
                abort();
            }
            conf_free(c3);
            free(err2);
            free(text2);
        }
no_leak_check:
        if (strstr(err, FIXTURE_SECRET) && !strstr(text, FIXTURE_SECRET)) {
            fprintf(stderr, "password file content echoed in: %s\n", err);
            abort();
        }
    }
    conf_free(c);
    conf_free(c2);
    free(err);
    free(err_small);
    free(text);
    return 0;
}
