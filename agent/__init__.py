"""Strobe: an eBPF continuous-profiling agent."""
