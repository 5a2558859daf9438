"""A busy leaf under DEPTH (argv[2]) recursive Python calls, for SECONDS (argv[1]).

argv[3] "direct": recurse calls itself; "callbacks": through map(), so C frames sit
between every two Python frames (3.12+: a C-stack shim frame in the frame chain too).
"""

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


def recurse_via_map(depth, end):
    if depth == 0:
        return busy_bottom(end)
    return list(map(recurse_via_map, [depth - 1], [end]))


def main():
    depth, end = int(sys.argv[2]), time.monotonic() + float(sys.argv[1])
    if sys.argv[3] == "direct":
        recurse(depth, end)
    else:
        recurse_via_map(depth, end)


main()
