"""Tooling around the library, not part of its core: the benchmark (bench, bench_cases, bench_report),
the demo and the synthetic Llama-shaped checkpoints the tests and the bench build."""
