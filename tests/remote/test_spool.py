"""The disk spool: overflow of a small queue survives a restart and is delivered in order."""

from __future__ import annotations

import pytest

from agent.sinks.remote import otlp, parca
from agent.sinks.remote.spool import SUFFIX
from tests.remote.backend import make_profile

DROPPED = "strobe_remote_profiles_dropped_total"


def request_size(protocol: str) -> int:
    if protocol == "parca":
        return len(parca.encode(make_profile(1), "", False))
    return len(otlp.encode(make_profile(1), ""))


def spool_files(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("protocol", ["parca", "otlp"])
def test_spooled_profiles_survive_a_restart_in_order(backends, sinks, tmp_path, delta, protocol):
    backend = backends(protocol)
    backend.stop()
    spool = tmp_path / "spool"
    bound = request_size(protocol) * 3 // 2  # memory holds one request, the rest spills
    first = sinks(
        address=backend.address, protocol=protocol, queue_max_bytes=bound, spool_dir=str(spool)
    )
    for ident in range(1, 11):
        first.write(make_profile(ident))
        assert first.memory_bytes <= bound
    first.close(timeout=0.1)  # backend still down: what memory held goes to the spool
    assert len(spool_files(spool)) == 10
    assert all(name.endswith(f".{protocol}{SUFFIX}") for name in spool_files(spool))

    second = sinks(address=backend.address, protocol=protocol, spool_dir=str(spool))
    assert second.pending == 10
    backend.start()
    second.write(make_profile(11))
    second.write(make_profile(12))
    assert second.flush(60)
    assert backend.ids() == list(range(1, 13))
    assert spool_files(spool) == []
    assert delta(DROPPED, reason="spool_full") == 0
    assert delta(DROPPED, reason="shutdown") == 0


def test_spool_bound_drops_the_oldest(backends, sinks, tmp_path, delta):
    backend = backends("parca")
    backend.stop()
    spool = tmp_path / "spool"
    file_size = request_size("parca") + 12  # header: magic + crc32
    limit = 3 * file_size + file_size // 2
    sink = sinks(
        address=backend.address, queue_max_bytes=1, spool_dir=str(spool), spool_max_bytes=limit
    )
    for ident in range(1, 7):
        sink.write(make_profile(ident))
        assert sum(path.stat().st_size for path in spool.iterdir()) <= limit
    assert delta(DROPPED, reason="spool_full") == 3
    backend.start()
    assert sink.flush(60)
    ids = backend.ids()
    assert len(ids) == 3 and ids == sorted(ids) and ids[-2:] == [5, 6]


def test_corrupt_and_foreign_spool_files_are_dropped_and_counted(backends, sinks, tmp_path, delta):
    backend = backends("parca")
    backend.stop()
    spool = tmp_path / "spool"
    first = sinks(address=backend.address, queue_max_bytes=1, spool_dir=str(spool))
    for ident in (1, 2, 3):
        first.write(make_profile(ident))
    first.close(timeout=0.1)
    second_file = spool / spool_files(spool)[1]
    data = bytearray(second_file.read_bytes())
    data[-1] ^= 0xFF
    second_file.write_bytes(bytes(data))
    (spool / f"{99:016d}.otlp{SUFFIX}").write_bytes(b"from another protocol")
    (spool / ".0000000000000100.parca.req.tmp").write_bytes(b"half written")

    backend.start()
    second = sinks(address=backend.address, spool_dir=str(spool))
    assert second.flush(60)
    assert backend.ids() == [1, 3]
    assert delta(DROPPED, reason="spool_corrupt") == 1
    assert delta(DROPPED, reason="spool_discarded") == 1
    assert spool_files(spool) == []
