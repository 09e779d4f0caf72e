"""Every Python block of the README and of the documentation pages runs as
written, unpatched: each page's blocks in order in one namespace, as a reader
pastes them (a later block uses the imports of an earlier one). The only names
given to a block are those its page says the reader brings: ``docs/hf.md``
loads "a Hugging Face checkpoint's" ``state_dict`` and ``config``, here one of
the golden files of ``tests/test_hf.py``, and a whole model's ``model_state_dict``,
``model_config``, ``model_tokens`` and ``model_positions``, the golden file of
``tests/test_hf_model.py``.

Blocks are found by what they contain, not by position, and every block is
claimed by a test below. They also do what they say: the library example's
train step clips at tau = 100 (checked against NumPy's QK-Clip of the weights
it was given, and by re-measuring S), the own-attention example is found and
clipped by ``qk_clip``, the decoding example gives the shapes it states, and
the loader example loads the golden weights.

Besides the blocks: the README opens with the two commands a new user types
(and ``.ci/run`` runs the same test command), its relative links resolve, and
``docs/checkpoints.md`` names exactly the fields the resume rules hold."""

import functools
import json
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qkclip_eqx import next_token_loss
from reference import assert_leaves_close, np_qk_clip

ROOT = pathlib.Path(__file__).parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
TAU = 100.0  # the README's make_train_step(opt, mode="clip", tau=100.0)
# Which block each test runs, by a text only that block holds.
CLAIMED = {
    ("README.md", "qc.make_train_step("): "test_library_example_runs",
    ("docs/attention.md", "class MyAttention("): "test_own_clippable_attention_example",
    ("docs/decoding.md", "qc.generate"): "test_docs_decoding_example_runs",
    ("docs/index.md", "qc.qk_clip("): "test_docs_index_example_runs",
    ("docs/hf.md", "qc.hf.mla_from_hf("): "test_docs_hf_example_loads_the_golden_weights",
    ("docs/own-models.md", "qc.ClippableMultiheadAttention("): "test_docs_own_models_example",
    ("docs/hf.md", "qc.hf.transformer_from_hf("): "test_docs_hf_whole_model_example",
    ("docs/moe.md", "qc.MoEConfig("): "test_docs_moe_example_builds_the_model_it_describes",
}


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def _hf_checkpoint() -> dict:
    """A Hugging Face DeepseekV3Attention's state_dict and config (golden file)."""
    with np.load(ROOT / "tests" / "data" / "hf_dsv3_attn_qlora.npz") as f:
        arrays = {k: f[k] for k in f.files}
    config = json.loads(str(arrays.pop("config_json")))
    for k in ("hidden_states", "output", "max_logits", "versions", "position_ids"):
        arrays.pop(k, None)
    # and a whole model's (the golden file of tests/test_hf_model.py)
    with np.load(ROOT / "tests" / "data" / "hf_dsv3_model_yarn.npz") as f:
        model = {k: f[k] for k in f.files}
    given = {
        "model_config": json.loads(str(model.pop("config_json"))),
        "model_tokens": jnp.asarray(model.pop("input_ids")),
        "model_positions": jnp.asarray(model.pop("position_ids")),
        "model_logits": model.pop("logits"),
    }
    model.pop("max_logits"), model.pop("versions")
    return {"state_dict": arrays, "config": config, "model_state_dict": model, **given}


GIVEN = {"docs/hf.md": _hf_checkpoint}


def test_docs_hf_whole_model_example():
    """docs/hf.md: the whole model gives transformers' logits (the golden file's)."""
    scope, _ = _namespace("docs/hf.md", "qc.hf.transformer_from_hf(")
    np.testing.assert_allclose(scope["logits"], scope["model_logits"], rtol=0, atol=1e-5)
    assert scope["S"].shape == (2, 4)


