"""Two Python threads busy in alpha and beta while the main thread waits in join."""

import sys
import threading
import time


def alpha(end):
    total = 0
    while time.monotonic() < end:
        for i in range(2000):
            total += i * i
    return total


def beta(end):
    total = 0
    while time.monotonic() < end:
        for i in range(2000):
            total -= i * 3
    return total


def main():
    end = time.monotonic() + float(sys.argv[1])
    threads = [threading.Thread(target=f, args=(end,)) for f in (alpha, beta)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


main()
