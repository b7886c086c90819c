"""callpolicy's benchmarks: every figure is a ratio against a baseline measured in the same
run, interleaved, with min/median/max over repeats (these machines are shared and noisy).

Run them all with ``python -m benchmarks`` (``--quick`` for a smoke run, ``--only NAME``).
"""
