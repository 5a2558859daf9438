/* A context-switch storm for the off-CPU benchmarks: pipe ping-pong.
 *
 *   offcpu_pingpong SECONDS [CPU|any] [WORK_US]
 *
 * The parent forks a child; they bounce one byte over two pipes (parent writes to the
 * child, child writes back) for SECONDS (default 5), then the parent prints round trips
 * per wall second as one number on stdout. Every read blocks, so each round trip is two
 * context switches when both processes share a CPU.
 *
 * By default both are pinned to one CPU (the lowest the process may use; or CPU if
 * given) before the fork: the densest and steadiest switch rate. On the 2-vCPU dev VM
 * (kernel 6.18) that was 145k-180k round trips/s, 290k-360k context switches/s
 * system-wide (perf stat -a, /proc/stat ctxt), over eight 5 s runs. "any" leaves
 * placement to the scheduler: the two then often sit on different CPUs, each going idle
 * at every read, and the rate swings from run to run (17k-100k round trips/s, 62k-220k
 * switches/s on the same VM), so it is no good for comparisons.
 *
 * WORK_US (default 0): each side spins this many microseconds per byte it receives,
 * like a server handling a request: it sets the switch rate (15 us: ~60k switches/s
 * pinned) and gives the switches a realistic share of the time.
 *
 * The child exits when the parent closes its pipe end or dies (PR_SET_PDEATHSIG).
 * Errors go to stderr with exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double work_seconds;

/* Busy for work_seconds (the handling of one message). */
static void work(void) {
    if (work_seconds <= 0)
        return;
    double until = now() + work_seconds;
    while (now() < until)
        ;
}

/* One byte each way; 1 on success, 0 on end of file. */
static int transfer(int fd, char *byte, int reading) {
    for (;;) {
        ssize_t n = reading ? read(fd, byte, 1) : write(fd, byte, 1);
        if (n == 1)
            return 1;
        if (n == 0 && reading)
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        die(reading ? "read" : "write");
    }
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    work_seconds = argc > 3 ? atof(argv[3]) / 1e6 : 0.0;
    if (argc <= 2 || strcmp(argv[2], "any") != 0) {
        cpu_set_t set;
        int cpu = argc > 2 ? atoi(argv[2]) : -1;
        if (cpu < 0) {
            if (sched_getaffinity(0, sizeof set, &set) != 0)
                die("sched_getaffinity");
            for (cpu = 0; cpu < CPU_SETSIZE && !CPU_ISSET(cpu, &set); cpu++)
                ;
        }
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) /* inherited by the child */
            die("sched_setaffinity");
    }
    int to_child[2], to_parent[2];
    if (pipe(to_child) != 0 || pipe(to_parent) != 0)
        die("pipe");
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        close(to_child[1]);
        close(to_parent[0]);
        char byte;
        while (transfer(to_child[0], &byte, 1)) {
            work();
            transfer(to_parent[1], &byte, 0);
        }
        _exit(0);
    }
    close(to_child[0]);
    close(to_parent[1]);
    char byte = 'x';
    unsigned long trips = 0;
    double start = now(), elapsed;
    for (;;) {
        for (int i = 0; i < 256; i++, trips++) {
            transfer(to_child[1], &byte, 0);
            if (!transfer(to_parent[0], &byte, 1)) {
                fprintf(stderr, "the child closed its pipe\n");
                return 1;
            }
            work();
        }
        elapsed = now() - start;
        if (elapsed >= seconds)
            break;
    }
    close(to_child[1]); /* the child reads end of file and exits */
    int status;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR)
            die("waitpid");
    printf("%.0f\n", (double)trips / elapsed);
    return 0;
}
