"""A training run's settings: [`qkclip_eqx.RunConfig`][], the presets, the
optimizer and lr schedule they build, and what a resume may change.

One declaration per option: a model option is a field of
[`qkclip_eqx.TransformerConfig`][], [`qkclip_eqx.MLAConfig`][] or
[`qkclip_eqx.GQAConfig`][] (with its help line and resume rule in the field's
`doc(...)` metadata), and `RunConfig` gets one field of it, by the same name,
generated here; a run option is a field of `RunConfig` with its own `doc`.
`FIELD_DOCS`, `MUST_MATCH`, `MAY_CHANGE`, the `qkclip-train` flags and the
keys of `config.json` are all read from those declarations
(docs/contributing.md, "How to add an option").
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import typing
from typing import TYPE_CHECKING, Any, Literal

import optax

from ._clip import Mode, check_tau_alpha
from ._config import GQAConfig, MLAConfig, TransformerConfig
from ._optim import muon_adamw, warmup_cosine, wsd
from ._options import (
    MUST_MATCH_RULE,
    as_config,
    as_value,
    check_fields,
    doc,
    hints_of,
    optional_config,
)
from ._parallel import AXES
from ._sinks import parse_log_to

Optimizer = Literal["muonclip", "muon", "adamw"]
AttentionKind = Literal["mla", "gqa"]

#: The attention configs a run can build, by `RunConfig.attention`.
ATTENTION_CONFIGS: dict[str, type] = {"mla": MLAConfig, "gqa": GQAConfig}
#: Where the model's options are declared: each field of these (but those
#: with `run=None`) is a field of `RunConfig`.
MODEL_CONFIGS: tuple[type, ...] = (*ATTENTION_CONFIGS.values(), TransformerConfig)


@dataclasses.dataclass(frozen=True)
class ModelOption:
    """One `RunConfig` field made from model-config fields of one name: its
    annotation, default and metadata, and the configs (and field name) it sets.
    `deferred`: the configs' defaults differ (e.g. `rope_layout`), so the run's
    default is None, "each config's own"."""

    name: str
    annotation: Any
    default: Any
    metadata: dict[str, Any]
    targets: dict[type, str]
    deferred: bool


def _model_options() -> dict[str, ModelOption]:
    found: dict[str, list[tuple[type, dataclasses.Field, Any]]] = {}
    for cls in MODEL_CONFIGS:
        hints = hints_of(cls)
        for f in dataclasses.fields(cls):
            if "run" in f.metadata and f.metadata["run"] is None:
                continue
            name = f.metadata.get("run_name", f.name)
            found.setdefault(name, []).append((cls, f, hints[f.name]))
    options = {}
    for name, decls in found.items():
        cls0, f0, tp = decls[0]
        if any(t != tp for _, _, t in decls):
            raise TypeError(f"model option {name}: its configs annotate it differently")
        defaults = [f.metadata.get("run", f.default) for _, f, _ in decls]
        defaults = [d for d in defaults if d is not dataclasses.MISSING]
        deferred = len(set(map(repr, defaults))) > 1
        help = f0.metadata["help"]
        kinds = [k for k, c in ATTENTION_CONFIGS.items() if any(c is cls for cls, _, _ in decls)]
        if len(decls) == 1 and kinds:
            help = f"{kinds[0]}: {help}"
        if deferred:
            help += (
                " (none: "
                + ", ".join(
                    f"{f.default} for {k}" for k, (_, f, _) in zip(kinds, decls, strict=True)
                )
                + ")"
            )
            tp = tp | None
        options[name] = ModelOption(
            name=name,
            annotation=tp,
            default=None if deferred else defaults[0],
            metadata={**f0.metadata, "help": help},
            targets={cls: f.name for cls, f, _ in decls},
            deferred=deferred,
        )
    return options


MODEL_OPTIONS: dict[str, ModelOption] = _model_options()


@typing.dataclass_transform(frozen_default=True)
def _with_model_options(cls: type) -> type:
    """`cls` as a frozen dataclass with a field per `MODEL_OPTIONS` entry,
    after `attention` (the run's own fields keep their order)."""
    own = dict(cls.__annotations__)
    annotations: dict[str, Any] = {}
    for name, tp in own.items():
        annotations[name] = tp
        if name == "attention":
            for option in MODEL_OPTIONS.values():
                annotations[option.name] = option.annotation
                setattr(
                    cls,
                    option.name,
                    dataclasses.field(default=option.default, metadata=option.metadata),
                )
    cls.__annotations__ = annotations
    cls = dataclasses.dataclass(frozen=True)(cls)
    # the fields are checked in __post_init__ (`check_fields`), with errors naming
    # the field, not by a runtime type checker's wrapper of __init__ (jaxtyping's
    # import hook in the tests); `typing.get_type_hints(RunConfig)` still works
    cls.__init__.__no_type_check__ = True  # pyright: ignore[reportAttributeAccessIssue]
    return cls


_AS_LR = "as lr"
_AS_TAU = "as tau"
_AS_MESH = "as mesh"
_NO_EFFECT = "no effect on training"


@_with_model_options
class RunConfig:
    """Everything a training run needs. `optimizer="muonclip"` is Muon with
    QK-Clip (`mode` clip by default); `"muon"` is Muon that never clips
    (`monitor` or `off`); `"adamw"` monitors by default and clips with
    `mode="clip"` (QK-Clip does not depend on the optimizer).

    Beside the fields below, every option of the model's configs
    ([`qkclip_eqx.TransformerConfig`][], [`qkclip_eqx.MLAConfig`][],
    [`qkclip_eqx.GQAConfig`][]) is a field, by the same name (`dim`,
    `n_heads`, `kv_lora_rank`, `rope_theta`, `yarn`, `clip_mode`, ...; the
    MLA latent norms' `norm_eps` is `latent_norm_eps` and `implementation` is
    `attention_implementation`); see `MODEL_OPTIONS`.
    """

    # model: mla or gqa, then (generated) every option of the model's configs
    attention: AttentionKind = dataclasses.field(
        default="mla",
        metadata=doc(
            "attention: mla (DeepSeek-V3's latent attention) or gqa (grouped-query; MHA when "
            "n-kv-heads = n-heads, MQA when 1)",
            resume=MUST_MATCH_RULE,
            hint="MQA is attention='gqa' with n_kv_heads=1",
        ),
    )
    # optimisation
    optimizer: Optimizer = dataclasses.field(
        default="muonclip",
        metadata=doc(
            "muonclip (Muon with QK-Clip), muon (never clips), or adamw", resume=MUST_MATCH_RULE
        ),
    )
    mode: Mode | None = dataclasses.field(
        default=None,
        metadata=doc(
            "QK-Clip: clip, monitor (measure S only) or off (none: clip for muonclip, else "
            "monitor)",
            resume=_AS_TAU,
        ),
    )
    tau: float = dataclasses.field(
        default=100.0,
        metadata=doc(
            "QK-Clip threshold on the max logit S (Kimi K2: 100)",
            resume="QK-Clip uses the new threshold from the resume step on",
        ),
    )
    alpha: float = dataclasses.field(
        default=0.5,
        metadata=doc(
            "QK-Clip: share of the clip on the query side (the rest on the key)", resume=_AS_TAU
        ),
    )
    clip_until: int | None = dataclasses.field(
        default=None,
        metadata=doc(
            "clip mode: clip the updates of steps before this one only (none: always)",
            resume=_AS_TAU,
        ),
    )
    lr: float = dataclasses.field(
        default=3e-3,
        metadata=doc(
            "peak learning rate",
            resume="the lr schedule is recomputed; from the resume step on, the lr is the new "
            "schedule's value at that step",
            check=">0",
        ),
    )
    weight_decay: float = dataclasses.field(
        default=0.1,
        metadata=doc("decoupled weight decay", resume="applies from the resume step on"),
    )
    schedule: Literal["wsd", "cosine", "constant"] = dataclasses.field(
        default="wsd",
        metadata=doc(
            "lr schedule: wsd (warmup, stable, decay), cosine, or constant", resume=_AS_LR
        ),
    )
    warmup_steps: int = dataclasses.field(
        default=50, metadata=doc("steps of linear warmup from 0", resume=_AS_LR, check=">=0")
    )
    decay_fraction: float = dataclasses.field(
        default=0.2,
        metadata=doc("wsd: the share of the steps spent decaying", resume=_AS_LR, check="[0,1]"),
    )
    final_lr_fraction: float = dataclasses.field(
        default=0.0,
        metadata=doc(
            "the lr the schedule ends at, as a fraction of lr", resume=_AS_LR, check="[0,1]"
        ),
    )
    steps: int = dataclasses.field(
        default=600,
        metadata=doc(
            "training steps",
            resume="the run ends at the new step count, and the warmup/decay schedule is "
            "recomputed for it (from the resume step on, the lr is the new schedule's value at "
            "that step)",
            check=">0",
        ),
    )
    batch_size: int = dataclasses.field(
        default=16, metadata=doc("sequences per step", resume=MUST_MATCH_RULE, check=">0")
    )
    seq_len: int = dataclasses.field(
        default=128, metadata=doc("tokens per sequence", resume=MUST_MATCH_RULE, check=">0")
    )
    accum_steps: int = dataclasses.field(
        default=1,
        metadata=doc(
            "micro-batches per step (gradient accumulation; divides batch-size)",
            resume=_AS_MESH,
            check=">0",
        ),
    )
    seed: int = dataclasses.field(
        default=0,
        metadata=doc("seed of the initial weights and of the batches", resume=MUST_MATCH_RULE),
    )
    # data, records
    data: str | None = dataclasses.field(
        default=None,
        metadata=doc(
            "a text file or directory (bytes, or tokens with --tokenizer), a 1-D token file "
            "(.npy, raw .u16/.u32, nanoGPT .bin; memory-mapped), or a directory with train.bin "
            "and val.bin (none: the Python standard library's source)",
            resume=MUST_MATCH_RULE,
        ),
    )
    max_bytes: int = dataclasses.field(
        default=8_000_000,
        metadata=doc(
            "read at most this many bytes of text data", resume=MUST_MATCH_RULE, check=">0"
        ),
    )
    vocab_size: int | None = dataclasses.field(
        default=None,
        metadata=doc(
            "a token file's vocabulary, stated: skips the scan for its largest id, and every "
            "batch is checked against it (none: scan)",
            resume=MUST_MATCH_RULE,
            check=">0",
        ),
    )
    tokenizer: str | None = dataclasses.field(
        default=None,
        metadata=doc(
            "a Hugging Face tokenizer.json: --data text is tokenised with it once, cached beside "
            "the data (the tokenizers extra)",
            resume=MUST_MATCH_RULE,
        ),
    )
    out: str = dataclasses.field(
        default="runs/default",
        metadata=doc(
            "run directory: config.json, metrics.jsonl, checkpoints, plots", resume=_NO_EFFECT
        ),
    )
    eval_every: int = dataclasses.field(
        default=100,
        metadata=doc("steps between validation losses", resume=_NO_EFFECT, check=">0"),
    )
    eval_batches: int = dataclasses.field(
        default=8,
        metadata=doc("validation batches per evaluation", resume=_NO_EFFECT, check=">0"),
    )
    ckpt_every: int = dataclasses.field(
        default=200, metadata=doc("steps between checkpoints", resume=_NO_EFFECT, check=">0")
    )
    keep: int = dataclasses.field(
        default=2, metadata=doc("checkpoints kept", resume=_NO_EFFECT, check=">0")
    )
    label: str | None = dataclasses.field(
        default=None,
        metadata=doc("the run's name in plots (none: the directory's name)", resume=_NO_EFFECT),
    )
    log_to: str | None = dataclasses.field(
        default=None,
        metadata=doc(
            "also send each step's metrics to: tensorboard (RUN/tensorboard), wandb "
            "(RUN/wandb; offline without an API key or network), comma-separated; needs the "
            "qkclip_eqx[tensorboard] or [wandb] extra (none: no sink)",
            resume=_NO_EFFECT,
        ),
    )
    # devices: e.g. "fsdp=4,model=2" (absent axes have size 1); None: one device
    mesh: str | None = dataclasses.field(
        default=None,
        metadata=doc(
            "devices, e.g. fsdp=4,model=2 (axes data, fsdp, model, seq; absent axes have size 1; "
            "none: one device)",
            resume="the same maths in another arithmetic order: results agree to rounding, "
            "not bit for bit",
        ),
    )

    if TYPE_CHECKING:  # the generated model options (MODEL_OPTIONS)

        def __init__(self, **fields: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...

    def __post_init__(self) -> None:
        hints = hints_of(RunConfig)
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            if (cls := optional_config(tp)) is not None:
                try:
                    value = as_config(cls, value, owner=f"RunConfig.{f.name}")
                except ValueError as e:  # YaRN.factor -> RunConfig.yarn.factor
                    raise ValueError(
                        str(e).replace(f"{cls.__name__}.", f"RunConfig.{f.name}.")
                    ) from None
            object.__setattr__(self, f.name, as_value(value, tp))
        check_fields(self)  # types, allowed values, ranges: every field at once
        self.mesh_shape()  # validates the mesh string
        self.sinks()  # validates log_to
        try:
            check_tau_alpha(self.tau, self.alpha)
        except ValueError as e:
            raise ValueError(f"RunConfig.{e}") from None
        if self.mode is None:
            object.__setattr__(self, "mode", "clip" if self.optimizer == "muonclip" else "monitor")
        if self.optimizer == "muon" and self.mode == "clip":
            raise ValueError(
                "RunConfig.mode='clip' with optimizer='muon': that is optimizer='muonclip'"
            )
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"RunConfig.batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}"
            )
        try:
            self.model_config()  # the model configs' own checks (ranges, cross-field rules)
        except ValueError as e:
            raise ValueError(_as_run_names(str(e))) from None

    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON-ready values (a nested config as a dict)."""
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
        or removed) and every bad value, with `source` (the file).
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
        try:
            return cls(**{k: v for k, v in values.items() if k in fields})
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
        """`mesh` parsed: a size for each axis of the library's meshes
        (`qkclip_eqx._parallel.AXES`: data, fsdp, model, seq), absent axes 1;
        or None.

        Raises `ValueError` when `mesh` does not look like `"fsdp=4,model=2"`
        or names an axis twice.
        """
        if self.mesh is None:
            return None
        shape: dict[str, int] = dict.fromkeys(AXES, 1)
        example = "fsdp=4,model=2"
        seen = set()
        for part in self.mesh.split(","):
            name, _, size = (x.strip() for x in part.partition("="))
            if name not in shape or not size.isdigit() or int(size) < 1 or name in seen:
                raise ValueError(
                    f"RunConfig.mesh must look like {example!r} (axes {', '.join(AXES)}, each "
                    f"once, sizes >= 1), got {self.mesh!r}"
                )
            seen.add(name)
            shape[name] = int(size)
        return shape

    def sinks(self) -> tuple[str, ...]:
        """`log_to` parsed: the names of the sinks (`_sinks.SINKS`), each once.

        Raises `ValueError` naming an unknown sink.
        """
        if self.log_to is None:
            return ()
        try:
            return parse_log_to(self.log_to)
        except ValueError as e:
            raise ValueError(f"RunConfig.log_to: {e}") from None

    def model_config(self, vocab_size: int = 256) -> TransformerConfig:
        """The [`qkclip_eqx.TransformerConfig`][] of the run's model (MLA or GQA
        by `attention`), for a vocabulary of `vocab_size` tokens."""
        attention_cls = ATTENTION_CONFIGS[self.attention]
        kwargs: dict[type, dict[str, Any]] = {TransformerConfig: {}, attention_cls: {}}
        for option in MODEL_OPTIONS.values():
            value = getattr(self, option.name)
            if option.deferred and value is None:
                continue
            for cls, name in option.targets.items():
                if cls in kwargs:
                    kwargs[cls][name] = value
        return TransformerConfig(
            vocab_size=vocab_size,
            attention=attention_cls(**kwargs[attention_cls]),
            **kwargs[TransformerConfig],
        )


def _as_run_names(message: str) -> str:
    """A model config's error with its fields named as RunConfig's
    (`MLAConfig.norm_eps` -> `RunConfig.latent_norm_eps`)."""
    renamed = {
        (cls.__name__, field): option.name
        for option in MODEL_OPTIONS.values()
        for cls, field in option.targets.items()
    }

    def sub(m: re.Match[str]) -> str:
        return "RunConfig." + renamed.get((m[1], m[2]), m[2] or "")

    names = "|".join(c.__name__ for c in MODEL_CONFIGS)
    return re.sub(rf"\b({names})\.(\w+)", sub, message)


def _rules() -> tuple[dict[str, str], tuple[str, ...], dict[str, str]]:
    docs, must, may = {}, [], {}
    for f in dataclasses.fields(RunConfig):
        docs[f.name] = f.metadata["help"]
        rule = f.metadata["resume"]
        if rule == MUST_MATCH_RULE:
            must.append(f.name)
        else:
            may[f.name] = rule
    return docs, tuple(must), may


#: One line per field of [`qkclip_eqx.RunConfig`][]: the help of its
#: `qkclip-train` flag (read from the fields' declarations).
FIELD_DOCS: dict[str, str]
# What a resume may change (docs/checkpoints.md, "What a resume may change"),
# read from the fields' declarations. MUST_MATCH: the fields that shape the
# model, the optimizer state or the data stream; a checkpoint whose values
# differ is refused, naming each field. Every other field may change, with the
# effect stated (and printed when a resume changes it).
MUST_MATCH: tuple[str, ...]
MAY_CHANGE: dict[str, str]
FIELD_DOCS, MUST_MATCH, MAY_CHANGE = _rules()


def merge_values(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` (field values) with `overrides`; a dict given for a nested
    config (`yarn`) updates the base's config field by field (a flag
    `--yarn-factor 4` keeps the other YaRN fields of a `--config` file)."""
    merged = dict(base)
    for name, value in overrides.items():
        old = merged.get(name)
        if isinstance(value, dict) and old is not None:
            value = {**(old if isinstance(old, dict) else dataclasses.asdict(old)), **value}
        merged[name] = value
    return merged


#: Keys a run's `config.json` holds beside the fields: what the run read
#: (`data_description`: the data's files and sizes) and what ran it
#: (`provenance`: versions, git commit, devices, start time; see
#: `_provenance.py`). Skipped on reading.
RECORD_KEYS = ("data_description", "provenance")


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
    return RunConfig(**merge_values(PRESETS[name], overrides))


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