@functools.cache
def _run_page(page: str) -> tuple[dict, ...]:
    """Run the page's blocks in order in one namespace; the namespace after each."""
    scope = GIVEN[page]() if page in GIVEN else {}
    after = []
    for i, block in enumerate(_blocks(page)):
        exec(compile(block, f"{page}, python block {i}", "exec"), scope)
        after.append(dict(scope))
    return tuple(after)


def _namespace(page: str, marker: str) -> tuple[dict, str]:
    """The namespace after the page's one block holding ``marker``, and the block."""
    found = [i for i, b in enumerate(_blocks(page)) if marker in b]
    assert len(found) == 1, (page, marker, found)
    return _run_page(page)[found[0]], _blocks(page)[found[0]]


def test_every_python_block_is_claimed_by_a_test():
    """A block added to any page without a test fails here."""
    blocks = {(page, i): b for page in PAGES for i, b in enumerate(_blocks(page))}
    assert len(blocks) >= len(CLAIMED)
    for (page, i), block in blocks.items():
        claims = [name for (p, marker), name in CLAIMED.items() if p == page and marker in block]
        assert len(claims) == 1, f"{page}, python block {i}: claimed by {claims}"
    assert all(name in globals() for name in CLAIMED.values())


_forward = eqx.filter_jit(next_token_loss)


def test_docs_moe_example_builds_the_model_it_describes():
    """docs/moe.md: one dense layer, then three MoE layers of 16 experts."""
    scope, _ = _namespace("docs/moe.md", "qc.MoEConfig(")
    model = scope["model"]
    assert model.blocks.mlp.w_gate.shape == (1, 256, 128)
    assert model.moe_blocks.mlp.experts.w_gate.shape == (3, 16, 64, 128)
    assert model.moe_blocks.mlp.shared.w_up.shape == (3, 64, 128)


def test_library_example_runs():
    scope, block = _namespace("README.md", "qc.make_train_step(")
    assert scope["metrics"]["max_logits"].shape == (4, 8)
    assert np.isfinite(float(scope["metrics"]["loss"]))
    assert "tau=100.0" in block.replace(" ", "")

    # The example's step, on its model with every even head's q weights scaled
    # so that layer 0's S is 300 (odd heads: 30): those heads are over tau.
    step, opt, model, tokens = scope["step"], scope["opt"], scope["model"], scope["tokens"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, tokens.shape), jnp.int32)
    _, s_base = map(np.asarray, _forward(model, tokens))
    assert np.all(s_base > 0.1)
    target = np.where(np.arange(s_base.shape[1]) % 2 == 0, 300.0, 30.0)[None, :]
    factor = jnp.asarray(target / s_base, jnp.float32)[:, :, None, None]
    hot = eqx.tree_at(lambda m: m.blocks.attn.wq, model, model.blocks.attn.wq * factor)
    _, s_hot = map(np.asarray, _forward(hot, tokens))
    # measured rel 5.1e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s_hot[0], target[0], rtol=2.5e-6)
    assert np.any(s_hot > TAU) and np.any(s_hot < TAU)

    # A fresh optimizer state: the example's schedule warms up from lr 0, so the
    # update is zero and the step's model must be exactly the clip of ``hot``.
    state = opt.init(eqx.filter(hot, eqx.is_array))
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, hot)
    clipped, _, metrics = step(copy, state, tokens)
    # bit-equal (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_array_equal(metrics["max_logits"], s_hot)
    assert int(metrics["heads_clipped"]) == int(np.sum(s_hot > TAU))
    # measured rel 1.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    assert_leaves_close(clipped, np_qk_clip(hot, s_hot, TAU), rtol=6e-7)
    # re-run on the same batch: layer 0 (whose inputs the clip does not change) is min(S, tau)
    _, s_after = map(np.asarray, _forward(clipped, tokens))
    # measured rel 2.3e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s_after[0], np.minimum(s_hot[0], TAU), rtol=1e-6)


