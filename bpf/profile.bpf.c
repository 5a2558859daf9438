// Strobe's CPU sampler (bcc C). On every CPU's cpu-clock tick it counts
// (window slot, process, thread name, user stack, kernel stack).
//
// Only uapi types are used (the perf_event context, pt_regs, stack ids, helpers),
// like bcc's tools/profile.py, so any kernel's header tree compiles it correctly.
//
// Windows: control[CONTROL_SLOT] holds the current slot (0 or 1). Keys carry the
// slot and each slot has its own stack maps, so user space flips the slot, then
// drains and clears the old slot's counts and stacks while new samples land in
// the other slot. Freed stack ids are thus never reused within a live window.
//
// New processes: the first sample of a tgid and every exec emit a pid event on a
// ring buffer, so user space can read /proc/PID/maps before a short-lived
// process exits.
//
// User stacks: with frame pointers (bpf_get_stackid), or, compiled with
// -DDWARF_UNWIND, walked here from .eh_frame-derived tables (see the second half).
//
// Compile-time constants (bcc cflags): COUNTS_ENTRIES, STACK_ENTRIES,
// SEEN_ENTRIES, EVENT_PAGES; with DWARF_UNWIND also UNWIND_ROWS, UNWIND_MAPPINGS,
// USER_STACK_ENTRIES.
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

#define COMM_LEN 16
#define ERR_FAULT 14   // EFAULT: no stack of that kind (user mode tick, kernel thread)
#define ERR_EXIST 17   // EEXIST: another stack holds the hash bucket
#define ERR_NOSPC 28   // ENOSPC: the user stack map is full
#define NOEXIST 1      // BPF_NOEXIST

// CONTROL_OFFCPU_MIN_US: blocked intervals shorter than this are not counted;
// CONTROL_OFFCPU_MAX_PER_PERIOD: blocking switches walked per CPU per OFFCPU_PERIOD_NS
// (0: all); beyond it they are sampled at random and weighted (see on_sched_switch).
enum control_index {
    CONTROL_SLOT,
    CONTROL_PID_FILTER,
    CONTROL_OFFCPU_MIN_US,
    CONTROL_OFFCPU_MAX_PER_PERIOD,
    CONTROL_ENTRIES,
};

// Keep in step with LOST_REASONS in agent/sampler/convert.py.
enum lost_reason {
    LOST_COUNTS_FULL,
    LOST_USER_STACK_COLLISION,
    LOST_USER_STACK_ERROR,
    LOST_KERNEL_STACK_COLLISION,
    LOST_KERNEL_STACK_ERROR,
    LOST_PID_EVENT,
    LOST_REASONS,
};

// EVENT_UNKNOWN_MAPPING: the table walker met an address of the process that no
// table covers (code mapped since its tables were made, e.g. dlopen): user space
// re-reads its mappings. At most once per REFRESH_NS per process.
// EVENT_PYTHON_CODE: the Python walker met a code object (address) new to this
// process: user space reads its name, file and line table while the process lives.
enum pid_event_kind { EVENT_FIRST_SAMPLE, EVENT_EXEC, EVENT_UNKNOWN_MAPPING, EVENT_PYTHON_CODE };

struct sample_key {
    u32 slot;
    u32 pid;              // tgid
    s64 user_stack_id;    // < 0: -errno; a stack id (frame pointers) or a stack hash (tables)
    s32 kernel_stack_id;
    char comm[COMM_LEN];
};

struct sample_value {
    u64 count;
    u32 tid;              // the last thread sampled with this key
    u32 pad;
};

struct pid_event {
    u32 pid;
    u32 kind;
    u64 address;          // EVENT_PYTHON_CODE: the code object; else 0
};

BPF_HASH(counts, struct sample_key, struct sample_value, COUNTS_ENTRIES);
BPF_STACK_TRACE(stacks0, STACK_ENTRIES);
BPF_STACK_TRACE(stacks1, STACK_ENTRIES);
BPF_ARRAY(control, u32, CONTROL_ENTRIES);
BPF_PERCPU_ARRAY(lost, u64, LOST_REASONS);
BPF_TABLE("lru_hash", u32, u8, seen, SEEN_ENTRIES);
BPF_RINGBUF_OUTPUT(pid_events, EVENT_PAGES);

static __always_inline void count_lost(u32 reason) {
    u64 *n = lost.lookup(&reason);
    if (n)
        (*n)++;  // per-CPU slot: no atomics needed
}

static __always_inline u32 control_value(u32 index) {
    u32 *value = control.lookup(&index);
    return value ? *value : 0;
}

static __always_inline void emit_event(u32 pid, u32 kind, u64 address) {
    struct pid_event event = {.pid = pid, .kind = kind, .address = address};
    if (pid_events.ringbuf_output(&event, sizeof(event), 0) != 0)
        count_lost(LOST_PID_EVENT);
}

static __always_inline void emit_pid_event(u32 pid, u32 kind) {
    emit_event(pid, kind, 0);
}

static __always_inline void note_stack_error(s64 id, u32 collision, u32 error) {
    if (id >= 0 || id == -ERR_FAULT)
        return;
    count_lost(id == -ERR_EXIST ? collision : error);
}

static __always_inline void add_sample(struct sample_key *key, u32 tid) {
    struct sample_value *value = counts.lookup(key);
    if (!value) {
        struct sample_value fresh = {.count = 0, .tid = tid};
        // NOEXIST: if another CPU inserted the key first, add to its entry.
        int err = counts.insert(key, &fresh);
        value = counts.lookup(key);
        if (!value) {
            if (err)
                count_lost(LOST_COUNTS_FULL);
            return;
        }
    }
    __sync_fetch_and_add(&value->count, 1);
    value->tid = tid;
}

static __always_inline s64 frame_pointer_stack(struct bpf_perf_event_data *ctx, u32 slot) {
    return slot == 0 ? stacks0.get_stackid(ctx, BPF_F_USER_STACK)
                     : stacks1.get_stackid(ctx, BPF_F_USER_STACK);
}

static __always_inline void finish_sample(struct sample_key *key, u32 tid) {
    note_stack_error(key->user_stack_id, LOST_USER_STACK_COLLISION, LOST_USER_STACK_ERROR);
    note_stack_error(key->kernel_stack_id, LOST_KERNEL_STACK_COLLISION, LOST_KERNEL_STACK_ERROR);
    add_sample(key, tid);
}

