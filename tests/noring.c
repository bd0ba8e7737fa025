/*
 * noring.c — run a program where io_uring is not allowed, the way Docker's
 * default seccomp profile or kernel.io_uring_disabled leave it: a seccomp
 * filter makes io_uring_setup fail with EPERM, then $PB_REAL_BROKER (or
 * argv[1]) is exec'ed with the remaining arguments.  Used by test_ops to
 * check the broker's fallback to epoll.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { .len = sizeof filter / sizeof filter[0], .filter = filter };
    const char *real = getenv("PB_REAL_BROKER");
    char **args = argv;
    if (!real) {
        if (argc < 2) {
            fprintf(stderr, "usage: noring PROGRAM [ARGS...] (or set PB_REAL_BROKER)\n");
            return 2;
        }
        real = argv[1];
        args = argv + 1;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("noring: seccomp");
        return 1;
    }
    args[0] = (char *)real;
    execv(real, args);
    perror("noring: exec");
    return 127;
}
