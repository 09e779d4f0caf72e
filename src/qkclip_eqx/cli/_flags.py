"""Every RunConfig field as a command-line flag (argparse, from the dataclass)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import types
import typing
from typing import Any

import jax

from .._options import hints_of, optional_config
from .._run_config import PRESETS, RECORD_KEYS, RunConfig, merge_values, preset

DEFAULT_PRESET = "small"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: the problem, then where the flags are
    listed (not the ~30 lines of usage first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _NoneValue:
    """`--flag none` of an optional field (None is a flag not given)."""

    def __repr__(self) -> str:
        return "none"


NONE = _NoneValue()


def _bool(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.strip().lower() not in words:
        raise ValueError(text)
    return words[text.strip().lower()]


_bool.__name__ = "bool (true or false)"  # argparse names it in errors


def _none_only(text: str) -> _NoneValue:
    if text.strip().lower() != "none":
        raise ValueError(text)
    return NONE


_none_only.__name__ = "value (only none; set its fields with their own flags)"


def _parser_for(tp: Any) -> tuple[Any, list[Any] | None]:
    """The argparse `type` and `choices` for a field's annotation; an optional
    field also takes `none`."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):  # X | None: parse X, or "none"
        inner, choices = _parser_for(args[0])

        def parse(text: str) -> Any:
            return NONE if text.strip().lower() == "none" else inner(text)

        parse.__name__ = getattr(inner, "__name__", "value")  # argparse names it in errors
        return parse, None if choices is None else [*choices, NONE]
    if origin is typing.Literal:
        return str, list(typing.get_args(tp))
    if tp is bool:
        return _bool, None
    return tp, None


def _shown(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def flag_of(path: str) -> str:
    """The flag of a field (`kv_lora_rank` -> `--kv-lora-rank`) or of a nested
    config's field (`yarn.factor` -> `--yarn-factor`)."""
    return "--" + path.replace(".", "-").replace("_", "-")


def with_flag_names(message: str) -> str:
    """A config error with its fields named as their flags
    (`RunConfig.tau must be > 0` -> `--tau must be > 0`)."""
    return re.sub(r"\bRunConfig\.(\w+(?:\.\w+)?)", lambda m: flag_of(m[1]), message)


def preset_of(argv: list[str] | None) -> str | None:
    """The `--preset` of `argv` (None when not given or not a preset), read
    before the full parse so that every flag's help shows the preset's value."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    return known.preset if known.preset in PRESETS else None


def add_run_flags(parser: argparse.ArgumentParser, preset_name: str | None = None) -> None:
    """`--preset`, `--config` and one flag per [`qkclip_eqx.RunConfig`][]
    field (a nested config, such as `yarn`: `--yarn none` and one flag per
    field of it), each with its help line and its value in `preset_name`
    (default `small`)."""
    shown = preset_name or DEFAULT_PRESET
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help=f"starting values; any flag below overrides them (default: {DEFAULT_PRESET}). "
        "With --resume, the run's own config.json is the start instead",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="start a new run from a config file (such as another run's config.json) instead "
        "of a preset; any flag below overrides it",
    )
    base = preset(shown)
    group = parser.add_argument_group(
        f"run settings (RunConfig fields; [{shown}: value] is the preset's)"
    )
    hints = hints_of(RunConfig)
    for field in dataclasses.fields(RunConfig):
        tp, help = hints[field.name], field.metadata["help"]
        value = getattr(base, field.name)
        nested = optional_config(tp)
        if nested is None:
            tp, choices = _parser_for(tp)
            group.add_argument(
                flag_of(field.name),
                type=tp,
                choices=choices,
                default=None,
                metavar=None if choices else field.name.upper(),
                help=f"{help} [{shown}: {_shown(value)}]",
            )
            continue
        group.add_argument(
            flag_of(field.name),
            type=_none_only,
            default=None,
            metavar="none",
            help=f"{help}: none turns it off; the --{field.name.replace('_', '-')}-* flags "
            f"below set it [{shown}: {_shown(value)}]",
        )
        inner_hints = hints_of(nested)
        for inner in dataclasses.fields(nested):
            tp, choices = _parser_for(inner_hints[inner.name])
            shown_inner = "none" if value is None else _shown(getattr(value, inner.name))
            group.add_argument(
                flag_of(f"{field.name}.{inner.name}"),
                dest=f"{field.name}.{inner.name}",
                type=tp,
                choices=choices,
                default=None,
                metavar=None if choices else inner.name.upper(),
                help=f"{field.name}: {inner.metadata['help']} [{shown}: {shown_inner}]",
            )


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fields whose flags `args` holds, with their values (`none` as None;
    a nested config's flags as a dict of its fields)."""
    given: dict[str, Any] = {}
    hints = hints_of(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name)
        if value is not None:
            given[f.name] = None if value is NONE else value
        nested = optional_config(hints[f.name])
        if nested is None:
            continue
        inner = {
            g.name: None if v is NONE else v
            for g in dataclasses.fields(nested)
            if (v := getattr(args, f"{f.name}.{g.name}")) is not None
        }
        if inner and f.name in given:
            raise ValueError(f"{flag_of(f.name)} none with {flag_of(f.name)}-* flags")
        if inner:
            given[f.name] = inner
    return given


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset (default `small`) or the `--config` file, with the flags given."""
    given = given_fields(args)
    if args.config is None:
        return preset(args.preset or DEFAULT_PRESET, **given)
    if args.preset is not None:
        raise ValueError("--config and --preset both give the starting values: give one")
    path = pathlib.Path(args.config)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: a run config is a JSON object")
    values = {k: v for k, v in values.items() if k not in RECORD_KEYS}
    return RunConfig.from_dict(merge_values(values, given), source=str(path))


CACHE_ENV = "QKCLIP_EQX_COMPILATION_CACHE"


def cache_dir() -> pathlib.Path:
    """Where the CLIs keep JAX's persistent compilation cache:
    `$XDG_CACHE_HOME/qkclip_eqx/jax`, by default `~/.cache/qkclip_eqx/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "qkclip_eqx" / "jax"


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help=f"compile from scratch: do not read or write JAX's compilation cache in "
        f"{cache_dir()} (or set {CACHE_ENV}=0; a JAX_COMPILATION_CACHE_DIR of yours is kept)",
    )


def use_compilation_cache(args: argparse.Namespace) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache for this process, unless
    `--no-compilation-cache` or `QKCLIP_EQX_COMPILATION_CACHE=0` says not to or
    the user set JAX's own `jax_compilation_cache_dir`. Every program is cached,
    however short its compile (JAX's default keeps those over 1 s only): a
    second identical run skips compiling. Called by the CLIs only, never on
    import of the library, and after `jax.distributed.initialize`.

    A multi-process run on CPU compiles from scratch, whatever cache directory
    JAX was given: from jax 0.12.1 the CPU topology in the cache key differs
    between processes and only process 0 writes, so in a second run process 0
    loads its programs while the others compile, and the run hangs or dies at
    its first step. Returns the directory used, or None."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    off = args.no_compilation_cache or os.environ.get(CACHE_ENV, "1").strip().lower() in (
        "0",
        "false",
        "no",
        "off",
    )
    if off:
        return None
    own = getattr(jax.config, "jax_compilation_cache_dir")  # noqa: B009  # untyped in jax's stubs; the user's JAX_COMPILATION_CACHE_DIR
    if own:
        return pathlib.Path(own)
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile as before
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
