"""Config round trips and JSON type strictness, as properties over generated
configs, every field found generically (`dataclasses.fields` and
`typing.get_type_hints`), so that a new or renamed field is covered without
an edit here.

- `RunConfig.from_json(cfg.to_json()) == cfg`, and the same config given as
  `qkclip-train` flags (through `main(argv)`) is the same config.
- A value of the wrong JSON type for ANY typed field is refused, naming the
  field: `true` is no int or float (Python's `bool` is an `int`), `"3"` no
  int, `1` no bool; the same on the command line. Which values are wrong is
  decided here, independently of the library's own type check.
- The model configs (`MLAConfig`, `GQAConfig`, `TransformerConfig`, `YaRN`)
  refuse a bool for every int or float field and an int for every bool field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import qkclip_eqx as qc
from builders import synthetic_corpus
from qkclip_eqx.cli import train as train_cli

HINTS = typing.get_type_hints(qc.RunConfig)
FIELDS = [f.name for f in dataclasses.fields(qc.RunConfig)]
# JSON values of every type, to find the wrong ones for each field
POOL: list[Any] = [True, False, 0, 1, 3, 2.5, -1.0, "x", "3", "true", None, [], [1], {}, {"a": 1}]


def _arms(tp) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def fits(value: Any, tp: Any) -> bool:
    """This test's own JSON type rule: exact types, an int is a float, a bool
    is neither."""
    for arm in _arms(tp):
        if typing.get_origin(arm) is Literal:
            if any(type(value) is type(a) and value == a for a in typing.get_args(arm)):
                return True
        elif arm is type(None):
            if value is None:
                return True
        elif arm is float:
            if type(value) in (int, float):
                return True
        elif type(value) is arm:
            return True
    return False


def _wrong_values(tp) -> list:
    return [v for v in POOL if not fits(v, tp)]


WRONG = [(name, v) for name in FIELDS for v in _wrong_values(HINTS[name])]


def test_every_field_has_wrong_values_including_a_bool_where_a_number_is_due():
    numbers = [n for n in FIELDS if any(a in (int, float) for a in _arms(HINTS[n]))]
    assert len(numbers) >= 20
    for name in numbers:
        assert True in _wrong_values(HINTS[name]), name


@pytest.mark.parametrize("name, value", WRONG, ids=[f"{n}={v!r}" for n, v in WRONG])
def test_a_value_of_the_wrong_json_type_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        qc.RunConfig.from_dict({name: value})
    text = json.dumps({**qc.preset("tiny").to_dict(), name: value})
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        qc.RunConfig.from_json(text)


# --------------------------------------------------------------------------
# generated configs
# --------------------------------------------------------------------------

_TEXT = st.text(alphabet="abcxyz_-", min_size=1, max_size=6)


def _values(name: str, tp) -> st.SearchStrategy:
    """Values of a field's type, of the sizes a valid config tends to have."""
    if name == "mesh":
        return st.sampled_from([None, "data=1", "data=2,model=1", "model=1,seq=1"])
    if name in ("data", "out", "label"):
        return st.one_of(st.none(), _TEXT) if type(None) in _arms(tp) else _TEXT
    options = []
    for arm in _arms(tp):
        if typing.get_origin(arm) is Literal:
            options.append(st.sampled_from(typing.get_args(arm)))
        elif arm is type(None):
            options.append(st.none())
        elif arm is int:
            options.append(st.sampled_from([1, 2, 4, 8, 16, 64]))
        elif arm is float:
            options.append(st.floats(1e-4, 1.0, allow_nan=False))
        elif arm is str:
            options.append(_TEXT)
        else:
            raise AssertionError(f"RunConfig.{name}: no strategy for {arm!r}")
    return st.one_of(*options)


@st.composite
def overrides(draw, wrong: bool = False):
    """A few fields of the tiny preset changed; with `wrong`, one of them to a
    value of the wrong JSON type."""
    names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True))
    values = {n: draw(_values(n, HINTS[n])) for n in names}
    if wrong:
        name = draw(st.sampled_from(names))
        values[name] = draw(st.sampled_from(_wrong_values(HINTS[name])))
    return values


