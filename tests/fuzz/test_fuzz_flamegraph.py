"""render_flamegraph on arbitrary names (control characters, markup, lone surrogates from
undecodable ELF bytes) and counts: always a well-formed SVG whose boxes add up."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from hypothesis import example, given
from hypothesis import strategies as st

from agent.flamegraph import render_flamegraph
from agent.model import Frame, Location, Mapping, ProfileSample
from tests.fuzz import any_text, fuzz_settings

SVG = "{http://www.w3.org/2000/svg}"
# Characters XML 1.0 allows; everything else must have been replaced.
XML_CHAR = re.compile("[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")
NAME = st.one_of(st.sampled_from(["main", "<b>&amp;", "]]>", "\x00", "a\udcffb"]), any_text)
MAPPING = st.builds(
    Mapping, start=st.just(0x1000), end=st.just(0x2000), offset=st.just(0), path=NAME
)
LOCATION = st.builds(
    Location,
    address=st.integers(0, 2**64 - 1),
    mapping=st.one_of(st.none(), MAPPING),
    frames=st.lists(st.builds(Frame, function=NAME), max_size=3).map(tuple),
    kernel=st.booleans(),
)
SAMPLE = st.builds(
    ProfileSample,
    locations=st.lists(LOCATION, max_size=5).map(tuple),
    count=st.one_of(st.integers(-2, 1000), st.just(2**63 - 1)),
)


@fuzz_settings(200)
@given(st.lists(SAMPLE, max_size=6), NAME)
@example([ProfileSample((Location(1, None, frames=(Frame("\x01<&>\udcff\ufffe"),)),), 1)], "\x00")
def test_flamegraph_is_well_formed_xml(samples: list[ProfileSample], title: str) -> None:
    svg = render_flamegraph(samples, title=title)
    assert XML_CHAR.fullmatch(svg), "a character XML 1.0 forbids"
    root = ET.fromstring(svg.encode("utf-8"))
    assert root.tag == f"{SVG}svg"
    frames = root.find(f"{SVG}g[@id='frames']")
    assert frames is not None
    boxes = frames.findall(f"{SVG}g")
    total = sum(sample.count for sample in samples if sample.count > 0)
    if total == 0:
        assert boxes == []
        return
    tooltip = boxes[0].find(f"{SVG}title")
    assert tooltip is not None and tooltip.text is not None
    assert tooltip.text.startswith(f"all ({total:,} samples, 100.00%)")
    for box in boxes:
        rect = box.find(f"{SVG}rect")
        assert rect is not None
        x, width = float(rect.attrib["x"]), float(rect.attrib["width"])
        assert x >= 0 and x + width <= 1200 + 10 + 0.01  # inside the frame area
