"""The parts of ``benchmarks/run.py`` (the entry point; run it, not these): ``measure`` (device,
timing, FLOPs, matmul peak), ``benches`` (the measured sections), ``report`` (targets, tables,
RESULTS.md)."""
