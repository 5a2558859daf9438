"""The admin HTTP server of `strobe run`, alone in a process, for memory measurements.

Built by the agent's own code from `strobe run` flags (agent.commands.daemon.admin_server, with the
generated token), so it has the agent's bound and idle timeout. It prints its port, serves
until its stdin closes, then closes the server and exits.

    python -m tests.integration.admin_child CACHE_DIR
"""

from __future__ import annotations

import logging
import sys

from agent.admin.token import admin_token
from agent.commands.cli import build_parser
from agent.commands.daemon import admin_server
from agent.config import build_config


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    flags = ["run", "--http-address", "127.0.0.1:0", "--cache-dir", argv[0]]
    config = build_config(build_parser().parse_args(flags), "run", environ={})
    admin = admin_server(config, admin_token(config))
    admin.start()
    admin.set_ready()
    print(admin.port, flush=True)
    sys.stdin.read()  # until the parent closes it
    admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
