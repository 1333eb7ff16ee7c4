/* Runs inside a box to give the guest's own cost of what the host asks a box to do.
 *
 *   guest_helper spawn N PROG [ARGS...]
 *       fork + execve + waitpid of PROG, N times, stdout/stderr to /dev/null;
 *       prints each iteration's wall time in nanoseconds, one per line.
 *   guest_helper time PROG [ARGS...]
 *       runs PROG once with stdout to /dev/null; prints its wall time in nanoseconds.
 *
 * Built static (gcc -static -O2) by the bench's build step and copied into the box.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int run_once(char **argv, int devnull, int quiet_stderr) {
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return -1;
    }
    if (pid == 0) {
        dup2(devnull, 1);
        if (quiet_stderr) dup2(devnull, 2);
        execve(argv[0], argv, environ);
        perror("execve");
        _exit(127);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) < 0) {
        perror("waitpid");
        return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(int argc, char **argv) {
    int devnull = open("/dev/null", O_WRONLY);
    if (devnull < 0) {
        perror("/dev/null");
        return 2;
    }
    if (argc >= 4 && strcmp(argv[1], "spawn") == 0) {
        long n = strtol(argv[2], NULL, 10);
        for (long i = 0; i < n; i++) {
            long long t0 = now_ns();
            int rc = run_once(argv + 3, devnull, 1);
            long long t1 = now_ns();
            if (rc != 0) {
                fprintf(stderr, "%s exited with %d\n", argv[3], rc);
                return 1;
            }
            printf("%lld\n", t1 - t0);
        }
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "time") == 0) {
        long long t0 = now_ns();
        int rc = run_once(argv + 2, devnull, 0);
        long long t1 = now_ns();
        if (rc != 0) {
            fprintf(stderr, "%s exited with %d\n", argv[2], rc);
            return 1;
        }
        printf("%lld\n", t1 - t0);
        return 0;
    }
    fprintf(stderr, "usage: guest_helper spawn N PROG [ARGS...] | guest_helper time PROG [ARGS...]\n");
    return 2;
}
