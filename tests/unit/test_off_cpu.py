"""Off-CPU time without root or BPF: the conversions, profiles, sinks, pull endpoint,
flame graph and flags that turn blocked intervals (Window.off_cpu) into output."""

from __future__ import annotations

import dataclasses
import re
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as svc

from agent.admin.pull import PullEndpoint
from agent.admin.server import AdminServer
from agent.admin.taps import Tap, TapSet, merge_windows
from agent.commands.record import flamegraph_of
from agent.config import ConfigError
from agent.model import (
    CPU,
    OFF_CPU,
    Frame,
    Location,
    ProcessInfo,
    ProfileSample,
    SeriesProfile,
    StackSample,
    Window,
)
from agent.pipeline import off_cpu_settings
from agent.pprof.builder import build_pprof, parse_pprof
from agent.sampler.convert import RawOffCpu, to_off_cpu_samples
from agent.sampler.sampler import OffCpuSettings
from agent.sinks.proto import profilestore_pb2 as pb
from agent.sinks.remote import otlp, parca
from agent.window_flow import Stages, off_cpu_labels, window_profile, window_profiles
from tests.unit import test_pull
from tests.unit.test_config import config_for
from tests.unit.test_pull import get
from tests.unit.test_window_flow import EXE, process, symbolize

EFAULT = 14
PERIOD_NS = 10_000_000
SVG = "{http://www.w3.org/2000/svg}"


# --- sampler.convert.to_off_cpu_samples ---------------------------------------------


def raw(
    user: int,
    kernel: int,
    count: int,
    nanoseconds: int,
    pid: int = 100,
    comm: bytes = b"sleeper\0\0\0\0\0\0\0\0\0",
) -> RawOffCpu:
    return RawOffCpu(0, pid, user, kernel, comm, count, nanoseconds, pid + 1)


def test_off_cpu_samples_keep_the_kernel_weighted_count_and_time() -> None:
    samples, evicted = to_off_cpu_samples(
        [raw(user=1, kernel=2, count=6, nanoseconds=15_000)],
        {1: (0x400010, 0x400020)},
        {2: (0xFFFFFFFF81000000,)},
    )
    assert samples == (
        StackSample(
            pid=100,
            tid=101,
            comm="sleeper",
            user_stack=(0x400010, 0x400020),
            kernel_stack=(0xFFFFFFFF81000000,),
            count=6,
            nanoseconds=15_000,
        ),
    )
    assert evicted == 0


def test_entries_naming_an_evicted_stack_are_dropped_and_counted() -> None:
    samples, evicted = to_off_cpu_samples(
        [
            raw(user=1, kernel=2, count=1, nanoseconds=1_000),
            raw(user=9, kernel=2, count=4, nanoseconds=9_000),  # user stack evicted
            raw(user=1, kernel=8, count=5, nanoseconds=8_000),  # kernel stack evicted
        ],
        {1: (0x400010,)},
        {2: (0xFFFFFFFF81000000,)},
    )
    assert [(s.user_stack, s.kernel_stack, s.count) for s in samples] == [
        ((0x400010,), (0xFFFFFFFF81000000,), 1)
    ]
    assert evicted == 9


def test_negative_ids_mean_no_stack_and_are_kept() -> None:
    samples, evicted = to_off_cpu_samples(
        [
            raw(user=-EFAULT, kernel=-EFAULT, count=3, nanoseconds=30_000),
            raw(user=-EFAULT, kernel=2, count=1, nanoseconds=20_000),
            raw(user=1, kernel=-EFAULT, count=1, nanoseconds=10_000),
        ],
        {1: (0x400010,)},
        {2: (0xFFFFFFFF81000000,)},
    )
    assert evicted == 0
    assert [(s.user_stack, s.kernel_stack, s.count, s.nanoseconds) for s in samples] == [
        ((), (), 3, 30_000),
        ((), (0xFFFFFFFF81000000,), 1, 20_000),
        ((0x400010,), (), 1, 10_000),
    ]


