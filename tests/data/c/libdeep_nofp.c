/* A shared library without frame pointers, loaded with dlopen by dlopen_main.c:
 * lib_entry -> lib_middle -> lib_spin. */
volatile unsigned long lib_sink;

__attribute__((noinline)) unsigned long lib_spin(unsigned long n) {
    unsigned long total = n;
    for (unsigned long i = 0; i < 2000000UL; i++) total += i ^ (total >> 3);
    lib_sink = total;
    return total;
}

__attribute__((noinline)) unsigned long lib_middle(unsigned long n) {
    volatile unsigned long local[5];
    for (int i = 0; i < 5; i++) local[i] = n + i;
    return lib_spin(n + 1) + local[n % 5];
}

unsigned long lib_entry(unsigned long n) {
    volatile unsigned long local[3];
    for (int i = 0; i < 3; i++) local[i] = n * i;
    return lib_middle(n + 2) + local[n % 3];
}
