"""Comparing runs: GPU-vs-NPU scoring diffs under per-metric tolerances."""
