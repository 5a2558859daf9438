"""What a user types: `strobe run` (daemon.py), `strobe record`, `strobe top`, the parser
that dispatches to them (cli.py), and what only they use: the start-up priority, signals that
arrive before the daemon is up, the daemon's SIGHUP reload.

Imports nothing: `python -m agent` raises the start-up priority before the heavy imports.
"""
