/* Inlined calls (at -O2): top -> middle -> leaf, for inline-frame tests. */
volatile int sink;

static inline __attribute__((always_inline)) void leaf(int x) {
    sink += x * 7;
}

static inline __attribute__((always_inline)) void middle(int x) {
    leaf(x + 1);
    sink -= 1;
}

__attribute__((noinline)) void top(int x) {
    middle(x);
}

int main(void) {
    top(3);
    return 0;
}