def test_python_words_follow_the_user_stack_id() -> None:
    words = (0x7A11, 0x7A12, 0x7A13)
    samples, _ = to_off_cpu_samples(
        [
            raw(user=1, kernel=-EFAULT, count=1, nanoseconds=2_000, pid=10),
            raw(user=2, kernel=-EFAULT, count=1, nanoseconds=1_000, pid=20),
            raw(user=-EFAULT, kernel=-EFAULT, count=1, nanoseconds=500, pid=30),
        ],
        {1: (0x400010,), 2: (0x400020,)},
        {},
        {1: words},
    )
    assert {s.pid: s.python_stack for s in samples} == {10: words, 20: (), 30: ()}


def test_longest_blocked_first_not_most_intervals() -> None:
    samples, _ = to_off_cpu_samples(
        [
            raw(user=1, kernel=-EFAULT, count=100, nanoseconds=1_000_000),
            raw(user=2, kernel=-EFAULT, count=1, nanoseconds=50_000_000),
            raw(user=3, kernel=-EFAULT, count=7, nanoseconds=7_000_000),
        ],
        {1: (0x1,), 2: (0x2,), 3: (0x3,)},
        {},
    )
    assert [s.nanoseconds for s in samples] == [50_000_000, 7_000_000, 1_000_000]
    assert [s.user_stack for s in samples] == [(0x2,), (0x3,), (0x1,)]


# --- window_flow: window_profiles and window_profile ----------------------------------


def series(proc: ProcessInfo | None, _sample: StackSample) -> tuple[tuple[str, str], ...]:
    return (("comm", proc.comm if proc else ""), ("node", "n1"))


def blocked(
    pid: int, user: tuple[int, ...], count: int, nanoseconds: int, kernel: tuple[int, ...] = ()
) -> StackSample:
    return StackSample(pid, pid, f"app{pid}", user, kernel, count, (), nanoseconds)


STAGES = Stages(resolve_process=process, symbolize=symbolize, series_labels=series)


def both_kinds() -> Window:
    samples = (
        StackSample(pid=1, tid=1, comm="app1", user_stack=(0x400010,), kernel_stack=(), count=5),
        StackSample(pid=2, tid=2, comm="app2", user_stack=(0x400020,), kernel_stack=(), count=3),
    )
    off_cpu = (
        blocked(1, (0x400030,), 4, 40_000_000, kernel=(0xFFFF0010,)),
        blocked(1, (0x400040,), 100, 2_000_000, kernel=(0xFFFF0020,)),
    )
    return Window(start_ns=1_000, end_ns=10_000_001_000, samples=samples, off_cpu=off_cpu)


def value_types(profile: Any) -> list[tuple[str, str]]:
    strings = profile.string_table
    return [(strings[t.type], strings[t.unit]) for t in profile.sample_type]


def test_window_profiles_make_cpu_and_off_cpu_series() -> None:
    profiles = window_profiles(both_kinds(), STAGES, PERIOD_NS)
    cpu = [p for p in profiles if p.kind == CPU]
    off = [p for p in profiles if p.kind == OFF_CPU]
    assert [p.labels for p in cpu] == [
        (("comm", "app1"), ("node", "n1")),
        (("comm", "app2"), ("node", "n1")),
    ]
    assert [p.labels for p in off] == [
        (("comm", "app1"), ("node", "n1"), ("profile_type", "off-cpu"))
    ]
    assert len(profiles) == 3

    cpu_pprof = parse_pprof(cpu[0].pprof)
    assert value_types(cpu_pprof) == [("samples", "count"), ("cpu", "nanoseconds")]
    assert [list(s.value) for s in cpu_pprof.sample] == [[5, 5 * PERIOD_NS]]

    (profile,) = off
    decoded = parse_pprof(profile.pprof)
    assert value_types(decoded) == [("samples", "count"), ("off_cpu", "nanoseconds")]
    strings = decoded.string_table
    assert strings[decoded.period_type.type] == "wallclock"
    assert sorted(list(s.value) for s in decoded.sample) == [[4, 40_000_000], [100, 2_000_000]]
    assert sum(s.nanoseconds for s in profile.samples) == 42_000_000


