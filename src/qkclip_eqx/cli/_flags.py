"""Every RunConfig field as a command-line flag (argparse, from the dataclass)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import types
import typing
from typing import Any

import jax

from .._run_config import FIELD_DOCS, PRESETS, RunConfig, preset

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


def _parser_for(tp: Any) -> tuple[Any, list[Any] | None]:
    """The argparse `type` and `choices` for a field's annotation (no field is a
    bool); an optional field also takes `none`."""
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
    return tp, None


def _shown(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def preset_of(argv: list[str] | None) -> str | None:
    """The `--preset` of `argv` (None when not given or not a preset), read
    before the full parse so that every flag's help shows the preset's value."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    return known.preset if known.preset in PRESETS else None


def add_run_flags(parser: argparse.ArgumentParser, preset_name: str | None = None) -> None:
    """`--preset` and one flag per [`qkclip_eqx.RunConfig`][] field, each with
    its `FIELD_DOCS` line and its value in `preset_name` (default `small`)."""
    shown = preset_name or DEFAULT_PRESET
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help=f"starting values; any flag below overrides them (default: {DEFAULT_PRESET}). "
        "With --resume, the run's own config.json is the start instead",
    )
    base = preset(shown)
    group = parser.add_argument_group(
        f"run settings (RunConfig fields; [{shown}: value] is the preset's)"
    )
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        tp, choices = _parser_for(hints[field.name])
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            type=tp,
            choices=choices,
            default=None,
            metavar=None if choices else field.name.upper(),
            help=f"{FIELD_DOCS[field.name]} [{shown}: {_shown(getattr(base, field.name))}]",
        )


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fields whose flags `args` holds, with their values (`none` as None)."""
    return {
        f.name: None if getattr(args, f.name) is NONE else getattr(args, f.name)
        for f in dataclasses.fields(RunConfig)
        if getattr(args, f.name) is not None
    }


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset (default `small`) with the flags given."""
    return preset(args.preset or DEFAULT_PRESET, **given_fields(args))


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
    import of the library. Returns the directory used, or None."""
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
