"""Benchmarks: training throughput per precision mode (:mod:`yxanul.bench.throughput`)."""
