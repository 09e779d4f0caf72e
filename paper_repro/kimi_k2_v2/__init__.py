"""Kimi K2 (arXiv 2507.20534) stability claims at small scale, version 2:
pre-registered rules (``settings``), a fixed corpus (``corpus``), a training
loop with probe S, per-head spectral norms and update stable ranks
(``runner``), per-run numbers (``analysis``), the experiments in order
(``pipeline``) and the figures and ``results.md`` (``report``).

Run from the repository root::

    python -m paper_repro.kimi_k2_v2            # full run (<= 90 min on 2 CPU cores, estimated)
    python -m paper_repro.kimi_k2_v2 --quick    # same pipeline, test size
"""
