"""Benchmark scripts of vqkit; run them as modules from the repository root,
e.g. ``python -m benchmarks.bench_search --quick`` (see docs/benchmarks.md)."""
