/* Workloads of the Strobe benchmarks (compiled by benchmarks/_harness.py).
 *
 *   workload spin SECONDS    count loop iterations for SECONDS, then print
 *                            "<iterations per wall second> <iterations per CPU second>";
 *                            SECONDS <= 0 spins until killed (a busy process)
 *   workload stacks SECONDS  a random walk over a call tree: recursion whose depth and
 *                            path change all the time, so almost every sample has a
 *                            stack of its own (until killed when SECONDS <= 0)
 *   workload flat SECONDS    one hot loop in one function: many samples, few stacks
 *   workload MODE SECONDS N  the same in N processes: forks N - 1 children (a fork costs
 *                            ~0.1 ms, spawning 1,000 processes from Python under load
 *                            ~70 ms each); they die with the parent (PR_SET_PDEATHSIG)
 *
 * Built with -fno-omit-frame-pointer -fno-optimize-sibling-calls so every frame is
 * walkable and no call turns into a jump.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 48 /* 2 frames per level: stays under the kernel's 127-frame limit */

static volatile uint64_t sink;
static uint64_t rng_state;

static double now(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint64_t next_random(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

__attribute__((noinline)) static uint64_t work(uint64_t x, int rounds) {
    for (int i = 0; i < rounds; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

static int spin(double seconds) {
    uint64_t x = 88172645463325252ULL, iterations = 0;
    double start = now(CLOCK_MONOTONIC), cpu_start = now(CLOCK_PROCESS_CPUTIME_ID);
    for (;;) {
        for (int k = 0; k < 64; k++, iterations++)
            x = work(x, 256);
        if (seconds > 0 && now(CLOCK_MONOTONIC) - start >= seconds)
            break;
    }
    sink = x;
    double wall = now(CLOCK_MONOTONIC) - start, cpu = now(CLOCK_PROCESS_CPUTIME_ID) - cpu_start;
    printf("%.1f %.1f\n", (double)iterations / wall, (double)iterations / cpu);
    return 0;
}

/* The call tree: four node functions, each calls descend(); descend() makes 0, 1 or 2
 * calls into random nodes (a critical branching process: one call on average), so the
 * time spreads over all depths and the path to each node is a random word in {a,b,c,d}. */
static void node_a(int depth);
static void node_b(int depth);
static void node_c(int depth);
static void node_d(int depth);
static void (*const nodes[4])(int) = {node_a, node_b, node_c, node_d};

__attribute__((noinline)) static void descend(int depth) {
    sink = work(sink + (uint64_t)depth, 200);
    if (depth >= MAX_DEPTH)
        return;
    uint64_t r = next_random();
    int calls = (r & 3) == 0 ? 0 : (r & 3) == 3 ? 2 : 1;
    for (int i = 0; i < calls; i++)
        nodes[(r >> (2 + 2 * i)) & 3](depth + 1);
}

#define NODE(name)                                                                             \
    __attribute__((noinline)) static void name(int depth) {                                    \
        descend(depth);                                                                        \
        __asm__ volatile("" ::: "memory");                                                     \
    }
NODE(node_a)
NODE(node_b)
NODE(node_c)
NODE(node_d)

static int stacks(double seconds) {
    rng_state = ((uint64_t)getpid() << 32) ^ (uint64_t)(now(CLOCK_MONOTONIC) * 1e9) ^ 1;
    double start = now(CLOCK_MONOTONIC);
    for (;;) {
        for (int k = 0; k < 16; k++)
            descend(0);
        if (seconds > 0 && now(CLOCK_MONOTONIC) - start >= seconds)
            return 0;
    }
}

__attribute__((noinline)) static int flat(double seconds) {
    uint64_t x = 1;
    double start = now(CLOCK_MONOTONIC);
    for (;;) {
        for (int k = 0; k < 100000; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        sink = x;
        if (seconds > 0 && now(CLOCK_MONOTONIC) - start >= seconds)
            return 0;
    }
}

/* Become one of `processes` copies: the parent forks the others, which exit with it. */
static void fork_copies(int processes) {
    pid_t parent = getpid();
    for (int i = 1; i < processes; i++) {
        pid_t child = fork();
        if (child < 0) {
            perror("fork");
            return;
        }
        if (child == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(0); /* the parent died before prctl */
            return;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s spin|stacks|flat SECONDS [PROCESSES]\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[2]);
    if (argc == 4)
        fork_copies(atoi(argv[3]));
    if (strcmp(argv[1], "spin") == 0)
        return spin(seconds);
    if (strcmp(argv[1], "stacks") == 0)
        return stacks(seconds);
    if (strcmp(argv[1], "flat") == 0)
        return flat(seconds);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
