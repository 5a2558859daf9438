"""A short-lived process: busy in flash_busy (under flash) for SECONDS (argv[1]), then
exits, so it may exit while the agent walks its frames or reads its code objects."""

import sys
import time


def flash_busy(end):
    total = 0
    while time.monotonic() < end:
        for i in range(500):
            total += i * i
    return total


def flash(seconds):
    return flash_busy(time.monotonic() + seconds)


flash(float(sys.argv[1]))
