"""The on-disk SymCache store: indexes survive a restart, each build id is built once,
the store stays under its byte bound (least recently used out)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.model import ProcessInfo
from agent.symbolize.symbol_store import SymbolStore, entry_name
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.symbolize.helpers import loader_mappings, runtime_address, symbol_vaddr

BASE = 0x7F5600000000


def loaded(binary: Path) -> ProcessInfo:
    return ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, BASE))


def named_line(symbolizer: Symbolizer, process: ProcessInfo, binary: Path) -> tuple[str, int]:
    address = runtime_address(binary, symbol_vaddr(binary, "inner_spin") + 8, process.mappings)
    (location,) = symbolizer.symbolize(process, (address,), ())
    return location.frames[0].function, location.frames[0].line


def test_index_survives_a_new_symbolizer(c_binaries: Path, tmp_path: Path) -> None:
    binary, process = c_binaries / "spin_pie", loaded(c_binaries / "spin_pie")
    first = Symbolizer(cache_dir=tmp_path)
    assert first.prepare(process) == 1
    assert (first.stats.built, first.stats.loaded) == (1, 0)
    expected = named_line(first, process, binary)
    assert expected[0] == "inner_spin" and expected[1] > 0
    files = sorted(p.name for p in (tmp_path / "symbols").iterdir())
    assert any(name.endswith(".symcache") for name in files)

    second = Symbolizer(cache_dir=tmp_path)  # a restart: same cache directory
    assert second.prepare(process) == 1
    assert (second.stats.built, second.stats.loaded) == (0, 1)  # mapped, not re-indexed
    assert named_line(second, process, binary) == expected


def test_an_unusable_cache_entry_is_rebuilt(c_binaries: Path, tmp_path: Path) -> None:
    process = loaded(c_binaries / "spin_pie")
    first = Symbolizer(cache_dir=tmp_path)
    assert first.prepare(process) == 1
    (symcache,) = (tmp_path / "symbols").glob("*.symcache")
    symcache.write_bytes(b"not a symcache")
    second = Symbolizer(cache_dir=tmp_path)
    assert second.prepare(process) == 1
    assert (second.stats.built, second.stats.loaded) == (1, 0)
    assert named_line(second, process, c_binaries / "spin_pie")[1] > 0


def test_same_binary_is_indexed_once_at_a_time(c_binaries: Path, tmp_path: Path) -> None:
    process = loaded(c_binaries / "spin_pie")
    symbolizers = [Symbolizer(cache_dir=tmp_path) for _ in range(4)]  # four agents, one cache
    threads = [threading.Thread(target=s.prepare, args=(process,)) for s in symbolizers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sum(s.stats.built for s in symbolizers) == 1
    assert sum(s.stats.loaded for s in symbolizers) == 3


def fill(store: SymbolStore, key: str, size: int) -> None:
    temp = store.temp_path(key)
    temp.write_bytes(b"x" * size)
    store.commit(key, temp, 0)


def test_store_evicts_least_recently_used_by_bytes(tmp_path: Path) -> None:
    store = SymbolStore(tmp_path, max_bytes=10_000)
    for name in ("aa", "bb", "cc"):
        fill(store, f"build:{name}", 3000)
        time.sleep(0.01)  # distinct mtimes; the order, not the duration, matters
    old = time.time() - 100
    os.utime(store.path_of("build:aa"), (old, old))
    os.utime(store.path_of("build:aa", ".json"), (old, old))
    assert store.lookup("build:bb") is not None  # use refreshes bb
    fill(store, "build:dd", 3000)  # 12 KB > 10 KB: the least recently used goes
    assert store.lookup("build:aa") is None
    assert all(store.lookup(f"build:{n}") is not None for n in ("bb", "cc", "dd"))
    assert store.total_bytes() <= 10_000


def test_entry_larger_than_the_bound_is_not_kept(tmp_path: Path) -> None:
    store = SymbolStore(tmp_path, max_bytes=1000)
    fill(store, "build:ab", 5000)
    assert store.lookup("build:ab") is None
    assert store.total_bytes() <= 1000


def test_small_bound_through_the_symbolizer(c_binaries: Path, tmp_path: Path) -> None:
    symbolizer = Symbolizer(cache_dir=tmp_path, symbol_cache_max_bytes=1)
    process = loaded(c_binaries / "spin_pie")
    assert symbolizer.prepare(process) == 1  # the index works from its mapping...
    assert named_line(symbolizer, process, c_binaries / "spin_pie")[1] > 0
    assert not list((tmp_path / "symbols").glob("*.symcache"))  # ...but is not kept on disk


def test_files_without_build_id_get_a_digest_name(c_binaries: Path, tmp_path: Path) -> None:
    assert entry_name("build:0123abcd") == "0123abcd"
    name = entry_name("file:2049:1234:99:10")
    assert name.startswith("file-") and "/" not in name
    assert entry_name("build:../../etc") != "../../etc"
    binary = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "noid"))
    objcopy = require_tool("objcopy")
    subprocess.run([objcopy, "--remove-section", ".note.gnu.build-id", str(binary)], check=True)
    process = loaded(binary)
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache")
    assert symbolizer.prepare(process) == 1
    (symcache,) = (tmp_path / "cache" / "symbols").glob("*.symcache")
    assert symcache.name.startswith("file-")
    again = Symbolizer(cache_dir=tmp_path / "cache")
    assert again.prepare(process) == 1
    assert (again.stats.built, again.stats.loaded) == (0, 1)


@pytest.mark.parametrize("ttl", [3600.0, 0.0])
def test_failure_marker_is_honoured_until_it_expires(tmp_path: Path, ttl: float) -> None:
    store = SymbolStore(tmp_path, max_bytes=1 << 20, failure_ttl=ttl)
    store.mark_failed("build:ee", "index_timeout")
    assert store.failure("build:ee") == ("index_timeout" if ttl else None)
