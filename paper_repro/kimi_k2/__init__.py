"""Kimi K2 (arXiv 2507.20534) stability claims at small scale:
pre-registered rules (``settings``), a fixed corpus (``corpus``), a training
loop with probe S, per-head spectral norms and update stable ranks
(``runner``), per-run numbers (``analysis``), the experiments in order
(``pipeline``) and the figures and ``results.md`` (``report``).

Run from the repository root::

    python -m paper_repro.kimi_k2            # full run (52 min measured on 2 CPU cores)
    python -m paper_repro.kimi_k2 --quick    # same pipeline, test size
"""
