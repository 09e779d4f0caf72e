"""A training run's settings: [`qkclip_eqx.RunConfig`][], the presets, the
optimizer and lr schedule they build, and what a resume may change.

Every field of `RunConfig` is a flag of `qkclip-train`. The module runs past
500 lines because each field's help line (`FIELD_DOCS`) and the resume rule
(`MUST_MATCH`, `MAY_CHANGE`) sit here, beside the fields they describe, so
that a new field cannot miss them (tests check both tables cover every field).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import types
import typing
from typing import Any, Literal

import optax

from ._clip import MODES, Mode, check_tau_alpha
from ._config import (
    Dtype,
    GQAConfig,
    Implementation,
    Kernel,
    MaxLogit,
    MLAConfig,
    TransformerConfig,
)
from ._optim import muon_adamw, warmup_cosine, wsd

Optimizer = Literal["muonclip", "muon", "adamw"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. `optimizer="muonclip"` is Muon with
    QK-Clip (`mode` clip by default); `"muon"` is Muon that never clips
    (`monitor` or `off`); `"adamw"` monitors by default and clips with
    `mode="clip"` (QK-Clip does not depend on the optimizer)."""

    # model
    attention: Literal["mla", "gqa"] = "mla"
    n_layers: int = 4
    dim: int = 128
    n_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_kv_heads: int | None = None
    head_dim: int = 32
    mlp_hidden: int = 384
    kernel: Kernel = "dense"
    block_size: int = 128
    # kernel="dot_product_attention" only: S exact or the LSE bound, and the backend
    max_logit: MaxLogit = "exact"
    attention_implementation: Implementation | None = None
    # parameters and optimizer state (keep float32), and the matmuls' dtype:
    # see TransformerConfig
    param_dtype: Dtype = "float32"
    compute_dtype: Dtype = "float32"
    # optimisation
    optimizer: Optimizer = "muonclip"
    mode: Mode | None = None  # None: clip for muonclip, else monitor
    tau: float = 100.0
    alpha: float = 0.5
    clip_until: int | None = None  # clip mode: clip the updates of steps < clip_until only
    lr: float = 3e-3
    weight_decay: float = 0.1
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    final_lr_fraction: float = 0.0  # the lr the schedule ends at, as a fraction of lr
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    accum_steps: int = 1
    seed: int = 0
    # data, records
    data: str | None = None
    max_bytes: int = 8_000_000
    vocab_size: int | None = None  # a token file's vocabulary, stated (None: scanned)
    tokenizer: str | None = None  # a tokenizer.json for text data
    out: str = "runs/default"
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    keep: int = 2
    label: str | None = None
    # devices: e.g. "data=4,model=2" (absent axes have size 1); None: one device
    mesh: str | None = None

    def __post_init__(self) -> None:
        self.mesh_shape()  # validates the mesh string
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "accum_steps",
            "eval_every",
            "eval_batches",
            "ckpt_every",
            "keep",
            "max_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"RunConfig.{name} must be > 0, got {getattr(self, name)}")
        try:
            check_tau_alpha(self.tau, self.alpha)
        except ValueError as e:
            raise ValueError(f"RunConfig.{e}") from None
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(
                f"RunConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}"
            )
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"RunConfig.vocab_size must be > 0 or None, got {self.vocab_size}")
        if not self.lr > 0:
            raise ValueError(f"RunConfig.lr must be > 0, got {self.lr}")
        if self.optimizer not in ("muonclip", "muon", "adamw"):
            raise ValueError(
                f"RunConfig.optimizer must be muonclip, muon or adamw, got {self.optimizer!r}"
            )
        if self.mode is None:
            object.__setattr__(self, "mode", "clip" if self.optimizer == "muonclip" else "monitor")
        if self.mode not in MODES:
            raise ValueError(f"RunConfig.mode must be clip, monitor or off, got {self.mode!r}")
        if self.optimizer == "muon" and self.mode == "clip":
            raise ValueError(
                "RunConfig.mode='clip' with optimizer='muon': that is optimizer='muonclip'"
            )
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"RunConfig.batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}"
            )
        self.model_config()  # validates the model fields, naming the bad one

    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON-ready values."""
        return dataclasses.asdict(self)

    def to_json(self, **records: Any) -> str:
        """The config as the JSON of a run's `config.json`: every field, then
        `records` (keys of `RECORD_KEYS`, such as `data_description`).
        [`qkclip_eqx.RunConfig.from_json`][] reads it back to an equal config."""
        bad = sorted(set(records) - set(RECORD_KEYS))
        if bad:
            raise ValueError(f"RunConfig.to_json: {bad} are not records of config.json")
        return json.dumps({**self.to_dict(), **records}, indent=1)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> RunConfig:
        """The config of `values` (field name to value; `RECORD_KEYS` are
        skipped, a missing field takes its default).

        **Raises:**

        `ValueError` naming every key that is not a field (unknown, misspelled
        or removed) and every value of the wrong type, with `source` (the file).
        """
        if not isinstance(values, dict):
            raise ValueError(
                f"{source}: a run config is a JSON object, got {type(values).__name__}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - set(RECORD_KEYS))
        if unknown:
            raise ValueError(
                f"{source}: not fields of RunConfig (unknown, misspelled or removed): "
                + ", ".join(unknown)
            )
        hints = typing.get_type_hints(cls)
        wrong = [
            f"{name}={value!r} (expected {_type_name(hints[name])})"
            for name, value in values.items()
            if name in fields and not _fits(value, hints[name])
        ]
        if wrong:
            raise ValueError(f"{source}: wrong type: " + ", ".join(wrong))
        try:
            return cls(**{k: _as_field(v, hints[k]) for k, v in values.items() if k in fields})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> RunConfig:
        """The config of a `config.json` (a path, or its text), as
        [`qkclip_eqx.RunConfig.to_json`][] and `qkclip-train` write it.

        **Raises:**

        `ValueError` naming the file and every unknown field or wrong value;
        `OSError` when the file cannot be read.
        """
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            path = pathlib.Path(text_or_path)
            text, source = path.read_text(), str(path)
        else:
            text, source = str(text_or_path), "config JSON"
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not JSON ({e})") from None
        return cls.from_dict(values, source=source)

    def make_optimizer(self) -> optax.GradientTransformation:
        """The run's optimizer: [`qkclip_eqx.muon_adamw`][] (Muon and MuonClip) or
        AdamW, on the run's lr schedule and weight decay."""
        return optimizer(self)

    def mesh_shape(self) -> dict[str, int] | None:
        """`mesh` parsed: `{"data": d, "model": m, "seq": s}`, or None.

        Raises `ValueError` when `mesh` does not look like
        `"data=4,model=2,seq=1"`.
        """
        if self.mesh is None:
            return None
        shape = {"data": 1, "model": 1, "seq": 1}
        for part in self.mesh.split(","):
            name, _, size = part.partition("=")
            if name.strip() not in shape or not size.strip().isdigit() or int(size) < 1:
                raise ValueError(
                    f"RunConfig.mesh must look like 'data=4,model=2,seq=1', got {self.mesh!r}"
                )
            shape[name.strip()] = int(size)
        return shape

    def model_config(self, vocab_size: int = 256) -> TransformerConfig:
        """The [`qkclip_eqx.TransformerConfig`][] of the run's model (MLA or GQA
        by `attention`), for a vocabulary of `vocab_size` tokens."""
        if self.attention == "mla":
            attn = MLAConfig(
                dim=self.dim,
                n_heads=self.n_heads,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                kernel=self.kernel,
                block_size=self.block_size,
                max_logit=self.max_logit,
                implementation=self.attention_implementation,
            )
        else:
            attn = GQAConfig(
                dim=self.dim,
                n_heads=self.n_heads,
                n_kv_heads=self.n_kv_heads,
                head_dim=self.head_dim,
                kernel=self.kernel,
                block_size=self.block_size,
                max_logit=self.max_logit,
                implementation=self.attention_implementation,
            )
        return TransformerConfig(
            vocab_size=vocab_size,
            n_layers=self.n_layers,
            mlp_hidden=self.mlp_hidden,
            attention=attn,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
        )


