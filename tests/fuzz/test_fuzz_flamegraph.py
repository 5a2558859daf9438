"""render_flamegraph on arbitrary names (control characters, markup, lone surrogates from
undecodable ELF bytes), processes and counts: always a well-formed SVG whose boxes add up:
callees within their caller, no more samples than it, merged boxes exactly their frames."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import example, given
from hypothesis import strategies as st

from agent.model import Frame, Location, Mapping, ProfileSample
from agent.render.flamegraph import render_flamegraph
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
    lambda locations, count, pid, comm: ProfileSample(
        locations, count, (("comm", comm), ("pid", str(pid))), pid
    ),
    locations=st.lists(LOCATION, max_size=5).map(tuple),
    count=st.one_of(st.integers(-2, 1000), st.just(2**63 - 1)),
    pid=st.integers(0, 3),
    comm=st.one_of(st.sampled_from(["", "app", "app (pid 1)", "pid 2"]), NAME),
)
EPSILON = 0.02  # px: coordinates are written with two decimals


@dataclass
class Box:
    name: str
    count: int
    x: float
    y: float
    width: float
    shown: bool
    merged: bool
    left_out: tuple[int, int]
    callees: list[Box] = field(default_factory=list)


def parse(group: ET.Element) -> Box:
    title, rect = group.find(f"{SVG}title"), group.find(f"{SVG}rect")
    assert title is not None and title.text is not None and rect is not None
    name, _, rest = title.text.rpartition(" (")
    classes = group.attrib["class"].split()
    frames, samples = (int(n) for n in group.attrib.get("data-left-out", "0 0").split())
    return Box(
        name,
        int(rest.split(" ")[0].replace(",", "")),
        float(rect.attrib["x"]),
        float(rect.attrib["y"]),
        float(rect.attrib["width"]),
        "hide" not in classes,
        "elided" in classes,
        (frames, samples),
    )


def tree(groups: list[ET.Element]) -> Box:
    """The call tree back from the boxes: pre-order, one row per depth (as the script)."""
    boxes = [parse(group) for group in groups]
    path: list[Box] = []
    for box in boxes:
        depth = round((boxes[0].y - box.y) / 16)
        assert 0 <= depth <= len(path), "a box without its caller before it"
        del path[depth:]
        if path:
            path[-1].callees.append(box)
        path.append(box)
    return boxes[0]


def check(box: Box) -> None:
    """A caller's callees fit in it; its merged box is exactly its hidden callees."""
    frames = [callee for callee in box.callees if not callee.merged]
    merged = [callee for callee in box.callees if callee.merged]
    assert len(merged) <= 1 and (not merged or box.callees[-1] is merged[0])  # last
    assert sum(callee.count for callee in frames) + box.left_out[1] <= box.count
    hidden = [callee for callee in frames if not callee.shown]
    if merged:
        assert box.shown and merged[0].shown
        assert merged[0].count == sum(callee.count for callee in hidden) + box.left_out[1]
    right = box.x
    for callee in [*(callee for callee in frames if callee.shown), *merged]:
        assert box.shown, "a hidden frame with a shown callee"
        assert callee.x >= right - EPSILON, "overlapping callees"
        right = callee.x + callee.width
    assert right <= box.x + box.width + EPSILON, "callees wider than their caller"
    for callee in frames:
        check(callee)


@fuzz_settings(200)
@given(st.lists(SAMPLE, max_size=6), NAME)
@example([ProfileSample((Location(1, None, frames=(Frame("\x01<&>\udcff\ufffe"),)),), 1)], "\x00")
@example(  # names that collide: "app (pid 1)" is both a comm and pid 1's disambiguated name
    [
        ProfileSample((), count, (("comm", comm), ("pid", str(pid))), pid)
        for count, pid, comm in [(1, 1, "app"), (2, 2, "app"), (4, 0, "app (pid 1)")]
    ],
    "collide",
)
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
    root = tree(boxes)
    assert (root.name, root.count, root.x, root.width) == ("all", total, 10, 1200)
    check(root)
    # above `all`, one frame per process (a pid; without one, a comm) with all its samples,
    # even when two processes' names collide
    per_process: Counter[object] = Counter()
    for sample in samples:
        if sample.count > 0:
            comm = dict(sample.labels).get("comm", "")
            per_process[sample.pid if sample.pid else comm] += sample.count
    processes = [box.count for box in root.callees if not box.merged]
    assert Counter(processes) <= Counter(per_process.values())
    assert sum(processes) + root.left_out[1] == total
