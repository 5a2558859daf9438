"""Remote-store sinks: Parca (ProfileStoreService/WriteRaw) and OTLP profiles over gRPC.

    sink = RemoteSink(RemoteStoreConfig(address="parca:7070", protocol="parca"))
    sink.write(profile)   # never blocks on the network; spooled (fsynced) first if a
                          # spool_dir is set, else queued in memory; drops are counted
    sink.close()          # delivers within close_timeout_seconds, spools the rest

Modules: config (RemoteStoreConfig), parca / otlp (SeriesProfile -> request bytes),
channel (TLS, token, transport), retry (codes and backoff), spool (disk), sink
(RemoteSink: its queue, the sender thread, ordering and delivery guarantees).

RemoteSink is imported on first use: grpc adds ~9 MiB of RSS to the agent's modules,
which an agent that only keeps a local store (the default) should not pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.sinks.remote.config import RemoteStoreConfig

if TYPE_CHECKING:
    from agent.sinks.remote.sink import RemoteSink

__all__ = ["RemoteSink", "RemoteStoreConfig"]


def __getattr__(name: str) -> object:
    if name == "RemoteSink":
        from agent.sinks.remote.sink import RemoteSink

        return RemoteSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
