"""Parca: one SeriesProfile -> one WriteRawRequest for ProfileStoreService/WriteRaw.

How the data maps to series:
- Each SeriesProfile becomes one RawProfileSeries holding one RawSample whose
  raw_profile is the profile's gzipped pprof, unchanged.
- Series labels are `__name__="parca_agent_cpu"` plus the profile's labels (already
  bounded by the label stage), plus `node` when the labels carry none and a node name
  is configured. `parca_agent_cpu` is the name Parca Agent uses for on-CPU profiles,
  so Parca's UI lists them as its well-known on-CPU type (parca_agent_cpu:samples:count:
  cpu:nanoseconds:delta, the rest coming from the pprof's sample and period types).
- Per-process detail (pid, comm, ...) stays in the pprof as sample labels and never
  becomes a series label, so the number of series is bounded by the label stage, not
  by the number of processes on the host.
- `normalized` follows the config. Default False: agent/pprof/builder.py keeps
  runtime addresses plus each mapping's start/limit/offset (the pprof convention), so
  Parca must normalize them (address - start + offset) before it symbolizes server-side.
"""

from __future__ import annotations

from agent.model import OFF_CPU, SeriesProfile, valid_utf8
from agent.sinks.proto import profilestore_pb2 as pb

PROFILE_NAME = "parca_agent_cpu"
# Off-CPU profiles get the name Parca Agent gives its own (parca-agent issue #3061): with
# their period type wallclock/nanoseconds, Parca lists them as the well-known Off-CPU
# type parca_agent:samples:count:wallclock:nanoseconds:delta (and the blocked time as
# parca_agent:off_cpu:nanoseconds:wallclock:nanoseconds:delta).
OFF_CPU_PROFILE_NAME = "parca_agent"
METHOD = "/parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw"


def series_labels(profile: SeriesProfile, node: str) -> list[tuple[str, str]]:
    """Sorted, unique series labels; `__name__` is always ours."""
    labels = {name: value for name, value in profile.labels if name != "__name__" and value}
    if node and "node" not in labels:
        labels["node"] = node
    labels["__name__"] = OFF_CPU_PROFILE_NAME if profile.kind == OFF_CPU else PROFILE_NAME
    return sorted(labels.items())


def encode(profile: SeriesProfile, node: str, normalized: bool) -> bytes:
    """The serialized WriteRawRequest for one profile."""
    labels = [
        pb.Label(name=valid_utf8(name), value=valid_utf8(value))
        for name, value in series_labels(profile, node)
    ]
    series = pb.RawProfileSeries(
        labels=pb.LabelSet(labels=labels),
        samples=[pb.RawSample(raw_profile=profile.pprof)],
    )
    return pb.WriteRawRequest(series=[series], normalized=normalized).SerializeToString()


def rejection(response: bytes) -> str:
    """WriteRawResponse is empty: an accepted call accepted everything."""
    pb.WriteRawResponse.FromString(response)
    return ""
