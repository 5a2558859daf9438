from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

import agent.render.flamegraph
from agent.model import Frame, Location, Mapping, ProfileSample
from agent.render.flamegraph import MARGIN, MIN_WIDTH_PX, WIDTH, render_flamegraph

SVG = "{http://www.w3.org/2000/svg}"
LIBC = Mapping(start=0x7F0000000000, end=0x7F0000100000, offset=0, path="/usr/lib/libc.so.6")
BLOB = Mapping(start=0x7F1000000000, end=0x7F1000100000, offset=0, path="/opt/libblob.so")


def loc(*functions: str, address: int = 0x1000, kernel: bool = False) -> Location:
    return Location(
        address=address,
        mapping=None if kernel else LIBC,
        frames=tuple(Frame(function=f) for f in functions),
        kernel=kernel,
    )


def unnamed(mapping: Mapping | None, address: int = 0x7F0000001234) -> Location:
    return Location(address=address, mapping=mapping)


def sample(count: int, *locations: Location, pid: int = 1, comm: str = "app") -> ProfileSample:
    labels = (("comm", comm), ("pid", str(pid))) if comm else ()
    return ProfileSample(locations=locations, count=count, labels=labels, pid=pid)


@dataclass(frozen=True)
class Drawn:
    name: str
    count: int
    x: float
    y: float
    width: float
    shown: bool
    classes: str
    fill: str
    left_out: str  # the data-left-out attribute, "" without


def drawn(svg: str) -> list[Drawn]:
    """Every frame box in the file, shown or hidden, from its tooltip and rect."""
    root = ET.fromstring(svg)
    frames = root.find(f"{SVG}g[@id='frames']")
    assert frames is not None
    found = []
    for group in frames:
        title, rect = group.find(f"{SVG}title"), group.find(f"{SVG}rect")
        assert title is not None and rect is not None
        match = re.fullmatch(r"(.*) \(([\d,]+) samples, [\d.]+%\)", title.text or "", re.S)
        assert match, title.text
        classes = group.attrib["class"]
        found.append(
            Drawn(
                match.group(1),
                int(match.group(2).replace(",", "")),
                float(rect.attrib["x"]),
                float(rect.attrib["y"]),
                float(rect.attrib["width"]),
                "hide" not in classes.split(),
                classes,
                rect.attrib["fill"],
                group.attrib.get("data-left-out", ""),
            )
        )
    return found


def shown(svg: str) -> list[Drawn]:
    return [box for box in drawn(svg) if box.shown]


def by_name(svg: str) -> dict[str, Drawn]:
    return {box.name: box for box in shown(svg)}


SAMPLES = [
    sample(30, loc("compute"), loc("main")),
    sample(10, loc("parse"), loc("main")),
    sample(60, loc("idle")),
]


def test_root_spans_full_width_and_widths_are_proportional_to_samples() -> None:
    frames = by_name(render_flamegraph(SAMPLES))
    root = frames["all"]
    assert (root.count, root.x, root.width) == (100, pytest.approx(MARGIN), pytest.approx(WIDTH))
    for name, expected in {"app": 100, "main": 40, "compute": 30, "parse": 10, "idle": 60}.items():
        assert frames[name].count == expected
        assert frames[name].width == pytest.approx(WIDTH * expected / 100, abs=0.01)


def test_root_is_at_the_bottom_then_processes_and_callees_above_within_their_caller() -> None:
    frames = by_name(render_flamegraph(SAMPLES))
    root, app, main, compute = frames["all"], frames["app"], frames["main"], frames["compute"]
    assert root.y > app.y > main.y > compute.y
    assert root.y - app.y == app.y - main.y  # adjacent rows
    assert frames["idle"].y == main.y  # siblings share a row
    assert main.x <= compute.x and compute.x + compute.width <= main.x + main.width + 0.01
    parse = frames["parse"]
    assert compute.x + compute.width <= parse.x + 0.01 or parse.x + parse.width <= compute.x + 0.01


def test_each_process_is_a_frame_so_programs_do_not_merge() -> None:
    svg = render_flamegraph(
        [
            sample(6, loc("work"), loc("main"), pid=10, comm="nginx"),
            sample(4, loc("work"), loc("main"), pid=20, comm="redis"),
        ]
    )
    boxes = shown(svg)
    row_of = {box.name: box.y for box in boxes}
    processes = sorted((box.name, box.count) for box in boxes if box.y == row_of["nginx"])
    assert processes == [("nginx", 6), ("redis", 4)]
    assert sorted(box.count for box in boxes if box.name == "main") == [4, 6]


def test_processes_sharing_a_comm_are_told_apart_by_pid() -> None:
    svg = render_flamegraph(
        [
            sample(5, loc("a"), pid=101, comm="python3"),
            sample(3, loc("b"), pid=102, comm="python3"),
            sample(2, loc("c"), pid=7, comm="postgres"),
        ]
    )
    names = {box.name: box.count for box in shown(svg)}
    assert names["python3 (pid 101)"] == 5 and names["python3 (pid 102)"] == 3
    assert names["postgres"] == 2 and "python3" not in names


