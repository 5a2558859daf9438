"""Writes its pid to PIDFILE (argv[1]), is busy in short_burst for SECONDS (argv[2],
default 0.5), and exits."""

import os
import sys
import time


def short_burst(seconds):
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        for i in range(2000):
            total += i * i
    return total


with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
short_burst(float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
