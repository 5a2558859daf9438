"""Three hot leaf functions sharing the CPU 50/30/20 by wall time, for SECONDS (argv[1])."""

import sys
import time


def hot_fifty(seconds):
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        for i in range(200):
            total += i * i
    return total


def hot_thirty(seconds):
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        for i in range(200):
            total += i * i
    return total


def hot_twenty(seconds):
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        for i in range(200):
            total += i * i
    return total


def main():
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        hot_fifty(0.005)
        hot_thirty(0.003)
        hot_twenty(0.002)


main()
