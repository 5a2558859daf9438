"""The cardinality guard folds series past the cap into one overflow series."""

from __future__ import annotations

import pytest

from agent.labels.guard import OVERFLOW_LABEL, CardinalityGuard
from agent.metrics import REGISTRY


def overflowed() -> float:
    return REGISTRY.get_sample_value("strobe_series_overflow_samples_total") or 0.0


def series(pod: str) -> tuple[tuple[str, str], ...]:
    return (("namespace", "shop"), ("node", "worker-1"), ("pod", pod))


def test_n_plus_one_series_with_cap_n_folds_the_excess() -> None:
    cap = 3
    guard = CardinalityGuard(cap)
    before = overflowed()
    admitted = [guard.admit(series(f"p{i}"), samples=10) for i in range(cap)]
    assert admitted == [series(f"p{i}") for i in range(cap)]
    folded = guard.admit(series("p-extra"), samples=7)
    assert folded == (("node", "worker-1"), (OVERFLOW_LABEL, "true"))
    assert overflowed() - before == 7
    assert guard.overflow_samples == 7 and guard.series == cap
    # Series admitted earlier keep their labels; the overflow does not take a slot.
    assert guard.admit(series("p0"), samples=5) == series("p0")
    assert guard.admit(series("p-extra-2")) == folded
    assert overflowed() - before == 8


def test_a_new_window_starts_afresh() -> None:
    guard = CardinalityGuard(1)
    guard.admit(series("a"))
    assert guard.admit(series("b")) != series("b")
    guard.start_window()
    assert guard.overflow_samples == 0
    assert guard.admit(series("b")) == series("b")


def test_overflow_series_without_node_and_bad_cap() -> None:
    guard = CardinalityGuard(1)
    guard.admit((("comm", "a"),))
    assert guard.admit((("comm", "b"),)) == ((OVERFLOW_LABEL, "true"),)
    with pytest.raises(ValueError, match="max_series"):
        CardinalityGuard(0)