#define MAX_USER_FRAMES 127
#define MAX_KERNEL_FRAMES 127  // PERF_MAX_STACK_DEPTH
#define HASH_SEED 0xcbf29ce484222325ULL
#define HASH_MULTIPLIER 0x9e3779b97f4a7c15ULL
#define STACK_ID_MASK 0x7fffffffffffffffULL  // stack hashes as ids >= 0; < 0 means -errno

#ifdef PYTHON_FRAMES
// After the native frames: PY_MARKER, then one word per Python frame (see below).
#define PY_MAX_FRAMES 64
#define PY_FRAME_READ 128         // bytes of a frame read at once: every field used is in them
#define PY_FRAME_BYTES (PY_FRAME_READ + 8)
#define STACK_WORDS (MAX_USER_FRAMES + 2 + PY_MAX_FRAMES)
#else
#define STACK_WORDS MAX_USER_FRAMES
#endif

struct user_stack {
    u64 len;
    u64 ips[STACK_WORDS];
};


// Saved user registers of the current task (its pt_regs from kernel entry), which
// needs no struct layout; 0 for a kernel thread, which has none.
static __always_inline int task_user_registers(struct pt_regs *regs) {
    struct task_struct *task = bpf_get_current_task_btf();
    void *saved = (void *)bpf_task_pt_regs(task);
    return bpf_probe_read_kernel(regs, sizeof(*regs), saved) == 0 && (regs->cs & 3) == 3;
}

static __always_inline u64 hash_word(u64 hash, u64 word) {
    hash = (hash ^ word) * HASH_MULTIPLIER;
    return hash ^ (hash >> 29);
}

#ifdef DWARF_UNWIND
static __always_inline int start_table_unwind(struct bpf_perf_event_data *ctx,
                                              struct sample_key *key, u32 tid);
#endif

int on_cpu_clock(struct bpf_perf_event_data *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    if (pid == 0)
        return 0;  // the idle task
    u32 filter = control_value(CONTROL_PID_FILTER);
    if (filter != 0 && pid != filter)
        return 0;

    // Look up before inserting: an LRU insert takes a free node (and its lock) even
    // when the key exists, on every tick.
    u8 one = 1;
    if (!seen.lookup(&pid) && seen.insert(&pid, &one) == 0)
        emit_pid_event(pid, EVENT_FIRST_SAMPLE);

    struct sample_key key = {};
    key.slot = control_value(CONTROL_SLOT) & 1;
    key.pid = pid;
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    key.kernel_stack_id = key.slot == 0 ? stacks0.get_stackid(ctx, 0)
                                        : stacks1.get_stackid(ctx, 0);
#ifdef DWARF_UNWIND
    if (start_table_unwind(ctx, &key, tid))
        return 0;  // the unwinder programs count the sample when they are done
#endif
    key.user_stack_id = frame_pointer_stack(ctx, key.slot);
    finish_sample(&key, tid);
    return 0;
}

// Raw tracepoints (no tracefs needed): sched_process_exec runs in the process
// after its exec.
int on_exec(struct bpf_raw_tracepoint_args *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    u32 filter = control_value(CONTROL_PID_FILTER);
    if (filter != 0 && pid != filter)
        return 0;
    u8 one = 1;
    seen.update(&pid, &one);
    emit_pid_event(pid, EVENT_EXEC);
    return 0;
}

// sched_process_exit: forget a leaving process so that a later process that
// reuses its pid is announced again.
int on_exit(struct bpf_raw_tracepoint_args *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    if (pid == (u32)pid_tgid)
        seen.delete(&pid);
    return 0;
}

#ifdef OFF_CPU
// ---------------------------------------------------------------------------
// Off-CPU time, from the raw tracepoint sched_switch (no kprobes, no tracefs, and
// no task_struct layout: only the current task and the preempt flag are used).
//
// At a voluntary switch-out (preempt == false: the task blocks), the outgoing task
// is still current. Its kernel stack (bpf_get_stack) and user stack (the on-CPU
// walkers, copied as raw-tracepoint programs) are kept by hash in LRU maps, and
// its start of blocking in off_cpu_started. The switch-in names the incoming task
// only by its task_struct, so each CPU keeps the time its current task was switched
// in, and a thread's blocked interval is counted at its next switch-out on any CPU
// (voluntary or not, and its last one at exit): blocked = switched in - start.
// Intervals under CONTROL_OFFCPU_MIN_US are dropped; the rest add (weight,
// weight * ns) under the current slot in off_cpu_counts.
//
// Cost: a walk costs ~2 us, and a busy node switches 100k times a second. So each CPU
// walks at most CONTROL_OFFCPU_MAX_PER_PERIOD blocking switches per OFFCPU_PERIOD_NS:
// when the previous period had n > max switches, each one is walked with probability
// 1/w (w = n / max) and counts w times: an unbiased estimate (Horvitz-Thompson) whose
// weight is kept with the interval, so a change of w mid-interval cannot bias it. The stacks live in the LRU maps, not in a slot's
// maps, so an interval that spans a window flip keeps its stacks; user space reads
// them by hash at the drain. Compile-time: OFFCPU_THREADS, OFFCPU_STACKS, and
// SCHED_SWITCH_PREV_STATE on kernels >= 5.18, whose tracepoint passes prev_state.

// Keep in step with OFF_CPU_STATS in agent/sampler/convert.py.
enum off_cpu_stat {
    OFFCPU_SWITCHES,       // voluntary switch-outs seen
    OFFCPU_NOT_SAMPLED,    // of those, skipped by the rate limit (the rest are weighted)
    OFFCPU_KERNEL_THREAD,  // of those sampled, kernel threads (no user stack): not recorded
    OFFCPU_SHORT,          // intervals under the minimum: dropped
    OFFCPU_COUNTED,        // intervals counted
    OFFCPU_COUNTS_FULL,    // intervals lost: off_cpu_counts had no room
    OFFCPU_STATS,
};

struct off_cpu_key {
    u32 slot;
    u32 pid;
    s64 user_stack_id;    // a stack hash in off_cpu_user_stacks; < 0: none
    s64 kernel_stack_id;  // a stack hash in off_cpu_kernel_stacks; < 0: none
    char comm[COMM_LEN];
};

struct off_cpu_value {
    u64 count;            // blocked intervals
    u64 ns;               // their total length
    u32 tid;
    u32 pad;
};

