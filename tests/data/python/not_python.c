/* Not CPython, though it looks like one to a profiler: named python3.X by the test and
 * exporting (-rdynamic) a _PyRuntime full of garbage, in the file and in memory, where
 * every other word points back into _PyRuntime, so a reader that trusts it follows
 * readable pointers to more garbage. Busy in busy_not_python for SECONDS (argv[1]). */
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

char _PyRuntime[4096] = {[0 ... 4095] = (char)0xA5};

static void scribble(void) {
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    uint64_t *words = (uint64_t *)_PyRuntime;
    for (unsigned i = 0; i < sizeof(_PyRuntime) / 8; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        words[i] = i % 2 ? (uint64_t)(uintptr_t)(_PyRuntime + ((x >> 33) % 4096 & ~7ULL)) : x;
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) uint64_t busy_not_python(double seconds) {
    volatile uint64_t total = 0;
    double end = now() + seconds;
    while (now() < end)
        for (uint64_t i = 0; i < 100000; i++)
            total += i * i;
    return total;
}

int main(int argc, char **argv) {
    scribble();
    return busy_not_python(argc > 1 ? atof(argv[1]) : 10) == 1;
}
