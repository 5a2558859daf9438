"""Exporter: profiles per second the remote sink sustains, and bytes per profile.

The profile is a busy host's window: --stacks unique stacks (default 5,000) over 31
binaries and the kernel, built with agent.pprof.builder.build_pprof from agent.model
values (shared call-path prefixes, inlined frames, file/line info, pid/comm labels),
so its size and encode cost resemble a real one.

For each protocol (parca, otlp) an in-process gRPC server on 127.0.0.1 (port 0)
accepts the protocol's real method. It takes the request as raw bytes and only counts
them (decoding there would compete with the exporter for this process's GIL); the
first and last requests are decoded with the protocol's message type afterwards to
check they carry the whole profile. agent.sinks.remote.RemoteSink (plaintext, default
queue) then gets writes for --seconds, the writer keeping at most --in-flight profiles
pending (a steady producer, not a burst the queue would drop); the rate is the
profiles written divided by the time until the sink has delivered them all (flush). write() encodes
on the caller's thread, so encoding is inside the rate. Encode cost alone and the
request sizes are reported too. Needs no root.
"""

from __future__ import annotations

import gzip
import random
import statistics
import time
from concurrent import futures
from typing import Any

import grpc
from _harness import base_parser, emit

from agent.model import Frame, Location, Mapping, ProfileSample, SeriesProfile
from agent.pprof.builder import build_pprof
from agent.sinks.remote import RemoteSink, RemoteStoreConfig, otlp, parca

MiB = 1 << 20
WINDOW_NS = 10_000_000_000
PERIOD_NS = 1_000_000_000 // 19


# -- a busy host's profile -----------------------------------------------------------


