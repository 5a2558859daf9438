"""A process that breaks its own frame chain while it runs: corrupt_then_spin points its
frame's link to its caller (PyFrameObject.f_back on 3.8-3.10, _PyInterpreterFrame.previous
on 3.11+; byte offset PREVIOUS, argv[1], with CODE, argv[2], the frame's code pointer)
at unmapped memory, prints "corrupted", and runs spin until SIGUSR1 (or 60 s); then it
puts the link back before returning, so the interpreter never follows it, and exits 0.
Exits 3 without writing anything if the frame does not look as expected."""

import ctypes
import gc
import signal
import sys
import time

GARBAGE = 0xDEADBEEF000  # unmapped: a read of a frame there fails
F_FRAME = 24  # 3.11+: PyFrameObject.f_frame, after ob_refcnt, ob_type and f_back
stop = False


def on_usr1(signum, frame):
    global stop
    stop = True


def spin(end):
    total = 0
    while not stop and time.monotonic() < end:
        for i in range(2000):
            total += i * i
    return total


def interpreter_frame(frame):
    """The address of the frame the interpreter walks for this frame object."""
    if sys.version_info >= (3, 11):  # noqa: UP036 (run by 3.8-3.13)
        return ctypes.c_void_p.from_address(id(frame) + F_FRAME).value
    return id(frame)  # 3.8-3.10: the frame object itself


def corrupt_then_spin(previous, code):
    frame = sys._getframe()
    address = interpreter_frame(frame)
    link = ctypes.c_void_p.from_address(address + previous)
    saved = link.value
    if ctypes.c_void_p.from_address(address + code).value != id(frame.f_code):
        sys.exit(3)
    if saved != interpreter_frame(frame.f_back):
        sys.exit(3)
    gc.disable()  # 3.8-3.10's collector visits f_back
    link.value = GARBAGE
    try:
        print("corrupted", flush=True)
        return spin(time.monotonic() + 60)
    finally:
        link.value = saved
        gc.enable()


def main():
    signal.signal(signal.SIGUSR1, on_usr1)
    corrupt_then_spin(int(sys.argv[1]), int(sys.argv[2]))


main()
