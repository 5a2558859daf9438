"""Writes its pid to PIDFILE (argv[1]), then is busy in short_burst for 0.5 s and exits."""

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
short_burst(0.5)