#: One line per field of [`qkclip_eqx.RunConfig`][]: the help of its
#: `qkclip-train` flag.
FIELD_DOCS: dict[str, str] = {
    "attention": "attention: mla (DeepSeek-V3's latent attention) or gqa (grouped-query; MHA when n-kv-heads = n-heads)",
    "n_layers": "Transformer blocks",
    "dim": "model width",
    "n_heads": "attention (query) heads per layer",
    "q_lora_rank": "mla: rank of the query's low-rank projection (none: a full projection)",
    "kv_lora_rank": "mla: rank of the compressed key/value latent",
    "qk_nope_head_dim": "mla: per-head query/key width without rotary embedding",
    "qk_rope_head_dim": "mla: per-head query/key width with rotary embedding (shared key)",
    "v_head_dim": "mla: per-head value width",
    "n_kv_heads": "gqa: key/value heads (none: n-heads, i.e. MHA)",
    "head_dim": "gqa: per-head width",
    "mlp_hidden": "hidden width of each block's MLP",
    "kernel": "attention kernel: dense, blockwise (FlashAttention-style), or dot_product_attention (jax.nn)",
    "block_size": "blockwise kernel: query/key block length",
    "max_logit": "dot_product_attention kernel: S exact, or its log-sum-exp upper bound",
    "attention_implementation": "dot_product_attention kernel: xla or cudnn (none: JAX chooses)",
    "param_dtype": "dtype of the stored parameters and optimizer state (keep float32)",
    "compute_dtype": "dtype of the matmuls (bfloat16 on an accelerator)",
    "optimizer": "muonclip (Muon with QK-Clip), muon (never clips), or adamw",
    "mode": "QK-Clip: clip, monitor (measure S only) or off (none: clip for muonclip, else monitor)",
    "tau": "QK-Clip threshold on the max logit S (Kimi K2: 100)",
    "alpha": "QK-Clip: share of the clip on the query side (the rest on the key)",
    "clip_until": "clip mode: clip the updates of steps before this one only (none: always)",
    "lr": "peak learning rate",
    "weight_decay": "decoupled weight decay",
    "schedule": "lr schedule: wsd (warmup, stable, decay), cosine, or constant",
    "warmup_steps": "steps of linear warmup from 0",
    "decay_fraction": "wsd: the share of the steps spent decaying",
    "final_lr_fraction": "the lr the schedule ends at, as a fraction of lr",
    "steps": "training steps",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence",
    "accum_steps": "micro-batches per step (gradient accumulation; divides batch-size)",
    "seed": "seed of the initial weights and of the batches",
    "data": "a text file or directory (bytes, or tokens with --tokenizer), a 1-D token file (.npy, raw .u16/.u32, nanoGPT .bin; memory-mapped), or a directory with train.bin and val.bin (none: the Python standard library's source)",
    "max_bytes": "read at most this many bytes of text data",
    "vocab_size": "a token file's vocabulary, stated: skips the scan for its largest id, and every batch is checked against it (none: scan)",
    "tokenizer": "a Hugging Face tokenizer.json: --data text is tokenised with it once, cached beside the data (the tokenizers extra)",
    "out": "run directory: config.json, metrics.jsonl, checkpoints, plots",
    "eval_every": "steps between validation losses",
    "eval_batches": "validation batches per evaluation",
    "ckpt_every": "steps between checkpoints",
    "keep": "checkpoints kept",
    "label": "the run's name in plots (none: the directory's name)",
    "mesh": "devices, e.g. data=4,model=2 (absent axes have size 1; none: one device)",
}