def test_own_clippable_attention_example():
    scope, _ = _namespace("docs/attention.md", "class MyAttention(")
    qc = scope["qc"]

    ones = jnp.ones((2, 4, 8))
    attn = scope["MyAttention"](wq=ones, wk=ones, wv=ones, wo=jnp.ones((8, 8)), n_heads=2)
    # its head layout shards every per-head leaf, and wo's columns, over `model`; FSDP
    # takes the last axis left
    specs = qc.partition_specs({"layer": attn})["layer"]
    per_head = P("model", None, "fsdp")
    assert (specs.wq, specs.wk, specs.wv, specs.wo) == (per_head,) * 3 + (P("fsdp", "model"),)
    clipped = qc.qk_clip({"layer": attn}, [jnp.array([400.0, 50.0])], 100.0)["layer"]
    # head 0: gamma = 1/4 split as sqrt on each side; head 1 below tau: untouched
    # exactly 0.5: gamma = 100/400 and its square root are exact in float32
    np.testing.assert_array_equal(clipped.wq[0], 0.5)
    np.testing.assert_array_equal(clipped.wk[0], 0.5)
    assert np.array_equal(clipped.wq[1], attn.wq[1]) and np.array_equal(clipped.wk[1], attn.wk[1])


def test_docs_decoding_example_runs():
    """docs/decoding.md: the decoding block gives the shapes it states."""
    scope, _ = _namespace("docs/decoding.md", "qc.generate")
    assert scope["logits"].shape == (1, 256) and scope["S"].shape == (2, 2)
    assert int(scope["cache"].length) == 4 and scope["cache"].c_kv.shape == (2, 16, 16)
    assert scope["tokens"].shape == (8,)


def test_docs_index_example_runs():
    """docs/index.md: S per example and head, and the clip of the heads over tau."""
    scope, _ = _namespace("docs/index.md", "qc.qk_clip(")
    s = np.asarray(scope["S"])
    assert s.shape == (4, 8) and isinstance(scope["attn"], scope["qc"].MLAttention)
    before = scope["qc"].MLAttention(scope["cfg"], key=jax.random.key(0))
    assert_leaves_close(scope["attn"], np_qk_clip(before, s.max(axis=0), TAU, prefix=""))


def test_docs_hf_example_loads_the_golden_weights():
    """docs/hf.md: the module holds the state_dict's weights, reshaped per head."""
    scope, _ = _namespace("docs/hf.md", "qc.hf.mla_from_hf(")
    attn, state = scope["attn"], scope["state_dict"]
    (key,) = [k for k in state if k.endswith("kv_a_proj_with_mqa.weight")]
    np.testing.assert_array_equal(np.asarray(attn.wkv_a), state[key])
    assert attn.wq_a is not None and attn.wq.shape[0] == scope["config"]["num_attention_heads"]


# The README's first two blocks are what a user types on a fresh machine:
# install and train, install and test. .ci/run runs the same test command.
MAIN_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && qkclip-train"
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate"
    ' && pip install -e ".[test]" && python -m pytest -q'
)


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = re.findall(r"```(\w*)\n(.*?)```", text, re.S)[:2]
    assert first == [("bash", MAIN_COMMAND + "\n"), ("bash", TEST_COMMAND + "\n")]
    assert text.index(MAIN_COMMAND) < text.index("\n## ")  # before any section
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q\n" in ci and 'pip install -q -e ".[$extras]"' in ci


