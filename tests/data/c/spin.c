/* Burns CPU in a known call chain: main -> outer_function -> inner_spin.
   argv[1] is CPU seconds, not wall seconds: on a busy machine it still burns that much. */
#include <stdlib.h>
#include <time.h>

volatile unsigned long sink;

__attribute__((noinline)) void inner_spin(void) {
    for (unsigned long i = 0; i < 1000000UL; i++) sink += i;
}

__attribute__((noinline)) void outer_function(void) { inner_spin(); }

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    struct timespec start, now;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &start);
    do {
        outer_function();
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
