"""Kimi K2 (arXiv 2507.20534) stability experiments at small scale.

Run from the repository root::

    python -m paper_repro.kimi_k2            # full run, ~42 min on 2 CPU cores
    python -m paper_repro.kimi_k2 --quick    # same pipeline, tiny sizes, ~1 min
    python -m paper_repro.kimi_k2 --preset gpu --out DIR   # larger, for an accelerator

Modules:

- ``settings``: every size, learning rate and step count, per mode, with the reason.
- ``runner``: run-or-resume one training run (``qkclip_eqx.train``), skipping complete ones.
- ``analysis``: pure functions from ``metrics.jsonl`` to the reported numbers.
- ``report``: figures and ``results.md``, generated from the run logs.
- ``pipeline``: the experiments in order, each choice made from earlier logs.
"""
