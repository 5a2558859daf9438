"""Unwind tables for the BPF stack walker: user stacks of code built without frame pointers.

    table.read_unwind_table(stream) -> UnwindTable   .eh_frame/.debug_frame -> packed rows
    registry.UnwindTables(maps)                      tables shared by build id, routed per
        .prepare(process) / .forget(pid) / .sweep()  pid, freed with their last process
    worker.UnwindWorker(tables)                      does that beside the sampling loop

agent.sampler.Sampler(unwinder="dwarf"|"auto") owns one of each; the BPF side is the
second half of bpf/profile.bpf.c.
"""
