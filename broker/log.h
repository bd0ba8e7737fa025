/*
 * log.h — the broker's logging: level macros that carry file and line, errno
 * passed explicitly, and a per-slot variant that adds pool, slot and backend
 * pid (PgBouncer's slog_* idea).  Logs go to stderr (timestamped) or syslog.
 */
#ifndef PB_LOG_H
#define PB_LOG_H

enum { LOG_LVL_DEBUG = 0, LOG_LVL_INFO, LOG_LVL_WARN, LOG_LVL_ERROR };

extern int log_level;                 /* messages below it are dropped */

/* "debug" | "info" | "warn" | "error" → LOG_LVL_*, or -1.  Case does not
 * matter, and "warning" (PostgreSQL's name) is "warn". */
int log_level_parse(const char *s);
/* Send logs to syslog (ident "poolbroker") instead of stderr. */
void log_use_syslog(int on);

/* err: an errno value to append as ": strerror(err)", or 0.  The message is
 * written as one line: newlines and other control characters in it (libpq's
 * messages have them) become single spaces. */
void log_msg(int level, const char *file, int line, int err, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

#define log_debug(...)  do { if (log_level <= LOG_LVL_DEBUG) log_msg(LOG_LVL_DEBUG, __FILE__, __LINE__, 0, __VA_ARGS__); } while (0)
#define log_info(...)   log_msg(LOG_LVL_INFO,  __FILE__, __LINE__, 0, __VA_ARGS__)
#define log_warn(...)   log_msg(LOG_LVL_WARN,  __FILE__, __LINE__, 0, __VA_ARGS__)
#define log_error(...)  log_msg(LOG_LVL_ERROR, __FILE__, __LINE__, 0, __VA_ARGS__)
/* With an errno value. */
#define log_errno(level, err, ...) log_msg((level), __FILE__, __LINE__, (err), __VA_ARGS__)

/* Per-connection context: pool name, slot index, backend pid (backend=, as
 * every log line names a backend's pid; a worker's is worker=). */
#define slog(level, conn, fmt, ...) \
    log_msg((level), __FILE__, __LINE__, 0, "[%s/%u backend=%d] " fmt, \
            (conn)->pool->cf->name, (conn)->index, (conn)->backend_pid, ##__VA_ARGS__)

#endif /* PB_LOG_H */
