"""CPython frames: interpreter offsets, code objects, line tables."""
