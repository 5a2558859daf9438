"""Cardinality guard: at most `max_series` distinct series per window.

Relabeling decides which labels a series has; the guard decides how many series a
window may have, so a host running thousands of short-lived containers (or a relabel
rule keyed on something unbounded) cannot flood the backend. Once a window has seen
`max_series` distinct series, samples of any further series are folded into one
overflow series, `{node="<node>", strobe_overflow="true"}`, and counted in
strobe_series_overflow_samples_total. Series admitted earlier in the window keep their
own labels; a new window starts afresh.
"""

from __future__ import annotations

from agent import metrics

OVERFLOW_LABEL = "strobe_overflow"

Labels = tuple[tuple[str, str], ...]


def overflow_series(labels: Labels) -> Labels:
    """The series excess samples fold into: the node label (if any) plus the overflow marker."""
    node = [(name, value) for name, value in labels if name == "node"]
    return tuple(sorted([*node, (OVERFLOW_LABEL, "true")]))


class CardinalityGuard:
    """Admits series for the current window up to a cap. Not thread-safe: one per pipeline."""

    def __init__(self, max_series: int) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, got {max_series}")
        self.max_series = max_series
        self._admitted: set[Labels] = set()
        self.overflow_samples = 0  # in the current window

    def start_window(self) -> None:
        """Forget the admitted series: call once per profiling window."""
        self._admitted.clear()
        self.overflow_samples = 0

    def admit(self, labels: Labels, samples: int = 1) -> Labels:
        """`labels` if the series fits in this window, else the overflow series."""
        if labels in self._admitted:
            return labels
        if len(self._admitted) < self.max_series:
            self._admitted.add(labels)
            return labels
        self.overflow_samples += samples
        metrics.SERIES_OVERFLOW.inc(samples)
        return overflow_series(labels)

    @property
    def series(self) -> int:
        """Distinct series admitted in this window (the overflow series not included)."""
        return len(self._admitted)