def test_readme_links_resolve():
    """Every relative link of the README names a file or folder of the repository."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    assert [link for link in local if not (ROOT / link).exists()] == []


def _bullet_names(page: str, section: str, lead: str) -> set[str]:
    """The backticked names of the bullet list under ``section`` that follows ``lead``."""
    text = (ROOT / page).read_text()
    body = text[text.index(section) :]
    body = body[body.index(lead) :]
    bullets = body[: body.index("\n\n", body.index("\n- "))]
    names = set()
    for item in re.split(r"\n- ", bullets)[1:]:
        head = item.split(":")[0] if lead.startswith("Everything else") else item
        names |= set(re.findall(r"`(\w+)`", head))
    return names


def test_resume_rules_documented():
    """docs/checkpoints.md names exactly the fields a resume must keep and may change."""
    from qkclip_eqx._run_config import MAY_CHANGE, MUST_MATCH

    page, section = "docs/checkpoints.md", "## What a resume may change"
    assert _bullet_names(page, section, "These must match") == set(MUST_MATCH)
    assert _bullet_names(page, section, "Everything else may change") == set(MAY_CHANGE)


def test_train_step_metrics_documented():
    """Every metric the README's step returns is named in docs/train-step.md."""
    scope, _ = _namespace("README.md", "qc.make_train_step(")
    text = (ROOT / "docs" / "train-step.md").read_text()
    section = text[text.index("## Metrics") :]
    assert {"loss", "max_logits", "heads_clipped"} <= set(scope["metrics"])
    assert set(scope["metrics"]) <= set(re.findall(r"`(\w+)`", section))


def test_docs_own_models_example():
    """docs/own-models.md: the user's eqx.nn.MultiheadAttention model trains with
    the clip, routes embedding and head to AdamW, and after a clip at the
    median S re-running the batch gives min(S, tau) per head."""
    scope, block = _namespace("docs/own-models.md", "qc.ClippableMultiheadAttention(")
    qc, model, tokens = scope["qc"], scope["model"], scope["tokens"]
    assert scope["metrics"]["max_logits"].shape == (4,)
    assert isinstance(scope["plain"], eqx.nn.MultiheadAttention)
    assert "tau=100.0" in block.replace(" ", "")
    # routing: the embedding and head are in no Muon state, the attention's matrices are
    muon_state = scope["state"].inner_states["muon"].inner_state[0]
    paths = {
        jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(muon_state)[0]
    }
    assert any(".attn.mha.query_proj.weight" in p for p in paths)
    assert not any(".embedding" in p or ".head" in p for p in paths)
    _, s = map(np.asarray, _forward(model, tokens))
    tau = float(np.median(s))
    _, s_after = map(np.asarray, _forward(qc.qk_clip(model, jnp.asarray(s), tau), tokens))
    # measured rel 9.2e-8 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(s_after, np.minimum(s, tau), rtol=5e-7)
    assert np.sum(s > tau) == 2


@pytest.mark.parametrize("mode", ["query", "query_key", "group"])
def test_the_clip_leaves_weights_bit_identical_as_the_readme_says(mode):
    """The README and docs/index.md: the clip leaves the weights of a head
    with S <= tau bit-identical, except in GQA's query_key and group modes,
    which also scale what the head shares with a clipped group-mate."""
    import qkclip_eqx as qc

    cfg = qc.GQAConfig(dim=8, n_heads=4, head_dim=4, n_kv_heads=2, clip_mode=mode)
    attn = qc.GQAttention(cfg, key=jax.random.key(0))
    clipped = qc.qk_clip(attn, jnp.array([200.0, 1.0, 1.0, 1.0]), 100.0)  # head 0 over tau
    mate_q = np.array_equal(clipped.wq[1], attn.wq[1])  # head 1: S <= tau, shares key 0
    shared_k = np.array_equal(clipped.wk[0], attn.wk[0])
    assert np.array_equal(clipped.wq[2:], attn.wq[2:]) and np.array_equal(clipped.wk[1], attn.wk[1])
    assert (mate_q and shared_k) == (mode == "query")
    for page in ("README.md", "docs/index.md"):
        text = " ".join((ROOT / page).read_text().split())
        assert (
            "Otherwise it leaves the weights bit-identical, except in GQA's `query_key` and "
            "`group` clip modes, which also scale the key (and, in `group`, the queries) shared "
            "with a clipped head" in text
        ), page