struct off_cpu_start {
    u64 start_ns;
    s64 user_stack_id;
    s64 kernel_stack_id;
    u32 pid;
    u32 weight;           // blocking switches this one stands for (1 / its probability)
    char comm[COMM_LEN];
};

#define TASK_DEAD_STATE 0x80  // include/linux/sched.h: the task's last switch-out
#define OFFCPU_PERIOD_NS 100000000ULL  // the rate limit's period: 100 ms

struct off_cpu_rate {
    u64 period_start;
    u32 switches;         // blocking switches in this period so far
    u32 weight;           // from the previous period: walk 1 in this many
};

#define OFFCPU_TRACE_FRAMES 2  // the frames of the tracing path itself, innermost

struct kernel_stack {
    u64 ips[MAX_KERNEL_FRAMES];  // 0-terminated, like a stack map's entry
};

BPF_HASH(off_cpu_counts, struct off_cpu_key, struct off_cpu_value, COUNTS_ENTRIES);
BPF_TABLE("lru_hash", u32, struct off_cpu_start, off_cpu_started, OFFCPU_THREADS);
BPF_TABLE("lru_hash", u64, struct user_stack, off_cpu_user_stacks, OFFCPU_STACKS);
BPF_TABLE("lru_hash", u64, struct kernel_stack, off_cpu_kernel_stacks, OFFCPU_STACKS);
BPF_PERCPU_ARRAY(off_cpu_switched_in, u64, 1);  // when this CPU's current task came in
BPF_PERCPU_ARRAY(off_cpu_stats, u64, OFFCPU_STATS);
BPF_PERCPU_ARRAY(off_cpu_rate, struct off_cpu_rate, 1);
BPF_PERCPU_ARRAY(off_cpu_kernel_scratch, struct kernel_stack, 1);
#ifndef DWARF_UNWIND
BPF_PERCPU_ARRAY(off_cpu_user_scratch, struct user_stack, 1);
#endif

static __always_inline void count_off_cpu(u32 stat) {
    u64 *n = off_cpu_stats.lookup(&stat);
    if (n)
        (*n)++;
}

// The current task's kernel stack, stored by hash; its id, or -ERR_FAULT.
static __always_inline s64 off_cpu_kernel_stack(void *ctx) {
    u32 zero = 0;
    struct kernel_stack *stack = off_cpu_kernel_scratch.lookup(&zero);
    if (!stack)
        return -ERR_FAULT;
    // Skip the BPF program and bpf_trace_run4: the stack then starts at __schedule.
    long bytes = bpf_get_stack(ctx, stack->ips, sizeof(stack->ips), OFFCPU_TRACE_FRAMES);
    if (bytes <= 0)
        return -ERR_FAULT;
    u64 words = (u64)bytes / 8;
    u64 hash = HASH_SEED;
    for (int i = 0; i < MAX_KERNEL_FRAMES; i++) {
        if (i < words)
            hash = hash_word(hash, stack->ips[i]);
        else
            stack->ips[i] = 0;
    }
    hash &= STACK_ID_MASK;
    if (!off_cpu_kernel_stacks.lookup(&hash))  // a lookup also keeps it in the LRU
        off_cpu_kernel_stacks.update(&hash, stack);
    return hash;
}

// A user stack, stored by hash; its id, or -ERR_FAULT when empty.
static __always_inline s64 off_cpu_store_user_stack(struct user_stack *stack, u64 hash) {
    if (stack->len == 0)
        return -ERR_FAULT;
    hash &= STACK_ID_MASK;
    if (!off_cpu_user_stacks.lookup(&hash))
        off_cpu_user_stacks.update(&hash, stack);
    return hash;
}

// This CPU's current weight (1: walk every blocking switch), counting this switch.
static __always_inline u32 off_cpu_weight(u64 now) {
    u32 zero = 0;
    struct off_cpu_rate *rate = off_cpu_rate.lookup(&zero);
    if (!rate)
        return 1;
    if (now - rate->period_start >= OFFCPU_PERIOD_NS) {
        u32 max = control_value(CONTROL_OFFCPU_MAX_PER_PERIOD);
        rate->weight = max > 0 && rate->switches > max ? rate->switches / max : 1;
        rate->switches = 0;
        rate->period_start = now;
    }
    rate->switches++;
    return rate->weight > 0 ? rate->weight : 1;
}

static __always_inline void off_cpu_remember(u32 tid, u32 pid, char *comm, u64 start_ns,
                                             u32 weight, s64 user_stack_id,
                                             s64 kernel_stack_id) {
    struct off_cpu_start start = {
        .start_ns = start_ns,
        .user_stack_id = user_stack_id,
        .kernel_stack_id = kernel_stack_id,
        .pid = pid,
        .weight = weight,
    };
    __builtin_memcpy(start.comm, comm, COMM_LEN);
    off_cpu_started.update(&tid, &start);
}

// Count the thread's last blocked interval, which ended when it was switched in.
static __always_inline void off_cpu_account(u32 tid, u64 switched_in) {
    struct off_cpu_start *found = off_cpu_started.lookup(&tid);
    if (!found)
        return;
    struct off_cpu_start start = *found;
    off_cpu_started.delete(&tid);
    if (switched_in <= start.start_ns)
        return;  // the CPU's first switch since attach: its switch-in time is unknown
    u64 blocked = switched_in - start.start_ns;
    if (blocked < (u64)control_value(CONTROL_OFFCPU_MIN_US) * 1000) {
        count_off_cpu(OFFCPU_SHORT);
        return;
    }
    struct off_cpu_key key = {
        .slot = control_value(CONTROL_SLOT) & 1,
        .pid = start.pid,
        .user_stack_id = start.user_stack_id,
        .kernel_stack_id = start.kernel_stack_id,
    };
    __builtin_memcpy(key.comm, start.comm, COMM_LEN);
    struct off_cpu_value *value = off_cpu_counts.lookup(&key);
    if (!value) {
        struct off_cpu_value fresh = {.tid = tid};
        off_cpu_counts.insert(&key, &fresh);  // NOEXIST: another CPU may have been first
        value = off_cpu_counts.lookup(&key);
        if (!value) {
            count_off_cpu(OFFCPU_COUNTS_FULL);
            return;
        }
    }
    u64 weight = start.weight > 0 ? start.weight : 1;
    __sync_fetch_and_add(&value->count, weight);
    __sync_fetch_and_add(&value->ns, blocked * weight);
    value->tid = tid;
    count_off_cpu(OFFCPU_COUNTED);
}
#endif  // OFF_CPU

