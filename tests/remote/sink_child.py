"""A stand-in agent for the kill -9 tests: the agent's own code builds its RemoteSink from
`strobe run` flags, then it writes numbered profiles and prints each number once write()
has returned (so the parent knows which ones the sink had accepted when it was killed).

    python -m tests.remote.sink_child ADDRESS SPOOL_DIR FIRST COUNT
"""

from __future__ import annotations

import sys
import time

from agent.commands.cli import build_parser
from agent.commands.daemon import build_sinks
from agent.config import build_config
from tests.remote.backend import make_profile


def main(argv: list[str]) -> int:
    address, spool_dir, first, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    flags = ["run", "--remote-store-address", address, "--remote-store-insecure"]
    flags += ["--remote-store-spool-dir", spool_dir, "--no-local-store"]
    (sink,) = build_sinks(build_config(build_parser().parse_args(flags), "run", environ={}))
    for ident in range(first, first + count):
        sink.write(make_profile(ident))
        print(ident, flush=True)  # written only after write() returned
    print("done", flush=True)
    time.sleep(600)  # like an agent between windows: wait for the kill
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
