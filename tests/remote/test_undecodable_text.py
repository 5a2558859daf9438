"""Names and labels with undecodable bytes (lone surrogates) still encode for both protocols."""

from __future__ import annotations

from agent.model import Frame, Location, ProfileSample, SeriesProfile
from agent.sinks.remote import otlp, parca


def profile_with_bad_text() -> SeriesProfile:
    location = Location(address=0x1000, mapping=None, frames=(Frame("spin\udcff"),), kernel=True)
    sample = ProfileSample((location,), 3, (("comm", "a\udcff"), ("pid", "7")), pid=7)
    return SeriesProfile((("comm", "a\udcff"), ("node", "n")), 1, 2, 3, (sample,), b"")


def test_both_encoders_replace_lone_surrogates() -> None:
    profile = profile_with_bad_text()
    assert "a\ufffd".encode() in parca.encode(profile, node="n", normalized=False)
    assert "spin\ufffd".encode() in otlp.encode(profile, node="n")
