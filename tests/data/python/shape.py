"""main -> Worker.run -> Worker.leaf, a busy loop, for SECONDS (argv[1]) under <module>."""

import sys
import time


class Worker:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def run(self):
        return self.leaf()

    def leaf(self):
        total = 0
        while time.monotonic() < self.end:
            for i in range(2000):
                total += i * i
        return total


def main():
    Worker(float(sys.argv[1])).run()


main()
