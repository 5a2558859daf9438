"""The reference program: main -> handler -> one of three Python functions with the same
work per call, chosen at random with weights 60/30/10 (random, so no cycle of the
workload can alias with the sampling), then a regex search (C: _sre, no Python frame);
and a second thread, named side_worker (its comm), busy in side_worker a few percent of
the time. For SECONDS (argv[1])."""

import random
import re
import sys
import threading
import time

UNIT = 4000
PATTERN = re.compile(r"(\w+)@(\w+)\.(com|org)")
TEXT = "mail alice@example.com, bob@example.org or carol at example dot net; " * 6


def sixty():
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def thirty():
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def ten():
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def handler(draw):
    roll = draw()
    if roll < 0.6:
        sixty()
    elif roll < 0.9:
        thirty()
    else:
        ten()
    return PATTERN.findall(TEXT)


def side_worker(end):
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
        comm.write("side_worker")
    total = 0
    while time.monotonic() < end:
        for i in range(12000):
            total ^= i
        time.sleep(0.005)
    return total


def main():
    end = time.monotonic() + float(sys.argv[1])
    side = threading.Thread(target=side_worker, args=(end,))
    side.start()
    draw = random.Random(7).random
    while time.monotonic() < end:
        handler(draw)
    side.join()


main()