#ifdef DWARF_UNWIND
// ---------------------------------------------------------------------------
// Table-driven user stack unwinding (x86_64).
//
// User space turns each binary's .eh_frame into sorted rows (one per PC range:
// how to find the CFA and where rbp is saved; the return address is at CFA-8)
// and writes them into one global array, unwind_rows. unwind_mappings, an LPM
// trie keyed by (pid, address prefix), gives for an address the binary's row
// range and the bias between runtime addresses and table PCs.
//
// The walk starts from the user registers of the sample (the interrupted ones,
// or, in kernel mode, the task's saved user pt_regs from bpf_task_pt_regs, which
// needs no struct layout). Each frame is a table step when a row covers the PC,
// else a frame-pointer step. on_cpu_clock tail-calls unwind_user, which walks
// FRAMES_PER_CALL frames and tail-calls itself until the stack ends; the state
// lives in a per-CPU array (perf_event programs do not nest on a CPU). The
// finished stack is stored under a 64-bit hash of its frames in the slot's
// user stack map, so equal stacks aggregate in the counts map as before.
#define FRAMES_PER_CALL 6
#define MAX_UNWIND_CALLS 22     // 132 frames; the kernel allows 33 tail calls in a chain,
                                // the rest are the Python walker's
#define SEARCH_STEPS 24         // binary search over up to 2^24 rows of one binary
#define REFRESH_NS 250000000ULL  // dlopen bursts (Python imports) are routed within this
#define USER_SPACE_END 0x800000000000ULL

// Keep in step with agent/unwind/table.py.
enum cfa_kind {
    CFA_NONE,         // no unwind info for this PC (a gap): frame-pointer step
    CFA_RSP,          // CFA = rsp + offset
    CFA_RBP,          // CFA = rbp + offset
    CFA_PLT,          // PLT stub: CFA = rsp + 8 + ((rip & 15) >= offset ? 8 : 0)
    CFA_END,          // outermost frame (return address undefined): the stack ends here
    CFA_UNSUPPORTED,  // a rule the walker cannot follow: frame-pointer step
};

// Keep in step with UNWIND_STATS in agent/sampler/convert.py.
enum unwind_stat {
    STAT_TABLE_FRAMES,   // frames stepped with a table row
    STAT_FP_FRAMES,      // frames stepped with the frame pointer (no row)
    STAT_STACK_END,      // walks that reached an outermost frame
    STAT_STOPPED,        // walks stopped early: unreadable memory, zero rbp or return address
    STAT_TRUNCATED,      // walks that hit MAX_USER_FRAMES or the tail-call limit
    STAT_NO_USER_REGS,   // samples without user registers (kernel threads)
    STAT_TAIL_CALL_FAILED,
    STAT_NO_ROUTE,       // walks stopped at code user space has not routed yet (new process or code)
    STAT_NO_TABLE,       // walks stopped at code whose table was refused (no room) and has no frame pointers
    STAT_PY_FRAMES,      // Python frames read
    STAT_PY_NO_THREAD,   // samples of a Python process whose thread has no Python frame
    STAT_PY_UNREADABLE,  // Python walks stopped at a frame that could not be read
    STAT_PY_TRUNCATED,   // Python walks cut at PY_MAX_FRAMES or the tail-call limit
    STAT_PY_TAIL_CALL_FAILED,
    UNWIND_STATS,
};

struct unwind_row {
    u32 pc;           // table PC where this row starts
    u8 cfa_kind;
    u8 rbp_offset;    // an s8: rbp saved at CFA + 8 * rbp_offset; 0: rbp unchanged
    s16 cfa_offset;
};

struct mapping_key {
    u32 prefixlen;    // 32 (pid) + address bits that matter
    u32 pid_be;       // big-endian, like the address: LPM matches bytes in order
    u64 address_be;
};

struct mapping_value {
    u64 bias;         // table PC = runtime address - bias
    u32 first_row;    // the binary's rows: unwind_rows[first_row, first_row + row_count)
    u32 row_count;    // 0: no table; first_row then says ROUTE_FRAME_POINTERS or ROUTE_STOP
};
// Keep in step with agent/unwind/mappings.py.
#define ROUTE_FRAME_POINTERS 0xfffffffeU  // code without .eh_frame (Go, JIT): frame pointers
#define ROUTE_STOP 0xffffffffU            // code without a table or frame pointers: stop here

struct unwind_state {
    u64 ip;
    u64 sp;
    u64 bp;
    u64 hash;
    u32 tid;
    u32 calls;
    u32 unknown_noted;  // an EVENT_UNKNOWN_MAPPING was considered for this sample
    u32 off_cpu;        // an off-CPU walk (see on_sched_switch), of this weight; 0: on-CPU
    u64 off_cpu_start_ns;
    s64 off_cpu_kernel_stack_id;
    struct sample_key key;
    struct user_stack stack;
#ifdef PYTHON_FRAMES
    u64 py_frame;       // the next interpreter frame to read; 0: none
    u64 py_pending;     // the last Python frame's word, appended once its entry bit is known
    u32 py_calls;
    u32 py_count;       // Python frames seen
    u8 py_bytes[PY_FRAME_BYTES];
#endif
};

enum step_result { STEP_CONTINUE, STEP_DONE, STEP_TRY_FP };

BPF_ARRAY(unwind_rows, struct unwind_row, UNWIND_ROWS);
BPF_F_TABLE("lpm_trie", struct mapping_key, struct mapping_value, unwind_mappings,
            UNWIND_MAPPINGS, BPF_F_NO_PREALLOC);
