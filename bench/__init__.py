"""Benchmarks of mend-service: one module per figure, :mod:`bench.runner` writes docs/BENCHMARKS.md.

Every figure is a ratio measured inside one run with interleaved (ABAB) samples, because absolute
times on a shared 2-core machine drift. ``mend bench [--quick] [--only NAME] [--out PATH]``.
"""
