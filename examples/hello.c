/*
 * hello.c — a complete poolbroker worker: attach to the broker, lease a
 * PostgreSQL connection from pool "main", run a parameterised query, release;
 * then the same with the Redis pool "cache", whose failure is not fatal.
 *
 *   make examples && POOLBROKER_SOCKET=/run/poolbroker/poolbroker.sock build/examples/hello [NAME]
 *   cc hello.c $(pkg-config --cflags --libs poolbroker) -lhiredis    (installed library)
 */
#include <stdio.h>

#include <poolbroker.h>

int main(int argc, char **argv)
{
    const char *name = argc > 1 ? argv[1] : "world";
    pb_client *c;
    pb_lease *l;
    pb_result *r = NULL;
    int rc, status = 0;

    if ((rc = pb_connect(NULL, &c)) != PB_OK) {           /* NULL: $POOLBROKER_SOCKET */
        fprintf(stderr, "pb_connect: %s\n", pb_strerror(rc));
        return 1;
    }
    if ((rc = pb_acquire(c, "main", -1, &l)) != PB_OK) {  /* -1: the pool's acquire_timeout_ms */
        fprintf(stderr, "pb_acquire(main): %s\n", pb_strerror(rc));
        pb_disconnect(c);
        return 1;
    }
    const char *params[] = { name };
    rc = pb_pg_exec_params(l, "SELECT 'hello, ' || $1, n FROM generate_series(1, 3) AS n",
                           1, NULL, params, NULL, NULL, 0, &r);
    if (rc != PB_OK) {                                    /* no answer from the server */
        fprintf(stderr, "query: %s\n", pb_strerror(rc));
        status = 1;
    } else if (pb_result_status(r) == PB_RES_ERROR) {     /* the server answered with an error */
        const char *state = pb_error_field(r, 'C');
        fprintf(stderr, "query: SQLSTATE %s: %s\n", state ? state : "?", pb_error_message(r));
        status = 1;
    } else {
        for (int i = 0; i < pb_ntuples(r); i++)
            printf("%s (row %s)\n", pb_getvalue(r, i, 0), pb_getvalue(r, i, 1));
    }
    pb_result_free(r);                                    /* the result outlives the lease; NULL is fine */
    if ((rc = pb_release(l)) != PB_OK)                    /* PB_ESTALE: the broker took it back */
        fprintf(stderr, "pb_release(main): %s\n", pb_strerror(rc));

    /* Redis: optional here.  Without a "cache" pool pb_acquire gives
     * PB_ENOPOOL; any failure is printed and the program goes on. */
    if ((rc = pb_acquire(c, "cache", -1, &l)) != PB_OK) {
        fprintf(stderr, "pb_acquire(cache): %s; skipping Redis\n", pb_strerror(rc));
    } else {
        redisReply *reply = NULL;
        rc = pb_redis_command(l, &reply, "INCR hello:%s", name);
        if (rc != PB_OK)
            fprintf(stderr, "redis INCR: %s\n", pb_strerror(rc));
        else if (reply->type == REDIS_REPLY_ERROR)
            fprintf(stderr, "redis INCR: %s\n", reply->str);
        else if (reply->type == REDIS_REPLY_INTEGER)
            printf("hello:%s counter = %lld\n", name, reply->integer);
        freeReplyObject(reply);                           /* NULL is fine */
        pb_release(l);
    }
    pb_disconnect(c);
    return status;
}
