"""Independent float64 NumPy references, written from the papers and the
documented weight layouts; no library function is called to compute them.

- :func:`np_rms_norm`, :func:`np_swiglu`: Zhang & Sennrich 2019; Shazeer 2020
  (arXiv 2002.05202).
- :func:`np_clip_factors`, :func:`np_qk_clip`: QK-Clip, Kimi K2 report (arXiv
  2507.20534), sec. 2.1 and Algorithm 1, on a :class:`qkclip_eqx.Transformer`'s
  stacked attention weights (and, for GQA, the two shared-key rules that
  ``GQAttention.scale_heads`` documents).
- :class:`NumpyMuonClip`: Muon (Moonlight, arXiv 2502.16982; K2 Algorithm 1)
  for the matrices of the blocks, AdamW for the rest, as ``qkclip_eqx.muon_adamw``
  says it computes them.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def np_rms_norm(x, w, eps):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis."""
    x = np.asarray(x, np.float64)
    return np.asarray(w, np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_swiglu(x, w_gate, w_up, w_down):
    """``W_down (silu(W_gate x) * W_up x)`` with silu(z) = z / (1 + e^-z); weights (out, in)."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    g = x @ w_gate.T
    return ((g / (1.0 + np.exp(-g))) * (x @ w_up.T)) @ w_down.T


# --------------------------------------------------------------------------
# QK-Clip
# --------------------------------------------------------------------------


def np_clip_factors(s, tau) -> np.ndarray:
    """gamma = tau / S where S > tau (finite), else 1 (K2 sec. 2.1)."""
    s = np.asarray(s, np.float64)
    over = np.isfinite(s) & (s > tau)
    return np.where(over, tau / np.where(over, s, 1.0), 1.0)


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    """Every array leaf of ``tree`` as a host array, keyed by its key path."""
    flat = jtu.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return {jtu.keystr(p): np.asarray(x) for p, x in flat}


def np_qk_clip(model, s, tau: float, alpha: float = 0.5, prefix: str = ".blocks.attn"):
    """The expected array leaves of ``model`` after QK-Clip with S ``s``
    (``[layers, heads]`` for a Transformer; ``[heads]`` for one attention
    module with ``prefix=""``), as a dict path -> array.

    MLA: q_C rows by gamma^alpha, q_R rows by gamma, k_C rows of wkv_b by
    gamma^(1-alpha); everything else untouched. MHA: W_q^h by gamma^alpha,
    W_k^h by gamma^(1-alpha). GQA "query": W_q^h by gamma_h, keys untouched;
    GQA "query_key": eta = the group's smallest gamma, the shared key by
    eta^(1-alpha), W_q^h by gamma_h / eta^(1-alpha) (every head's logits by
    gamma_h); GQA "group": its queries by eta^alpha, the shared key by
    eta^(1-alpha)."""
    attn = model
    for name in filter(None, prefix.split(".")):
        attn = getattr(attn, name)
    c = attn.config
    out = leaves_by_path(model)
    gamma = np_clip_factors(s, tau)  # [*layers, heads]

    def scaled(name, factor, rows=slice(None)):
        w = out[f"{prefix}.{name}"]
        new = w.astype(np.float64)
        new[..., rows, :] *= factor[..., None, None]
        out[f"{prefix}.{name}"] = new.astype(w.dtype)

    if hasattr(c, "kv_lora_rank"):  # MLA
        nope = c.qk_nope_head_dim
        scaled("wq", gamma**alpha, slice(0, nope))
        scaled("wq", gamma, slice(nope, None))
        scaled("wkv_b", gamma ** (1 - alpha), slice(0, nope))
        return out
    group = c.n_heads // c.n_kv_heads
    if group == 1:
        scaled("wq", gamma**alpha)
        scaled("wk", gamma ** (1 - alpha))
    elif c.clip_mode == "query":
        scaled("wq", gamma)
    elif c.clip_mode == "query_key":
        eta = gamma.reshape(*gamma.shape[:-1], c.n_kv_heads, group).min(axis=-1)
        scaled("wq", gamma / np.repeat(eta ** (1 - alpha), group, axis=-1))
        scaled("wk", eta ** (1 - alpha))
    else:
        eta = gamma.reshape(*gamma.shape[:-1], c.n_kv_heads, group).min(axis=-1)
        scaled("wq", np.repeat(eta**alpha, group, axis=-1))
        scaled("wk", eta ** (1 - alpha))
    return out


def heads_scaled(model, s, tau: float, prefix: str = ".blocks.attn") -> np.ndarray:
    """Which (layer, head) pairs have their logits scaled by QK-Clip: S > tau,
    and in GQA "group" mode every head of a group with one head over tau ("query"
    and "query_key" mode scale every head's logits by its own gamma)."""
    attn = model
    for name in filter(None, prefix.split(".")):
        attn = getattr(attn, name)
    c = attn.config
    over = np_clip_factors(s, tau) < 1
    if getattr(c, "clip_mode", "query") == "group" and c.n_heads != c.n_kv_heads:
        group = c.n_heads // c.n_kv_heads
        grouped = over.reshape(*over.shape[:-1], c.n_kv_heads, group).any(axis=-1)
        over = np.repeat(grouped, group, axis=-1)
    return over


def assert_leaves_close(model, expected: dict[str, np.ndarray], rtol=2e-6, atol=0.0, what=""):
    """Every array leaf of ``model`` against ``expected`` (same paths)."""
    got = leaves_by_path(model)
    assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
    for path, want in expected.items():
        np.testing.assert_allclose(got[path], want, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


# --------------------------------------------------------------------------
# Muon + AdamW
# --------------------------------------------------------------------------


def np_newton_schulz(m: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
    """K2/Moonlight's quintic Newton-Schulz: X0 = M / (||M||_F + eps), then
    X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation."""
    a, b, c = NS_COEFFS
    x = np.asarray(m, np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class NumpyMuonClip:
    """``qkclip_eqx.muon_adamw`` over several steps, in float64.

    Leaves whose path starts with ``.blocks.`` (a Transformer's stacked
    blocks, layer axis first) and have rank >= 3 get Muon, each layer's
    ``(out..., in)`` weight orthogonalised as one ``(prod(out), in)`` matrix;
    the rest AdamW. With count t = 1, 2, ... and lr_t = ``lr(t - 1)``:

    Muon, as ``optax.contrib.scale_by_muon`` computes it (and ``_optim.py``
    says): the momentum is an EMA with bias correction and Nesterov's look-ahead,

        M_t = mu M_{t-1} + (1 - mu) G_t
        N_t = mu M_t / (1 - mu^(t+1)) + (1 - mu) G_t / (1 - mu^t)
        W  <- W - lr_t (NS5(N_t) * 0.2 sqrt(max(fan_in, fan_out)) + lambda W)

    AdamW (betas b1, b2; decoupled decay lambda):

        m_t, v_t = EMAs of G and G^2;  W <- W - lr_t (m^_t / (sqrt(v^_t) + eps) + lambda W).
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr,
        *,
        weight_decay=0.1,
        momentum=0.95,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        rms=0.2,
        ns_steps=5,
    ):
        self.lr, self.wd, self.mu, self.b1, self.b2 = lr, weight_decay, momentum, b1, b2
        self.eps, self.rms, self.ns_steps = eps, rms, ns_steps
        self.muon = {k: k.startswith(".blocks.") and v.ndim >= 3 for k, v in params.items()}
        self.m = {k: np.zeros(v.shape) for k, v in params.items()}
        self.v = {k: np.zeros(v.shape) for k, v in params.items()}
        self.t = 0

    def _muon(self, k, g, w):
        mu, t = self.mu, self.t
        self.m[k] = mu * self.m[k] + (1 - mu) * g
        nesterov = mu * self.m[k] / (1 - mu ** (t + 1)) + (1 - mu) * g / (1 - mu**t)
        out = np.empty_like(g)
        for layer in range(g.shape[0]):
            mat = nesterov[layer].reshape(-1, g.shape[-1])
            o = np_newton_schulz(mat, self.ns_steps, self.eps)
            out[layer] = (o * self.rms * math.sqrt(max(mat.shape))).reshape(g.shape[1:])
        return out + self.wd * w

    def _adamw(self, k, g, w):
        t = self.t
        self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
        self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
        m_hat = self.m[k] / (1 - self.b1**t)
        v_hat = self.v[k] / (1 - self.b2**t)
        return m_hat / (np.sqrt(v_hat) + self.eps) + self.wd * w

    def update(
        self, grads: dict[str, np.ndarray], params: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The updates (to be added to ``params``) of the next step."""
        self.t += 1
        lr = float(self.lr(self.t - 1)) if callable(self.lr) else float(self.lr)
        out = {}
        for k, g in grads.items():
            g, w = np.asarray(g, np.float64), np.asarray(params[k], np.float64)
            u = self._muon(k, g, w) if self.muon[k] else self._adamw(k, g, w)
            out[k] = -lr * u
        return out


def tree_from_paths(like, values: dict[str, np.ndarray]):
    """``like`` (a PyTree of arrays) with each array leaf replaced by ``values[path]``."""

    def fill(path, leaf):
        return (
            jax.numpy.asarray(values[jtu.keystr(path)], leaf.dtype) if eqx.is_array(leaf) else leaf
        )

    return jtu.tree_map_with_path(fill, like)
