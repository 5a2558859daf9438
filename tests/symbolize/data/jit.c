/* A stand-in for a JIT: generated code in anonymous RWX memory, described by a perf
 * map in /tmp (named by the pid this process sees), then executed forever.
 * Prints the code address once the map is written. x86-64 machine code. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
    unsigned char *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) return 1;
    memset(code, 0x90, 4096);        /* nop */
    code[0x80] = 0xEB;               /* jmp . : the "hot loop" spins here */
    code[0x81] = 0xFE;
    char path[64];
    snprintf(path, sizeof path, "/tmp/perf-%d.map", (int)getpid());
    FILE *map = fopen(path, "w");
    if (!map) return 2;
    fprintf(map, "%lx 80 jit_prologue\n", (unsigned long)code);
    fprintf(map, "%lx 40 LazyCompile:~hot_loop /app/main.js:3\n", (unsigned long)(code + 0x80));
    fclose(map);
    printf("%lx\n", (unsigned long)code);
    fflush(stdout);
    ((void (*)(void))(code + 0x80))();
    return 0;
}
