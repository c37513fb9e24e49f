"""Benchmarks, run from the repository root: `python -m benchmarks.bench` (the GPU throughput table of
shared BENCHMARK.md, with predictions and outcomes in benchmarks/NOTES.md) and the other modules here."""