class Host:
    """Binaries, functions and call sites to draw stacks from (seeded: reproducible)."""

    def __init__(self, rng: random.Random, binaries: int = 31, functions: int = 400) -> None:
        self.rng = rng
        self.mappings = [
            Mapping(
                start=0x400000 if b == 0 else 0x7F0000000000 + b * 0x1000000,
                end=(0x400000 if b == 0 else 0x7F0000000000 + b * 0x1000000) + 0x800000,
                offset=0,
                path="/usr/bin/server" if b == 0 else f"/usr/lib/x86_64-linux-gnu/lib{b:02d}.so",
                inode=1000 + b,
            )
            for b in range(binaries)
        ]
        self.build_ids = [f"{b:02x}" * 20 for b in range(binaries)]
        self.user = [self._user_site(b, f) for b in range(binaries) for f in range(functions)]
        self.kernel = [
            Location(
                address=0xFFFFFFFF81000000 + k * 0x400,
                mapping=None,
                frames=(Frame(f"kernel_function_{k}"),),
                kernel=True,
            )
            for k in range(500)
        ]

    def _user_site(self, binary: int, function: int) -> list[Location]:
        """A few call sites (locations) in one function, some with an inlined callee."""
        mapping, base = self.mappings[binary], self.mappings[binary].start + function * 0x2000
        name = f"module{binary}::function_{function}"
        source = f"src/module{binary}/file{function % 40}.cc"
        sites = []
        for site in range(4):
            line = 10 + function % 300 + site * 3
            frames: tuple[Frame, ...] = (Frame(name, source, line, line - 5 - site),)
            if self.rng.random() < 0.1:
                frames = (Frame(f"{name}_inlined", source, line + 100, line + 95), *frames)
            sites.append(
                Location(base + 0x10 + site * 0x40, mapping, self.build_ids[binary], frames)
            )
        return sites

    def stack(self, previous: tuple[Location, ...]) -> tuple[Location, ...]:
        """A stack sharing a random prefix (outermost frames) with the previous one."""
        outer = list(reversed(previous))[: self.rng.randint(len(previous) // 2, len(previous))]
        depth = self.rng.randint(max(len(outer) + 1, 10), max(len(outer) + 1, 40))
        while len(outer) < depth:
            # popularity falls off steeply with the index, as in real profiles
            function = int(len(self.user) * self.rng.random() ** 4)
            outer.append(self.rng.choice(self.user[function]))
        user = tuple(reversed(outer))
        if self.rng.random() < 0.3:
            return tuple(self.rng.sample(self.kernel, self.rng.randint(3, 12))) + user
        return user


def busy_profile(stacks: int, seed: int = 8) -> SeriesProfile:
    rng = random.Random(seed)
    host = Host(rng)
    samples: list[ProfileSample] = []
    seen: set[tuple[int, tuple[Location, ...]]] = set()
    stack: tuple[Location, ...] = ()
    while len(samples) < stacks:
        stack = host.stack(tuple(loc for loc in stack if not loc.kernel))
        pid = 1000 + rng.randrange(150)
        if (pid, stack) in seen:
            continue
        seen.add((pid, stack))
        labels = (("comm", f"worker-{pid % 40}"), ("pid", str(pid)))
        samples.append(ProfileSample(stack, rng.randint(1, 10), labels, pid))
    start_ns = time.time_ns()
    return SeriesProfile(
        labels=(("namespace", "shop"), ("node", "bench"), ("pod", "web-1")),
        start_ns=start_ns,
        duration_ns=WINDOW_NS,
        period_ns=PERIOD_NS,
        samples=tuple(samples),
        pprof=build_pprof(samples, start_ns, WINDOW_NS, PERIOD_NS),
    )


# -- a counting gRPC backend ---------------------------------------------------------


class CountingBackend:
    """A gRPC server for one method that keeps request sizes, first and last request."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.sizes: list[int] = []
        self.first = self.last = b""
        service, name = method.strip("/").split("/")
        handler = grpc.unary_unary_rpc_method_handler(self._handle)  # bytes in, bytes out
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2),
            options=[("grpc.max_receive_message_length", 64 * MiB)],
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {name: handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _handle(self, request: bytes, _context: grpc.ServicerContext) -> bytes:
        if not self.sizes:
            self.first = request
        self.last = request
        self.sizes.append(len(request))
        return b""  # an empty WriteRawResponse / ExportProfilesServiceResponse

    def stop(self) -> None:
        self.server.stop(grace=None).wait()


def check_request(protocol: str, request: bytes, profile: SeriesProfile) -> None:
    """The server got a decodable request carrying the whole profile."""
    if protocol == "parca":
        from agent.sinks.proto import profilestore_pb2

        parsed = profilestore_pb2.WriteRawRequest.FromString(request)
        assert parsed.series[0].samples[0].raw_profile == profile.pprof
        return
    from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2

    export = profiles_service_pb2.ExportProfilesServiceRequest.FromString(request)
    got = export.resource_profiles[0].scope_profiles[0].profiles[0].samples
    assert len(got) == len(profile.samples), (len(got), len(profile.samples))


# -- measurements --------------------------------------------------------------------


def encoder(protocol: str) -> Any:
    if protocol == "parca":
        return lambda p: parca.encode(p, "bench", False)
    return lambda p: otlp.encode(p, "bench")


def encode_cost(protocol: str, profile: SeriesProfile, repeat: int) -> dict[str, float]:
    encode = encoder(protocol)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        encode(profile)
        times.append(time.perf_counter() - started)
    return {"encode_ms_median": round(1000 * statistics.median(times), 2)}


def sustained_rate(
    protocol: str, profile: SeriesProfile, seconds: float, in_flight: int
) -> dict[str, Any]:
    method = parca.METHOD if protocol == "parca" else otlp.METHOD
    backend = CountingBackend(method)
    config = RemoteStoreConfig(
        address=f"127.0.0.1:{backend.port}", protocol=protocol, insecure=True, node="bench"
    )
    sink = RemoteSink(config)
    try:
        sink.write(profile)  # connect and warm up
        sink.flush(timeout=120)
        warm = len(backend.sizes)
        started, cpu_started = time.perf_counter(), time.process_time()
        count = 0
        while time.perf_counter() - started < seconds:
            while sink.pending >= in_flight:
                time.sleep(0.0005)
            sink.write(profile)
            count += 1
        delivered = sink.flush(timeout=600)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        sink.close(timeout=10)
        backend.stop()
    received = len(backend.sizes) - warm
    check_request(protocol, backend.first, profile)
    check_request(protocol, backend.last, profile)
    return {
        "profiles": count,
        "received": received,
        "all_delivered": delivered and received == count,
        "profiles_per_second": round(received / elapsed, 1),
        "cpu_ms_per_profile": round(1000 * cpu / max(received, 1), 2),
        "request_bytes": backend.sizes[-1],
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--stacks", type=int, default=5000, help="unique stacks per profile")
    parser.add_argument("--seconds", type=float, default=30.0, help="sending time per protocol")
    parser.add_argument("--in-flight", type=int, default=8, help="most pending profiles")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 10.0
    started = time.perf_counter()
    profile = busy_profile(args.stacks)
    build_started = time.perf_counter()
    build_pprof(profile.samples, profile.start_ns, WINDOW_NS, PERIOD_NS)
    build_ms = 1000 * (time.perf_counter() - build_started)
    sizes = {
        "pprof_gzip_bytes": len(profile.pprof),
        "pprof_raw_bytes": len(gzip.decompress(profile.pprof)),
        "parca_request_bytes": len(parca.encode(profile, "bench", False)),
        "otlp_request_bytes": len(otlp.encode(profile, "bench")),
        "otlp_request_gzip_bytes": len(gzip.compress(otlp.encode(profile, "bench"), 6)),
    }
    protocols = {}
    for protocol in ("parca", "otlp"):
        protocols[protocol] = encode_cost(protocol, profile, repeat=5) | sustained_rate(
            protocol, profile, args.seconds, args.in_flight
        )
        print(f"{protocol}: {protocols[protocol]}", flush=True)
    emit(
        "exporter",
        {
            "settings": vars(args),
            "profile": {
                "unique_stacks": len(profile.samples),
                "locations": len({loc for s in profile.samples for loc in s.locations}),
                "build_pprof_ms": round(build_ms, 1),
            }
            | sizes,
            "protocols": protocols,
            "elapsed_s": round(time.perf_counter() - started, 1),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
