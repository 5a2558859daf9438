/* Waits for a line on stdin, then dlopens argv[1] (libdeep_nofp.so) and spins in it for
 * argv[2] seconds: code mapped after the process was first seen. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

volatile unsigned long sink;

__attribute__((noinline)) unsigned long run(unsigned long (*entry)(unsigned long), double seconds) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    unsigned long total = 0;
    do {
        total += entry(total & 7);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return total;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    char line[16];
    if (!fgets(line, sizeof(line), stdin)) return 3;
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) return 4;
    unsigned long (*entry)(unsigned long) = (unsigned long (*)(unsigned long))dlsym(lib, "lib_entry");
    if (!entry) return 5;
    sink = run(entry, atof(argv[2]));
    return 0;
}
