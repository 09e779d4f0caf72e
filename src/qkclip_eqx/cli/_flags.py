"""Every RunConfig field as a command-line flag (argparse, from the dataclass)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

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
