"""Kernel release strings decide compile-time features of the BPF program."""

from __future__ import annotations

from agent.sampler.loader import kernel_at_least


def test_release_strings_compare_by_major_and_minor() -> None:
    assert kernel_at_least("6.18.44-fc-v1300", (5, 18))
    assert kernel_at_least("5.18.0", (5, 18))
    assert not kernel_at_least("5.17.15-generic", (5, 18))
    assert not kernel_at_least("4.19.0-27-amd64", (5, 18))
    assert not kernel_at_least("garbage", (5, 18))  # unknown: the feature stays off