// Not preallocated: only the stacks a window holds take memory (1 KiB each), so
// the bound can be generous (a busy node has far more unique user than kernel stacks).
#ifndef USER_STACK_ENTRIES
#define USER_STACK_ENTRIES STACK_ENTRIES
#endif
BPF_F_TABLE("hash", u64, struct user_stack, user_stacks0, USER_STACK_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct user_stack, user_stacks1, USER_STACK_ENTRIES, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(unwind_state, struct unwind_state, 1);
BPF_PERCPU_ARRAY(unwind_stats, u64, UNWIND_STATS);
BPF_PROG_ARRAY(unwind_programs, 2);  // 0: unwind_user, 1: unwind_python
BPF_TABLE("lru_hash", u32, u64, unwind_refresh, 4096);  // pid -> last unknown-mapping event

static __always_inline void count_stat(u32 stat) {
    u64 *n = unwind_stats.lookup(&stat);
    if (n)
        (*n)++;
}

static __always_inline void note_unknown_mapping(struct unwind_state *st, u64 pc) {
    if (st->unknown_noted || pc >= USER_SPACE_END)
        return;
    st->unknown_noted = 1;
    u32 pid = st->key.pid;
    u64 now = bpf_ktime_get_ns();
    u64 *last = unwind_refresh.lookup(&pid);
    if (last && now - *last < REFRESH_NS)
        return;
    unwind_refresh.update(&pid, &now);
    emit_pid_event(pid, EVENT_UNKNOWN_MAPPING);
}

static __always_inline int user_registers(struct bpf_perf_event_data *ctx,
                                          struct unwind_state *st) {
    if ((ctx->regs.cs & 3) == 3) {  // the tick interrupted user mode
        st->ip = ctx->regs.ip;
        st->sp = ctx->regs.sp;
        st->bp = ctx->regs.bp;
        return 1;
    }
    struct pt_regs regs = {};
    if (!task_user_registers(&regs))
        return 0;  // a kernel thread has no user registers
    st->ip = regs.ip;
    st->sp = regs.sp;
    st->bp = regs.bp;
    return 1;
}

static __always_inline int start_table_unwind(struct bpf_perf_event_data *ctx,
                                              struct sample_key *key, u32 tid) {
    u32 zero = 0;
    struct unwind_state *st = unwind_state.lookup(&zero);
    if (!st)
        return 0;
    if (!user_registers(ctx, st)) {
        count_stat(STAT_NO_USER_REGS);
        return 0;  // the caller records the sample without a user stack
    }
    st->key = *key;
    st->tid = tid;
    st->hash = HASH_SEED;
    st->calls = 0;
    st->unknown_noted = 0;
    st->off_cpu = 0;
    st->stack.len = 0;
    unwind_programs.call(ctx, 0);
    count_stat(STAT_TAIL_CALL_FAILED);
    return 0;  // not loaded yet: frame pointers it is
}

static __always_inline struct unwind_row *find_row(struct mapping_value *m, u64 table_pc) {
    if (table_pc > 0xffffffffULL)
        return NULL;
    u32 pc = (u32)table_pc;
    u32 first = m->first_row;
    u32 lo = first, hi = first + m->row_count;
    // Find the first row whose pc is above ours; the row before it covers us.
    for (int i = 0; i < SEARCH_STEPS; i++) {
        if (lo >= hi)
            break;
        u32 mid = lo + ((hi - lo) >> 1);
        struct unwind_row *row = unwind_rows.lookup(&mid);
        if (!row)
            return NULL;
        if (row->pc <= pc)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == first)
        return NULL;
    u32 index = lo - 1;
    return unwind_rows.lookup(&index);
}

static __always_inline int table_step(struct unwind_state *st, struct unwind_row *row) {
    u64 cfa;
    switch (row->cfa_kind) {
    case CFA_RSP:
        cfa = st->sp + row->cfa_offset;
        break;
    case CFA_RBP:
        cfa = st->bp + row->cfa_offset;
        break;
    case CFA_PLT:
        cfa = st->sp + 8 + ((st->ip & 15) >= (u64)row->cfa_offset ? 8 : 0);
        break;
    case CFA_END:
        count_stat(STAT_STACK_END);
        return STEP_DONE;
    default:
        return STEP_TRY_FP;
    }
    u64 ra = 0;
    if (bpf_probe_read_user(&ra, sizeof(ra), (void *)(cfa - 8)) != 0 || ra == 0) {
        count_stat(STAT_STOPPED);
        return STEP_DONE;
    }
    if (row->rbp_offset != 0) {
        u64 bp = 0;
        if (bpf_probe_read_user(&bp, sizeof(bp), (void *)(cfa + 8 * (s64)(s8)row->rbp_offset)) != 0) {
            count_stat(STAT_STOPPED);
            return STEP_DONE;
        }
        st->bp = bp;
    }
    st->sp = cfa;
    st->ip = ra;
    count_stat(STAT_TABLE_FRAMES);
    return STEP_CONTINUE;
}

static __always_inline int frame_pointer_step(struct unwind_state *st) {
    u64 frame[2] = {};  // saved rbp, return address
    if (st->bp == 0 || bpf_probe_read_user(frame, sizeof(frame), (void *)st->bp) != 0 ||
        frame[1] == 0) {
        count_stat(STAT_STOPPED);
        return STEP_DONE;
    }
    st->sp = st->bp + 16;
    st->bp = frame[0];
    st->ip = frame[1];
    count_stat(STAT_FP_FRAMES);
    return STEP_CONTINUE;
}

// Record the current frame, then step to its caller.
static __always_inline int unwind_frame(struct unwind_state *st) {
    u64 len = st->stack.len;
    if (len >= MAX_USER_FRAMES) {
        count_stat(STAT_TRUNCATED);
        return STEP_DONE;
    }
    st->stack.ips[len] = st->ip;
    st->stack.len = len + 1;
    st->hash = hash_word(st->hash, st->ip);

    // A caller's ip is a return address: look up the call instruction before it.
    u64 pc = len == 0 ? st->ip : st->ip - 1;
    struct mapping_key key = {
        .prefixlen = 96,
        .pid_be = __builtin_bswap32(st->key.pid),
        .address_be = __builtin_bswap64(pc),
    };
    struct mapping_value *mapping = unwind_mappings.lookup(&key);
    if (!mapping) {
        // Not routed yet (a new process, or code mapped since): a frame-pointer guess
        // in code built without them makes junk frames, so the walk ends here.
        note_unknown_mapping(st, pc);
        count_stat(STAT_NO_ROUTE);
        return STEP_DONE;
    }
    if (mapping->row_count == 0) {
        if (mapping->first_row == ROUTE_FRAME_POINTERS)
            return frame_pointer_step(st);
        count_stat(STAT_NO_TABLE);
        return STEP_DONE;
    }
    struct unwind_row *row = find_row(mapping, pc - mapping->bias);
    if (row) {
        int result = table_step(st, row);
        if (result != STEP_TRY_FP)
            return result;
    }
    return frame_pointer_step(st);
}

static __always_inline void store_user_stack(struct unwind_state *st) {
    u64 hash = st->hash & STACK_ID_MASK;
    int err = st->key.slot == 0 ? user_stacks0.insert(&hash, &st->stack)
                                : user_stacks1.insert(&hash, &st->stack);
    // EEXIST: the same stack is already stored (a 64-bit hash collision is negligible).
    st->key.user_stack_id = (err == 0 || err == -ERR_EXIST) ? (s64)hash : -ERR_NOSPC;
}

#ifdef PYTHON_FRAMES
// ---------------------------------------------------------------------------
// CPython frames (3.8-3.13).
//
// User space finds a process's interpreter (the ELF symbol _PyRuntime) and writes
// the byte offsets of its version into py_procs. After the native walk, the
// sampled thread's PyThreadState is found by its kernel tid (native_thread_id, or
// on 3.8-3.10 the tid in glibc's struct pthread at thread_id) and its frame chain
// is walked, leaf first. Each frame is one word after PY_MARKER:
//   bits 0-46 the code object's address, bit 47 PY_ENTRY_BIT (the outermost
//   frame of one run of the C eval loop, so user space can put each run in place
//   of its _PyEval_EvalFrameDefault native frame), bits 48-63 the instruction
//   position (f_lasti; on 3.11+ the instruction pointer's distance from the code
//   object in code units, which user space turns into an index).
// The first sight of a (pid, code object) emits EVENT_PYTHON_CODE, so user space
// reads the code object while the process still lives.
#define PY_FRAMES_PER_CALL 16
#define PY_MAX_CALLS 8          // 128 steps: 64 frames and the C-stack shims between them
#define PY_MAX_THREADS 32
#define PY_MARKER 0xffffffffffffffffULL
#define PY_TRUNCATED 0xfffffffffffffffeULL  // the walk stopped at PY_MAX_FRAMES
#define PY_ENTRY_BIT (1ULL << 47)
#define PY_ADDRESS_MASK (PY_ENTRY_BIT - 1)
#define PY_NONE 0xffff

// Keep in step with agent/python/bpf_config.py.
struct py_proc {
    u64 interpreters_head;        // address of _PyRuntime.interpreters.head
    u64 pidns_dev;                // the process's pid namespace (nsfs device and inode), when
    u64 pidns_ino;                // not the host's: Python keeps thread ids as seen in there
    u16 interp_threads_head;
    u16 tstate_next;
    u16 tstate_native_thread_id;  // PY_NONE: match threads by their pthread's tid
    u16 tstate_thread_id;
    u16 tstate_frame;
    u16 cframe_current_frame;     // PY_NONE: tstate_frame points at the frame itself
    u16 frame_previous;
    u16 frame_code;
    u16 frame_instr;
    u16 frame_owner;              // PY_NONE: frames have no owner field
    u16 frame_is_entry;           // PY_NONE: no is_entry field (all but 3.11)
    u16 pthread_tid;              // glibc struct pthread: the kernel tid
    u8 instr_is_pointer;          // 3.11+: an instruction pointer; else an int f_lasti
    u8 owned_by_cstack;           // owner value of C-stack shim frames (3.12+); 0xff: none
    u16 every_frame_entry;        // 3.8-3.10: each frame is a run of the eval loop
};

struct py_code_key {
    u32 pid;
    u32 pad;
    u64 code;
};

BPF_HASH(py_procs, u32, struct py_proc, 4096);
BPF_TABLE("lru_hash", u64, u64, py_threads, 16384);                // pid_tgid -> PyThreadState
BPF_TABLE("lru_hash", struct py_code_key, u8, py_codes_seen, 65536);
#endif  // PYTHON_FRAMES

static __always_inline void finish_user_stack(struct unwind_state *st) {
    if (st->stack.len > 0)
        store_user_stack(st);
    else
        st->key.user_stack_id = -ERR_FAULT;
    finish_sample(&st->key, st->tid);
}

#ifdef OFF_CPU
static __always_inline void off_cpu_walk_done(struct unwind_state *st) {
    s64 user_stack_id = off_cpu_store_user_stack(&st->stack, st->hash);
    off_cpu_remember(st->tid, st->key.pid, st->key.comm, st->off_cpu_start_ns, st->off_cpu,
                     user_stack_id, st->off_cpu_kernel_stack_id);
}
#endif

// The end of a walk: on-CPU walks count their sample, off-CPU walks remember the stack.
static __always_inline void finish_walk(struct unwind_state *st) {
#ifdef OFF_CPU
    if (st->off_cpu) {
        off_cpu_walk_done(st);
        return;
    }
#endif
    finish_user_stack(st);
}

// FRAMES_PER_CALL native frames; 1: tail-call the native walker again.
static __always_inline int walk_native(struct unwind_state *st) {
    for (int i = 0; i < FRAMES_PER_CALL; i++) {
        if (unwind_frame(st) != STEP_CONTINUE)
            return 0;
    }
    st->calls++;
    if (st->calls < MAX_UNWIND_CALLS)
        return 1;
    count_stat(STAT_TRUNCATED);
    return 0;
}

// 1: the process runs CPython, tail-call the Python walker.
static __always_inline int python_next(struct unwind_state *st) {
#ifdef PYTHON_FRAMES
    if (py_procs.lookup(&st->key.pid)) {
        st->py_calls = 0;
        st->py_count = 0;
        st->py_pending = 0;
        st->py_frame = 0;
        return 1;
    }
#endif
    return 0;
}

// The walkers exist twice, for on-CPU (perf_event) and off-CPU (raw tracepoint):
// a program tail-calls only programs of its own type, through its own prog array.
int unwind_user(struct bpf_perf_event_data *ctx) {
    u32 zero = 0;
    struct unwind_state *st = unwind_state.lookup(&zero);
    if (!st)
        return 0;
    if (walk_native(st)) {
        unwind_programs.call(ctx, 0);
        count_stat(STAT_TRUNCATED);  // the kernel's tail-call limit
    }
    if (python_next(st)) {
        unwind_programs.call(ctx, 1);
        count_stat(STAT_PY_TAIL_CALL_FAILED);
    }
    finish_walk(st);
    return 0;
}

#ifdef PYTHON_FRAMES

static __always_inline u64 py_field(struct unwind_state *st, u16 offset) {
    return *(u64 *)(st->py_bytes + (offset & (PY_FRAME_READ - 1)));
}

static __always_inline int py_is_thread(struct py_proc *proc, u64 tstate, u32 tid) {
    if (proc->tstate_native_thread_id != PY_NONE) {
        u64 native = 0;
        bpf_probe_read_user(&native, sizeof(native), (void *)(tstate + proc->tstate_native_thread_id));
        return native == tid;
    }
    u64 pthread = 0;
    u32 kernel_tid = 0;
    if (bpf_probe_read_user(&pthread, sizeof(pthread), (void *)(tstate + proc->tstate_thread_id)) ||
        !pthread)
        return 0;
    bpf_probe_read_user(&kernel_tid, sizeof(kernel_tid), (void *)(pthread + proc->pthread_tid));
    return kernel_tid == tid;
}

// The sampled thread's PyThreadState: cached per thread, checked on every use.
static __always_inline u64 py_thread_state(struct py_proc *proc, u32 pid, u32 host_tid,
                                           u32 tid) {
    u64 thread = ((u64)pid << 32) | host_tid;
    u64 *cached = py_threads.lookup(&thread);
    if (cached && py_is_thread(proc, *cached, tid))
        return *cached;
    u64 interp = 0, tstate = 0;
    if (bpf_probe_read_user(&interp, sizeof(interp), (void *)proc->interpreters_head) || !interp)
        return 0;
    if (bpf_probe_read_user(&tstate, sizeof(tstate), (void *)(interp + proc->interp_threads_head)))
        return 0;
    for (int i = 0; i < PY_MAX_THREADS && tstate; i++) {
        if (py_is_thread(proc, tstate, tid)) {
            py_threads.update(&thread, &tstate);
            return tstate;
        }
        if (bpf_probe_read_user(&tstate, sizeof(tstate), (void *)(tstate + proc->tstate_next)))
            return 0;
    }
    return 0;
}

static __always_inline void py_append(struct unwind_state *st, u64 word) {
    u64 len = st->stack.len;
    if (len >= STACK_WORDS)
        return;
    st->stack.ips[len] = word;
    st->stack.len = len + 1;
    st->hash = hash_word(st->hash, word);
}

static __always_inline void py_note_code(struct unwind_state *st, u64 code) {
    struct py_code_key key = {.pid = st->key.pid, .code = code};
    if (py_codes_seen.lookup(&key))
        return;
    u8 one = 1;
    if (py_codes_seen.insert(&key, &one) == 0)
        emit_event(st->key.pid, EVENT_PYTHON_CODE, code);
}

// Frames are left: the pending word goes in, and the cut mark after it.
static __always_inline void py_truncate(struct unwind_state *st) {
    count_stat(STAT_PY_TRUNCATED);
    if (st->py_count > 0) {
        py_append(st, st->py_pending);
        st->py_pending = PY_TRUNCATED;
    }
}

// Read one interpreter frame; queue its word (the previous one is appended now).
static __always_inline int py_step(struct unwind_state *st, struct py_proc *proc) {
    u64 frame = st->py_frame;
    if (frame == 0)
        return STEP_DONE;
    if (st->py_count >= PY_MAX_FRAMES) {
        py_truncate(st);
        return STEP_DONE;
    }
    if (bpf_probe_read_user(st->py_bytes, PY_FRAME_READ, (void *)frame) != 0) {
        count_stat(STAT_PY_UNREADABLE);
        return STEP_DONE;
    }
    st->py_frame = py_field(st, proc->frame_previous);
    if (proc->frame_owner != PY_NONE &&
        st->py_bytes[proc->frame_owner & (PY_FRAME_READ - 1)] == proc->owned_by_cstack) {
        st->py_pending |= PY_ENTRY_BIT;  // a shim: the frame before it began a run of the loop
        return STEP_CONTINUE;
    }
    u64 code = py_field(st, proc->frame_code);
    u64 position;
    if (proc->instr_is_pointer) {
        u64 instr = py_field(st, proc->frame_instr);
        position = instr > code ? (instr - code) / 2 : 0;
    } else {
        s32 lasti = (s32)py_field(st, proc->frame_instr);
        position = lasti > 0 ? (u64)lasti : 0;
    }
    if (position > 0xffff)
        position = 0xffff;
    u64 entry = proc->every_frame_entry;
    if (proc->frame_is_entry != PY_NONE)
        entry = st->py_bytes[proc->frame_is_entry & (PY_FRAME_READ - 1)];
    if (st->py_count == 0)
        py_append(st, PY_MARKER);
    else
        py_append(st, st->py_pending);
    st->py_pending = (code & PY_ADDRESS_MASK) | (entry ? PY_ENTRY_BIT : 0) | (position << 48);
    st->py_count++;
    count_stat(STAT_PY_FRAMES);
    py_note_code(st, code & PY_ADDRESS_MASK);
    return STEP_CONTINUE;
}

// The sampled thread's id as the process sees it (a container has its own pid namespace).
static __always_inline u32 py_own_tid(struct unwind_state *st, struct py_proc *proc) {
    if (proc->pidns_ino == 0)
        return st->tid;
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(proc->pidns_dev, proc->pidns_ino, &ns, sizeof(ns)) != 0)
        return st->tid;
    return ns.pid;
}