def test_window_profile_takes_one_kind() -> None:
    cpu = window_profile(both_kinds(), STAGES, PERIOD_NS)
    off = window_profile(both_kinds(), STAGES, PERIOD_NS, kind=OFF_CPU)
    assert cpu is not None and off is not None
    assert cpu.kind == CPU and off.kind == OFF_CPU
    assert sum(s.count for s in cpu.samples) == 8
    assert sum(s.count for s in off.samples) == 104
    assert value_types(parse_pprof(off.pprof))[1] == ("off_cpu", "nanoseconds")
    assert sum(s.value[1] for s in parse_pprof(off.pprof).sample) == 42_000_000
    assert cpu.period_ns == PERIOD_NS and off.period_ns == 0
    assert [list(s.value) for s in parse_pprof(cpu.pprof).sample] == [
        [5, 5 * PERIOD_NS],
        [3, 3 * PERIOD_NS],
    ]
    only_cpu = dataclasses.replace(both_kinds(), off_cpu=())
    assert window_profile(only_cpu, STAGES, PERIOD_NS, kind=OFF_CPU) is None


def test_a_relabeled_profile_type_gives_way_to_off_cpu() -> None:
    labels = off_cpu_labels((("node", "n1"), ("profile_type", "cpu")))
    assert labels == (("node", "n1"), ("profile_type", "off-cpu"))


# --- sinks: Parca and OTLP ------------------------------------------------------------


def off_cpu_profile() -> SeriesProfile:
    (profile,) = [p for p in window_profiles(both_kinds(), STAGES, PERIOD_NS) if p.kind == OFF_CPU]
    return profile


def parca_name(profile: SeriesProfile) -> str:
    return dict(parca.series_labels(profile, node="n1"))["__name__"]


def test_parca_names_off_cpu_series_apart() -> None:
    profiles = window_profiles(both_kinds(), STAGES, PERIOD_NS)
    assert [parca_name(p) for p in profiles if p.kind == CPU] == ["parca_agent_cpu"] * 2
    off = off_cpu_profile()
    assert parca_name(off) == "parca_agent"
    request = pb.WriteRawRequest.FromString(parca.encode(off, "n1", normalized=True))
    (sent,) = request.series
    labels = {label.name: label.value for label in sent.labels.labels}
    assert labels["__name__"] == "parca_agent"
    assert labels["profile_type"] == "off-cpu"
    assert sent.samples[0].raw_profile == off.pprof


def otlp_profile(profile: SeriesProfile) -> tuple[Any, Any]:
    request = svc.ExportProfilesServiceRequest.FromString(otlp.encode(profile, "n1", ""))
    (message,) = request.resource_profiles[0].scope_profiles[0].profiles
    return request.dictionary, message


def test_otlp_off_cpu_values_are_blocked_nanoseconds() -> None:
    stack = symbolize(None, (0x400010,), (0xFFFF0010,))
    samples = (
        ProfileSample(stack, count=3, labels=(("comm", "a"),), pid=7, nanoseconds=3_000_000),
        ProfileSample(stack, count=500, labels=(("comm", "a"),), pid=7, nanoseconds=1_000),
        ProfileSample(stack[1:], count=1, labels=(("comm", "a"),), pid=7, nanoseconds=9_000_000),
    )
    labels = (("node", "n1"), ("profile_type", "off-cpu"))
    profile = SeriesProfile(
        labels, 1_000, 10**10, 0, samples, build_pprof(samples, 1_000, 10**10, 0, OFF_CPU), OFF_CPU
    )
    dictionary, message = otlp_profile(profile)
    strings = dictionary.string_table
    sample_type, period_type = (
        (strings[t.type_strindex], strings[t.unit_strindex])
        for t in (message.sample_type, message.period_type)
    )
    assert sample_type == ("off_cpu", "nanoseconds")
    assert period_type == ("wallclock", "nanoseconds")
    assert message.period == 0
    # the first two share stack and attributes: one sample, their nanoseconds summed
    assert sorted(list(s.values) for s in message.samples) == [[3_001_000], [9_000_000]]
    entries = [dictionary.attribute_table[i] for i in message.attribute_indices]
    attributes = {strings[e.key_strindex]: e.value.string_value for e in entries}
    assert attributes == {"profile_type": "off-cpu"}

    on_cpu = SeriesProfile(labels[:1], 1_000, 10**10, PERIOD_NS, samples, b"", CPU)
    dictionary, message = otlp_profile(on_cpu)
    strings = dictionary.string_table
    assert strings[message.sample_type.type_strindex] == "samples"
    assert sorted(list(s.values) for s in message.samples) == [[1], [503]]


