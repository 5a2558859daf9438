"""Three hot leaf functions with the same work per call, called at random 50/30/20, for
SECONDS (argv[1]); random, so no cycle of the workload can alias with the sampling."""

import random
import sys
import time

UNIT = 5000


def hot_fifty():
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def hot_thirty():
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def hot_twenty():
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def main():
    end = time.monotonic() + float(sys.argv[1])
    choose = random.Random(1).choice
    functions = [hot_fifty] * 5 + [hot_thirty] * 3 + [hot_twenty] * 2
    while time.monotonic() < end:
        choose(functions)()


main()
