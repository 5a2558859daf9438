// Strobe's CPU sampler (bcc C). On every CPU's cpu-clock tick it counts
// (window slot, process, thread name, user stack, kernel stack).
//
// Only uapi types are used (the perf_event context, stack ids, helpers), like
// bcc's tools/profile.py, so any kernel's header tree compiles it correctly.
//
// Windows: control[CONTROL_SLOT] holds the current slot (0 or 1). Keys carry the
// slot and each slot has its own stack map, so user space flips the slot, then
// drains and clears the old slot's counts and stacks while new samples land in
// the other slot. Freed stack ids are thus never reused within a live window.
//
// New processes: the first sample of a tgid and every exec emit a pid event on a
// ring buffer, so user space can read /proc/PID/maps before a short-lived
// process exits.
//
// Compile-time constants (bcc cflags): COUNTS_ENTRIES, STACK_ENTRIES,
// SEEN_ENTRIES, EVENT_PAGES.
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

#define COMM_LEN 16
#define ERR_FAULT 14   // EFAULT: no stack of that kind (user mode tick, kernel thread)
#define ERR_EXIST 17   // EEXIST: another stack holds the hash bucket
#define NOEXIST 1      // BPF_NOEXIST

enum control_index { CONTROL_SLOT, CONTROL_PID_FILTER, CONTROL_ENTRIES };

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

enum pid_event_kind { EVENT_FIRST_SAMPLE, EVENT_EXEC };

struct sample_key {
    u32 slot;
    u32 pid;              // tgid
    s32 user_stack_id;    // < 0: -errno from bpf_get_stackid
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

static __always_inline void emit_pid_event(u32 pid, u32 kind) {
    struct pid_event event = {.pid = pid, .kind = kind};
    if (pid_events.ringbuf_output(&event, sizeof(event), 0) != 0)
        count_lost(LOST_PID_EVENT);
}

static __always_inline void note_stack_error(s32 id, u32 collision, u32 error) {
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

int on_cpu_clock(struct bpf_perf_event_data *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 tid = (u32)pid_tgid;
    if (pid == 0)
        return 0;  // the idle task
    u32 filter = control_value(CONTROL_PID_FILTER);
    if (filter != 0 && pid != filter)
        return 0;

    struct sample_key key = {};
    key.slot = control_value(CONTROL_SLOT) & 1;
    key.pid = pid;
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    if (key.slot == 0) {
        key.user_stack_id = stacks0.get_stackid(ctx, BPF_F_USER_STACK);
        key.kernel_stack_id = stacks0.get_stackid(ctx, 0);
    } else {
        key.user_stack_id = stacks1.get_stackid(ctx, BPF_F_USER_STACK);
        key.kernel_stack_id = stacks1.get_stackid(ctx, 0);
    }
    note_stack_error(key.user_stack_id, LOST_USER_STACK_COLLISION, LOST_USER_STACK_ERROR);
    note_stack_error(key.kernel_stack_id, LOST_KERNEL_STACK_COLLISION, LOST_KERNEL_STACK_ERROR);

    u8 one = 1;
    if (seen.insert(&pid, &one) == 0)
        emit_pid_event(pid, EVENT_FIRST_SAMPLE);
    add_sample(&key, tid);
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