# --- capture: merge_windows and Tap ---------------------------------------------------


def test_merge_windows_sums_off_cpu_of_identical_stacks() -> None:
    first = Window(0, 10, (), off_cpu=(blocked(1, (0x1,), 2, 2_000), blocked(2, (0x2,), 1, 7_000)))
    second = Window(10, 25, (), off_cpu=(blocked(1, (0x1,), 3, 5_000),))
    merged = merge_windows([first, second])
    assert merged is not None
    assert (merged.start_ns, merged.end_ns) == (0, 25)
    assert sorted((s.pid, s.count, s.nanoseconds) for s in merged.off_cpu) == [
        (1, 5, 7_000),
        (2, 1, 7_000),
    ]
    assert merged.samples == ()


def test_tap_with_a_pid_keeps_only_its_off_cpu_intervals() -> None:
    tap = Tap(deadline=time.monotonic() + 60, pid=2, kind=OFF_CPU)
    on_cpu = (StackSample(1, 1, "app1", (0x1,), (), 9), StackSample(2, 2, "app2", (0x2,), (), 4))
    tap.feed(
        Window(0, 10, on_cpu, off_cpu=(blocked(1, (0x1,), 2, 2_000), blocked(2, (0x2,), 1, 7_000)))
    )
    (window,) = tap.windows
    assert [s.pid for s in window.samples] == [2]
    assert [(s.pid, s.nanoseconds) for s in window.off_cpu] == [(2, 7_000)]


def test_a_tap_whose_time_is_up_is_finished_by_the_feed_with_the_pipelines_stages() -> None:
    taps = TapSet()
    tap = taps.open(0, pid=1, kind=OFF_CPU)  # its time is up at the first feed
    pipeline: Any = type("Pipeline", (), {"stages": STAGES, "period_ns": PERIOD_NS})
    taps.feed(both_kinds(), pipeline)
    assert tap.done.is_set() and not taps.active()
    assert tap.error is None and tap.result is not None
    profile = parse_pprof(tap.result)
    assert sorted(s.value[1] for s in profile.sample) == [2_000_000, 40_000_000]
    addresses = {loc.address for loc in profile.location}
    assert not addresses & {0xFFFF0010, 0xFFFF0020}  # served over HTTP: no KASLR leak


# --- pull: type=off-cpu ---------------------------------------------------------------


server = test_pull.server  # the fixture: a started AdminServer that wants its token


class KindCapture:
    def __init__(self) -> None:
        self.calls: list[tuple[float, int | None, str]] = []

    def __call__(self, seconds: float, pid: int | None, kind: str) -> bytes:
        self.calls.append((seconds, pid, kind))
        return build_pprof([], time.time_ns(), int(seconds * 1e9), 0, kind)


def test_off_cpu_pull_without_off_cpu_recording_is_refused(server: AdminServer) -> None:
    capture = KindCapture()
    PullEndpoint(capture, max_seconds=60).register(server)
    status, _, body = get(server, "?seconds=1&type=off-cpu")
    assert status == 400
    assert b"--off-cpu" in body
    assert capture.calls == []


