"""Python frames without BPF: the walker's words, the merge into native stacks, the
walker's config struct, and code objects read from this very process."""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import sys

import pytest

from agent import metrics
from agent.model import Frame, Location, Mapping
from agent.process.reader import read_process
from agent.python import unwinder as unwinder_module
from agent.python.code_objects import CodeObjects, read_code
from agent.python.frames import (
    ENTRY_BIT,
    PY_MARKER,
    PY_TRUNCATED,
    TRUNCATED_FRAME,
    decode_word,
    merge_runs,
    python_runs,
    split_words,
)
from agent.python.interpreter import Interpreter, find_interpreter
from agent.python.offsets import OFFSETS
from agent.python.unwinder import PY_PROC, PythonUnwinder, bpf_config, pid_namespace
from agent.sampler.convert import split_python_stacks
from agent.sampler.loader import bpf_source_path

LIB = Mapping(0x1000, 0x9000, 0, "/usr/lib/libpython3.11.so.1.0")


def native(name: str, address: int) -> Location:
    return Location(address=address, mapping=LIB, frames=(Frame(name),))


def python(name: str) -> Location:
    return Location(address=0, mapping=None, frames=(Frame(name, "app.py", 1),))


def word(code: int, position: int = 0, entry: bool = False) -> int:
    return code | (ENTRY_BIT if entry else 0) | position << 48


def names(locations: tuple[Location, ...]) -> list[str]:
    return [location.frames[0].function for location in locations]


def test_words_split_at_the_marker_and_decode() -> None:
    stack = (0x401000, 0x402000, PY_MARKER, word(0x7F00DEAD0, 17, True), word(0x7F00BEEF0, 3))
    user, words = split_python_stacks_of(stack)
    assert user == (0x401000, 0x402000)
    assert len(words) == 2
    first = decode_word(words[0])
    assert (first.code, first.position, first.entry) == (0x7F00DEAD0, 17, True)
    assert decode_word(words[1]).entry is False
    assert split_words((1, 2, 3)) == ((1, 2, 3), ())


