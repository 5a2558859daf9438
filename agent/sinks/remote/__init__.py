"""Remote-store sinks: Parca (ProfileStoreService/WriteRaw) and OTLP profiles over gRPC.

    sink = RemoteSink(RemoteStoreConfig(address="parca:7070", protocol="parca"))
    sink.write(profile)   # never blocks; queued, spooled or dropped (counted)
    sink.close()          # delivers within close_timeout_seconds, spools the rest

Modules: config (RemoteStoreConfig), parca / otlp (SeriesProfile -> request bytes),
channel (TLS, token, transport), retry (codes and backoff), spool (disk), queue
(RemoteSink: ordering and delivery guarantees).
"""

from agent.sinks.remote.config import RemoteStoreConfig
from agent.sinks.remote.queue import RemoteSink

__all__ = ["RemoteSink", "RemoteStoreConfig"]
