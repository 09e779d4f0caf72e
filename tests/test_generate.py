"""generate and qkclip-generate: greedy tokens are the full forward's argmax
and bit-identical across runs; sampled tokens are the documented draws from
the full forward's logits; the CLI samples from a saved checkpoint."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from builders import init_from_numpy
from qkclip_eqx import GQAConfig, MLAConfig, Transformer, TransformerConfig, generate
from qkclip_eqx._checkpoint import save_checkpoint
from qkclip_eqx._run_config import meta_of, optimizer, preset
from qkclip_eqx.cli import generate as cli

VOCAB, PROMPT, NEW = 40, 4, 7
CONFIG = TransformerConfig(
    vocab_size=VOCAB,
    n_layers=2,
    mlp_hidden=32,
    attention=MLAConfig(
        dim=16,
        n_heads=2,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        q_lora_rank=6,
    ),
)
CONFIG_S = (CONFIG.n_layers, CONFIG.n_heads)
run = eqx.filter_jit(generate)


@pytest.fixture(scope="module")
def model():
    m = init_from_numpy(lambda k: Transformer(CONFIG, key=k), seed=5)
    prompt = jnp.asarray(np.random.default_rng(6).integers(0, VOCAB, PROMPT), jnp.int32)
    return m, prompt


@eqx.filter_jit
def forward(m, tokens):
    return m(tokens)


def test_greedy_is_the_full_forward_argmax_and_bit_identical(model):
    m, prompt = model
    tokens, s = run(m, prompt, NEW)
    again, s_again = run(m, prompt, NEW)
    assert tokens.shape == (NEW,) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(again))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_again))
    seq = jnp.concatenate([prompt, tokens])
    logits, s_full = forward(m, seq[:-1])  # the last token's logits are never computed
    np.testing.assert_array_equal(
        np.asarray(tokens), np.argmax(np.asarray(logits[PROMPT - 1 :]), -1)
    )
    # measured rel 6.7e-7 (jax 0.10.2 and 0.12.0.1, CPU)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_full), rtol=3e-6)
    assert len(set(np.asarray(tokens).tolist())) > 1  # not a constant stream


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5)])
def test_sampling_draws_the_documented_tokens(model, temperature, top_k):
    """Token i is jax.random.categorical(split(key, NEW)[i], logits / T) over the
    top_k largest logits, the logits being the full forward's of the sequence so far."""
    m, prompt = model
    key = jax.random.key(11)
    tokens, _ = run(m, prompt, NEW, temperature=temperature, top_k=top_k, key=key)
    again, _ = run(m, prompt, NEW, temperature=temperature, top_k=top_k, key=key)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(again))
    other, _ = run(m, prompt, NEW, temperature=temperature, top_k=top_k, key=jax.random.key(12))
    assert not np.array_equal(np.asarray(tokens), np.asarray(other))
    logits, _ = forward(m, jnp.concatenate([prompt, tokens])[:-1])
    logits = np.asarray(logits[PROMPT - 1 :], np.float64) / temperature
    keys = jax.random.split(key, NEW)
    for i in range(NEW):
        row = logits[i].copy()
        if top_k is not None:
            row[np.argsort(row)[:-top_k]] = -np.inf
            assert np.isfinite(row[int(tokens[i])])
        assert int(jax.random.categorical(keys[i], jnp.asarray(row, jnp.float32))) == int(tokens[i])


def test_vmap_over_keys_gives_each_keys_sample(model):
    m, prompt = model
    keys = jax.random.split(jax.random.key(5), 3)
    batch, s = eqx.filter_jit(jax.vmap(lambda k: generate(m, prompt, NEW, temperature=1.0, key=k)))(
        keys
    )
    assert batch.shape == (3, NEW) and s.shape == (3, *CONFIG_S)
    for i in range(3):
        one, _ = run(m, prompt, NEW, temperature=1.0, key=keys[i])
        np.testing.assert_array_equal(np.asarray(batch[i]), np.asarray(one))


def test_top_k_one_is_greedy(model):
    m, prompt = model
    greedy, _ = run(m, prompt, NEW)
    sampled, _ = run(m, prompt, NEW, temperature=1.3, top_k=1, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(sampled))


