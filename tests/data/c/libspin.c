/* A shared library that burns CPU: exercises the shared-object address translation. */
volatile unsigned long lib_sink;

__attribute__((noinline)) void lib_inner(void) {
    for (unsigned long i = 0; i < 1000000UL; i++) lib_sink += i;
}

__attribute__((noinline)) void lib_spin(void) { lib_inner(); }
