"""A thread compressing a large buffer with zlib (which releases the GIL) in a loop."""

import os
import sys
import threading
import time
import zlib


def compress_loop(end):
    data = os.urandom(1 << 16) * 32  # 2 MiB, compressible: deflate works on every byte
    while time.monotonic() < end:
        zlib.compress(data, 6)


def main():
    end = time.monotonic() + float(sys.argv[1])
    thread = threading.Thread(target=compress_loop, args=(end,))
    thread.start()
    thread.join()


main()