#: Keys a run's `config.json` holds beside the fields: what the run read
#: (`data_description`: the data's files and sizes). Skipped on reading.
RECORD_KEYS = ("data_description",)


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field's annotation (an int fits a float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _as_field(value: Any, tp: Any) -> Any:
    """A JSON value as its field's type: an integer where a float is due (JSON
    writes 30.0 as 30 in hand-written files) becomes that float."""
    floats = tp is float or float in typing.get_args(tp)
    if floats and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


PRESETS: dict[str, dict[str, Any]] = {
    # a few seconds: the tests
    "tiny": dict(
        n_layers=2,
        dim=32,
        n_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
        mlp_hidden=64,
        steps=20,
        batch_size=4,
        seq_len=32,
        warmup_steps=4,
        eval_every=10,
        eval_batches=2,
        ckpt_every=10,
        max_bytes=400_000,
    ),
    # the default run (its time: docs/benchmarks.md). A model this small, trained
    # this briefly, does not reach K2's tau = 100 at a stable lr; lr 2e-2 grows
    # S to ~60 within 150 steps, so the cap is shown at tau = 30, the threshold
    # of the K2 ablation (Fig. 12).
    "small": dict(lr=2e-2, tau=30.0),
    # about 100M parameters (100.4M with byte tokens), for an accelerator:
    # float32 master weights and optimizer state, bfloat16 matmuls
    "gpu-100m": dict(
        n_layers=15,
        dim=768,
        n_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        head_dim=64,
        mlp_hidden=2048,
        steps=5000,
        batch_size=64,
        seq_len=1024,
        kernel="blockwise",
        compute_dtype="bfloat16",
        lr=2e-3,
        warmup_steps=250,
        eval_every=250,
        ckpt_every=500,
        max_bytes=64_000_000,
    ),
}


