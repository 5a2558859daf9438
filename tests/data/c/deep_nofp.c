/* A deep call chain built without frame pointers (-O2 -fomit-frame-pointer), for the
 * table-driven unwinder: main -> level_1 -> ... -> level_6 -> leaf_spin. Each level
 * keeps a local array live across its call, so every frame has a different size and
 * rbp is free for data: frame-pointer walking cannot cross these frames. */
#include <stdlib.h>
#include <time.h>

volatile unsigned long sink;

#define LEVEL(name, next, size)                                      \
    __attribute__((noinline)) unsigned long name(unsigned long n) {  \
        volatile unsigned long local[size];                          \
        for (int i = 0; i < size; i++) local[i] = n + i;             \
        unsigned long r = next(n + 1);                               \
        return r + local[n % size];                                  \
    }

__attribute__((noinline)) unsigned long leaf_spin(unsigned long n) {
    unsigned long total = n;
    for (unsigned long i = 0; i < 2000000UL; i++) total += i ^ (total >> 3);
    sink = total;
    return total;
}

LEVEL(level_6, leaf_spin, 3)
LEVEL(level_5, level_6, 7)
LEVEL(level_4, level_5, 1)
LEVEL(level_3, level_4, 12)
LEVEL(level_2, level_3, 5)
LEVEL(level_1, level_2, 9)

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        sink += level_1((unsigned long)argc);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