def test_off_cpu_pull_reaches_the_capture(server: AdminServer) -> None:
    capture = KindCapture()
    PullEndpoint(capture, max_seconds=60, kinds=frozenset({CPU, OFF_CPU})).register(server)
    status, _, body = get(server, "?seconds=1&type=off-cpu")
    assert status == 200
    assert value_types(parse_pprof(body))[1] == ("off_cpu", "nanoseconds")
    assert get(server, "?seconds=1")[0] == 200
    assert capture.calls == [(1.0, None, OFF_CPU), (1.0, None, CPU)]


def test_unknown_profile_type_is_a_bad_request(server: AdminServer) -> None:
    capture = KindCapture()
    PullEndpoint(capture, max_seconds=60, kinds=frozenset({CPU, OFF_CPU})).register(server)
    status, _, body = get(server, "?seconds=1&type=bogus")
    assert status == 400
    assert b"bogus" in body
    assert capture.calls == []


# --- record: the off-CPU flame graph --------------------------------------------------


def tooltips(svg: str) -> dict[str, tuple[int, str, float]]:
    """Frame name -> (weight, unit, width) of every box drawn."""
    frames = ET.fromstring(svg).find(f"{SVG}g[@id='frames']")
    assert frames is not None
    found = {}
    for group in frames:
        title, rect = group.find(f"{SVG}title"), group.find(f"{SVG}rect")
        assert title is not None and rect is not None
        match = re.fullmatch(r"(.*) \(([\d,]+) (.+), [\d.]+%\)", title.text or "", re.S)
        assert match, title.text
        weight = int(match.group(2).replace(",", ""))
        found[match.group(1)] = (weight, match.group(3), float(rect.attrib["width"]))
    return found


def test_off_cpu_flame_graph_weighs_blocked_time() -> None:
    def leaf(name: str) -> tuple[Location, ...]:
        return (
            Location(0x400010, EXE, frames=(Frame(name),)),
            Location(0x400020, EXE, frames=(Frame("main"),)),
        )

    samples = [
        ProfileSample(leaf("long_wait"), count=1, labels=(), pid=1, nanoseconds=900_000),
        ProfileSample(leaf("many_short"), count=100, labels=(), pid=1, nanoseconds=100_000),
    ]
    off = tooltips(flamegraph_of(samples, 1, OFF_CPU))
    assert off["long_wait"][:2] == (900, "µs blocked")
    assert off["many_short"][:2] == (100, "µs blocked")
    assert off["long_wait"][2] > off["many_short"][2] * 5
    assert off["main"][0] == 1_000
    # the same samples on CPU weigh their counts
    on = tooltips(flamegraph_of(samples, 1, CPU))
    assert on["many_short"][:2] == (100, "samples")
    assert on["many_short"][2] > on["long_wait"][2]


# --- config and pipeline.off_cpu_settings ----------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"), [("--off-cpu-min-block", "0"), ("--off-cpu-max-rate", "-1")]
)
def test_out_of_range_off_cpu_settings_are_refused(flag: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"flag {flag}:"):
        config_for(["run", "--off-cpu", flag, value])


def test_off_cpu_settings_from_the_config() -> None:
    assert off_cpu_settings(config_for(["run"])) is None
    assert off_cpu_settings(config_for(["run", "--off-cpu-min-block", "5ms"])) is None
    assert off_cpu_settings(config_for(["run", "--off-cpu"])) == OffCpuSettings(1000, 1000)
    settings = off_cpu_settings(
        config_for(["run", "--off-cpu", "--off-cpu-min-block", "1ms", "--off-cpu-max-rate", "0"])
    )
    assert settings == OffCpuSettings(min_block_us=1000, max_rate=0)
    small = off_cpu_settings(config_for(["run", "--off-cpu", "--off-cpu-min-block", "0.1ms"]))
    assert small is not None and small.min_block_us == 100