def split_python_stacks_of(stack: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    stacks = {7: stack, 8: (0x401000,)}
    python_stacks = split_python_stacks(stacks)
    assert 8 not in python_stacks and stacks[8] == (0x401000,)
    return stacks[7], python_stacks[7]


def test_runs_end_at_entry_frames() -> None:
    words = [word(1), word(2, entry=True), word(3, entry=True), word(4), PY_TRUNCATED]
    runs = python_runs(words, lambda w: python(f"f{w.code}"))
    assert [names(tuple(run)) for run in runs] == [
        ["f1", "f2"],
        ["f3"],
        ["f4", TRUNCATED_FRAME.function],
    ]


def test_each_eval_loop_frame_takes_its_run() -> None:
    # leaf C function, eval loop (run 1), C callback caller, eval loop (run 2), main
    stack = (
        native("deflate", 1),
        native("_PyEval_EvalFrameDefault", 2),
        native("list_sort", 3),
        native("_PyEval_EvalFrameDefault", 4),
        native("Py_RunMain", 5),
    )
    runs = [[python("keyfunc")], [python("caller"), python("<module>")]]
    merged = merge_runs(stack, runs)
    assert names(merged) == ["deflate", "keyfunc", "list_sort", "caller", "<module>", "Py_RunMain"]


def test_runs_left_over_go_to_the_last_eval_loop_and_loops_left_over_stay() -> None:
    stack = (native("_PyEval_EvalFrameDefault", 1), native("main", 2))
    runs = [[python("a")], [python("b")], [python("c")]]
    assert names(merge_runs(stack, runs)) == ["a", "b", "c", "main"]
    two_loops = (native("_PyEval_EvalFrameDefault", 1), native("_PyEval_EvalFrameDefault", 2))
    assert names(merge_runs(two_loops, [[python("a")]])) == ["a", "_PyEval_EvalFrameDefault"]


def test_without_eval_loop_frames_python_frames_go_beneath() -> None:
    stack = (native("memcpy", 1),)  # the native walk stopped after the leaf
    merged = merge_runs(stack, [[python("a")], [python("b")]])
    assert names(merged) == ["memcpy", "a", "b"]
    assert names(merge_runs((), [[python("a")]])) == ["a"]


def c_struct_members(name: str) -> list[tuple[str, str]]:
    body = bpf_source_path().read_text().split(f"struct {name} {{", 1)[1].split("};", 1)[0]
    members = []
    for line in body.splitlines():
        code = line.split("//")[0].strip()
        match = re.fullmatch(r"(u64|u32|u16|u8)\s+(\w+);", code)
        if match:
            members.append((match.group(1), match.group(2)))
    return members


def test_config_struct_matches_the_bpf_struct() -> None:
    members = c_struct_members("py_proc")
    sizes = {"u64": "Q", "u32": "I", "u16": "H", "u8": "B"}
    formats = "".join(sizes[kind] for kind, _ in members)
    assert PY_PROC.format.startswith("=" + formats.replace("HHHHHHHHHHHH", "12H"))
    assert [name for _, name in members[1:3]] == ["pidns_dev", "pidns_ino"]
    assert PY_PROC.size == 56  # sizeof(struct py_proc): 52 bytes of fields, aligned to 8
    assert members[0] == ("u64", "interpreters_head")


@pytest.mark.parametrize("version", sorted(OFFSETS))
def test_config_packs_every_supported_version(version: tuple[int, int]) -> None:
    interpreter = Interpreter(version, OFFSETS[version], 0x7F0000001000, 0, "/x")
    config = bpf_config(interpreter)
    assert config is not None and len(config) == PY_PROC.size
    fields = PY_PROC.unpack(config)
    offsets = OFFSETS[version]
    assert fields[0] == 0x7F0000001000 + offsets.runtime_interpreters_head
    instr_is_pointer, every_frame_entry = fields[15], fields[17]
    assert instr_is_pointer == (version >= (3, 11))
    assert every_frame_entry == (version < (3, 11))
    native_tid = fields[5]
    assert (native_tid == 0xFFFF) == (offsets.tstate_native_thread_id < 0)


def test_frame_fields_beyond_the_walkers_read_are_refused() -> None:
    offsets = OFFSETS[(3, 11)]
    wide = type(offsets)(**{**_fields(offsets), "frame_instr": 200})
    assert bpf_config(Interpreter((3, 11), wide, 0x1000, 0, "/x")) is None


def _fields(offsets: object) -> dict[str, object]:
    return {name: getattr(offsets, name) for name in offsets.__slots__}  # type: ignore[attr-defined]


def own_interpreter() -> Interpreter:
    process = read_process(os.getpid())
    assert process is not None
    found = find_interpreter(process)
    assert isinstance(found, Interpreter), found
    return found


def sample_function() -> int:
    total = 0
    for i in range(3):
        total += i
    return total


class Holder:
    def método(self) -> None:  # a non-ASCII name: a compact, non-ASCII str
        pass


def test_this_processs_interpreter_is_found() -> None:
    interpreter = own_interpreter()
    assert interpreter.version == sys.version_info[:2]
    assert interpreter.code_type == id(type(sample_function.__code__))


def test_code_objects_read_from_a_live_process() -> None:
    interpreter = own_interpreter()
    code = sample_function.__code__
    info = read_code(os.getpid(), id(code), interpreter)
    assert info is not None
    assert info.name == getattr(code, "co_qualname", code.co_name)
    assert info.filename == code.co_filename
    assert info.firstlineno == code.co_firstlineno
    method = read_code(os.getpid(), id(Holder.método.__code__), interpreter)
    assert method is not None and method.name.endswith("método")
    # Not a code object (a function object): refused by its type.
    assert read_code(os.getpid(), id(sample_function), interpreter) is None


def test_lines_of_a_live_code_object() -> None:
    interpreter = own_interpreter()
    code = sample_function.__code__
    info = read_code(os.getpid(), id(code), interpreter)
    assert info is not None
    adaptive = max(interpreter.offsets.code_code_adaptive, 0) // 2
    for start, end, line in code.co_lines():
        if line is None:
            continue
        unit = start // 2  # the walker reports code units from the code object's start
        position = unit + adaptive if interpreter.version >= (3, 11) else start
        assert info.line(interpreter, position) == line, (start, end)


def test_a_reused_address_is_read_again_next_window() -> None:
    interpreter = own_interpreter()
    pid = os.getpid()
    codes = CodeObjects()
    first, second = sample_function.__code__, Holder.método.__code__
    codes.note(pid, id(first), interpreter)
    # Pretend the first code object was freed and the second took its address.
    codes._entries[(pid, id(second))] = codes._entries.pop((pid, id(first)))
    codes._checked.clear()
    info = codes.get(pid, id(second), interpreter)
    assert info is not None and info.name.endswith("método")
    assert codes.reads == 2


def test_unreadable_memory_is_none_not_an_error() -> None:
    interpreter = own_interpreter()
    assert read_code(os.getpid(), 0x10, interpreter) is None
    assert read_code(2**22 + 12345, 0x7F0000000000, interpreter) is None  # no such pid
    codes = CodeObjects(max_entries=2)
    for address in (0x10, 0x20, 0x30):
        codes.note(os.getpid(), address, interpreter)
    assert len(codes) == 2 and codes.failures == 3


def test_struct_offsets_in_words_fit_the_position_field() -> None:
    # 16 bits of position: clamped in BPF, decoded here without touching the address.
    w = word(0x7FFFFFFFFFF0, 0xFFFF, True)
    decoded = decode_word(w)
    assert decoded.code == 0x7FFFFFFFFFF0 and decoded.position == 0xFFFF
    assert struct.pack("=Q", w)


def test_a_process_in_the_agents_pid_namespace_needs_no_translation() -> None:
    assert pid_namespace(os.getpid()) == (0, 0)
    assert pid_namespace(2**22 + 12345) == (0, 0)  # gone: no translation asked for


class RecordingMaps:
    def __init__(self) -> None:
        self.configs: dict[int, bytes] = {}

    def set_python_process(self, pid: int, config: bytes) -> None:
        self.configs[pid] = config

    def remove_python_process(self, pid: int) -> None:
        self.configs.pop(pid, None)


def skipped(reason: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "strobe_python_interpreters_skipped_total", {"reason": reason}
        )
        or 0.0
    )


