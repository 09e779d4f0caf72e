"""scripts/bench_speed.py: its FLOP count matches the model it times, and it runs."""

import mmap

import equinox as eqx
import jax
import numpy as np

import qkclip_eqx as qc
from builders import load_script


def _load():
    return load_script("bench_speed")


TINY = [
    "--layers",
    "2",
    "--dim",
    "32",
    "--heads",
    "2",
    "--q-lora",
    "16",
    "--kv-lora",
    "8",
    "--nope",
    "8",
    "--rope",
    "4",
    "--v",
    "8",
    "--mlp",
    "48",
    "--vocab",
    "64",
    "--seq",
    "16",
    "--batch",
    "2",
    "--rounds",
    "1",
    "--piece-rounds",
    "1",
    "--peak-n",
    "128",
]


def test_flops_count_the_models_own_matrices():
    """6 x (matmul parameters) x tokens, where the matmul parameters are the
    model's weights other than the embedding and the norm gains (counted here
    from the built Transformer, not from the script's table)."""
    bench = _load()
    a = bench.parse_args(TINY)
    model = eqx.filter_eval_shape(qc.Transformer, bench.model_config(a), key=jax.random.key(0))
    leaves = [
        (p, x)
        for p, x in jax.tree_util.tree_leaves_with_path(model)
        if isinstance(x, jax.ShapeDtypeStruct)
    ]
    names = [(jax.tree_util.keystr(p), x) for p, x in leaves]
    matmul_params = sum(
        int(np.prod(x.shape)) for name, x in names if "embed" not in name and "norm" not in name
    )
    flops = bench.model_flops(a)
    assert flops["matmuls"] == 6 * matmul_params * a.batch * a.seq
    assert flops["total"] == flops["matmuls"] + flops["attention"] + flops["newton_schulz"]


def test_runs_without_torch(capsys):
    _load().main([*TINY, "--torch-python", ""])
    out = capsys.readouterr().out
    assert "no --torch-python" in out and "qkclip_eqx" in out and "MFU" in out
    assert "faults" in out and "sys ms" in out


def test_counts_the_page_faults_of_the_call():
    """Touching a fresh 64 MiB anonymous mapping page by page faults at least
    once per 2 MiB (once per 4 KiB page without transparent huge pages)."""
    bench = _load()
    size = 64 << 20

    def touch():
        with mmap.mmap(-1, size) as m:
            for i in range(0, size, mmap.PAGESIZE):
                m[i] = 1

    seconds, faults, system = bench._timed_with_faults(touch)
    assert faults >= size // (2 << 20)
    assert seconds > 0 and system >= 0
