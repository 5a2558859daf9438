/* main calls three leaf functions in fixed CPU proportions: 50% / 30% / 20%.
 * Each leaf runs the same loop body for the same count, and each round picks one leaf at
 * random with those odds, so the leaf running at any instant is an independent draw.
 * A fixed round (50, 30, 20 in turn) phase-locked with the sampling timer on a quiet
 * machine: one CI run saw 46 / 39 / 16. */
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

volatile unsigned long sink;

#define LEAF(name)                                                   \
    __attribute__((noinline)) void name(unsigned long n) {          \
        for (unsigned long i = 0; i < n; i++) sink += i * 7 + 3;    \
    }
LEAF(leaf_fifty)
LEAF(leaf_thirty)
LEAF(leaf_twenty)

static uint64_t state = 88172645463325252ull;

static uint64_t xorshift64(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int round = 0; round < 100; round++) {  /* ~5 us each */
            unsigned draw = (unsigned)(xorshift64() % 10);
            if (draw < 5)
                leaf_fifty(2000);
            else if (draw < 8)
                leaf_thirty(2000);
            else
                leaf_twenty(2000);
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
