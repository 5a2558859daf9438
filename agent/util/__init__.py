"""Small helpers with no knowledge of profiles: atomic file writes, a paused cyclic GC, an LRU
dict, systemd notifications."""
