"""otlp.encode on arbitrary samples (the strategy of test_fuzz_pprof: extreme addresses
and counts, empty stacks, any text, shared and equal locations and mappings): the request
is what upb writes for it and decodes to exactly the samples given, merged."""

from __future__ import annotations

import pytest
from hypothesis import given

from agent.model import ProfileSample, SeriesProfile
from agent.sinks.remote import otlp
from tests.fuzz import fuzz_settings
from tests.fuzz.test_fuzz_pprof import samples
from tests.remote.test_otlp_encode import decode, expected_samples

INT64 = range(-(2**63), 2**63)


@fuzz_settings(150)
@given(samples())
def test_any_samples_encode_to_what_they_are(given_samples: list[ProfileSample]) -> None:
    labels = (("namespace", "ns"), ("service", "\udcff"))
    profile = SeriesProfile(labels, 1, 10**10, 52_631_578, tuple(given_samples), b"")
    expected = expected_samples(profile)
    if any(count not in INT64 for _, _, (count,) in expected):  # merged counts overflow
        with pytest.raises(ValueError):  # as upb refuses such a value
            otlp.encode(profile, "node")
        return
    _, decoded = decode(otlp.encode(profile, "node"))
    assert decoded == expected
