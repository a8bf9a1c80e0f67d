"""Benchmarks: speed of the shipped model, its training loop, data pipeline and app.

    python -m benchmarks            # everything, under 10 minutes on a 2-core CPU
    python -m benchmarks --quick    # every code path at toy sizes, well under a minute

Each concern is its own script (``python -m benchmarks.inference`` ...) that prints a table and
writes JSON to ``benchmarks/results/<name>.json``; the full run also writes
``benchmarks/results/summary.md``, the table for the README.
"""
