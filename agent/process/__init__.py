"""Process stage: pid -> ProcessInfo (comm, exe, executable mappings), by pid + start time."""

from agent.process.cache import ProcessCache
from agent.process.maps import parse_maps, parse_stat
from agent.process.reader import read_process

__all__ = ["ProcessCache", "parse_maps", "parse_stat", "read_process"]
