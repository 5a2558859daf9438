"""A busy leaf under DEPTH (argv[2]) recursive Python calls, for SECONDS (argv[1])."""

import sys
import time


def busy_bottom(end):
    total = 0
    while time.monotonic() < end:
        for i in range(2000):
            total += i * i
    return total


def recurse(depth, end):
    if depth == 0:
        return busy_bottom(end)
    return recurse(depth - 1, end)


def main():
    recurse(int(sys.argv[2]), time.monotonic() + float(sys.argv[1]))


main()