def test_a_process_is_one_frame_named_by_its_most_common_thread_name() -> None:
    svg = render_flamegraph(
        [
            sample(5, loc("a"), pid=9, comm="java"),
            sample(2, loc("gc"), pid=9, comm="GC Thread#0"),
            sample(1, loc("x"), pid=0, comm="ghost"),  # no pid: known by its comm
            sample(1, loc("y"), pid=0, comm=""),  # nothing known
            ProfileSample((loc("z"),), 1, (), pid=33),  # a pid without comm
        ]
    )
    names = {box.name: box.count for box in shown(svg)}
    assert names["java"] == 7 and "GC Thread#0" not in names
    assert names["ghost"] == 1 and names["[unknown]"] == 1 and names["pid 33"] == 1


def test_inline_frames_become_boxes_caller_below_callee() -> None:
    frames = by_name(render_flamegraph([sample(5, loc("inner", "outer"), loc("main"))]))
    assert frames["main"].y > frames["outer"].y > frames["inner"].y
    assert frames["inner"].count == frames["outer"].count == 5


def test_recursion_gives_one_box_per_level() -> None:
    svg = render_flamegraph([sample(4, loc("fib"), loc("fib"), loc("main"))])
    assert [box.name for box in shown(svg)] == ["all", "app", "main", "fib", "fib"]


def test_a_run_of_unnamed_frames_of_one_file_is_one_frame() -> None:
    tower = tuple(unnamed(BLOB, BLOB.start + 0x100 * i) for i in range(1, 25))
    svg = render_flamegraph([sample(3, *tower, loc("call_blob"), loc("main"))])
    assert [box.name for box in shown(svg)] == ["all", "app", "main", "call_blob", "[libblob.so]"]


def test_unnamed_runs_fold_per_file_and_across_addresses() -> None:
    svg = render_flamegraph(
        [
            # libc, then libblob, then (after a named frame) libc again: three frames
            sample(2, unnamed(LIBC), unnamed(BLOB, BLOB.start), loc("cb"), unnamed(LIBC)),
            # another address of the same libc code at the same place: the same frame
            sample(
                1,
                unnamed(LIBC, LIBC.start + 0x999),
                unnamed(BLOB, BLOB.start + 8),
                loc("cb"),
                unnamed(LIBC, LIBC.start + 0x10),
            ),  # fmt: skip
        ]
    )
    assert [(box.name, box.count) for box in shown(svg)] == [
        ("all", 3),
        ("app", 3),
        ("[libc.so.6]", 3),
        ("cb", 3),
        ("[libblob.so]", 3),
        ("[libc.so.6]", 3),
    ]


def test_unnamed_kernel_anonymous_and_special_frames_are_named_by_where_they_ran() -> None:
    kernel = Location(address=0xFFFFFFFF81000000, mapping=None, kernel=True)
    anon = unnamed(Mapping(0x10000, 0x20000, 0, ""), 0x10010)
    vdso = unnamed(Mapping(0x30000, 0x31000, 0, "[vdso]"), 0x30010)
    names = by_name(render_flamegraph([sample(1, kernel, vdso, anon, unnamed(None), loc("main"))]))
    assert {"[kernel]", "[vdso]", "[anon]", "[unknown]"} <= names.keys()


def test_names_are_xml_escaped() -> None:
    nasty = 'operator<<(std::ostream&, "x") > y'
    svg = render_flamegraph([sample(1, loc(nasty))], title='a <b> & "c"')
    assert nasty in by_name(svg)  # ET.fromstring fails on bad escaping
    root = ET.fromstring(svg)
    assert any(t.text == 'a <b> & "c"' for t in root.iter(f"{SVG}text"))


def test_characters_xml_cannot_carry_are_replaced() -> None:
    svg = render_flamegraph([sample(1, loc("bad\x00name\x1b\udc80"), comm="x\x01")])
    assert {"bad\ufffdname\ufffd\ufffd", "x\ufffd"} <= by_name(svg).keys()


def narrow_callees() -> list[ProfileSample]:
    """9,700 samples in `big` and 30 callees of 10 samples each: 1.2 px, too narrow."""
    tiny = [sample(10, loc(f"tiny_{i:02d}"), loc("main")) for i in range(30)]
    return [sample(9_700, loc("big"), loc("main")), *tiny]


def test_frames_narrower_than_the_minimum_are_merged_into_one_box_at_the_right() -> None:
    svg = render_flamegraph(narrow_callees())
    frames = by_name(svg)
    assert WIDTH * 10 / 10_000 < MIN_WIDTH_PX  # the premise
    merged = frames["[30 small frames]"]
    assert merged.count == 300 and merged.y == frames["big"].y
    assert merged.x == pytest.approx(frames["big"].x + frames["big"].width, abs=0.01)
    assert merged.width == pytest.approx(WIDTH * 300 / 10_000, abs=0.01)
    assert merged.fill == "rgb(215,215,215)" and "elided" in merged.classes
    assert not any(name.startswith("tiny_") for name in frames)


