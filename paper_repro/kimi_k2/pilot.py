"""The pilot: the numbers the rules' tolerances and the budget are set from,
measured before the full run and committed with the pre-registration
(``results/pilot.json``).

1. Step times per width and optimizer family: the bare compiled step (after
   its compile), and the loop's wall time per step (probes included).
2. One update's growth of S and the step-to-step ratio of S: unclipped Muon
   at lr 0.1 for 150 steps at every width, probed at t and t + 1 for every
   tenth t. ``growth`` = S(probe, t + 1) / S(probe, t) per head (fixed data);
   ``step_ratio`` = S(batch t + 1, W_{t+1}) / S(batch t, W_t) per head: what
   S / tau can reach one step after a clip (a new batch and one update).
3. Seed-to-seed variation: Muon at lr 0.01, width 64, seeds 0-2, and the same
   with QK-Clip at tau = 15 (a clip that acts on healthy runs): the standard
   deviation of the final val loss, and the per-step |loss difference| of the
   two trajectories that differ only by the clip.

``python -m paper_repro.kimi_k2.pilot`` writes ``results/pilot.json``.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import qkclip_eqx as qc

from . import runner
from . import settings as S
from .corpus import load_corpus

HERE = pathlib.Path(__file__).resolve().parent
GROWTH_LR, GROWTH_STEPS = 0.1, 150
SEED_LR, SEED_WIDTH, SEED_TAU, SEEDS = 0.01, 64, 15.0, (0, 1, 2)


def bare_step_ms(s: S.Settings, width: int, family: str, data, n: int = 50) -> float:
    """Mean wall time per step of ``n`` compiled steps dispatched back to back
    on one batch (after the compile and 5 steps), as a loop with no
    measurements would run them."""
    spec = spec_for(s, width, "muon" if family == "muon" else "adamw", 0.01, 0, None, "bare")
    cfg = qc.RunConfig(**spec.model, batch_size=s.batch_size, seq_len=s.seq_len)
    model = qc.Transformer(cfg.model_config(data.vocab_size), key=jax.random.key(0))
    opt, step = runner.COMPILED.get(spec)
    state = opt.init(eqx.filter(model, eqx.is_array))
    hp = {"lr": jnp.float32(0.01), "wd": jnp.float32(0.1), "tau": jnp.float32(math.inf)}
    batch = jnp.asarray(
        qc.get_batch(data.train, batch_size=s.batch_size, seq_len=s.seq_len, seed=0, step=0)
    )
    for _ in range(5):
        model, state, loss, _ = step(hp, model, state, batch)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        model, state, loss, _ = step(hp, model, state, batch)
    loss.block_until_ready()
    return 1000 * (time.perf_counter() - t0) / n


def spec_for(
    s,
    width,
    optimizer,
    lr,
    seed,
    tau,
    name,
    steps=None,
    probe_pairs=False,
    probe_every=None,
    corpus="",
):
    return runner.RunSpec(
        name=name,
        optimizer=optimizer,
        width=width,
        lr=lr,
        weight_decay=s.weight_decay,
        tau=tau,
        seed=seed,
        steps=steps or s.steps,
        warmup_steps=s.warmup_steps,
        decay_fraction=s.decay_fraction,
        model=s.model(width),
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        probe_every=probe_every or s.probe_every,
        probe_pairs=probe_pairs,
        stop_loss=S.STOP_LOSS,
        corpus_sha256=corpus,
    )


def q99(x) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.quantile(x, 0.99)) if len(x) else math.nan


def budget(s: S.Settings, res: dict) -> dict:
    """The full run's wall time, estimated from the loop's time per step
    (AdamW: its bare step times the Muon loop's overhead), in minutes."""
    total = 0.0
    for w in s.widths:
        r = res["widths"][str(w)]
        muon, adamw = r["loop_ms"], r["bare_ms_adamw"] * r["loop_over_bare"]
        runs_muon = 2 * len(s.grid["muon"]) + 2 * (len(s.cure_seeds) - 1)
        if w == s.fig12_width:
            runs_muon += 2 * len(s.fig12_seeds) - 1 + len(s.wd_axis)
        total += s.steps * (runs_muon * muon + len(s.grid["adamw"]) * adamw) / 1000
    compile_s = 3 * len(s.widths) * 10.0  # two steps and the probe per width, ~10 s each
    return {"train_min": round(total / 60, 1), "compile_min": round(compile_s / 60, 1)}


def main(argv: list[str] | None = None) -> dict:
    s = S.FULL
    out = HERE / "results" / "pilot.json"
    runs = HERE / "results" / "pilot_logs"  # committed: tests/test_repro.py re-derives pilot.json
    t_start = time.perf_counter()
    data, corpus = load_corpus()
    probe = runner.spread_windows(data.val, s.probe_windows, s.seq_len)
    val = runner.spread_windows(data.val, s.val_windows, s.seq_len)
    res: dict = {"widths": {}, "corpus_sha256": corpus["sha256"]}
    for w in s.widths:
        row = {f"bare_ms_{f}": round(bare_step_ms(s, w, f, data), 2) for f in ("muon", "adamw")}
        spec = spec_for(
            s,
            w,
            "muon",
            GROWTH_LR,
            0,
            None,
            f"growth_w{w}",
            steps=GROWTH_STEPS,
            probe_pairs=True,
            probe_every=10,
            corpus=corpus["sha256"],
        )
        st = runner.run(spec, data, probe, val, runs / spec.name)
        lg = runner.read_log(runs / spec.name)
        start, end = spec.flat()
        steps, ps = lg["probe_step"], lg["probe_s"]
        pairs = [
            i
            for i in range(len(steps) - 1)
            if steps[i + 1] == steps[i] + 1 and start <= steps[i] < end
        ]
        g = np.concatenate([ps[i + 1][ps[i] > 0] / ps[i][ps[i] > 0] for i in pairs] or [[]])
        s_tr = lg["s"][start:end]
        ratio = s_tr[1:] / s_tr[:-1]
        ratio = ratio[(s_tr[:-1] > 0) & np.isfinite(ratio)]
        row.update(
            growth_run=st["stopped"],
            growth_q99=round(q99(g), 4),
            growth_median=round(float(np.median(g)), 4) if len(g) else None,
            step_ratio_q99=round(q99(ratio), 4),
            peak_s=round(float(np.nanmax(lg["s"])), 2),
        )
        # the loop of the full run (its probes and final validation included;
        # after the growth run, so that no compile of the probe is in it)
        spec = spec_for(s, w, "muon", SEED_LR, 0, None, f"muon_w{w}_s0", corpus=corpus["sha256"])
        st = runner.run(spec, data, probe, val, runs / spec.name)
        row["loop_ms"] = round(1000 * st["wall_s"] / st["steps_run"], 2)
        row["loop_over_bare"] = round(row["loop_ms"] / row["bare_ms_muon"], 3)
        res["widths"][str(w)] = row
        print(w, row, flush=True)
    vals, clip_vals, diffs = [], [], []
    for seed in SEEDS:
        pair = {}
        for opt, tau in (("muon", None), ("muonclip", SEED_TAU)):
            name = f"{opt}_w{SEED_WIDTH}_s{seed}"
            spec = spec_for(s, SEED_WIDTH, opt, SEED_LR, seed, tau, name, corpus=corpus["sha256"])
            st = runner.run(spec, data, probe, val, runs / spec.name)
            pair[opt] = (st, runner.read_log(runs / spec.name))
        vals.append(pair["muon"][0]["val_loss"])
        clip_vals.append(pair["muonclip"][0]["val_loss"])
        lm, lc = pair["muon"][1]["loss"], pair["muonclip"][1]["loss"]
        diffs.append(np.abs(lm - lc)[s.warmup_steps :])
        res.setdefault("clip_steps", []).append(
            int(np.sum(np.any(pair["muonclip"][1]["s"] > SEED_TAU, axis=(1, 2))))
        )
    d = np.asarray(clip_vals) - np.asarray(vals)
    res.update(
        seed_val=vals,
        seed_val_sd=round(float(np.std(vals, ddof=1)), 5),
        clip_val=clip_vals,
        paired_val_diff_sd=round(float(np.std(d, ddof=1)), 5),
        paired_abs_diff_q99=round(q99(np.concatenate(diffs)), 5),
        paired_abs_diff_max=round(float(np.max(np.concatenate(diffs))), 5),
    )
    res["tolerances"] = {
        "cap_tolerance": round(S.cap_tolerance(res), 4),
        "spike_delta": round(S.spike_delta(res), 5),
        "sensitivity_margin": round(S.sensitivity_margin(res), 5),
    }
    res["budget"] = budget(s, res)
    res["compiles"] = runner.COMPILED.compiles
    res["compile_s"] = round(runner.COMPILED.compile_s, 1)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["python"] = sys.version.split()[0]
    res["jax"] = jax.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
