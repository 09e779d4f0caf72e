"""Kimi K2 (arXiv 2507.20534) stability claims at small scale, on a width x
lr sweep: pre-registered rules (``settings``) with tolerances from a pilot
(``pilot``), a fixed corpus (``corpus``), one run with its measurements
(``runner``), per-run numbers (``analysis``), the experiments in order
(``pipeline``) and the figures and ``results.md`` (``report``).

Run from the repository root::

    python -m paper_repro.kimi_k2            # full run (36 min measured on 2 CPU cores)
    python -m paper_repro.kimi_k2 --no-train # results from the committed logs
    python -m paper_repro.kimi_k2 --quick    # same pipeline, test size
"""
