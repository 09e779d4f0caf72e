"""Every RunConfig field as a command-line flag (argparse, from the dataclass)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import types
import typing

import jax

from .._run_config import PRESETS, RunConfig, preset


def _parser_for(tp):
    """The argparse `type` and `choices` for a field's annotation (no field is a bool)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):  # X | None: parse X
        return _parser_for(args[0])
    if origin is typing.Literal:
        return str, list(typing.get_args(tp))
    return tp, None


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="small",
        choices=sorted(PRESETS),
        help="starting values; any flag below overrides them (default: small)",
    )
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        tp, choices = _parser_for(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=tp,
            choices=choices,
            default=None,
            help=f"default: {field.default!r} (before the preset)",
        )


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(RunConfig)
        if getattr(args, f.name) is not None
    }
    return preset(args.preset, **overrides)


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