static __always_inline int py_first_frame(struct unwind_state *st, struct py_proc *proc) {
    u64 tstate = py_thread_state(proc, st->key.pid, st->tid, py_own_tid(st, proc));
    if (tstate == 0) {
        count_stat(STAT_PY_NO_THREAD);  // a thread that runs no Python (or not yet)
        return 0;
    }
    u64 frame = 0;
    bpf_probe_read_user(&frame, sizeof(frame), (void *)(tstate + proc->tstate_frame));
    if (frame && proc->cframe_current_frame != PY_NONE)
        bpf_probe_read_user(&frame, sizeof(frame), (void *)(frame + proc->cframe_current_frame));
    st->py_frame = frame;
    return frame != 0;
}

static __always_inline void py_finish(struct unwind_state *st) {
    if (st->py_count > 0)
        py_append(st, st->py_pending);
}

// PY_FRAMES_PER_CALL Python frames; 1: tail-call the Python walker again.
static __always_inline int walk_python(struct unwind_state *st) {
    struct py_proc *proc = py_procs.lookup(&st->key.pid);
    if (!proc)
        goto done;
    if (st->py_calls == 0 && !py_first_frame(st, proc))
        goto done;
    for (int i = 0; i < PY_FRAMES_PER_CALL; i++) {
        if (py_step(st, proc) != STEP_CONTINUE)
            goto done;
    }
    st->py_calls++;
    if (st->py_calls < PY_MAX_CALLS)
        return 1;
    py_truncate(st);  // out of tail calls (shim frames of 3.12+ take steps too)
done:
    py_finish(st);
    return 0;
}

