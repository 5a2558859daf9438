"""Every self-metric Strobe exports, declared once. All names carry the `strobe_` prefix.

Stages import the metric objects they update from here; nothing else registers metrics,
so this module is the reference for what the agent exports (README "Metrics").
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

disable_created_metrics()  # no *_created series: a timestamp per counter nobody graphs
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, _resident_memory_bytes, fds


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, doc, labels, registry=REGISTRY)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, labels, registry=REGISTRY)


def package_version() -> str:
    try:
        return version("strobe")
    except PackageNotFoundError:
        return "0+unknown"


BUILD_INFO = _gauge(
    "strobe_build_info", "Always 1; the agent's version and Python.", ("version", "python")
)
BUILD_INFO.labels(version=package_version(), python=platform.python_version()).set(1)

# sampler
SAMPLES = _counter("strobe_samples", "Stack samples drained from the kernel.")
SAMPLES_LOST = _counter("strobe_samples_lost", "Samples lost in BPF, by reason.", ("reason",))
UNIQUE_STACKS = _gauge("strobe_window_unique_stacks", "Unique stacks in the last window.")
MAP_FILL = _gauge("strobe_bpf_map_fill_ratio", "Fill of a BPF map at the last drain.", ("map",))
PID_EVENTS_DROPPED = _counter(
    "strobe_pid_events_dropped",
    "New-process, exec and Python code events the ring buffer had no room for (their "
    "processes are read at the drain instead, if they still run).",
)
WINDOWS = _counter("strobe_windows", "Profiling windows processed.")
UNWIND_WALK_EVENTS = _counter(
    "strobe_unwind_walk_events",
    "Table unwinder in BPF: frames stepped (table_frames, frame_pointer_frames) and how "
    "walks ended (stack_end, stopped, truncated, no_route, no_table, ...).",
    ("event",),
)
OFF_CPU_EVENTS = _counter(
    "strobe_off_cpu_events",
    "Off-CPU recording (--off-cpu): voluntary context switches seen (switches), and what "
    "became of them: not_sampled, kernel_thread, short (under --off-cpu-min-block), "
    "counted, and lost (counts_full, stack_evicted).",
    ("outcome",),
)
UNWIND_TABLES_REFUSED = _gauge(
    "strobe_unwind_tables_refused",
    "Binaries whose unwind table did not fit the rows budget (their stacks end there "
    "unless they keep frame pointers).",
)
WINDOW_SECONDS = Histogram(
    "strobe_window_processing_seconds",
    "Time to turn one window of samples into profiles.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
# python
PYTHON_PROCESSES = _gauge(
    "strobe_python_processes", "Processes whose Python frames the BPF walker reads."
)
PYTHON_INTERPRETERS_SKIPPED = _counter(
    "strobe_python_interpreters_skipped",
    "CPython processes left with native frames only, by reason (unsupported_version, "
    "offsets_mismatch).",
    ("reason",),
)
PYTHON_CODE_OBJECTS = _counter(
    "strobe_python_code_objects_read",
    "Code objects read from Python processes, by result (ok, unreadable).",
    ("result",),
)
# process
PROCESSES_SEEN = _counter("strobe_processes_seen", "Processes captured (pid + start time).")
PROCESS_CACHE_SIZE = _gauge("strobe_process_cache_entries", "Processes in the process cache.")
PROCESS_READ_ERRORS = _counter(
    "strobe_process_read_errors", "Failures reading /proc for a process, by reason.", ("reason",)
)
# symbolize
FRAMES = _counter(
    "strobe_symbolize_frames", "Frames symbolized, by result (hit or miss).", ("kind", "result")
)
BINARY_ERRORS = _counter(
    "strobe_binary_errors", "Binaries that could not be read or indexed, by reason.", ("reason",)
)
SYMBOL_CACHE_BINARIES = _gauge("strobe_symbol_cache_binaries", "Binaries with a loaded index.")
DEBUGINFOD_REQUESTS = _counter(
    "strobe_debuginfod_requests", "debuginfod requests by result.", ("result",)
)
DEBUGINFOD_BYTES = _counter("strobe_debuginfod_bytes", "Bytes downloaded from debuginfod.")
DEBUGINFOD_CACHE_HITS = _counter("strobe_debuginfod_cache_hits", "debuginfod disk-cache hits.")
# labels
SERIES_OVERFLOW = _counter(
    "strobe_series_overflow_samples", "Samples folded into the overflow series by the cap."
)
KUBERNETES_UP = _gauge("strobe_kubernetes_api_up", "1 when the Kubernetes pod watch is healthy.")
KUBERNETES_PODS = _gauge("strobe_kubernetes_pods", "Pods of this node in the pod metadata cache.")
LABEL_CACHE_SIZE = _gauge("strobe_label_cache_entries", "Processes in the discovery-label cache.")
# sinks
PROFILES_WRITTEN = _counter("strobe_profiles_written", "Profiles written, by sink.", ("sink",))
PROFILE_BYTES = _counter("strobe_profile_bytes", "Bytes of profiles written, by sink.", ("sink",))
SINK_READY = _gauge(
    "strobe_sink_ready",
    "1 while the sink can take profiles, 0 while it refuses them (disk full, unwritable); "
    "/readyz is 503 while every sink refuses.",
    ("sink",),
)
SINK_ERRORS = _counter(
    "strobe_sink_errors", "Sink failures, by sink and reason.", ("sink", "reason")
)
REMOTE_SENT = _counter("strobe_remote_profiles_sent", "Profiles accepted by the remote store.")
REMOTE_FAILED = _counter(
    "strobe_remote_profiles_failed", "Send attempts that failed, by gRPC code.", ("code",)
)
REMOTE_DROPPED = _counter(
    "strobe_remote_profiles_dropped", "Profiles given up on, by reason.", ("reason",)
)
REMOTE_BYTES = _counter("strobe_remote_bytes", "Bytes sent to the remote store.")
REMOTE_LATENCY = Histogram(
    "strobe_remote_request_seconds",
    "Latency of remote-store requests.",
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
REMOTE_QUEUE_DEPTH = _gauge("strobe_remote_queue_profiles", "Profiles waiting to be sent.")
REMOTE_QUEUE_BYTES = _gauge("strobe_remote_queue_bytes", "Bytes waiting to be sent.")
REMOTE_LAST_SUCCESS = _gauge(
    "strobe_remote_last_success_timestamp_seconds", "Time of the last accepted send."
)
# admin HTTP
HTTP_REQUESTS = _counter(
    "strobe_http_requests", "Admin HTTP requests, by path and status.", ("path", "status")
)
HTTP_CONNECTIONS_REFUSED = _counter(
    "strobe_http_connections_refused",
    "Admin HTTP connections closed at accept: 64 were open already.",
)
PULL_REQUESTS = _counter(
    "strobe_pull_requests", "On-demand profile requests, by result.", ("result",)
)
