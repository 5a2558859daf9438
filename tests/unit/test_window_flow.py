from __future__ import annotations

import gzip

from agent.model import Frame, Location, Mapping, ProcessInfo, StackSample, Window
from agent.pprof.proto import profile_pb2
from agent.window_flow import Stages, window_profile, window_profiles

EXE = Mapping(start=0x400000, end=0x401000, offset=0, path="/usr/bin/app")


def process(pid: int, _stack: tuple[int, ...] = ()) -> ProcessInfo:
    return ProcessInfo(pid=pid, start_time=1, comm=f"app{pid}", exe="/usr/bin/app", mappings=(EXE,))


def symbolize(
    proc: ProcessInfo | None, user: tuple[int, ...], kernel: tuple[int, ...]
) -> tuple[Location, ...]:
    kern = tuple(
        Location(address=a, mapping=None, frames=(Frame(f"k{a:x}"),), kernel=True) for a in kernel
    )
    usr = tuple(Location(address=a, mapping=EXE, frames=(Frame(f"u{a:x}"),)) for a in user)
    return kern + usr


def series(proc: ProcessInfo | None, sample: StackSample) -> tuple[tuple[str, str], ...] | None:
    if sample.pid == 3:
        return None  # dropped by relabeling
    return (("node", "n1"), ("comm", proc.comm if proc else ""))


def window() -> Window:
    samples = (
        StackSample(
            pid=1,
            tid=1,
            comm="app1",
            user_stack=(0x400010, 0x400020),
            kernel_stack=(0xFFFF0010,),
            count=5,
        ),
        StackSample(pid=1, tid=2, comm="app1", user_stack=(0x400030,), kernel_stack=(), count=2),
        StackSample(pid=2, tid=2, comm="app2", user_stack=(0x400010,), kernel_stack=(), count=7),
        StackSample(pid=3, tid=3, comm="app3", user_stack=(0x400010,), kernel_stack=(), count=11),
    )
    return Window(start_ns=1_000, end_ns=10_000_001_000, samples=samples)


def parse(data: bytes) -> profile_pb2.Profile:
    profile = profile_pb2.Profile()
    profile.ParseFromString(gzip.decompress(data))
    return profile


def test_one_profile_per_series_and_dropped_series_vanish() -> None:
    stages = Stages(resolve_process=process, symbolize=symbolize, series_labels=series)
    profiles = window_profiles(window(), stages, period_ns=52_631_578)
    assert [dict(p.labels)["comm"] for p in profiles] == ["app1", "app2"]
    app1 = profiles[0]
    assert sum(s.count for s in app1.samples) == 7
    assert app1.duration_ns == 10_000_000_000
    decoded = parse(app1.pprof)
    assert sum(s.value[0] for s in decoded.sample) == 7
    strings = decoded.string_table
    pids = {label.num for s in decoded.sample for label in s.label if strings[label.key] == "pid"}
    assert pids == {1}
    # kernel frame first (innermost), then user frames
    first = next(s for s in decoded.sample if s.value[0] == 5)
    functions = {f.id: strings[f.name] for f in decoded.function}
    by_id = {loc.id: loc for loc in decoded.location}
    names = [functions[by_id[i].line[0].function_id] for i in first.location_id]
    assert names == ["kffff0010", "u400010", "u400020"]


def test_window_profile_keeps_every_sample() -> None:
    stages = Stages(resolve_process=process, symbolize=symbolize, series_labels=series)
    merged = window_profile(window(), stages, period_ns=1)
    assert merged is not None
    assert sum(s.value[0] for s in parse(merged.pprof).sample) == 14
    no_series = Stages(process, symbolize, series_labels=lambda proc, sample: None)
    assert window_profile(window(), no_series, period_ns=1) is None


def test_vanished_process_still_yields_its_frames() -> None:
    stages = Stages(
        resolve_process=lambda pid, stack: None,
        symbolize=symbolize,
        series_labels=lambda proc, sample: (("node", "n1"),),
    )
    profiles = window_profiles(window(), stages, period_ns=1)
    assert sum(s.count for s in profiles[0].samples) == 25


def test_series_labels_are_sample_labels_too() -> None:
    """A .pb.gz copied out of the store, a record or a pull still says who ran it."""
    labelled = Stages(
        resolve_process=process,
        symbolize=symbolize,
        series_labels=lambda proc, sample: (
            ("namespace", "prod"),
            ("pod", f"web-{sample.pid}"),
            ("container_id", ""),  # empty: not a label
            ("comm", "from-relabeling"),  # per process: the sample's own wins
        ),
    )
    merged = window_profile(window(), labelled, period_ns=52_631_578)
    assert merged is not None
    decoded = parse(merged.pprof)
    strings = decoded.string_table
    by_pod = {}
    for sample in decoded.sample:
        labels = {strings[lab.key]: strings[lab.str] or lab.num for lab in sample.label}
        by_pod[labels["pod"]] = labels
    assert by_pod["web-2"] == {"namespace": "prod", "pod": "web-2", "comm": "app2", "pid": 2}
    assert set(by_pod) == {"web-1", "web-2", "web-3"}
