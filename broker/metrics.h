/*
 * metrics.h — the broker's HTTP endpoint for monitoring (metrics_listen):
 * GET /metrics (Prometheus text format) and GET /health (JSON).
 */
#ifndef PB_METRICS_H
#define PB_METRICS_H

#include <stddef.h>

/*
 * Start serving on listen ("host:port": an IPv4 address, a host name, or a
 * bracketed IPv6 address, as metrics_listen in poolbroker.conf(5)) from a
 * thread of its own, off the event loop.  Every request reads the segment
 * shm_name afresh, as shmstat does.  Call after the segment exists and after
 * the broker has blocked the signals it takes through its signalfd: the
 * server's thread inherits the signal mask.  Returns 0, or -1 with a message
 * in err (bad address, cannot bind, already started).
 */
int metrics_start(const char *listen, const char *shm_name, char *err, size_t errlen);

/* Stop serving: close the listening socket and open connections, join the
 * thread.  Harmless when not started, and when called twice. */
void metrics_stop(void);

#endif /* PB_METRICS_H */