def _valid(values: dict) -> qc.RunConfig:
    try:
        return qc.RunConfig.from_dict({**qc.PRESETS["tiny"], **values})
    except ValueError:
        assume(False)
        raise


@given(overrides())
def test_json_round_trip(values):
    cfg = _valid(values)
    text = cfg.to_json(data_description="a description")
    back = qc.RunConfig.from_json(text)
    assert back == cfg
    assert back.to_json(data_description="a description") == text
    assert {f: type(getattr(back, f)) for f in FIELDS} == {f: type(getattr(cfg, f)) for f in FIELDS}


@given(overrides(wrong=True))
def test_generated_configs_with_one_wrong_type_are_refused_naming_it(values):
    bad = sorted(n for n, v in values.items() if not fits(v, HINTS[n]))
    assert bad
    with pytest.raises(ValueError) as info:
        qc.RunConfig.from_dict({**qc.PRESETS["tiny"], **values})
    assert any(n in str(info.value) for n in bad), (bad, str(info.value))


def _flag(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, float) else str(value)


class _Captured(Exception):
    pass


@pytest.fixture(scope="module")
def cli_config():
    """`qkclip-train`'s config for `argv`, through its `main`, stopping before training."""
    got = []

    def capture(cfg, **kw):
        got.append(cfg)
        raise _Captured

    data = synthetic_corpus(4096, 1024)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_cli, "train", capture)
        mp.setattr(train_cli, "load_run_data", lambda cfg: data)

        def run(argv):
            with pytest.raises(_Captured):
                train_cli.main([*argv, "--no-progress", "--no-plots"])
            return got.pop()

        yield run


@settings(max_examples=max(1, settings().max_examples * 2 // 3))
@given(overrides())
def test_config_json_to_cli_flags_and_back(cli_config, values):
    """config.json -> every field as its flag -> the CLI's config: the same config."""
    cfg = qc.RunConfig.from_json(_valid(values).to_json())
    argv = [f"--{n.replace('_', '-')}={_flag(getattr(cfg, n))}" for n in FIELDS]
    assert cli_config(argv) == cfg


@pytest.mark.parametrize(
    "name", [n for n in FIELDS if any(a in (int, float) for a in _arms(HINTS[n]))]
)
def test_a_bool_for_a_number_flag_is_refused_naming_it(name, capsys):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(SystemExit):
        train_cli.main(["--preset", "tiny", f"{flag}=true"])
    assert flag in capsys.readouterr().err


# --------------------------------------------------------------------------
# the model configs: every int/float field refuses a bool, every bool an int
# --------------------------------------------------------------------------

_MLA = qc.MLAConfig(
    dim=16, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4
)
_BASES = {
    "MLAConfig": _MLA,
    "GQAConfig": qc.GQAConfig(dim=16, n_heads=2, head_dim=4),
    "TransformerConfig": qc.TransformerConfig(
        vocab_size=8, n_layers=1, mlp_hidden=8, attention=_MLA
    ),
    "YaRN": qc.YaRN(factor=4.0, original_max_position_embeddings=64),
}


def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, resolved in its module (`typing.get_type_hints`
    gives these classes' none)."""
    import sys

    where = vars(sys.modules[cls.__module__])
    return {
        f.name: eval(f.type, where) if isinstance(f.type, str) else f.type
        for f in dataclasses.fields(cls)
    }


MODEL_CASES = [
    (cls, name, bad)
    for cls, base in _BASES.items()
    for name, tp in _field_types(type(base)).items()
    for bad in (
        [True, False, "2"]
        if any(a in (int, float) for a in _arms(tp))
        else [1, 0, "true"]
        if bool in _arms(tp)
        else []
    )
]


@pytest.mark.parametrize(
    "cls, name, bad", MODEL_CASES, ids=[f"{c}.{n}={b!r}" for c, n, b in MODEL_CASES]
)
def test_model_config_fields_refuse_the_wrong_json_type(cls, name, bad):
    with pytest.raises((ValueError, TypeError), match=name):
        dataclasses.replace(_BASES[cls], **{name: bad})
