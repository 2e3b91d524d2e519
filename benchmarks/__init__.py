"""Benchmarks of artifex_ckpt against raw Orbax and the disk: `python -m benchmarks`.

Every figure is a ratio of cases measured side by side in one process run (the
median of repeated, interleaved trials, with its min-max range), so that the drift of
a shared machine cancels out. See docs/benchmarks.md.
"""
