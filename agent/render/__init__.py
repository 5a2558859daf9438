"""Profiles shown to people: frame names, the flame graph's call tree and its script."""