def test_narrow_frames_stay_in_the_file_hidden_under_their_merged_box() -> None:
    """Search finds them and a zoom shows them (tests/browser), so they are kept."""
    boxes = drawn(render_flamegraph(narrow_callees()))
    merged = next(box for box in boxes if box.name == "[30 small frames]")
    tiny = [box for box in boxes if box.name.startswith("tiny_")]
    assert len(tiny) == 30 and not any(box.shown for box in tiny)
    assert [box.name for box in tiny] == sorted(box.name for box in tiny)
    assert tiny[0].x == pytest.approx(merged.x, abs=0.01)
    assert tiny[-1].x + tiny[-1].width == pytest.approx(merged.x + merged.width, abs=0.01)
    assert boxes[-1] == merged  # pre-order: after its siblings' subtrees


def test_frames_too_narrow_for_the_file_are_left_out_and_counted_in_the_merged_box() -> None:
    crumbs = [sample(1, loc(f"crumb_{i}"), loc("main")) for i in range(2_000)]
    svg = render_flamegraph([sample(998_000, loc("big"), loc("main")), *crumbs])
    boxes = drawn(svg)
    assert not any(box.name.startswith("crumb_") for box in boxes)  # 0.0012 px each
    merged = next(box for box in boxes if box.name.endswith("small frames]"))
    assert (merged.name, merged.count, merged.shown) == ("[2000 small frames]", 2_000, True)
    main = next(box for box in boxes if box.name == "main")
    assert main.left_out == "2000 2000"  # (frames, samples): the script needs both


def test_a_sliver_without_company_is_just_left_out() -> None:
    frames = by_name(render_flamegraph([sample(10_000, loc("big")), sample(1, loc("lone"))]))
    assert "lone" not in frames and not any(name.endswith("small frames]") for name in frames)


def test_the_file_keeps_at_most_max_frames_the_widest_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samples = [sample(100 + i, loc(f"leaf_{i:03d}"), loc("main")) for i in range(200)]
    assert len(drawn(render_flamegraph(samples))) > 200
    monkeypatch.setattr(agent.render.flamegraph, "MAX_FRAMES", 50)
    boxes = drawn(render_flamegraph(samples))
    leaves = [box for box in boxes if box.name.startswith("leaf_")]
    assert len([box for box in boxes if "elided" not in box.classes]) <= 50
    assert min(box.count for box in leaves) > max(
        100 + i for i in range(200) if f"leaf_{i:03d}" not in {box.name for box in leaves}
    )
    main = next(box for box in boxes if box.name == "main")
    frames, samples_left = (int(n) for n in main.left_out.split())
    assert frames == 200 - len(leaves)
    assert samples_left + sum(box.count for box in leaves) == main.count


def test_the_height_follows_the_frames_shown_not_hidden_towers() -> None:
    deep = tuple(loc(f"level_{i}") for i in range(60))
    plain = render_flamegraph([sample(10_000, loc("work"), loc("main"))])
    with_tower = render_flamegraph(
        [sample(10_000, loc("work"), loc("main")), sample(1, *deep, loc("main"))]
    )
    assert not any(box.name.startswith("level_") for box in shown(with_tower))
    assert any(box.name.startswith("level_") for box in drawn(with_tower))
    assert ET.fromstring(plain).attrib["height"] == ET.fromstring(with_tower).attrib["height"]


def test_the_file_loads_nothing_from_anywhere() -> None:
    svg = render_flamegraph(SAMPLES)
    without_namespace = svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http" not in without_namespace.replace('"http://www.w3.org/2000/svg"', "")
    for reference in ("href", "src=", "url(", "@import", "<image", "<foreignObject"):
        assert reference not in svg
    root = ET.fromstring(svg)
    scripts = list(root.iter(f"{SVG}script"))
    assert len(scripts) == 1 and "prompt(" in (scripts[0].text or "")
    assert svg.count("]]>") == 1  # the script's CDATA ends once, at its end


def test_output_is_stable_and_colors_follow_names_and_kinds() -> None:
    shuffled = list(reversed(SAMPLES))
    assert render_flamegraph(SAMPLES) == render_flamegraph(shuffled)
    extra = [sample(3, loc("main"), loc("idle")), sample(2, unnamed(BLOB), loc("main"))]
    fills: dict[str, set[str]] = {}
    for box in shown(render_flamegraph([*SAMPLES, *extra])):
        fills.setdefault(box.name, set()).add(box.fill)
    assert len(fills["main"]) == 1  # `main` at two depths, one color
    assert len({next(iter(f)) for f in fills.values()}) > 1

    def channels(name: str) -> tuple[int, ...]:
        return tuple(int(v) for v in re.findall(r"\d+", next(iter(fills[name]))))

    red, green, blue = channels("app")
    assert blue > red and blue >= 220  # processes: blue, apart from code's hot colors
    red, green, blue = channels("main")
    assert red >= 205 and blue <= 55  # code: flamegraph.pl's hot palette
    assert min(channels("[libblob.so]")) >= 140  # unnamed code: pale tan


def test_no_samples_is_still_a_valid_svg() -> None:
    svg = render_flamegraph([], title="empty")
    assert drawn(svg) == []
    assert "no samples" in svg