int unwind_python(struct bpf_perf_event_data *ctx) {
    u32 zero = 0;
    struct unwind_state *st = unwind_state.lookup(&zero);
    if (!st)
        return 0;
    if (walk_python(st)) {
        unwind_programs.call(ctx, 1);
        py_truncate(st);  // the kernel's tail-call limit
        py_finish(st);
    }
    finish_walk(st);
    return 0;
}
#endif  // PYTHON_FRAMES
#endif  // DWARF_UNWIND

#ifdef OFF_CPU
#ifdef DWARF_UNWIND
BPF_PERCPU_ARRAY(off_cpu_state, struct unwind_state, 1);
BPF_PROG_ARRAY(off_cpu_programs, 2);  // 0: off_cpu_unwind_user, 1: off_cpu_unwind_python

int off_cpu_unwind_user(struct bpf_raw_tracepoint_args *ctx) {
    u32 zero = 0;
    struct unwind_state *st = off_cpu_state.lookup(&zero);
    if (!st)
        return 0;
    if (walk_native(st)) {
        off_cpu_programs.call(ctx, 0);
        count_stat(STAT_TRUNCATED);
    }
    if (python_next(st)) {
        off_cpu_programs.call(ctx, 1);
        count_stat(STAT_PY_TAIL_CALL_FAILED);
    }
    finish_walk(st);
    return 0;
}

