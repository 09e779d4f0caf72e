"""scripts/bench_accelerator.py runs on the CPU at a tiny shape, trains the
preset's precision (f32 state, bf16 compute), and counts the model's FLOPs."""

import json

import pytest

from builders import load_script

TINY = dict(
    n_layers=1,
    dim=32,
    n_heads=2,
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    mlp_hidden=48,
    block_size=8,
)
BATCH, SEQ, VOCAB = 2, 16, 256


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_accelerator")


def test_runs_tiny_and_reports(bench, tmp_path):
    argv = [
        "--shape",
        "small",
        "--batch",
        str(BATCH),
        "--seq",
        str(SEQ),
        "--steps",
        "2",
        "--warmup",
        "0",
        "--peak-tflops",
        "0.5",
        "--json",
        str(tmp_path / "b.json"),
    ]
    for k, v in TINY.items():
        argv += ["--set", f"{k}={v}"]
    out = bench.main(argv)
    assert json.loads((tmp_path / "b.json").read_text()) == out
    assert out["shape"]["n_layers"] == 1 and out["shape"]["kernel"] == "blockwise"
    assert out["shape"]["param_dtype"] == "float32" and out["shape"]["compute_dtype"] == "bfloat16"
    assert out["param_and_state_dtypes"] == ["float32"]

    # the matmul parameters counted by hand from the shapes above
    d, h, nope, rope, v = TINY["dim"], TINY["n_heads"], 8, 4, 8
    per_layer = (
        16 * d
        + h * (nope + rope) * 16
        + (8 + rope) * d
        + h * (nope + v) * 8
        + d * h * v
        + 3 * d * TINY["mlp_hidden"]
    )
    n = per_layer + VOCAB * d
    assert out["matmul_params"] == n
    tokens = BATCH * SEQ
    flops = 6 * n * tokens + 6 * 2 * h * (nope + rope + v) * SEQ / 2 * tokens
    assert out["model_tflops_per_step"] == pytest.approx(flops / 1e12, rel=1e-12)
    assert out["tokens_per_s"] == pytest.approx(tokens / out["step_s_median"], rel=1e-15)
    assert out["mfu"] == pytest.approx(out["achieved_tflops"] / 0.5, rel=1e-15)  # measured exact
    assert out["peak_memory_bytes"] > 0


def test_peak_by_device_kind(bench):
    assert bench.default_peak_tflops("NVIDIA H200") == 989.0
    assert bench.default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.default_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.default_peak_tflops("TPU v4") == 275.0
    assert bench.default_peak_tflops("cpu") is None
