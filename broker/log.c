/*
 * log.c — see log.h.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "invariant.h"
#include "log.h"

int log_level = LOG_LVL_INFO;
static int use_syslog;

static const char *const level_names[] = { "debug", "info", "warn", "error" };

int log_level_parse(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcasecmp(s, level_names[i]) == 0)
            return i;
    /* PostgreSQL's spelling, which its users type (issue #18). */
    if (strcasecmp(s, "warning") == 0)
        return LOG_LVL_WARN;
    return -1;
}

void log_use_syslog(int on)
{
    if (on && !use_syslog)
        openlog("poolbroker", LOG_PID | LOG_NDELAY, LOG_DAEMON);
    else if (!on && use_syslog)
        closelog();
    use_syslog = on;
}

/* One event, one line (issue #18): libpq's messages carry newlines (a
 * multi-host failure is one line per host, with a tab-indented hint), which
 * split a log entry in two.  Every run of control characters becomes one
 * space, and trailing ones go. */
static void flatten(char *s)
{
    char *w = s;
    int in_ctl = 0;
    for (const char *r = s; *r; r++) {
        if ((unsigned char)*r < 0x20 || *r == 0x7f) {
            in_ctl = 1;
            continue;
        }
        if (in_ctl && w != s && w[-1] != ' ')
            *w++ = ' ';
        if (in_ctl && *r == ' ' && w != s && w[-1] == ' ') {
            in_ctl = 0;
            continue;               /* "a \n b": one space, not two */
        }
        in_ctl = 0;
        *w++ = *r;
    }
    *w = '\0';
}

void log_msg(int level, const char *file, int line, int err, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    int n;

    if (level < log_level)
        return;
    va_start(ap, fmt);
    n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    flatten(msg);
    n = (int)strlen(msg);
    if (err && (size_t)n < sizeof msg)
        snprintf(msg + n, sizeof msg - (size_t)n, ": %s", strerror(err));

    if (use_syslog) {
        static const int prio[] = { LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR };
        syslog(prio[level & 3], "%s (%s:%d)", msg, file, line);
        return;
    }
    struct timespec ts;
    struct tm tm;
    char when[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    /* One write per line so lines from a crash handler or a child never interleave. */
    char line_buf[1200];
    int len = snprintf(line_buf, sizeof line_buf, "%s.%03ldZ %s [%d] %s (%s:%d)\n", when,
                       ts.tv_nsec / 1000000, level_names[level & 3], (int)getpid(), msg, file, line);
    if (len > 0)
        (void)!write(STDERR_FILENO, line_buf, (size_t)len < sizeof line_buf ? (size_t)len : sizeof line_buf - 1);
}

/* invariant.h: a broken invariant is an error in the log always, and the end
 * of the process in debug and sanitizer builds. */
void pb_invariant_failed(const char *file, int line, const char *expr)
{
    log_msg(LOG_LVL_ERROR, file, line, 0, "broken invariant: %s", expr);
#ifdef PB_DEBUG
    abort();
#endif
}
