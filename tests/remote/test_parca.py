"""Parca WriteRaw: what a real ProfileStoreService server decodes."""

from __future__ import annotations

import gzip

from agent.pprof.builder import build_pprof, parse_pprof
from agent.sinks.remote import parca
from tests.remote.backend import make_profile


def test_server_decodes_series_labels_and_raw_profile(backends, sinks):
    backend = backends("parca")
    sink = sinks(address=backend.address, protocol="parca", node="node-a")
    profile = make_profile(1, labels=(("pod", "web-1"), ("namespace", "shop")))
    sink.write(profile)
    assert sink.flush(60)

    (request,) = backend.recorder.requests
    assert request.normalized is False
    (series,) = request.series
    labels = [(label.name, label.value) for label in series.labels.labels]
    assert labels == sorted(labels)
    assert dict(labels) == {
        "__name__": "parca_agent_cpu",
        "namespace": "shop",
        "pod": "web-1",
        "node": "node-a",
    }
    (sample,) = series.samples
    assert sample.raw_profile == profile.pprof
    assert gzip.decompress(sample.raw_profile).startswith(b"profile-000001-")


def test_functions_of_a_real_pprof_arrive(backends, sinks):
    """With the pipeline's pprof builder, the functions of the samples reach the server."""
    backend = backends("parca")
    sink = sinks(address=backend.address, protocol="parca", normalized=True)
    template = make_profile(2)
    pprof = build_pprof(template.samples, template.start_ns, template.duration_ns, 10)
    sink.write(
        type(template)(
            labels=template.labels,
            start_ns=template.start_ns,
            duration_ns=template.duration_ns,
            period_ns=10,
            samples=template.samples,
            pprof=pprof,
        )
    )
    assert sink.flush(60)
    (request,) = backend.recorder.requests
    assert request.normalized is True
    decoded = parse_pprof(request.series[0].samples[0].raw_profile)
    names = {decoded.string_table[f.name] for f in decoded.function}
    assert {"do_syscall", "inlined_leaf", "outer_caller", "libc_write", "main"} <= names
    series_names = {label.name for label in request.series[0].labels.labels}
    assert "pid" not in series_names and "comm" not in series_names


def test_series_name_is_ours_and_empty_values_are_left_out():
    profile = make_profile(3, labels=(("__name__", "other"), ("pod", ""), ("node", "n1")))
    assert parca.series_labels(profile, node="ignored") == [
        ("__name__", "parca_agent_cpu"),
        ("node", "n1"),
    ]