def test_bad_arguments_are_named(model):
    m, prompt = model
    with pytest.raises(ValueError, match="key"):
        generate(m, prompt, 3, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, prompt, 3, temperature=-1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        generate(m, prompt, 3, temperature=1.0, top_k=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, prompt, 0)
    with pytest.raises(ValueError, match="prompt"):
        generate(m, prompt[:0], 3)


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def test_gqa_greedy_is_the_full_forward_argmax():
    """A GQA model (two query heads per key head) generates over its k/v cache:
    the tokens are the full forward's argmax and S is the full forward's."""
    gqa = dataclasses.replace(
        CONFIG, attention=GQAConfig(dim=16, n_heads=4, n_kv_heads=2, head_dim=8)
    )
    m = init_from_numpy(lambda k: Transformer(gqa, key=k), seed=5)
    prompt = jnp.asarray(np.random.default_rng(6).integers(0, VOCAB, PROMPT), jnp.int32)
    tokens, s = run(m, prompt, NEW)
    logits, s_full = forward(m, jnp.concatenate([prompt, tokens])[:-1])
    np.testing.assert_array_equal(
        np.asarray(tokens), np.argmax(np.asarray(logits[PROMPT - 1 :]), -1)
    )
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_full), rtol=1e-5)
    assert s.shape == (2, 4) and len(set(np.asarray(tokens).tolist())) > 1


def test_cli_generates_from_a_gqa_checkpoint(tmp_path, capsys):
    cfg = preset("tiny", out=str(tmp_path), n_layers=1, attention="gqa")
    m = init_from_numpy(lambda k: Transformer(cfg.model_config(256), key=k), seed=9)
    state = optimizer(cfg).init(eqx.filter(m, eqx.is_array))
    meta = {**meta_of(cfg, 256), "step": 1, "run": dataclasses.asdict(cfg)}
    save_checkpoint(tmp_path, 1, (m, state), meta=meta)
    assert cli.main([str(tmp_path), "--prompt-tokens", "100,101", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    tokens, _ = run(m, jnp.array([100, 101], jnp.int32), 4)
    text = bytes([100, 101, *np.asarray(tokens).tolist()]).decode("utf-8", "replace")
    assert text in out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding one checkpoint of a tiny byte-level model, as
    qkclip-train writes it (model and optimizer state, meta with the run)."""
    out = tmp_path_factory.mktemp("run")
    cfg = preset("tiny", out=str(out))
    m = init_from_numpy(lambda k: Transformer(cfg.model_config(256), key=k), seed=7)
    state = optimizer(cfg).init(eqx.filter(m, eqx.is_array))
    meta = {**meta_of(cfg, 256), "step": 3, "run": dataclasses.asdict(cfg)}
    save_checkpoint(out, 3, (m, state), meta=meta)
    return out, m


def test_cli_greedy_matches_generate(run_dir, capsys):
    out, m = run_dir
    assert cli.main([str(out), "--prompt", "def f(", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr()
    prompt = jnp.asarray(np.frombuffer(b"def f(", np.uint8).astype(np.int32))
    tokens, _ = run(m, prompt, 12)
    text = (b"def f(" + np.asarray(tokens).astype(np.uint8).tobytes()).decode("utf-8", "replace")
    assert "ckpt_00000003 (step 3)" in printed.out
    assert text in printed.out
    assert "12 tokens in" in printed.err and "layer" in printed.err


def test_cli_token_prompt_and_sampling(run_dir, capsys):
    out, _ = run_dir
    args = [
        str(out),
        "--prompt-tokens",
        "100,101",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.9",
        "--top-k",
        "8",
        "--seed",
        "3",
    ]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first
    # a byte-level model prints text: tokens 100, 101 are "de"
    assert first.splitlines()[1].startswith("de")


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "exactly one of --prompt"),
        (["--prompt", ""], "empty"),
        (["--prompt-tokens", "1,300"], "prompt-tokens"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
    ],
)
def test_cli_bad_input_is_named(run_dir, capsys, args, message):
    out, _ = run_dir
    assert cli.main([str(out), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_token_vocabulary_prints_ids(tmp_path, capsys):
    """A model whose vocabulary is not bytes takes --prompt-tokens and prints ids."""
    cfg = preset("tiny", out=str(tmp_path), n_layers=1)
    m = init_from_numpy(lambda k: Transformer(cfg.model_config(320), key=k), seed=8)
    state = optimizer(cfg).init(eqx.filter(m, eqx.is_array))
    save_checkpoint(
        tmp_path,
        1,
        (m, state),
        meta={**meta_of(cfg, 320), "step": 1, "run": dataclasses.asdict(cfg)},
    )
    assert cli.main([str(tmp_path), "--prompt", "x"]) == 2
    assert "--prompt-tokens" in capsys.readouterr().err
    assert cli.main([str(tmp_path), "--prompt-tokens", "300,7", "--max-new-tokens", "3"]) == 0
    ids = capsys.readouterr().out.strip().splitlines()[-1].split(",")
    tokens, _ = run(m, jnp.array([300, 7], jnp.int32), 3)
    assert ids == ["300", "7", *map(str, np.asarray(tokens).tolist())]


def test_cli_without_checkpoint(tmp_path, capsys):
    assert cli.main([str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
