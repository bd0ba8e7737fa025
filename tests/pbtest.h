/*
 * pbtest.h — small cmocka helpers shared by the integration tests.
 * Include after <cmocka.h>, "harness.h" and "poolbroker.h".
 */
#ifndef PB_TEST_PBTEST_H
#define PB_TEST_PBTEST_H

/* Attach to the test broker of e, or fail the test saying why. */
static inline pb_client *pbt_connect(th_env *e)
{
    pb_client *c = NULL;
    int rc = pb_connect(e->sock_path, &c);
    if (rc != PB_OK)
        fail_msg("pb_connect: %s", pb_strerror(rc));
    return c;
}

#endif /* PB_TEST_PBTEST_H */
