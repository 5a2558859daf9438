/* One pthread mutex, two threads, for off-CPU tests: the waiter's blocked time is a
 * futex wait under pthread_mutex_lock.
 *
 *   holder (the main thread):
 *     main -> holder_thread -> hold_and_work     lock; nanosleep 5 ms holding it; unlock
 *                           -> holder_pause      nanosleep 0.3 ms with the lock free
 *   waiter (a pthread; neither thread is renamed, both keep the program's comm):
 *     start_thread -> waiter_thread -> wait_for_lock -> pthread_mutex_lock
 *                                      -> __lll_lock_wait -> futex wait (~5 ms)
 *                                   -> wait_for_holder   nanosleep 0.1 ms steps until
 *                                                        the holder has the lock again
 *
 * argv[1] is wall seconds (default 8). Each cycle the waiter blocks for about one 5 ms
 * hold in wait_for_lock. It wakes when the holder unlocks, takes the lock during the
 * holder's pause, releases it at once, then sleeps in 0.1 ms steps until the holder
 * has re-taken it, so its next wait_for_lock blocks again. Without that wait it would
 * re-take the free lock in a busy loop, and a plain mutex lets it barge in ahead of the
 * woken holder every time. Its other blocking is those steps: under 0.3 ms a cycle,
 * each well under a 1 ms minimum interval. If it wakes too late for a pause, it just
 * waits in the futex for the next one. Prints nothing unless a call fails (then stderr,
 * exit 1). Measured on the 2-vCPU dev VM at load ~2 (perf trace -s, 5 s, -O2 and -O0):
 * the waiter spent 4.53 s in futex and 0.38 s in clock_nanosleep (92% futex; ~99% of
 * its blocked intervals of 1 ms or more); it took the lock on every one of the
 * holder's turns.
 *
 * The holder sleeps rather than works while it holds the lock, so the program needs
 * almost no CPU: on a busy 2-vCPU machine a busy-working holder left the waiter queued
 * for a CPU after each wake-up, which stretched its 0.1 ms steps past 1 ms (a quarter
 * of its blocked time). So the holder blocks as long as the waiter does, in nanosleep
 * under hold_and_work: tell the two apart by stack (or thread), not by process total.
 *
 * A plain (default) mutex on purpose: its wait is pthread_mutex_lock -> __lll_lock_wait
 * -> FUTEX_WAIT, and pthread_mutex_lock is an exported symbol, so the frame has a name
 * even without libc's debug symbols. (A PTHREAD_PRIO_INHERIT mutex would hand the lock
 * over in the kernel with no pause, but its wait is a tail jump to the local
 * __pthread_mutex_lock_full, and the kernel's rt_mutex spins on-CPU while the owner
 * runs, which turned most of the wait into CPU time on a loaded 2-vCPU machine.)
 *
 * Functions on the chains are non-static and noinline (noclone under GCC), and each
 * checks its call's result or has an empty asm after it, so no call becomes a tail jump.
 * Correct at -O2 -fomit-frame-pointer and at -O0 -fno-omit-frame-pointer. Link -pthread.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime under -std=c11 too */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__clang__)
#define KEEP __attribute__((noinline))
#else
#define KEEP __attribute__((noinline, noclone))
#endif

#define HOLD_NS 5000000L       /* the holder sleeps this long with the lock held */
#define PAUSE_NS 300000L       /* then sleeps this long with it free */
#define WAITER_STEP_NS 100000L /* the waiter's sleep steps while the holder re-takes it */

pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
unsigned long holds; /* bumped by the holder each time it takes the lock (atomics) */
int stop;            /* set by the holder when the time is up (atomics) */

static void check(int err, const char *what) {
    if (err != 0) {
        fprintf(stderr, "%s: %s\n", what, strerror(err));
        exit(1);
    }
}

static void sleep_ns(long ns) {
    struct timespec t = {0, ns};
    while (nanosleep(&t, &t) != 0)
        if (errno != EINTR)
            check(errno, "nanosleep");
}

static double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) + (now.tv_nsec - start->tv_nsec) / 1e9;
}

KEEP void wait_for_lock(void) {
    check(pthread_mutex_lock(&lock), "pthread_mutex_lock");
    __asm__ volatile("" ::: "memory");
}

KEEP void wait_for_holder(unsigned long seen) {
    while (__atomic_load_n(&holds, __ATOMIC_ACQUIRE) == seen &&
           !__atomic_load_n(&stop, __ATOMIC_ACQUIRE))
        sleep_ns(WAITER_STEP_NS);
    __asm__ volatile("" ::: "memory");
}

KEEP void *waiter_thread(void *arg) {
    (void)arg;
    while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE)) {
        wait_for_lock();
        unsigned long seen = __atomic_load_n(&holds, __ATOMIC_ACQUIRE);
        check(pthread_mutex_unlock(&lock), "pthread_mutex_unlock");
        wait_for_holder(seen);
        __asm__ volatile("" ::: "memory");
    }
    __asm__ volatile("" ::: "memory");
    return NULL;
}

KEEP void hold_and_work(void) {
    check(pthread_mutex_lock(&lock), "pthread_mutex_lock");
    __atomic_add_fetch(&holds, 1, __ATOMIC_RELEASE);
    sleep_ns(HOLD_NS);
    check(pthread_mutex_unlock(&lock), "pthread_mutex_unlock");
    __asm__ volatile("" ::: "memory");
}

KEEP void holder_pause(void) {
    sleep_ns(PAUSE_NS);
    __asm__ volatile("" ::: "memory");
}

KEEP void holder_thread(double seconds) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        hold_and_work();
        __asm__ volatile("" ::: "memory");
        holder_pause();
        __asm__ volatile("" ::: "memory");
    } while (seconds_since(&start) < seconds);
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
}

KEEP int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 8.0;
    pthread_t waiter;
    check(pthread_create(&waiter, NULL, waiter_thread, NULL), "pthread_create");
    holder_thread(seconds);
    __asm__ volatile("" ::: "memory");
    check(pthread_join(waiter, NULL), "pthread_join");
    return 0;
}