#ifdef PYTHON_FRAMES
int off_cpu_unwind_python(struct bpf_raw_tracepoint_args *ctx) {
    u32 zero = 0;
    struct unwind_state *st = off_cpu_state.lookup(&zero);
    if (!st)
        return 0;
    if (walk_python(st)) {
        off_cpu_programs.call(ctx, 1);
        py_truncate(st);
        py_finish(st);
    }
    finish_walk(st);
    return 0;
}
#endif

// Walk the blocking task's user stack with the tables; 0 when the walker is not
// loaded (the caller falls back to frame pointers).
static __always_inline int off_cpu_walk(struct bpf_raw_tracepoint_args *ctx, struct pt_regs *regs,
                                        struct off_cpu_start *start, u32 tid) {
    u32 zero = 0;
    struct unwind_state *st = off_cpu_state.lookup(&zero);
    if (!st)
        return 0;
    st->ip = regs->ip;
    st->sp = regs->sp;
    st->bp = regs->bp;
    st->hash = HASH_SEED;
    st->calls = 0;
    st->unknown_noted = 0;
    st->off_cpu = start->weight;
    st->off_cpu_start_ns = start->start_ns;
    st->off_cpu_kernel_stack_id = start->kernel_stack_id;
    st->key.pid = start->pid;
    __builtin_memcpy(st->key.comm, start->comm, COMM_LEN);
    st->tid = tid;
    st->stack.len = 0;
    off_cpu_programs.call(ctx, 0);
    count_stat(STAT_TAIL_CALL_FAILED);
    return 0;
}
#else
// Frame-pointer user stack of the blocking task (the agent runs without tables).
static __always_inline s64 off_cpu_frame_pointer_stack(struct bpf_raw_tracepoint_args *ctx) {
    u32 zero = 0;
    struct user_stack *stack = off_cpu_user_scratch.lookup(&zero);
    if (!stack)
        return -ERR_FAULT;
    long bytes = bpf_get_stack(ctx, stack->ips, sizeof(stack->ips), BPF_F_USER_STACK);
    stack->len = bytes > 0 ? (u64)bytes / 8 : 0;
    u64 hash = HASH_SEED;
    for (int i = 0; i < MAX_USER_FRAMES; i++) {
        if (i < stack->len)
            hash = hash_word(hash, stack->ips[i]);
    }
    return off_cpu_store_user_stack(stack, hash);
}
#endif  // DWARF_UNWIND

// sched_switch(preempt, prev, next): the current task is prev, switching out.
int on_sched_switch(struct bpf_raw_tracepoint_args *ctx) {
    u64 now = bpf_ktime_get_ns();
    u32 zero = 0;
    u64 *switched_in = off_cpu_switched_in.lookup(&zero);
    if (!switched_in)
        return 0;
    u64 current_since = *switched_in;
    *switched_in = now;  // next runs from now
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    if (pid == 0)
        return 0;  // the idle task
    off_cpu_account(tid, current_since);
    if (ctx->args[0])
        return 0;  // preempted: still runnable, not waiting for anything
#ifdef SCHED_SWITCH_PREV_STATE
    u32 prev_state = (u32)ctx->args[3];
    if (prev_state == 0 || (prev_state & TASK_DEAD_STATE))
        return 0;  // TASK_RUNNING (a yield, a reschedule on the way to user mode) or exiting
#endif
    u32 filter = control_value(CONTROL_PID_FILTER);
    if (filter != 0 && pid != filter)
        return 0;
    count_off_cpu(OFFCPU_SWITCHES);
    u32 weight = off_cpu_weight(now);
    if (weight > 1 && bpf_get_prandom_u32() % weight != 0) {
        count_off_cpu(OFFCPU_NOT_SAMPLED);
        return 0;
    }
    struct pt_regs regs = {};
    if (!task_user_registers(&regs)) {
        count_off_cpu(OFFCPU_KERNEL_THREAD);
        return 0;
    }
    u8 one = 1;
    if (!seen.lookup(&pid) && seen.insert(&pid, &one) == 0)
        emit_pid_event(pid, EVENT_FIRST_SAMPLE);  // so user space reads its mappings

    struct off_cpu_start start = {.start_ns = now, .pid = pid, .weight = weight};
    bpf_get_current_comm(&start.comm, sizeof(start.comm));
    start.kernel_stack_id = off_cpu_kernel_stack(ctx);
#ifdef DWARF_UNWIND
    off_cpu_walk(ctx, &regs, &start, tid);  // remembers the interval when the walk ends
    start.user_stack_id = -ERR_FAULT;       // the walker is not loaded: no user stack
#else
    start.user_stack_id = off_cpu_frame_pointer_stack(ctx);
#endif
    off_cpu_remember(tid, pid, start.comm, now, weight, start.user_stack_id,
                     start.kernel_stack_id);
    return 0;
}
#endif  // OFF_CPU
