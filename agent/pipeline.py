"""The real stages, composed: kernel sampler, process cache, symbolizer, labeler.

The one place that knows which concrete stage implements each step; `strobe run`,
`strobe record` and the pull endpoint all build their pipeline here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.config import Config
from agent.model import ProcessInfo, StackSample
from agent.process.cache import ProcessCache
from agent.sampler.sampler import Sampler
from agent.session import Labels, Stages
from agent.symbolize.kallsyms import Kallsyms
from agent.symbolize.symbolizer import Symbolizer

log = logging.getLogger(__name__)


def node_only_labels(node: str):  # type: ignore[no-untyped-def]
    def series_labels(_process: ProcessInfo | None, _sample: StackSample) -> Labels:
        return (("node", node),)

    return series_labels


@dataclass
class Pipeline:
    sampler: Sampler
    processes: ProcessCache
    symbolizer: Symbolizer
    stages: Stages
    period_ns: int

    def start(self) -> None:
        self.sampler.start()

    def capture_new_processes(self, timeout_ms: int) -> None:
        """Read /proc for processes the kernel just saw, before they can exit."""
        for pid in self.sampler.poll_new_pids(timeout_ms=timeout_ms):
            self.processes.capture(pid)

    def end_window(self) -> None:
        self.processes.end_window()

    def close(self) -> None:
        self.sampler.close()


def build_pipeline(config: Config, pid: int | None = None) -> Pipeline:
    processes = ProcessCache()
    symbolizer = Symbolizer(kallsyms=Kallsyms.load())
    stages = Stages(
        resolve_process=processes.get,
        symbolize=symbolizer.symbolize,
        series_labels=node_only_labels(config.resolved_node_name),
    )
    sampler = Sampler(frequency=config.frequency, pid=pid)
    return Pipeline(sampler, processes, symbolizer, stages, period_ns=10**9 // config.frequency)
