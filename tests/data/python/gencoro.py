"""A generator consumed in a loop and an asyncio coroutine, busy in turn for SECONDS."""

import asyncio
import sys
import time


class Pipeline:
    def produce(self, end):
        while time.monotonic() < end:
            total = 0
            for i in range(2000):
                total += i * i
            yield total

    def consume(self, seconds):
        count = 0
        for _ in self.produce(time.monotonic() + seconds):
            count += 1
        return count

    async def crunch(self, seconds):
        end = time.monotonic() + seconds
        total = 0
        while time.monotonic() < end:
            for i in range(2000):
                total += i * i
            await asyncio.sleep(0)
        return total


def main():
    pipeline = Pipeline()
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        pipeline.consume(0.05)
        asyncio.run(pipeline.crunch(0.05))


main()