def test_this_process_is_registered_and_contradicting_offsets_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    maps = RecordingMaps()
    unwinder = PythonUnwinder()
    unwinder.use_maps(maps)
    process = read_process(os.getpid())
    assert process is not None
    unwinder.prepare(process)
    assert os.getpid() in maps.configs
    assert unwinder.interpreter(os.getpid()) == own_interpreter()
    code = sample_function.__code__
    unwinder.note_code(os.getpid(), id(code))  # verified now, then read
    assert len(unwinder.codes) == 1

    # Offsets that contradict the process (a thread state's interp elsewhere): refused.
    right = own_interpreter()
    wrong = dataclasses.replace(
        right, offsets=dataclasses.replace(right.offsets, tstate_interp=right.offsets.tstate_next)
    )
    monkeypatch.setattr(unwinder_module, "find_interpreter", lambda process, proc: wrong)
    before = skipped("offsets_mismatch")
    unwinder.prepare(process)
    assert os.getpid() not in maps.configs
    assert unwinder.interpreter(os.getpid()) is None
    assert skipped("offsets_mismatch") == before + 1


def test_offsets_are_checked_again_when_code_runs() -> None:
    maps = RecordingMaps()
    unwinder = PythonUnwinder()
    unwinder.use_maps(maps)
    right = own_interpreter()
    wrong = dataclasses.replace(
        right, offsets=dataclasses.replace(right.offsets, tstate_interp=right.offsets.tstate_next)
    )
    # As if registered at exec, before the interpreter had a thread to check against.
    unwinder._processes[os.getpid()] = (0, wrong)
    maps.configs[os.getpid()] = b"config"
    unwinder.note_code(os.getpid(), id(sample_function.__code__))
    assert os.getpid() not in maps.configs and len(unwinder.codes) == 0
