"""sorted() calling back into an expensive Python key function, for SECONDS (argv[1])."""

import sys
import time


def keyfunc(value):
    h = value
    for i in range(300):
        h = (h * 31 + i) & 0xFFFFF
    return h


def sort_caller(data):
    return sorted(data, key=keyfunc)


def main():
    end = time.monotonic() + float(sys.argv[1])
    data = list(range(500))
    while time.monotonic() < end:
        sort_caller(data)


main()
