"""`python -m agent` and the `strobe` console script."""

from agent.commands import startup_priority


def main() -> int:
    startup_priority.begin()  # before the imports below: they are start-up CPU too
    from agent.commands.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
