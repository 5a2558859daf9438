"""Which failed sends are retried, and how long to wait before the next try.

Codes follow the OTLP exporter rules, which fit Parca too:
- retried without limit (the backend is away or busy; the queue and spool absorb it):
  UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, CANCELLED, OUT_OF_RANGE,
  DATA_LOSS;
- retried a few times, then dropped: INTERNAL and UNKNOWN. Proxies and transports report
  glitches with these, but a server that fails on one request every time would
  otherwise hold up every later profile (delivery is in order);
- dropped at once, logged and counted: everything else (INVALID_ARGUMENT,
  UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, UNIMPLEMENTED, FAILED_PRECONDITION, ...):
  sending the same bytes again cannot succeed.

Backoff is exponential with jitter: the n-th retry waits a random time in
[d/2, d], d = min(max, base * 2**n). RESOURCE_EXHAUSTED means the server is
overloaded, so its base is backoff_resource_exhausted_seconds (default 5 s instead of
1 s) and its ceiling at least that.
"""

from __future__ import annotations

import random

import grpc

from agent.sinks.remote.config import RemoteStoreConfig

Code = grpc.StatusCode
RETRIED = frozenset(
    {
        Code.UNAVAILABLE,
        Code.DEADLINE_EXCEEDED,
        Code.RESOURCE_EXHAUSTED,
        Code.ABORTED,
        Code.CANCELLED,
        Code.OUT_OF_RANGE,
        Code.DATA_LOSS,
    }
)
RETRIED_A_FEW = frozenset({Code.INTERNAL, Code.UNKNOWN})
FEW = 3


def should_retry(code: grpc.StatusCode, failures_so_far: int) -> bool:
    """After `failures_so_far` failures of one request (this one included), try again?"""
    if code in RETRIED:
        return True
    return code in RETRIED_A_FEW and failures_so_far <= FEW


def backoff_seconds(
    config: RemoteStoreConfig, retry: int, code: grpc.StatusCode, rng: random.Random
) -> float:
    """The wait before retry number `retry` (0 for the first)."""
    base = config.backoff_initial_seconds
    ceiling = config.backoff_max_seconds
    if code == Code.RESOURCE_EXHAUSTED:
        base = config.backoff_resource_exhausted_seconds
        ceiling = max(ceiling, base)
    delay = min(ceiling, base * 2 ** min(retry, 32))
    return rng.uniform(delay / 2, delay)
