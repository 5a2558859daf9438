from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import pytest

from agent.commands.top import CLEAR_SCREEN, TopRow, hottest_functions, render_table, run_top
from agent.model import Frame, Location, Mapping, ProfileSample

EXE = Mapping(start=0x400000, end=0x500000, offset=0, path="/usr/bin/app")


def loc(*functions: str, address: int = 0x401000) -> Location:
    return Location(address=address, mapping=EXE, frames=tuple(Frame(f) for f in functions))


def sample(count: int, *locations: Location, pid: int = 42, comm: str = "app") -> ProfileSample:
    return ProfileSample(locations, count, (("comm", comm), ("pid", str(pid))), pid)


def unnamed(offset: int) -> Location:
    return Location(address=EXE.start + offset, mapping=EXE)


def by_function(rows: list[TopRow]) -> dict[str, TopRow]:
    return {row.function: row for row in rows}


def test_self_is_the_leaf_and_cum_the_whole_stack() -> None:
    rows = hottest_functions(
        [
            sample(6, loc("compute"), loc("main")),
            sample(3, loc("parse"), loc("main")),
            sample(1, loc("main")),
        ],
        limit=10,
    )
    assert [row.function for row in rows] == ["compute", "parse", "main"]
    main = by_function(rows)["main"]
    assert (main.self_samples, main.cum_samples) == (1, 10)
    assert (main.self_percent, main.cum_percent) == (pytest.approx(10.0), pytest.approx(100.0))
    compute = by_function(rows)["compute"]
    assert (compute.self_samples, compute.cum_samples, compute.self_percent) == (6, 6, 60.0)


def test_recursion_counts_once_in_cum() -> None:
    rows = by_function(
        hottest_functions(
            [sample(4, loc("fib"), loc("fib"), loc("fib"), loc("main")), sample(4, loc("other"))],
            limit=10,
        )
    )
    assert rows["fib"].cum_samples == 4
    assert rows["fib"].cum_percent == pytest.approx(50.0)
    assert rows["fib"].self_samples == 4


def test_self_is_the_innermost_inline_frame() -> None:
    rows = by_function(hottest_functions([sample(2, loc("inlined", "caller"), loc("main"))], 10))
    assert rows["inlined"].self_samples == 2
    assert rows["caller"].self_samples == 0 and rows["caller"].cum_samples == 2


def test_unsymbolized_leaf_is_named_by_address_and_limit_applies() -> None:
    rows = hottest_functions([sample(5, unnamed(0x1234), loc("main")), sample(1, loc("x"))], 1)
    assert [row.function for row in rows] == ["0x401234 (app)"]
    assert hottest_functions([], limit=5) == []


def test_each_row_names_its_process_and_processes_do_not_merge() -> None:
    rows = hottest_functions(
        [
            sample(5, loc("work"), loc("main"), pid=10, comm="nginx"),
            sample(3, loc("work"), loc("main"), pid=20, comm="redis"),
            sample(1, loc("work"), pid=20, comm="redis-bio"),  # a thread of redis
        ],
        limit=10,
    )
    work = [
        (row.process, row.self_samples, row.self_percent) for row in rows if row.function == "work"
    ]
    assert work == [
        ("nginx/10", 5, pytest.approx(5 / 9 * 100)),
        ("redis/20", 4, pytest.approx(4 / 9 * 100)),
    ]
    assert {row.process for row in rows} == {"nginx/10", "redis/20"}


def test_one_sample_unnamed_rows_fold_into_their_mapping() -> None:
    rows = hottest_functions(
        [
            sample(1, unnamed(0x10), loc("main")),
            sample(1, unnamed(0x20), unnamed(0x30), loc("main")),  # two in one sample
            sample(1, unnamed(0x10), loc("other")),  # 0x10 seen twice: its own row
            sample(4, loc("hot"), unnamed(0x40)),  # one stack, four samples: its own row
        ],
        limit=20,
    )
    found = {row.function: (row.self_samples, row.cum_samples) for row in rows}
    assert found["[app]"] == (1, 1)  # 0x20 and 0x30: one sample, counted once
    assert found["0x400010 (app)"] == (2, 2)
    assert found["0x400040 (app)"] == (0, 4)
    assert not {"0x400020 (app)", "0x400030 (app)"} & found.keys()
    assert sum(row.self_samples for row in rows) == 7  # folding loses no sample


def test_render_table_cuts_lines_to_width() -> None:
    rows = [TopRow("a" * 200, 3, 5, 30.0, 50.0, "x/1"), TopRow("short", 1, 1, 10.0, 10.0, "y/2")]
    text = render_table(rows, width=60, header="strobe top - test")
    lines = text.splitlines()
    assert lines[0] == "strobe top - test"
    assert "FUNCTION" in lines[1]
    assert all(len(line) <= 60 for line in lines)
    assert " 30.00%" in lines[2] and lines[3].endswith("short")
    assert "no samples" in render_table([], 80, "h")


def test_render_table_has_a_process_column() -> None:
    rows = [TopRow("f", 3, 5, 30.0, 50.0, "python3/4242"), TopRow("g", 1, 1, 10.0, 10.0, "x" * 40)]
    lines = render_table(rows, width=200, header="h").splitlines()
    assert lines[1].split() == ["SELF%", "SELF", "CUM%", "CUM", "PROCESS", "FUNCTION"]
    function_column = lines[1].index("FUNCTION")
    assert lines[2].split()[-2:] == ["python3/4242", "f"]
    assert lines[2].index(" f") + 1 == lines[3].index(" g") + 1 == function_column
    assert "x" * 24 + "  g" in lines[3]  # a long name is cut to PROCESS_WIDTH


def test_run_top_refreshes_each_interval_without_ansi_when_not_a_tty() -> None:
    windows = [
        [sample(3, loc("first"), loc("main"))],
        [sample(7, loc("second"), loc("main"))],
        [sample(1, loc("never"))],
    ]
    asked: list[float] = []

    def capture(seconds: float) -> Sequence[ProfileSample]:
        asked.append(seconds)
        return windows[len(asked) - 1]

    out = io.StringIO()
    run_top(capture, interval=0.5, pid=42, out=out, iterations=2, stop=threading.Event())
    text = out.getvalue()
    assert asked == [0.5, 0.5]
    assert CLEAR_SCREEN not in text
    first, second = text.split("\n\n")
    assert "pid 42" in first and "3 samples" in first and "first" in first
    assert "app/42" in first
    assert "second" in second and "first" not in second and "never" not in text


def test_run_top_clears_the_screen_on_a_tty_and_stops_on_the_event() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stop = threading.Event()
    calls = 0

    def capture(_seconds: float) -> Sequence[ProfileSample]:
        nonlocal calls
        calls += 1
        if calls == 2:
            stop.set()  # like Ctrl-C during the second window
        return [sample(1, loc("main"))]

    out = Terminal()
    run_top(capture, interval=1.0, out=out, stop=stop)
    assert calls == 2
    assert out.getvalue().count(CLEAR_SCREEN) == 1
    assert "all processes" in out.getvalue()


def test_run_top_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        run_top(lambda _s: [], interval=0, out=io.StringIO(), iterations=1)
