"""qkclip-train as two local processes (4 CPU devices each) on a data=4,model=2
mesh: each process writes its own shards of every checkpoint, and the result,
restored on one device, is the one-device run's; killed (SIGKILL, both
processes) while writing a checkpoint, it resumes as two processes and ends
bit for bit where the uninterrupted two-process run ends.

The cache is asked for (QKCLIP_EQX_COMPILATION_CACHE=1) and must stay empty:
a multi-process CPU run compiles from scratch, since from jax 0.12.1 the
processes' cache keys differ and a run whose process 0 alone loads its
programs hangs or dies (cli/_flags.py: use_compilation_cache)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import numpy as np
import pytest

from builders import synthetic_text
from launch import reserved_port, run_processes
from qkclip_eqx._checkpoint import latest_checkpoint, load_checkpoint
from qkclip_eqx._model import Transformer
from qkclip_eqx._run_config import optimizer, preset
from qkclip_eqx._train import load_run_data, train
from reference import leaves_by_path

FLAGS = dict(steps=4, ckpt_every=2, eval_every=2)
TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    corpus = root / "corpus.txt"
    corpus.write_bytes(synthetic_text(200_000, seed=1))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "QKCLIP_EQX_COMPILATION_CACHE": "1",
        "XDG_CACHE_HOME": str(root / "cache"),
    }
    return root, corpus, env


def _argv(corpus, out):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    return [
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
    ]


def _distributed(address, i):
    return ["--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)]


@pytest.fixture(scope="module")
def two_process_run(setup):
    root, corpus, env = setup
    out = root / "run"
    run_processes(
        lambda address, i: [
            sys.executable,
            "-m",
            "qkclip_eqx.cli.train",
            *_argv(corpus, out),
            *_distributed(address, i),
        ],
        env=env,
    )
    return out


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _like(cfg, vocab_size):
    model = eqx.filter_eval_shape(Transformer, cfg.model_config(vocab_size), key=jax.random.key(0))
    state = eqx.filter_eval_shape(lambda m: optimizer(cfg).init(eqx.filter(m, eqx.is_array)), model)
    return model, state


def test_two_process_run_checkpoints_restore_on_one_device(setup, two_process_run, tmp_path):
    _, corpus, _ = setup
    out = two_process_run
    root = out.parent
    cache = root / "cache" / "qkclip_eqx" / "jax"
    assert not cache.is_dir() or not any(cache.iterdir()), sorted(cache.iterdir())
    # each process wrote its own shards
    assert {p.name for p in (out / "ckpt_00000004" / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }

    cfg = preset("tiny", **FLAGS, data=str(corpus), out=str(tmp_path / "one"))
    data = load_run_data(cfg)
    ref = train(cfg, progress=False, data=data)
    (got, _), meta = load_checkpoint(out / "ckpt_00000004", _like(cfg, data.vocab_size))
    assert meta["step"] == 4 and meta["run"]["mesh"] == "data=4,model=2"
    want, have = leaves_by_path(ref.model), leaves_by_path(got)
    assert want.keys() == have.keys()
    for k in want:
        # measured max |diff| 4.8e-7, 17% of this tolerance (jax 0.10.2 and 0.12.0.1, CPU)
        np.testing.assert_allclose(have[k], want[k], rtol=2e-6, atol=4e-8, err_msg=k)
    # measured rel 3.1e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(_losses(out), _losses(pathlib.Path(cfg.out)), rtol=1e-6)


def test_two_processes_killed_mid_checkpoint_resume_bit_exact(setup, two_process_run):
    """Both processes are killed (SIGKILL) while the step-4 checkpoint is being
    committed (tests/_sigkill_worker.py holds Orbax's commit of that step); the
    step-2 checkpoint is the newest, and two processes resumed from it end with
    the uninterrupted two-process run's weights and losses, bit for bit."""
    root, corpus, env = setup
    out, marker = root / "killed", root / "at_step"
    with reserved_port() as port:
        address = f"127.0.0.1:{port}"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(TESTS / "_sigkill_worker.py"),
                    str(marker),
                    "4",
                    *_argv(corpus, out),
                    *_distributed(address, i),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    logs = "\n".join(p.communicate()[0] for p in procs)
                    pytest.fail("a process exited before the step-4 commit:\n" + logs[-3000:])
                time.sleep(0.05)
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.communicate(timeout=60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    assert latest_checkpoint(out).name == "ckpt_00000002"

    logs = run_processes(
        lambda address, i: [
            sys.executable,
            "-m",
            "qkclip_eqx.cli.train",
            # the run's own config.json: preset, steps, mesh and data are not given again
            *["--out", str(out), "--resume", "--no-progress", "--no-plots"],
            *_distributed(address, i),
        ],
        env=env,
    )
    assert "Traceback" not in logs[0]
    cfg = preset("tiny", **FLAGS, data=str(corpus))
    like = _like(cfg, 256)
    (want, _), _ = load_checkpoint(two_process_run / "ckpt_00000004", like)
    (have, _), meta = load_checkpoint(out / "ckpt_00000004", like)
    assert meta["step"] == 4
    want, have = leaves_by_path(want), leaves_by_path(have)
    assert want.keys() == have.keys()
    for k in want:
        np.testing.assert_array_equal(have[k], want[k], err_msg=k)
    assert _losses(out) == _losses(two_process_run)
