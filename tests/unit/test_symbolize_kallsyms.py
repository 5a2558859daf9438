"""Kernel symbols: parsing kallsyms text, and lookups on the real /proc/kallsyms (root)."""

from __future__ import annotations

from pathlib import Path

from agent.model import Frame
from agent.symbolize.kallsyms import Kallsyms
from agent.symbolize.symbolizer import Symbolizer
from tests.symbolize.helpers import require_root

SAMPLE = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81001000 t do_one_initcall
ffffffff81001200 T schedule
ffffffff81001300 W weak_helper
ffffffff82000000 D some_data
ffffffff82000100 b some_bss
ffffffffc0201000 t nft_do_chain	[nf_tables]
ffffffffc0201400 T nft_register_set	[nf_tables]
"""


def test_lookup_finds_the_containing_function() -> None:
    table = Kallsyms.from_text(SAMPLE)
    assert table.lookup(0xFFFFFFFF81001000) == Frame("do_one_initcall")
    assert table.lookup(0xFFFFFFFF810011FF) == Frame("do_one_initcall")
    assert table.lookup(0xFFFFFFFF81001234) == Frame("schedule")
    assert table.lookup(0xFFFFFFFF81001300) == Frame("weak_helper")


def test_data_symbols_are_not_functions() -> None:
    table = Kallsyms.from_text(SAMPLE)
    # some_data/some_bss are ignored: the nearest code symbol below is weak_helper.
    assert table.lookup(0xFFFFFFFF82000104) == Frame("weak_helper")
    assert len(table) == 7


def test_module_symbols_carry_the_module() -> None:
    table = Kallsyms.from_text(SAMPLE)
    assert table.lookup(0xFFFFFFFFC0201010) == Frame("nft_do_chain", file="[nf_tables]")
    assert table.lookup(0xFFFFFFFFC0201500) == Frame("nft_register_set", file="[nf_tables]")


def test_below_the_first_symbol_and_zero_are_unknown() -> None:
    table = Kallsyms.from_text(SAMPLE)
    assert table.lookup(0xFFFFFFFF80FFFFFF) is None
    assert table.lookup(0) is None


def test_hidden_addresses_give_an_empty_table() -> None:
    # With kptr_restrict, unprivileged readers see every address as zero.
    hidden = "0000000000000000 T _stext\n0000000000000000 T schedule\n"
    table = Kallsyms.from_text(hidden)
    assert len(table) == 0 and table.lookup(0xFFFFFFFF81001234) is None


def test_malformed_lines_are_skipped() -> None:
    table = Kallsyms.from_text("garbage\nzzzz T bad\nffffffff81000000 T ok\n\n")
    assert len(table) == 1 and table.lookup(0xFFFFFFFF81000010) == Frame("ok")


def test_unreadable_file_gives_an_empty_table(tmp_path: Path) -> None:
    assert len(Kallsyms.load(str(tmp_path / "missing"))) == 0


def test_kernel_return_addresses_are_looked_up_one_byte_back() -> None:
    symbolizer = Symbolizer(kallsyms=Kallsyms.from_text(SAMPLE))
    schedule = 0xFFFFFFFF81001200
    leaf, caller = symbolizer.symbolize(None, (), (schedule, schedule))
    assert leaf.frames == (Frame("schedule"),)  # the interrupted instruction itself
    assert caller.frames == (Frame("do_one_initcall"),)  # a call that ended its caller
    assert leaf.kernel and caller.kernel and caller.address == schedule


def test_real_kallsyms() -> None:
    require_root()  # unprivileged readers see zero addresses
    text = Path("/proc/kallsyms").read_text()
    table = Kallsyms.load()
    assert len(table) > 1000
    rows = [line.split()[:3] for line in text.splitlines()]
    addresses = [address for address, _, _ in rows]
    checked = 0
    for address, kind, name in rows:
        wanted = name in ("schedule", "do_sys_open", "vfs_read", "ksys_write")
        if wanted and kind in "tT" and addresses.count(address) == 1:  # no alias
            start = int(address, 16)
            assert table.lookup(start) == Frame(name)
            assert table.lookup(start + 1) == Frame(name)
            assert table.lookup(start - 1) != Frame(name)
            checked += 1
    assert checked >= 2
