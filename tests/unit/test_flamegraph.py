from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from agent.flamegraph import MARGIN, WIDTH, render_flamegraph
from agent.model import Frame, Location, Mapping, ProfileSample

SVG = "{http://www.w3.org/2000/svg}"
LIBC = Mapping(start=0x7F0000000000, end=0x7F0000100000, offset=0, path="/usr/lib/libc.so.6")


def loc(*functions: str, address: int = 0x1000, kernel: bool = False) -> Location:
    return Location(
        address=address,
        mapping=None if kernel else LIBC,
        frames=tuple(Frame(function=f) for f in functions),
        kernel=kernel,
    )


def sample(count: int, *locations: Location) -> ProfileSample:
    return ProfileSample(locations=locations, count=count)


def boxes(svg: str) -> list[tuple[str, int, float, float, float]]:
    """(name, samples, x, y, width) of every frame box, from the tooltips and rects."""
    root = ET.fromstring(svg)
    found = []
    for group in root.iter(f"{SVG}g"):
        title, rect = group.find(f"{SVG}title"), group.find(f"{SVG}rect")
        if title is None or rect is None:
            continue
        match = re.fullmatch(r"(.*) \(([\d,]+) samples, [\d.]+%\)", title.text or "", re.S)
        assert match, title.text
        found.append(
            (
                match.group(1),
                int(match.group(2).replace(",", "")),
                float(rect.attrib["x"]),
                float(rect.attrib["y"]),
                float(rect.attrib["width"]),
            )
        )
    return found


def by_name(svg: str) -> dict[str, tuple[int, float, float, float]]:
    return {name: (count, x, y, width) for name, count, x, y, width in boxes(svg)}


SAMPLES = [
    sample(30, loc("compute"), loc("main")),
    sample(10, loc("parse"), loc("main")),
    sample(60, loc("idle")),
]


def test_root_spans_full_width_and_widths_are_proportional_to_samples() -> None:
    frames = by_name(render_flamegraph(SAMPLES))
    count, x, _, width = frames["all"]
    assert count == 100
    assert x == pytest.approx(MARGIN)
    assert width == pytest.approx(WIDTH)
    for name, expected in {"main": 40, "compute": 30, "parse": 10, "idle": 60}.items():
        assert frames[name][0] == expected
        assert frames[name][3] == pytest.approx(WIDTH * expected / 100, abs=0.01)


def test_root_is_at_the_bottom_and_callees_sit_above_within_their_caller() -> None:
    frames = by_name(render_flamegraph(SAMPLES))
    _, root_x, root_y, _ = frames["all"]
    _, main_x, main_y, main_w = frames["main"]
    _, compute_x, compute_y, compute_w = frames["compute"]
    assert root_y > main_y > compute_y
    assert frames["idle"][2] == main_y  # siblings share a row
    assert main_x <= compute_x and compute_x + compute_w <= main_x + main_w + 0.01
    # children are laid out side by side without overlap
    _, parse_x, _, parse_w = frames["parse"]
    assert compute_x + compute_w <= parse_x + 0.01 or parse_x + parse_w <= compute_x + 0.01


def test_inline_frames_become_boxes_caller_below_callee() -> None:
    # one location: `inner` was inlined into `outer`, which main called
    svg = render_flamegraph([sample(5, loc("inner", "outer"), loc("main"))])
    frames = by_name(svg)
    assert frames["main"][2] > frames["outer"][2] > frames["inner"][2]
    assert frames["inner"][0] == frames["outer"][0] == 5


def test_recursion_gives_one_box_per_level() -> None:
    svg = render_flamegraph([sample(4, loc("fib"), loc("fib"), loc("main"))])
    assert [name for name, *_ in boxes(svg)] == ["all", "main", "fib", "fib"]


def test_unsymbolized_frames_show_address_and_mapping_basename() -> None:
    unknown = Location(address=0x7F0000001234, mapping=LIBC)
    kernel = Location(address=0xFFFFFFFF81000000, mapping=None, kernel=True)
    frames = by_name(render_flamegraph([sample(2, kernel, unknown, loc("main"))]))
    assert "0x7f0000001234 (libc.so.6)" in frames
    assert "0xffffffff81000000 ([kernel])" in frames


def test_names_are_xml_escaped() -> None:
    nasty = 'operator<<(std::ostream&, "x") > y'
    svg = render_flamegraph([sample(1, loc(nasty))], title='a <b> & "c"')
    frames = by_name(svg)  # ET.fromstring fails on bad escaping
    assert nasty in frames
    root = ET.fromstring(svg)
    assert any(t.text == 'a <b> & "c"' for t in root.iter(f"{SVG}text"))


def test_characters_xml_cannot_carry_are_replaced() -> None:
    svg = render_flamegraph([sample(1, loc("bad\x00name\x1b\udc80"))])
    assert "bad\ufffdname\ufffd\ufffd" in by_name(svg)


def test_frames_narrower_than_the_minimum_are_omitted() -> None:
    svg = render_flamegraph([sample(1_000_000, loc("big")), sample(1, loc("tiny"), loc("big2"))])
    names = {name for name, *_ in boxes(svg)}
    assert "big" in names
    assert "tiny" not in names and "big2" not in names


def test_output_is_stable_and_colors_follow_names() -> None:
    shuffled = list(reversed(SAMPLES))
    assert render_flamegraph(SAMPLES) == render_flamegraph(shuffled)
    root = ET.fromstring(render_flamegraph([*SAMPLES, sample(3, loc("main"), loc("idle"))]))
    fills: dict[str, set[str]] = {}
    for group in root.iter(f"{SVG}g"):
        title, rect = group.find(f"{SVG}title"), group.find(f"{SVG}rect")
        if title is not None and rect is not None:
            name = (title.text or "").rsplit(" (", 1)[0]
            fills.setdefault(name, set()).add(rect.attrib["fill"])
    assert len(fills["main"]) == 1  # `main` at two depths, one color
    assert len({next(iter(f)) for f in fills.values()}) > 1


def test_no_samples_is_still_a_valid_svg() -> None:
    svg = render_flamegraph([], title="empty")
    assert boxes(svg) == []
    assert "no samples" in svg
    ET.fromstring(svg)
