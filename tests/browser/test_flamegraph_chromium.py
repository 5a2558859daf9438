"""The flame graph in a real browser (Debian's headless Chromium): it renders from disk with
no network, one frame per process shows, a click zooms, the merged tail opens, search counts.

Clicks and key presses are real input events (the DevTools Input domain), so they go
through the browser's hit testing to the SVG's own handlers; the search's prompt() is
answered as a user would. What the page shows is read back from its DOM and its pixels.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import agent.render.flamegraph
from agent.model import Frame, Location, Mapping, ProfileSample
from agent.render.flamegraph import MARGIN, MIN_WIDTH_PX, WIDTH, render_flamegraph
from tests.browser.cdp import Chromium, screenshot
from tests.browser.host_profile import fragmented_profile, host_profile
from tests.browser.png import png_rows, png_size
from tests.conftest import require_tool

SVG_NS = "{http://www.w3.org/2000/svg}"
WINDOW = (1400, 900)
MATCH_FILL = (230, 0, 230)
# Every frame as the page has it now: attributes, classes, and where it is on screen.
FRAMES_JS = """[...document.querySelectorAll("#frames > g")].map((g) => {
  const title = g.querySelector("title").textContent, rect = g.querySelector("rect");
  const box = rect.getBoundingClientRect(), text = g.querySelector("text");
  return {title, name: title.slice(0, title.lastIndexOf(" (")),
    x: parseFloat(rect.getAttribute("x")), width: parseFloat(rect.getAttribute("width")),
    fill: rect.getAttribute("fill"), classes: g.getAttribute("class"),
    shown: box.width > 0, screen: [box.x, box.y, box.width, box.height],
    label: text ? text.textContent : ""};
})"""


@dataclass(frozen=True)
class Shown:
    """One frame as the page has it."""

    title: str
    name: str
    x: float
    width: float
    fill: str
    classes: str
    shown: bool
    screen: tuple[float, float, float, float]
    label: str

    @property
    def center(self) -> tuple[float, float]:
        x, y, width, height = self.screen
        return x + width / 2, y + height / 2


def frames(browser: Chromium) -> list[Shown]:
    return [Shown(**{**f, "screen": tuple(f["screen"])}) for f in browser.evaluate(FRAMES_JS)]


def only(found: list[Shown], name: str) -> Shown:
    matches = [frame for frame in found if frame.name == name]
    assert len(matches) == 1, f"{name}: {len(matches)} frames"
    return matches[0]


def element_center(browser: Chromium, element_id: str) -> tuple[float, float]:
    x, y, width, height = browser.evaluate(
        f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect();"
        " return [r.x, r.y, r.width, r.height]; })()"
    )
    assert width > 0, f"#{element_id} is not displayed"
    return x + width / 2, y + height / 2


def visible(browser: Chromium, element_id: str) -> bool:
    return bool(
        browser.evaluate(f"document.getElementById('{element_id}').getBoundingClientRect().width")
    )


def rgb(fill: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"rgb\((\d+),(\d+),(\d+)\)", fill)
    assert match, fill
    red, green, blue = (int(value) for value in match.groups())
    return red, green, blue


def near(pixel: tuple[int, int, int], color: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 2 for a, b in zip(pixel, color, strict=True))


def leaf_counts(samples: list[ProfileSample], prefix: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for sample in samples:
        leaf = sample.locations[0].frames[0].function if sample.locations[0].frames else ""
        if leaf.startswith(prefix):
            counts[leaf] += sample.count
    return counts


@pytest.fixture
def chromium_path() -> str:
    return require_tool("chromium")


@pytest.fixture
def host_svg(tmp_path: Path) -> Path:
    path = tmp_path / "host.svg"
    path.write_text(render_flamegraph(host_profile(), title="strobe: all processes"))
    return path


@pytest.fixture
def browser(chromium_path: str) -> Iterator[Chromium]:
    with Chromium(chromium_path, *WINDOW) as chromium:
        chromium.call("Runtime.enable")
        yield chromium


def test_screenshot_from_disk_shows_a_frame_per_process(
    chromium_path: str, host_svg: Path, tmp_path: Path
) -> None:
    """`chromium --screenshot` of the file: each frame's pixels have its fill."""
    png = tmp_path / "host.png"
    screenshot(chromium_path, host_svg.as_uri(), png, *WINDOW)
    data = png.read_bytes()
    assert png_size(data) == WINDOW
    drawn = {}
    for group in ET.fromstring(host_svg.read_text()).iter(f"{SVG_NS}g"):
        title, rect = group.find(f"{SVG_NS}title"), group.find(f"{SVG_NS}rect")
        if title is not None and rect is not None and "hide" not in group.attrib["class"]:
            drawn[(title.text or "").rsplit(" (", 1)[0]] = rect.attrib
    bottom = max(float(rect["y"]) for rect in drawn.values())
    pixels = png_rows(data, rows=int(bottom) + 16)
    merged = next(name for name in drawn if name.endswith(" small frames]"))
    names = ["all", "python3 (pid 4242)", "python3 (pid 4243)", "postgres", "kworker/u8:2"]
    for name in [*names, "[libblob.so]", "copy_user_generic", "dict_lookup", merged]:
        rect = drawn[name]
        # one pixel below the top edge, in the middle: above the label's glyphs
        x, y = float(rect["x"]) + float(rect["width"]) / 2, float(rect["y"]) + 1
        assert near(pixels[int(y)][int(x)], rgb(rect["fill"])), name
    top = min(float(rect["y"]) for rect in drawn.values())
    assert pixels[int(top) - 4][WINDOW[0] // 2 - 60] == (248, 248, 248)  # background above


def test_loads_offline_with_no_request_but_the_file_itself(
    browser: Chromium, host_svg: Path
) -> None:
    browser.call("Network.enable")
    browser.call(
        "Network.emulateNetworkConditions",
        offline=True,
        latency=0,
        downloadThroughput=-1,
        uploadThroughput=-1,
    )
    browser.call("Log.enable")
    browser.navigate(host_svg.as_uri())
    assert visible(browser, "search")  # the script ran: it shows the button
    found = frames(browser)
    assert only(found, "postgres").shown and only(found, "all").label == "all"
    requests = [
        event["params"]["request"]["url"]
        for event in browser.events
        if event["method"] == "Network.requestWillBeSent"
    ]
    assert requests == [host_svg.as_uri()]
    problems = [
        event
        for event in browser.events
        if event["method"] == "Runtime.exceptionThrown"
        or (event["method"] == "Log.entryAdded" and event["params"]["entry"]["level"] == "error")
    ]
    assert problems == []


@pytest.mark.parametrize("seed", [1, 2])
def test_the_script_lays_out_what_the_file_has(
    browser: Chromium, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On load the script lays the graph out itself (as it does on every zoom): the same
    boxes, positions and hidden frames as agent/render/tree.py wrote, at any minimum
    (the last: a frame budget raises it to some width that is no round number)."""
    for min_width, max_frames in ((MIN_WIDTH_PX, None), (7.5, None), (40.0, None), (2.0, 120)):
        label = f"seed {seed}, min width {min_width}, at most {max_frames} frames"
        if max_frames is not None:
            monkeypatch.setattr(agent.render.flamegraph, "MAX_FRAMES", max_frames)
        svg = tmp_path / f"{min_width}-{max_frames}.svg"
        svg.write_text(render_flamegraph(fragmented_profile(seed), min_width=min_width))
        written = []
        groups = ET.fromstring(svg.read_text()).find(f"{SVG_NS}g[@id='frames']")
        assert groups is not None
        for group in groups:
            title, rect = group.find(f"{SVG_NS}title"), group.find(f"{SVG_NS}rect")
            assert title is not None and rect is not None
            shown = "hide" not in group.attrib["class"]
            written.append((title.text, float(rect.attrib["x"]), rect.attrib["width"], shown))
        browser.navigate(svg.as_uri())
        laid_out = frames(browser)
        assert len(laid_out) == len(written), label
        for (title, x, width, shown), frame in zip(written, laid_out, strict=True):
            assert (frame.title, frame.shown) == (title, shown), label
            if shown:
                assert frame.x == pytest.approx(x, abs=0.011), title
                assert frame.width == pytest.approx(float(width), abs=0.011), title
        # over budget, nothing narrower than the raised minimum is kept, so none is hidden
        hidden = sum(not frame.shown for frame in laid_out)
        assert hidden > 0 if max_frames is None else hidden == 0, label
        assert any("elided" in frame.classes for frame in laid_out), "nothing merged"


def test_a_click_zooms_into_a_process_and_reset_zoom_restores(
    browser: Chromium, host_svg: Path
) -> None:
    browser.navigate(host_svg.as_uri())
    before = frames(browser)
    target = only(before, "python3 (pid 4243)")
    assert target.width < WIDTH / 2 and not visible(browser, "unzoom")

    browser.click(*target.center)
    after = frames(browser)
    zoomed = only(after, "python3 (pid 4243)")
    assert (zoomed.x, zoomed.width) == (MARGIN, WIDTH)
    # its callees widen by the same factor: ctypes_call has 1,200 of the process's 2,700
    for name in ("ctypes_call", "[libblob.so]"):
        frame = only(after, name)
        assert frame.shown and frame.width == pytest.approx(WIDTH * 1200 / 2700, abs=0.011)
        assert frame.label == name  # wide enough now for the whole name
    assert only(after, "dict_lookup").x == pytest.approx(MARGIN + WIDTH * 1200 / 2700, abs=0.02)
    # other processes are gone; the caller spans the width, faded
    assert not any(only(after, name).shown for name in ("postgres", "python3 (pid 4242)"))
    root = only(after, "all")
    assert root.width == WIDTH and "parent" in root.classes and root.shown
    assert visible(browser, "unzoom")
    assert browser.evaluate("document.getElementById('details').textContent") == zoomed.title

    browser.click(*element_center(browser, "unzoom"))
    restored = frames(browser)
    assert [(f.x, f.width, f.shown, f.classes) for f in restored] == [
        (f.x, f.width, f.shown, f.classes) for f in before
    ]
    assert not visible(browser, "unzoom")


def test_escape_undoes_a_zoom(browser: Chromium, host_svg: Path) -> None:
    browser.navigate(host_svg.as_uri())
    before = frames(browser)
    browser.click(*only(before, "postgres").center)
    assert only(frames(browser), "postgres").width == WIDTH
    browser.press("Escape", 27)
    assert [(f.x, f.width, f.shown) for f in frames(browser)] == [
        (f.x, f.width, f.shown) for f in before
    ]


def test_a_click_on_the_merged_box_spreads_its_frames(browser: Chromium, host_svg: Path) -> None:
    """300 rarely seen functions are one grey box; a click lays them out over the width,
    each as wide as its samples, and merges again only what is still too narrow."""
    rare = leaf_counts(host_profile(), "rare_function_")
    browser.navigate(host_svg.as_uri())
    before = frames(browser)
    merged = only(before, "[300 small frames]")
    assert merged.shown and not any(only(before, name).shown for name in rare)
    assert merged.title.startswith(f"[300 small frames] ({sum(rare.values()):,} samples, ")

    browser.click(*merged.center)
    after = frames(browser)
    unit = WIDTH / sum(rare.values())
    wide = {name for name, count in rare.items() if count * unit >= MIN_WIDTH_PX}
    assert 0 < len(wide) < len(rare)  # some open up, some stay merged: both paths run
    for name, count in rare.items():
        frame = only(after, name)
        assert frame.shown == (name in wide), name
        if frame.shown:
            assert frame.width == pytest.approx(count * unit, abs=0.011), name
    rest = f"[{len(rare) - len(wide)} small frames]"
    assert only(after, rest).width == pytest.approx(
        sum(count for name, count in rare.items() if name not in wide) * unit, abs=0.02
    )
    assert only(after, "PostgresMain").width == WIDTH  # the caller, faded
    assert not only(after, "ExecScan").shown


def test_search_paints_matches_and_counts_each_sample_once(
    browser: Chromium, host_svg: Path
) -> None:
    samples = host_profile()
    total = sum(sample.count for sample in samples)
    rare = leaf_counts(samples, "rare_function_")
    browser.call("Page.enable")
    browser.navigate(host_svg.as_uri())

    # `main` of every program but the kernel thread; the rest nest inside a `main`
    message = browser.click_and_answer(
        *element_center(browser, "search"), "^(main|Py_RunMain|dict_lookup)$"
    )
    assert "regular expression" in message
    matched = total - 400
    share = f"Matched: {100 * matched / total:.1f}% ({matched:,} of {total:,} samples)"
    assert browser.evaluate("document.getElementById('matched').textContent") == share
    found = frames(browser)
    dict_lookup = only(found, "dict_lookup")
    assert rgb(dict_lookup.fill) == MATCH_FILL
    assert near(browser.pixel(dict_lookup.center[0], dict_lookup.screen[1] + 1), MATCH_FILL)
    assert rgb(only(found, "ExecScan").fill) != MATCH_FILL

    browser.click(*element_center(browser, "search"))  # now "Reset Search"
    assert browser.evaluate("document.getElementById('matched').textContent") == ""
    assert rgb(only(frames(browser), "dict_lookup").fill) != MATCH_FILL

    # frames hidden for being narrow are searched too
    browser.click_and_answer(*element_center(browser, "search"), "^rare_function_00")
    matched = sum(count for name, count in rare.items() if name.startswith("rare_function_00"))
    share = f"Matched: {100 * matched / total:.1f}% ({matched:,} of {total:,} samples)"
    assert browser.evaluate("document.getElementById('matched').textContent") == share


def tall_profile() -> list[ProfileSample]:
    """Three programs, one 90 calls deep: a graph far taller than the window; one sample
    of another goes 120 deep, too narrow to show until its process is zoomed into."""
    exe = Mapping(0x400000, 0x500000, 0, "/usr/bin/app")

    def stack(*names: str) -> tuple[Location, ...]:
        return tuple(Location(0x401000, exe, frames=(Frame(name),)) for name in names)

    deep = stack(*(f"recurse_{i}" for i in reversed(range(90))), "main")
    deeper = stack(*(f"nested_{i}" for i in reversed(range(120))), "main")
    return [
        ProfileSample(deep, 500, (("comm", "deep"), ("pid", "1")), 1),
        ProfileSample(stack("work", "main"), 300, (("comm", "shallow"), ("pid", "2")), 2),
        ProfileSample(deeper, 1, (("comm", "shallow"), ("pid", "2")), 2),
        ProfileSample(stack("io", "main"), 200, (("comm", "other"), ("pid", "3")), 3),
    ]


def test_a_tall_graph_opens_at_its_bottom_with_the_controls_in_sight(
    browser: Chromium, tmp_path: Path
) -> None:
    """At first sight: `all`, every process and the title bar, on top of the frames."""
    svg = tmp_path / "tall.svg"
    svg.write_text(render_flamegraph(tall_profile(), title="tall"))
    browser.navigate(svg.as_uri())
    height = browser.evaluate("innerHeight")
    assert browser.evaluate("document.documentElement.scrollHeight") > 2 * height
    found = frames(browser)
    for name in ("all", "deep", "shallow", "other"):
        top, bottom = only(found, name).screen[1], sum(only(found, name).screen[1::2])
        assert top >= 0 and bottom <= height, name
    root = only(found, "all")
    assert near(browser.pixel(root.center[0], root.screen[1] + 1), rgb(root.fill))
    assert 0 <= element_center(browser, "search")[1] <= 34
    # the title bar is drawn over the frames scrolled under it
    tower = [frame for frame in found if frame.name.startswith("recurse_")]
    covered = next(frame for frame in tower if 0 <= frame.screen[1] + 1 < 30)
    assert near(browser.pixel(covered.center[0], covered.screen[1] + 1), (248, 248, 248))
    assert not near(rgb(covered.fill), (248, 248, 248))

    # a zoom that grows the picture upwards keeps the clicked frame under the mouse
    shallow = only(found, "shallow")
    assert not only(found, "nested_119").shown
    browser.click(*shallow.center)
    found = frames(browser)
    assert only(found, "nested_119").shown
    assert only(found, "shallow").screen[1] == shallow.screen[1]
    assert 0 <= element_center(browser, "unzoom")[1] <= 34  # Reset Zoom in the pinned bar


def deep_and_shallow() -> list[ProfileSample]:
    """A busy shallow program, and a small one whose single deep stack is too narrow."""
    exe = Mapping(0x400000, 0x500000, 0, "/usr/bin/app")

    def stack(*names: str) -> tuple[Location, ...]:
        return tuple(Location(0x401000, exe, frames=(Frame(name),)) for name in names)

    labels = (("comm", "busy"), ("pid", "1"))
    deep = stack(*(f"level_{i}" for i in reversed(range(40))), "tiny_main")
    return [
        ProfileSample(stack("work", "busy_main"), 10_000, labels, 1),
        ProfileSample(stack("shallow", "tiny_main"), 19, (("comm", "tiny"), ("pid", "2")), 2),
        ProfileSample(deep, 1, (("comm", "tiny"), ("pid", "2")), 2),
    ]


def test_zoom_grows_the_picture_for_frames_that_were_hidden_above_it(
    browser: Chromium, tmp_path: Path
) -> None:
    svg = tmp_path / "deep.svg"
    svg.write_text(render_flamegraph(deep_and_shallow()))
    browser.navigate(svg.as_uri())
    view_box = browser.evaluate("document.documentElement.getAttribute('viewBox')")
    assert not only(frames(browser), "level_39").shown

    browser.click(*only(frames(browser), "tiny").center)
    found = frames(browser)
    top = only(found, "level_39")
    assert top.shown and top.width == pytest.approx(WIDTH / 20, abs=0.011)
    grown: Any = browser.evaluate("document.documentElement.getAttribute('viewBox')")
    _, y, _, height = (float(v) for v in grown.split())
    assert y < 0 and height > float(view_box.split()[3])
    # the whole tower is inside the page, below the title line
    title_bottom = browser.evaluate(
        "document.getElementById('search').getBoundingClientRect().bottom"
    )
    assert top.screen[1] > title_bottom

    browser.click(*element_center(browser, "unzoom"))
    assert browser.evaluate("document.documentElement.getAttribute('viewBox')") == view_box
