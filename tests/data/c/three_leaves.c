/* main calls three leaf functions in fixed CPU proportions: 50% / 30% / 20%.
 * Each leaf runs the same loop body, so iterations are proportional to CPU time. */
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

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        leaf_fifty(500000);
        leaf_thirty(300000);
        leaf_twenty(200000);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