def preset(name: str, **overrides: Any) -> RunConfig:
    """A [`qkclip_eqx.RunConfig`][] from a named preset.

    **Arguments:**

    - `name`: a key of [`qkclip_eqx.PRESETS`][].
    - `**overrides`: fields of [`qkclip_eqx.RunConfig`][] that replace the
      preset's.

    **Returns:**

    The [`qkclip_eqx.RunConfig`][].

    **Raises:**

    `ValueError` when `name` is not a preset, or the config is invalid.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return RunConfig(**{**PRESETS[name], **overrides})


def schedule(cfg: RunConfig) -> optax.Schedule:
    if cfg.schedule == "wsd":
        return wsd(
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            decay_fraction=cfg.decay_fraction,
            final_fraction=cfg.final_lr_fraction,
        )
    if cfg.schedule == "cosine":
        return warmup_cosine(
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            final_fraction=cfg.final_lr_fraction,
        )
    return optax.constant_schedule(cfg.lr)


def optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    lr = schedule(cfg)
    if cfg.optimizer == "adamw":
        return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay)
    return muon_adamw(lr, weight_decay=cfg.weight_decay)


# What a resume may change (docs/checkpoints.md, "What a resume may change"). MUST_MATCH: the fields that
# shape the model, the optimizer state or the data stream; a checkpoint whose
# values differ is refused, naming each field. Every other field may change,
# with the effect stated here (and printed when a resume changes it).
MUST_MATCH = (
    # architecture (and the dtype of the stored parameters)
    "attention",
    "n_layers",
    "dim",
    "n_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_kv_heads",
    "head_dim",
    "mlp_hidden",
    "param_dtype",
    # data: which bytes, and the batches drawn from them at each step
    "data",
    "max_bytes",
    "vocab_size",
    "tokenizer",
    "batch_size",
    "seq_len",
    "seed",
    # optimizer kind: the layout and meaning of the optimizer state
    "optimizer",
)
MAY_CHANGE = {
    "lr": "the lr schedule is recomputed; from the resume step on, the lr is the new schedule's value at that step",
    "schedule": "as lr",
    "warmup_steps": "as lr",
    "decay_fraction": "as lr",
    "final_lr_fraction": "as lr",
    "steps": "the run ends at the new step count, and the warmup/decay schedule is recomputed for it "
    "(from the resume step on, the lr is the new schedule's value at that step)",
    "weight_decay": "applies from the resume step on",
    "tau": "QK-Clip uses the new threshold from the resume step on",
    "alpha": "as tau",
    "mode": "as tau",
    "clip_until": "as tau",
    "mesh": "the same maths in another arithmetic order: results agree to rounding, not bit for bit",
    "kernel": "as mesh",
    "block_size": "as mesh",
    "attention_implementation": "as mesh",
    "max_logit": "from the resume step on, QK-Clip acts on (and the metrics report) the new "
    "choice: S, or its log-sum-exp upper bound",
    "compute_dtype": "as mesh",
    "accum_steps": "as mesh",
    "eval_every": "no effect on training",
    "eval_batches": "no effect on training",
    "ckpt_every": "no effect on training",
    "keep": "no effect on training",
    "label": "no effect on training",
    "out": "no effect on training",
}


def meta_of(cfg: RunConfig, vocab_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (`MUST_MATCH`)."""
    config = dataclasses.asdict(cfg)
    return {"config": {name: config[name] for name in MUST_MATCH}, "vocab_size": vocab_size}


def resume_changes(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """One line per may-change field that differs from the checkpoint's run,
    with its effect (`MAY_CHANGE`); the lr at the resume step is named when
    the schedule changes it."""
    run, now = stored.get("run", {}), dataclasses.asdict(cfg)
    lines = []
    for name, effect in MAY_CHANGE.items():
        if name in run and run[name] != now[name]:
            lines.append(f"{name}: {run[name]!r} -> {now[name]!r}: {effect}")
    step = stored.get("step", 0)
    try:
        before = float(schedule(RunConfig.from_dict(run))(step))  # pyright: ignore[reportArgumentType]  # a schedule returns a real scalar
    except (TypeError, ValueError):
        before = None
    after = float(schedule(cfg)(step))  # pyright: ignore[reportArgumentType]  # a schedule returns a real scalar
    if before is not None and before != after:
        lines.append(f"lr at the resume step {step}: {before:.6g} -> {after:.6g}")
    return lines
