"""cycle_collection_paused: off inside, restored after, never turned on by a block that
found it off (nested or concurrent blocks), restored when the block raises."""

from __future__ import annotations

import gc

import pytest

from agent.model import StackSample, Window
from agent.util.gcpause import cycle_collection_paused
from agent.window_flow import Stages, window_profiles


def test_paused_inside_and_restored_after() -> None:
    assert gc.isenabled()
    with cycle_collection_paused():
        assert not gc.isenabled()
        with cycle_collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block found it off: leaves it off
    assert gc.isenabled()


def test_restored_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), cycle_collection_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_left_off_when_it_was_off() -> None:
    gc.disable()
    try:
        with cycle_collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_window_is_built_with_the_collector_paused() -> None:
    seen: list[bool] = []

    def symbolize(*_args: object) -> tuple[()]:
        seen.append(gc.isenabled())
        return ()

    stages = Stages(lambda *_: None, symbolize, lambda *_: ())
    window = Window(0, 1, (StackSample(1, 1, "a", (0x10,), (), 1),))
    assert window_profiles(window, stages, 1) == []
    assert seen == [False] and gc.isenabled()
