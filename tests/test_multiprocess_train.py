"""qkclip-train as two local processes (4 CPU devices each) on a data=4,model=2
mesh: each process writes its own shards of every checkpoint, and the result,
restored on one device, is the one-device run's."""

import json
import os
import pathlib
import sys

import equinox as eqx
import jax
import numpy as np

from builders import synthetic_text
from launch import run_processes
from qkclip_eqx._checkpoint import load_checkpoint
from qkclip_eqx._model import Transformer
from qkclip_eqx._run_config import optimizer, preset
from qkclip_eqx._train import load_run_data, train
from reference import leaves_by_path

FLAGS = dict(steps=4, ckpt_every=2, eval_every=2)


def test_two_process_run_checkpoints_restore_on_one_device(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(synthetic_text(200_000, seed=1))
    out = tmp_path / "run"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    run_processes(
        lambda address, i: [
            sys.executable,
            "-m",
            "qkclip_eqx.cli.train",
            "--preset",
            "tiny",
            *flags,
            "--mesh",
            "data=4,model=2",
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
            "--coordinator-address",
            address,
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ],
        env=env,
    )
    # each process wrote its own shards
    assert {p.name for p in (out / "ckpt_00000004" / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }

    cfg = preset("tiny", **FLAGS, data=str(corpus), out=str(tmp_path / "one"))
    data = load_run_data(cfg)
    ref = train(cfg, progress=False, data=data)
    model = eqx.filter_eval_shape(
        Transformer, cfg.model_config(data.vocab_size), key=jax.random.key(0)
    )
    state = eqx.filter_eval_shape(lambda m: optimizer(cfg).init(eqx.filter(m, eqx.is_array)), model)
    (got, _), meta = load_checkpoint(out / "ckpt_00000004", (model, state))
    assert meta["step"] == 4 and meta["run"]["mesh"] == "data=4,model=2"
    want, have = leaves_by_path(ref.model), leaves_by_path(got)
    assert want.keys() == have.keys()
    for k in want:
        np.testing.assert_allclose(have[k], want[k], rtol=1e-4, atol=2e-6, err_msg=k)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_losses = [
        json.loads(x)["loss"]
        for x in (pathlib.Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
    ]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
