"""Shared test helper: build modules fast."""

import importlib.util
import math
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def init_from_numpy(make, seed: int):
    """``make(key)``'s structure, filled from NumPy with the library's own init
    distribution: N(0, 1/fan_in) matrices, N(0, 1) embedding, unit norm gains.

    Building through ``eqx.filter_eval_shape`` avoids compiling a random-number
    kernel for every weight shape, which costs seconds per model on 2 cores."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        name = jtu.keystr(path)
        if "norm" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        scale = 1.0 if name.endswith(".embed") else 1.0 / math.sqrt(leaf.shape[-1])
        return jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)

    return jtu.tree_map_with_path(fill, eqx.filter_eval_shape(make, jax.random.key(0)))


# --------------------------------------------------------------------------
# Fixed training data: the same bytes on every machine and Python version
# --------------------------------------------------------------------------

_LETTERS = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", np.uint8)


def synthetic_text(n_bytes: int, seed: int = 0) -> bytes:
    """``n_bytes`` of English-like text: sentences of words drawn (skewed to the
    first ones, as in Zipf's law) from a fixed vocabulary of 400 made-up words.

    Drawn from ``np.random.PCG64(seed).random_raw``, whose stream NumPy keeps
    stable across releases, so the tests' training data does not depend on the
    running interpreter (its standard library) or on NumPy's version."""
    raw = np.random.PCG64(seed).random_raw(3 * 400 + 2 * (n_bytes // 3 + 16)).astype(np.uint64)
    head, raw = raw[: 3 * 400], raw[3 * 400 :]
    lengths = 2 + (head[:400] % 7).astype(int)  # 2..8 letters
    letters = _LETTERS[(head[400:] % 26).astype(int)]
    words = []
    for i, n in enumerate(lengths):
        w = letters[2 * i : 2 * i + n] if 2 * i + n <= len(letters) else letters[-n:]
        words.append(w.tobytes())
    # the product of two uniforms on 0..399, over 400: index k has weight ~ log(400 / k)
    a, b = raw[0::2] % 400, raw[1::2] % 400
    picks = (a * b // 400).astype(int)
    out, n_out = [], 0
    for j, k in enumerate(picks):
        word = words[k]
        if j % 9 == 0:
            word = word[:1].upper() + word[1:]
        out.append(word + (b".\n" if j % 9 == 8 else b" "))
        n_out += len(out[-1])
        if n_out >= n_bytes:
            break
    text = b"".join(out)[:n_bytes]
    assert len(text) == n_bytes, "synthetic_text: not enough draws"
    return text


def tiny_tokenizer(path: pathlib.Path) -> pathlib.Path:
    """A byte-level BPE `tokenizer.json` of 300 ids at `path`, trained by the
    tokenizers library's own trainer on synthetic text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([synthetic_text(50_000, seed=1).decode("utf-8", "replace")], trainer)
    tok.save(str(path))
    return path


def synthetic_corpus(train_bytes: int = 200_000, val_bytes: int = 65_536, seed: int = 0):
    """A :class:`qkclip_eqx.TokenData` of :func:`synthetic_text` byte tokens."""
    from qkclip_eqx import TokenData

    text = np.frombuffer(synthetic_text(train_bytes + val_bytes, seed), np.uint8).astype(np.uint16)
    train, val = text[:train_bytes], text[train_bytes:]
    train.flags.writeable = val.flags.writeable = False
    return TokenData(train, val, 256, f"synthetic text (seed {seed}), byte tokens, vocab 256")


# --------------------------------------------------------------------------
# S of every layer on given layer inputs
# --------------------------------------------------------------------------


@eqx.filter_jit
def layer_inputs(model, tokens):
    """The residual stream entering each layer of ``model``, per example:
    ``[batch, layers, seq, dim]``. ``tokens`` are the model's inputs (for a
    training batch ``[batch, seq + 1]``, its ``[:, :-1]``)."""
    params, static = eqx.partition(model.blocks, eqx.is_array)

    def one(tok):
        def layer(x, p):
            block = eqx.combine(p, static)
            return block(x)[0], x

        _, xs = jax.lax.scan(layer, model.embed[tok], params)
        return xs

    return jax.vmap(one)(tokens)


@eqx.filter_jit
def attention_s(model, xs):
    """S per layer and head of ``model``'s attentions, each layer fed the given
    inputs ``xs`` ([batch, layers, seq, dim], e.g. another model's
    :func:`layer_inputs`), max over the batch: ``[layers, heads]``.

    Clipping layer l changes the inputs of the layers after it, so the clip's
    identity S' = min(S, tau) holds layer by layer on the pre-clip inputs."""
    params, static = eqx.partition(model.blocks, eqx.is_array)

    def one(x_layers):
        def layer(_, args):
            p, x = args
            block = eqx.combine(p, static)
            return None, block.attn(block.attn_norm(x))[1]

        return jax.lax.scan(layer, None, (params, x_layers))[1]

    return jnp.max(jax.vmap(one)(xs), axis=0)


@eqx.filter_jit
def unclipped_update(model, opt, opt_state, tokens):
    """The train step without the clip: loss gradients and the optimizer's update."""
    from qkclip_eqx import next_token_loss  # noqa: PLC0415

    params, static = eqx.partition(model, eqx.is_array)
    grads = jax.grad(lambda p: next_token_loss(eqx.combine(p, static), tokens)[0])(params)
    updates, _ = opt.update(grads, opt_state, params)
    return eqx.combine(optax.apply_updates(params, updates), static)


def corrupt_checkpoint_arrays(ckpt) -> None:
    """Flip bytes in the middle of the largest array file of a checkpoint."""
    blob = max(
        (p for p in (ckpt / "state" / "d").iterdir() if p.is_file()), key=lambda p: p.stat().st_size
    )
    raw = bytearray(blob.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):
        raw[i] ^= 0xFF
    blob.write_bytes(bytes(raw))
