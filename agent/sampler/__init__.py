"""Sampling stage: on-CPU stacks from a BPF perf_event program, drained per window.

Public interface: `Sampler` (start / poll_new_processes / drain / close) and the kernel
header lookup it relies on. bcc is imported only by `agent.sampler.loader`.
"""

from agent.sampler.kernel_headers import HeaderChoice, KernelHeadersError, find_kernel_headers
from agent.sampler.sampler import Sampler

__all__ = ["HeaderChoice", "KernelHeadersError", "Sampler", "find_kernel_headers"]
