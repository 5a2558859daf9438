"""Three hot functions sharing the CPU 50/30/20 by wall time, for SECONDS (argv[1])."""

import sys
import time


def spin(seconds):
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        for i in range(200):
            total += i * i
    return total


def hot_fifty():
    return spin(0.005)


def hot_thirty():
    return spin(0.003)


def hot_twenty():
    return spin(0.002)


def main():
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        hot_fifty()
        hot_thirty()
        hot_twenty()


main()
