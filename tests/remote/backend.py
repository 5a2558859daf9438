"""Real gRPC backends for the remote-sink tests, written from the published definitions.

Backend runs a grpcio server on 127.0.0.1 with a servicer built on the generated stubs
(Parca: agent/sinks/proto; OTLP: opentelemetry-proto) that records every request it
accepts. It can fail the next calls with chosen codes, demand a bearer token, use TLS,
and stop and start again on the same port.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2 as otlp_pb2,
)
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2_grpc as otlp_grpc,
)

from agent.model import Frame, Location, Mapping, ProfileSample, SeriesProfile
from agent.sinks.proto import profilestore_pb2 as parca_pb2
from agent.sinks.proto import profilestore_pb2_grpc as parca_grpc


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll `condition` until true; False after `timeout` (generous: never a timing assert)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Recorder:
    """What a servicer received; `failures` are codes to answer the next calls with."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.failures: list[grpc.StatusCode] = []
        self.metadata: list[dict[str, str]] = []
        self.cond = threading.Condition()
        self.gate = threading.Event()  # cleared: calls hang until it is set again
        self.gate.set()
        self.arrivals = 0  # calls that reached the servicer, hanging ones included

    def handle(self, request: Any, context: grpc.ServicerContext) -> None:
        with self.cond:
            self.arrivals += 1
        self.gate.wait()
        with self.cond:
            self.metadata.append(dict(context.invocation_metadata()))
            if self.failures:
                code = self.failures.pop(0)
                context.abort(code, f"test backend says {code.name}")
            self.requests.append(request)
            self.cond.notify_all()

    def wait_for(self, count: int, timeout: float = 60.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.requests) >= count, timeout)


class ParcaServicer(parca_grpc.ProfileStoreServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def WriteRaw(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.recorder.handle(request, context)
        return parca_pb2.WriteRawResponse()


class OtlpServicer(otlp_grpc.ProfilesServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.recorder.handle(request, context)
        return otlp_pb2.ExportProfilesServiceResponse()


class BearerInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <expected()>` (UNAUTHENTICATED)."""

    def __init__(self, expected: Callable[[], str]) -> None:
        self.expected = expected
        self.rejected = 0

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        metadata = dict(handler_call_details.invocation_metadata)
        if metadata.get("authorization") == f"Bearer {self.expected()}":
            return continuation(handler_call_details)
        self.rejected += 1

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(deny)


class Backend:
    """A restartable gRPC server for one protocol, recording what it accepts."""

    def __init__(
        self,
        protocol: str,
        tls: grpc.ServerCredentials | None = None,
        token: Callable[[], str] | None = None,
    ) -> None:
        self.protocol = protocol
        self.tls = tls
        self.interceptor = BearerInterceptor(token) if token else None
        self.recorder = Recorder()
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Backend:
        interceptors = [self.interceptor] if self.interceptor else []
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        if self.protocol == "parca":
            parca_grpc.add_ProfileStoreServiceServicer_to_server(
                ParcaServicer(self.recorder), server
            )
        else:
            otlp_grpc.add_ProfilesServiceServicer_to_server(OtlpServicer(self.recorder), server)
        where = f"127.0.0.1:{self.port}"
        if self.tls is None:
            port = server.add_insecure_port(where)
        else:
            port = server.add_secure_port(where, self.tls)
        assert port, f"cannot bind {where}"
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        self.recorder.gate.set()  # never leave a handler thread hanging
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def ids(self) -> list[int]:
        """The id (see make_profile) of every accepted profile, in arrival order."""
        with self.recorder.cond:
            requests = list(self.recorder.requests)
        if self.protocol == "parca":
            return [
                int(gzip.decompress(req.series[0].samples[0].raw_profile).split(b"-")[1])
                for req in requests
            ]
        return [
            req.resource_profiles[0].scope_profiles[0].profiles[0].time_unix_nano
            for req in requests
        ]


MAIN_MAPPING = Mapping(start=0x400000, end=0x401000, offset=0, path="/usr/bin/app")
LIB_MAPPING = Mapping(start=0x7F0000000000, end=0x7F0000010000, offset=0x1000, path="/lib/libc.so")


def sample_locations() -> tuple[Location, ...]:
    """A stack, innermost first: a kernel frame, an inlined pair, a libc call, a Python
    frame, main."""
    return (
        Location(
            address=0xFFFFFFFF81000010, mapping=None, frames=(Frame("do_syscall"),), kernel=True
        ),
        Location(
            address=0x400123,
            mapping=MAIN_MAPPING,
            build_id="ab" * 20,
            frames=(Frame("inlined_leaf", "app.c", 12, 10), Frame("outer_caller", "app.c", 30, 25)),
        ),
        Location(
            address=0x7F0000000456,
            mapping=LIB_MAPPING,
            build_id="cd" * 20,
            frames=(Frame("libc_write"),),
        ),
        Location(
            address=0,
            mapping=None,
            frames=(Frame("Worker.run", "worker.py", 12, 10),),
            frame_type="cpython",
        ),  # a Python frame (agent/python)
        Location(
            address=0x400200,
            mapping=MAIN_MAPPING,
            build_id="ab" * 20,
            frames=(Frame("main", "app.c", 50, 45),),
        ),
        Location(address=0x400300, mapping=MAIN_MAPPING, build_id="ab" * 20),  # unsymbolized
    )


def make_profile(
    ident: int, labels: tuple[tuple[str, str], ...] = (), padding: int = 0
) -> SeriesProfile:
    """A SeriesProfile recognisable on the server by `ident` (pprof bytes, start time)."""
    stack = sample_locations()
    samples = (
        ProfileSample(locations=stack, count=7, labels=(("comm", "app"),), pid=4242),
        ProfileSample(locations=stack[1:], count=3, labels=(("comm", "worker"),), pid=4243),
    )
    pprof = gzip.compress(f"profile-{ident:06d}-".encode() + b"x" * padding, mtime=0)
    return SeriesProfile(
        labels=labels or (("namespace", "shop"), ("pod", "web-1")),
        start_ns=ident,
        duration_ns=10_000_000_000,
        period_ns=52_631_578,
        samples=samples,
        pprof=pprof,
    )
