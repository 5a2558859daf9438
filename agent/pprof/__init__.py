"""The pprof stage: symbolized samples -> gzipped pprof (see builder.py)."""

from agent.pprof.builder import PprofError, build_pprof, encode_profile, parse_pprof

__all__ = ["PprofError", "build_pprof", "encode_profile", "parse_pprof"]
