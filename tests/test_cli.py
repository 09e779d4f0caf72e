"""qkclip-train as a user meets it: a config.json that loads back, --resume from
the run's own config (only the flags given change), a mistyped --out or a
finished run said in one line, help for every flag with the preset's value,
one-line errors, a start-up summary, and a tokens/s that does not jump."""

import contextlib
import dataclasses
import io
import json
import re
import typing

import jax
import numpy as np
import pytest

from builders import synthetic_text, tiny_tokenizer
from qkclip_eqx import GQAConfig, MLAConfig, MoEConfig, RunConfig, TransformerConfig, YaRN, load_run
from qkclip_eqx._loglines import train_flops_per_token
from qkclip_eqx._run_config import FIELD_DOCS, MAY_CHANGE, MUST_MATCH, preset
from qkclip_eqx._train import _MetricsLog
from qkclip_eqx.cli import train as train_cli

TINY = ["--preset", "tiny", "--steps", "4", "--ckpt-every", "2", "--eval-every", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(synthetic_text(100_000, seed=5))
    return path


def _train(capsys, *args):
    rc = train_cli.main([*args, "--no-progress", "--no-plots"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """A 4-step tiny run at tau 50 (not the preset's), and what it printed."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # capsys is per test; this fixture is per module
        rc = train_cli.main(
            [*TINY, "--tau", "50", "--data", str(corpus), "--out", str(out)]
            + ["--no-progress", "--no-plots"]
        )
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


def test_config_json_round_trips(finished, corpus):
    out, _ = finished
    want = preset(
        "tiny", steps=4, ckpt_every=2, eval_every=2, tau=50.0, data=str(corpus), out=str(out)
    )
    assert RunConfig.from_json(out / "config.json") == want
    assert RunConfig.from_json(want.to_json()) == want
    assert json.loads((out / "config.json").read_text())["data_description"]  # kept, and skipped


def test_unknown_removed_or_mistyped_fields_are_named(tmp_path):
    good = json.loads(preset("tiny").to_json())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**good, "n_layerz": 3, "warmup": 5}))
    with pytest.raises(
        ValueError, match=r"config.json: not fields of RunConfig .*: n_layerz, warmup"
    ):
        RunConfig.from_json(path)
    path.write_text(json.dumps({**good, "steps": "600", "attention": "mqa"}))
    with pytest.raises(
        ValueError,
        match=r"config.json: RunConfig.attention must be one of 'mla', 'gqa', got 'mqa' "
        r"\(MQA is attention='gqa' with n_kv_heads=1\); RunConfig.steps must be int, got '600'",
    ):
        RunConfig.from_json(path)
    path.write_text(json.dumps({**good, "tau": -1}))
    with pytest.raises(ValueError, match="config.json: RunConfig.tau must be > 0"):
        RunConfig.from_json(path)


def test_resume_takes_the_runs_own_config_and_only_the_flags_given(finished, capsys):
    out, _ = finished
    # no --preset tiny, no --data, no --tau: all from the run's config.json
    rc, text, err = _train(capsys, "--out", str(out), "--resume", "--steps", "6")
    assert rc == 0, err
    assert "meta mismatch" not in text + err
    changes = [line for line in text.splitlines() if line.startswith("resume changes")]
    assert changes[0] == f"resume changes steps: 4 -> 6: {MAY_CHANGE['steps']}"
    assert not any("tau" in line or "n_layers" in line for line in changes)
    cfg = RunConfig.from_json(out / "config.json")
    assert (cfg.steps, cfg.tau, cfg.n_layers) == (6, 50.0, 2)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
    # finished: said so, in one line, with no "nan"
    rc, text, err = _train(capsys, "--out", str(out), "--resume")
    assert rc == 0 and err == ""
    assert text == (
        f"{out} is finished: its newest checkpoint is step 6 of 6. "
        "To train on, resume with --steps N (N > 6).\n"
    )


def test_resume_refuses_a_must_match_change_in_one_line(finished, capsys):
    out, _ = finished
    rc, text, err = _train(capsys, "--out", str(out), "--resume", "--n-layers", "3", "--steps", "9")
    assert rc == 2 and err.count("\n") == 1
    assert "--resume cannot change n_layers (2 -> 3)" in err
    assert "n_layers" in MUST_MATCH
    rc, _, err = _train(capsys, "--out", str(out), "--resume", "--preset", "tiny")
    assert rc == 2 and "drop --preset" in err and err.count("\n") == 1


def test_resume_in_a_directory_without_checkpoint_asks_in_one_line(tmp_path, capsys):
    rc, text, err = _train(capsys, "--out", str(tmp_path / "tny"), "--resume")
    assert rc == 2 and text == ""
    assert err == (
        f"qkclip-train: error: --resume: nothing to resume in {tmp_path / 'tny'} (no such "
        "directory): check --out, or drop --resume to start a new run there\n"
    )
    (tmp_path / "empty").mkdir()
    rc, _, err = _train(capsys, "--out", str(tmp_path / "empty"), "--resume")
    assert rc == 2 and "it holds no checkpoint" in err


def test_start_up_summary_replaces_the_config_dump(finished):
    out, text = finished
    assert not re.search(r"^\s+\w+ = ", text, re.M)  # no "  field = value" dump
    head = text.splitlines()[:7]
    assert head[0] == "qkclip-train (preset tiny): 4 steps"
    assert "MLA, 2 layers, width 32, 2 heads: 34,496 parameters" in head[1]
    assert "tau 50" in head[2]
    assert head[3].startswith("  devices 1 process(es), ")
    assert "corpus.txt" in head[4]
    assert head[5] == "  tokens  4 x 32 = 128 per step, 512 in all"
    assert head[6].startswith(f"  out     {out}: checkpoints every 2 steps")
    flops = train_flops_per_token(preset("tiny").model_config(256), 32)
    assert text.splitlines()[7] == (
        f"  flops   {flops:,.0f} per token trained (6N + attention: the TFLOP/s and MFU of the "
        "log lines)"
    )


def test_help_explains_every_flag_with_the_presets_value(capsys):
    assert set(FIELD_DOCS) == {f.name for f in dataclasses.fields(RunConfig)}
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    small = preset("small")
    assert f"peak learning rate [small: {small.lr:g}]" in text  # 0.02, not RunConfig's 0.003
    assert f"(Kimi K2: 100) [small: {small.tau:g}]" in text  # 30
    squeezed = "".join(text.split())  # argparse also wraps at hyphens
    for f in dataclasses.fields(RunConfig):
        assert "".join(FIELD_DOCS[f.name].split()) in squeezed, f.name
    with pytest.raises(SystemExit):
        train_cli.main(["--preset", "tiny", "--help"])
    assert "Transformer blocks [tiny: 2]" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tau", "x"], "argument --tau: invalid float value: 'x'"),
        (["--tau", "-1"], "--tau must be > 0, got -1.0"),
        (["--rope-theta", "0"], "--rope-theta must be a positive finite number, got 0.0"),
        (
            ["--yarn-factor", "4"],
            "--yarn needs original_max_position_embeddings (the YaRN has no default)",
        ),
        (
            ["--yarn-factor", "-4", "--yarn-original-max-position-embeddings", "8"],
            "--yarn-factor must be a positive finite number, got -4.0",
        ),
        (
            ["--kernel", "dense", "--max-logit", "lse_bound"],
            "--max-logit='lse_bound' needs kernel='dot_product_attention' (kernel 'dense' "
            "computes the exact S at no extra cost)",
        ),
        (
            ["--kernel", "flash"],
            "argument --kernel: invalid choice: 'flash' (choose from 'dense', 'blockwise', "
            "'dot_product_attention')",
        ),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_flag_value_is_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        train_cli.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == f"qkclip-train: error: {message} (see qkclip-train --help)\n"


def test_none_sets_an_optional_field(tmp_path):
    from qkclip_eqx.cli._flags import Parser, add_run_flags, run_config_from_args

    parser = Parser()
    add_run_flags(parser)
    args = parser.parse_args(["--preset", "gpu-100m", "--q-lora-rank", "none", "--mode", "none"])
    cfg = run_config_from_args(args)
    assert cfg.q_lora_rank is None and cfg.mode == "clip"
    assert preset("gpu-100m").q_lora_rank == 384


class _Bar:
    def __init__(self):
        self.posts, self.n, self.total = [], 0, 7

    def set_postfix(self, post, refresh):
        self.posts.append(post)

    def update(self, n):
        self.n += n

    def reset(self, total):
        self.n = 0

    def refresh(self):
        pass


def test_tokens_per_second_in_the_bar_is_the_median_of_recent_steps(tmp_path):
    """The bar's tok/s leaves out the first step (the compile) and is the median
    of the steps since: an evaluation step (slow) and the step read just after it
    (fast) do not move it; metrics.jsonl keeps every step's own."""
    cfg = preset("tiny")  # 128 tokens per step
    bar = _Bar()
    seconds = [10.0, 0.1, 0.1, 5.0, 0.001, 0.1, 0.2]
    with (tmp_path / "m.jsonl").open("w") as f:
        log = _MetricsLog(f, cfg, None, bar)
        for i, s in enumerate(seconds):
            log.defer(i, {"first_nonfinite": np.int32(0), "loss": np.float32(1.0)}, s)
            assert log.read() is None
    shown = [p.get("tok/s") for p in bar.posts]
    assert shown[0] is None  # the first step alone: the compile, not the speed
    want = [None] + [f"{128 / np.median(seconds[1 : i + 1]):,.0f}" for i in range(1, 7)]
    assert shown == want
    assert shown[3] == "1,280" and shown[4] == "1,280"  # the 5 s and the 1 ms step
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["tokens_per_s"] for r in lines] == [128 / s for s in seconds]


def _parse(*args):
    from qkclip_eqx.cli._flags import Parser, add_run_flags, run_config_from_args

    parser = Parser()
    add_run_flags(parser)
    return run_config_from_args(parser.parse_args(list(args)))


def _other_value(tp, default):
    """A valid value of a field other than its default, from its annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in args if a != default)
    if args:  # X | None
        return _other_value(args[0], None) if default is None else None
    if tp is bool:
        return not default
    if tp is int:
        return 2 if default is None else default + 2  # even: head widths must be; 2 divides
    return 1.0 if default is None else 2.0 * default  # float


def _write(cfg):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(cfg.to_json())
    return f.name


def _model_fields():
    """(config class, field, run field) of every option of the model configs."""
    from qkclip_eqx._run_config import MODEL_OPTIONS

    run_name = {
        (cls, name): option.name
        for option in MODEL_OPTIONS.values()
        for cls, name in option.targets.items()
    }
    for cls in (MLAConfig, GQAConfig, TransformerConfig, YaRN):
        for f in dataclasses.fields(cls):
            yield cls, f, run_name.get((cls, f.name), f"yarn.{f.name}" if cls is YaRN else None)


# model-config fields that are no run option, each with why
NOT_RUN_OPTIONS = {
    (TransformerConfig, "vocab_size"),  # from the data (the tokenizer)
    (TransformerConfig, "attention"),  # RunConfig.attention picks MLAConfig or GQAConfig
    (MLAConfig, "causal"),  # a language-model run is causal
    (GQAConfig, "causal"),
}


@pytest.mark.parametrize(
    "cls,field,run_field",
    [pytest.param(*x, id=f"{x[0].__name__}.{x[1].name}") for x in _model_fields()],
)
def test_every_model_option_is_a_flag_and_round_trips_through_config_json(cls, field, run_field):
    """Adding a model option is one declaration: every field of the model's
    configs (but NOT_RUN_OPTIONS) is a qkclip-train flag that reaches the
    model config, and round-trips through config.json."""
    from qkclip_eqx._options import hints_of, optional_config

    if (cls, field.name) in NOT_RUN_OPTIONS:
        assert run_field is None
        return
    assert run_field is not None, f"{cls.__name__}.{field.name} is no RunConfig field"
    attention = "gqa" if cls is GQAConfig else "mla"
    if field.name == "moe":  # a nested config: one flag per field, and --moe none
        cfg = _parse(
            "--preset",
            "tiny",
            "--moe-n-routed-experts",
            "4",
            "--moe-num-experts-per-tok",
            "2",
            "--moe-moe-intermediate-size",
            "8",
            "--moe-n-group",
            "2",
        )
        want = MoEConfig(
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_group=2
        )
        assert cfg.model_config().moe == want
        assert RunConfig.from_json(cfg.to_json()).model_config().moe == want
        assert _parse("--config", _write(cfg), "--moe", "none").moe is None
        return
    if optional_config(hints_of(cls)[field.name]) is not None:  # yarn: its own flags
        cfg = _parse(
            "--preset",
            "tiny",
            "--yarn-factor",
            "4",
            "--yarn-original-max-position-embeddings",
            "64",
        )
        assert cfg.model_config().attention.yarn == YaRN(4.0, 64)
        assert _parse("--config", _write(cfg), "--yarn", "none").yarn is None
        return
    # the kernel whose options (max_logit, implementation) all have other valid values
    base = ["--preset", "tiny", "--attention", attention, "--kernel", "dot_product_attention"]
    base += ["--compute-dtype", "bfloat16"]
    yarn = ["--yarn-factor", "4", "--yarn-original-max-position-embeddings", "64"]
    default = preset("tiny", kernel="dot_product_attention", compute_dtype="bfloat16")
    if cls is YaRN:
        base, default = base + yarn, dataclasses.replace(default, yarn=YaRN(4.0, 64))
        current = getattr(default.yarn, field.name)
    else:
        current = getattr(default, run_field)
        if current is None and run_field == "rope_layout":  # each attention's own default
            current = field.default
    value = _other_value(hints_of(cls)[field.name], current)
    if field.name == "implementation":
        value = "cudnn" if current == "xla" else "xla"
    cfg = _parse(
        *base,
        "--" + run_field.replace(".", "-").replace("_", "-"),
        str(value).lower() if isinstance(value, bool) else "none" if value is None else str(value),
    )
    model = cfg.model_config()
    owner = {TransformerConfig: model, YaRN: getattr(model.attention, "yarn", None)}.get(
        cls, model.attention
    )
    assert type(owner) is cls
    assert getattr(owner, field.name) == value, (run_field, value)
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert RunConfig.from_json(cfg.to_json()).model_config() == model


def _enum_fields():
    from qkclip_eqx._options import hints_of

    for name, tp in hints_of(RunConfig).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        literal = (
            tp
            if typing.get_origin(tp) is typing.Literal
            else next((a for a in args if typing.get_origin(a) is typing.Literal), None)
        )
        if literal is not None:
            yield name, typing.get_args(literal)


@pytest.mark.parametrize("name,allowed", list(_enum_fields()))
def test_every_enum_field_refuses_a_typo_from_every_entry_point(tmp_path, capsys, name, allowed):
    """Python, config.json and the CLI each refuse a typo in an enum-like
    field, naming the field (or the flag) and the allowed values."""
    typo = allowed[0][:-1] + "x"
    listed = ", ".join(repr(a) for a in allowed)
    with pytest.raises(ValueError, match=re.escape(f"RunConfig.{name} must be one of {listed}")):
        RunConfig(**{name: typo})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**preset("tiny").to_dict(), name: typo}))
    pattern = f"{path}: RunConfig.{name} must be one of {listed}"
    with pytest.raises(ValueError, match=re.escape(pattern)):
        RunConfig.from_json(path)
    flag = "--" + name.replace("_", "-")
    with pytest.raises(SystemExit):
        train_cli.main([flag, typo])
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: '{typo}'" in err
    assert all(repr(a) in err for a in allowed)


def test_schedule_typo_no_longer_trains_on_a_constant_lr():
    with pytest.raises(ValueError, match="RunConfig.schedule must be one of 'wsd', 'cosine'"):
        RunConfig(schedule="cosin")
    with pytest.raises(ValueError, match=r"RunConfig.steps must be int, got '10'"):
        RunConfig(steps="10")


def test_mesh_axes_come_from_the_library():
    """RunConfig.mesh takes exactly the axes of qkclip_eqx._parallel.AXES."""
    from qkclip_eqx._parallel import AXES

    every = ",".join(f"{a}=1" for a in AXES)
    assert RunConfig(mesh=every).mesh_shape() == dict.fromkeys(AXES, 1)
    assert RunConfig(mesh=f"{AXES[-1]}=2").mesh_shape()[AXES[-1]] == 2
    for bad in ("bogus=2", f"{AXES[0]}=0", f"{AXES[0]}=2,{AXES[0]}=1", f"{AXES[0]}"):
        with pytest.raises(ValueError, match=r"RunConfig.mesh must look like .*" + AXES[-1]):
            RunConfig(mesh=bad)


def test_a_new_run_starts_from_a_config_file_with_flags_overriding(finished, tmp_path, capsys):
    """--config FILE: another run's config.json (records and all) is the start,
    flags override it; with --preset or --resume it is refused in one line."""
    from qkclip_eqx.cli._flags import Parser, add_run_flags, run_config_from_args

    out, _ = finished
    parser = Parser()
    add_run_flags(parser)
    args = parser.parse_args(["--config", str(out / "config.json"), "--seed", "3"])
    cfg = run_config_from_args(args)
    assert cfg == dataclasses.replace(RunConfig.from_json(out / "config.json"), seed=3)
    rc, _, err = _train(capsys, "--config", str(out / "config.json"), "--out", str(out), "--resume")
    assert rc == 2 and "drop it" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        train_cli.main(["--config", str(out / "config.json"), "--preset", "tiny"])
    assert "--config and --preset both give the starting values" in capsys.readouterr().err
    yarn_cfg = tmp_path / "yarn.json"
    yarn_cfg.write_text(preset("tiny", yarn=YaRN(4.0, 64)).to_json())
    args = parser.parse_args(["--config", str(yarn_cfg), "--yarn-factor", "8"])
    assert run_config_from_args(args).yarn == YaRN(8.0, 64)  # one field changed, the rest kept
    args = parser.parse_args(["--config", str(yarn_cfg), "--yarn", "none"])
    assert run_config_from_args(args).yarn is None


def test_config_json_checkpoints_and_metrics_record_provenance(finished):
    """config.json and each checkpoint's metadata say what ran the run: the
    versions, the git commit of the checkout, the devices and mesh, the start
    time; each metrics.jsonl line holds its wall-clock time."""
    import datetime
    import pathlib
    import platform
    import subprocess

    import equinox
    import jax
    import optax

    import qkclip_eqx
    from qkclip_eqx._checkpoint import latest_checkpoint, read_meta

    out, _ = finished
    prov = json.loads((out / "config.json").read_text())["provenance"]
    versions = prov["versions"]
    assert versions["python"] == platform.python_version()
    assert (versions["jax"], versions["equinox"], versions["optax"]) == (
        jax.__version__,
        equinox.__version__,
        optax.__version__,
    )
    source = pathlib.Path(qkclip_eqx.__file__).parent
    git = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert (prov["git"] or {}).get("sha") == (git.stdout.strip() if git.returncode == 0 else None)
    assert prov["devices"]["count"] == len(jax.devices()) and prov["mesh"] is None
    started = datetime.datetime.fromisoformat(prov["started"]).timestamp()
    assert read_meta(latest_checkpoint(out))["provenance"] == prov
    times = [json.loads(x)["time"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the newest line is of the newest invocation (a resume, in this module), as is the record
    assert times == sorted(times) and started - 1 <= times[-1] <= started + 3600


def test_the_eta_leaves_out_the_first_step_which_compiles(tmp_path):
    """A resumed run at step 50 of 100 whose first step took 1000 s (the
    compile) and every later one 1 s: the bar's rate and ETA are those of the
    1 s steps, not hours."""
    from tqdm import tqdm

    clock = [0.0]
    bar = tqdm(total=100, initial=50, file=io.StringIO(), mininterval=0, smoothing=0.3)
    bar._time = lambda: clock[0]
    with (tmp_path / "m.jsonl").open("w") as f:
        log = _MetricsLog(f, preset("tiny"), None, bar)
        for i, s in enumerate([1000.0, 1.0, 1.0, 1.0, 1.0]):
            clock[0] += s
            log.defer(50 + i, {"first_nonfinite": np.int32(0), "loss": np.float32(1.0)}, s)
            assert log.read() is None
    d = bar.format_dict
    assert bar.n == 55 and d["elapsed"] == 4.0
    assert d["rate"] == pytest.approx(1.0)  # exact: EMA of dn = dt = 1
    remaining = (d["total"] - d["n"]) / d["rate"]
    assert remaining == pytest.approx(45.0)  # not (1004 s / 5 steps) x 45 steps


def test_flops_of_a_moe_model_count_the_activated_experts():
    """A MoE model's FLOPs per token: a hand count with k of the E routed
    experts per token (the router, shared experts and expert bias in full),
    which is less than the count of every expert's weights."""
    cfg = preset("tiny", n_layers=3)
    moe = MoEConfig(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    )  # fmt: skip
    mc = dataclasses.replace(cfg.model_config(256), moe=moe)
    d, h, L = cfg.dim, cfg.n_heads, cfg.n_layers
    dqk, dv, r = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    mla = d * h * dqk + d * (r + cfg.qk_rope_head_dim) + r * h * (cfg.qk_nope_head_dim + dv)
    mla += h * dv * d + r
    dense = 3 * d * cfg.mlp_hidden
    routed_active = 2 * 3 * 16 * d  # k = 2 experts of 3 matrices (16 x d)
    moe_layer = 8 * d + 8 + routed_active + 3 * 16 * d  # router, bias, routed, one shared
    n = L * (mla + 2 * d) + 1 * dense + 2 * moe_layer + d + d * 256
    want = 6 * n + 6 * L * cfg.seq_len * h * (dqk + dv)
    assert train_flops_per_token(mc, cfg.seq_len) == want
    every_expert = 6 * (n + 2 * 6 * 3 * 16 * d) + 6 * L * cfg.seq_len * h * (dqk + dv)
    assert want < every_expert


def test_plain_log_lines_with_tflops_and_mfu(finished, corpus, tmp_path, capsys):
    """--no-progress (or stdout not a terminal): a line every --log-every
    steps, at each evaluation and at the end, with TFLOP/s from the model's
    FLOPs per token and MFU against --peak-tflops; the FLOPs are 6N plus
    attention, checked against a hand count of the tiny preset's MLA model."""
    cfg = preset("tiny")
    mc = cfg.model_config(256)
    # hand count: per layer, MLA with a full query projection, an untied head
    d, h, L = cfg.dim, cfg.n_heads, cfg.n_layers
    dqk, dv, r = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    mla = d * h * dqk + d * (r + cfg.qk_rope_head_dim) + r * h * (cfg.qk_nope_head_dim + dv)
    mla += h * dv * d + r  # output projection, latent norm
    mlp = 3 * d * cfg.mlp_hidden  # SwiGLU
    n = L * (mla + mlp + 2 * d) + d + d * 256  # two norms per block, final norm, head
    want = 6 * n + 6 * L * cfg.seq_len * h * (dqk + dv)
    assert train_flops_per_token(mc, cfg.seq_len) == want
    out = tmp_path / "lines"
    rc, text, _ = _train(
        capsys,
        *TINY, "--steps", "5", "--data", str(corpus), "--out", str(out),
        "--log-every", "2", "--peak-tflops", "0.5",
    )  # fmt: skip
    assert rc == 0
    lines = [x for x in text.splitlines() if x.startswith("step=")]
    assert [x.split()[0] for x in lines] == ["step=2/5", "step=4/5", "step=5/5"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert f"loss={records[-1]['loss']:.4f}" in last and "val_loss=" in last
    assert f"heads_clipped={records[-1]['heads_clipped']}/4" in last
    assert f"heads_over_tau={records[-1]['heads_over_tau']}/4" in last
    speed = sorted(r["tokens_per_s"] for r in records[1:])[2]  # median of steps 1..4
    tflops = speed * want / 1e12
    assert f"tok/s={speed:,.0f}" in last and f"TFLOP/s={tflops:.3g}" in last
    assert f"MFU={100 * tflops / (0.5 * 8):.2f}%" in last  # 8 simulated devices
    with pytest.raises(SystemExit):
        train_cli.main([*TINY, "--data", str(corpus), "--out", str(tmp_path / "x"),
                        "--log-every", "0", "--no-plots"])  # fmt: skip
    assert "--log-every must be >= 1, got 0" in capsys.readouterr().err


def test_a_token_file_larger_than_memory_trains(tmp_path, capsys, monkeypatch):
    """A sparse 32 GiB raw uint16 file (more than the 24 GiB of RAM of the
    machine the suite was written on) with --vocab-size trains: no scan, and
    the batches touch a few pages of it (the resident memory of its mapping,
    from /proc/self/smaps, after each batch)."""
    from qkclip_eqx import _train as train_mod
    from test_data import _mapped_rss_kib

    path = tmp_path / "huge.u16"
    with path.open("wb") as f:
        f.truncate(32 << 30)
        f.seek(1 << 30)
        f.write((np.arange(100_000) % 200).astype("<u2").tobytes())
    seen = []

    def get_batch(*a, **k):
        batch = real(*a, **k)
        seen.append(_mapped_rss_kib(path))
        return batch

    real = train_mod.get_batch
    monkeypatch.setattr(train_mod, "get_batch", get_batch)
    out = tmp_path / "run"
    rc, text, err = _train(
        capsys, *TINY, "--steps", "3", "--data", str(path), "--vocab-size", "256",
        "--out", str(out),
    )  # fmt: skip
    assert rc == 0, err
    assert "token file (uint16)" in text and "vocab 256" in text
    # measured: under 1 MiB (832 KiB replaying these batches and evaluations alone)
    assert len(seen) == 3 and max(seen) < 4 * 1024
    small = tmp_path / "small.u16"
    (np.arange(20_000) % 200).astype("<u2").tofile(small)
    rc, _, err = _train(
        capsys, *TINY, "--data", str(small), "--vocab-size", "100", "--out", str(tmp_path / "b")
    )
    assert rc == 2
    assert err.startswith("qkclip-train: error: --vocab-size 100: the batch of step 0 holds")


def test_a_monitor_runs_table_stars_the_heads_above_tau(capsys, tmp_path):
    """The final table says "'*' = above tau" and, for a monitor run too,
    stars exactly the heads whose S is above tau; a run with S off shows no
    tau."""
    import equinox as eqx
    import jax

    from qkclip_eqx import Transformer
    from qkclip_eqx._train import RunResult

    cfg = preset("tiny", optimizer="muon", tau=5.0)
    assert cfg.mode == "monitor"
    model = eqx.filter_eval_shape(Transformer, cfg.model_config(), key=jax.random.key(0))
    m = {"loss": 1.0, "max_logits": [[4.0, 6.0], [5.5, None]]}
    train_cli._report(RunResult(model, 20, m, tmp_path, "done"), cfg)
    table = capsys.readouterr().out.splitlines()
    assert "(tau = 5.0, '*' = above tau)" in table[-4]
    assert table[-2:] == ["    0     4.00     6.00*", "    1     5.50*     nan "]
    train_cli._report(RunResult(model, 20, m, tmp_path, "done"), preset("tiny", mode="off"))
    text = capsys.readouterr().out
    assert "*" not in text and "tau" not in text


def test_generate_takes_a_prompt_that_is_not_utf8_as_its_bytes():
    """A byte-level model's prompt is bytes: `$'def \\xff\\xfe('` reaches
    Python as surrogates and is the bytes typed, not a codec error."""
    import argparse
    import os

    from qkclip_eqx.cli import generate as gen_cli

    prompt = os.fsdecode(b"def \xff\xfe(")  # what sys.argv holds for those bytes
    args = argparse.Namespace(prompt=prompt, prompt_tokens=None)
    np.testing.assert_array_equal(gen_cli._prompt(args, 256), list(b"def \xff\xfe("))


def test_a_checkpoint_error_names_the_path_once(tmp_path, capsys):
    from qkclip_eqx.cli import generate as gen_cli

    bad = tmp_path / "ckpt_00000001"
    bad.write_bytes(b"garbage")
    assert gen_cli.main([str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count(str(bad)) == 1 and "not a qkclip checkpoint" in err, err


def test_generate_encodes_a_prompt_with_the_runs_own_tokenizer(tmp_path):
    import argparse

    from qkclip_eqx.cli import generate as gen_cli

    tok = gen_cli._tokenizer(str(tiny_tokenizer(tmp_path / "tokenizer.json")))
    args = argparse.Namespace(prompt="def main(x):\n", prompt_tokens=None)
    ids = gen_cli._prompt(args, 320, tok)
    assert ids.tolist() == tok.encode("def main(x):\n", add_special_tokens=False).ids
    assert tok.decode(ids.tolist()) == "def main(x):\n"
    with pytest.raises(ValueError, match="the run's tokenizer .*nope.json"):
        gen_cli._tokenizer("nope.json")


CLOCK = {"time", "tokens_per_s"}
MOE = ["--n-layers", "3", "--moe-n-routed-experts", "4", "--moe-num-experts-per-tok", "2"]
MOE += ["--moe-moe-intermediate-size", "16", "--steps", "6", "--ckpt-every", "2"]


def test_a_crashed_moe_run_resumes_bit_for_bit(corpus, tmp_path, capsys, monkeypatch):
    """A MoE run (the flags of docs/moe.md) that crashes after step 3 resumes,
    from its own config.json, at the step-2 checkpoint; it ends with the
    uninterrupted run's weights, expert biases and optimizer state bit for bit,
    and every step's loss and expert loads are logged once, equal to that run's."""
    base = ["--preset", "tiny", *MOE, "--eval-every", "3", "--data", str(corpus)]
    rc, _, err = _train(capsys, *base, "--out", str(tmp_path / "straight"))
    assert rc == 0, err

    def crash_after_3(cfg, *, on_step=None, **kwargs):
        def hook(step, metrics):
            if on_step is not None:
                on_step(step, metrics)
            if step == 3:
                raise RuntimeError("crashed after step 3")

        return train(cfg, on_step=hook, **kwargs)

    train = train_cli.train
    crashed = tmp_path / "crashed"
    monkeypatch.setattr(train_cli, "train", crash_after_3)
    with pytest.raises(RuntimeError, match="crashed after step 3"):
        _train(capsys, *base, "--out", str(crashed))
    monkeypatch.setattr(train_cli, "train", train)
    assert sorted(p.name for p in crashed.glob("ckpt_*")) == ["ckpt_00000002"]
    rc, text, err = _train(capsys, "--out", str(crashed), "--resume")
    assert rc == 0, err
    assert "resume changes" not in text

    def log(run):  # every step's metrics but the clock's (time, tokens_per_s)
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in CLOCK} for x in lines]

    want, have = log("straight"), log("crashed")
    assert [m["step"] for m in have] == list(range(6))
    assert want == have  # loss, S, grad norm, expert_load, balance_loss, val_loss, ...
    assert all(len(m["expert_load"]) == 2 for m in want)  # the two MoE layers of three
    want_run, have_run = load_run(tmp_path / "straight"), load_run(crashed)
    assert have_run.step == 6 and have_run.model.moe_blocks is not None
    want_leaves = jax.tree.leaves((want_run.model, want_run.opt_state))
    have_leaves = jax.tree.leaves((have_run.model, have_run.opt_state))
    for a, b in zip(want_leaves, have_leaves, strict=True):
        np.testing.assert_array_equal(a, b)
