"""The speed benchmark's model in PyTorch: what a researcher would write instead.

Run by ``scripts/bench_speed.py`` in a Python that has torch (never a dependency
of this project; for example ``python3 -m venv /tmp/torch && /tmp/torch/bin/pip
install torch numpy``). It is the benchmark model of ``bench_speed.py`` in plain
eager PyTorch, float32:

- MLA (DeepSeek-V2, arXiv 2405.04434): q LoRA + RMSNorm, latent c_KV + RMSNorm,
  one RoPE key shared by the heads (interleaved pairs), causal softmax
  attention that also returns the per-head max logit S, output projection;
- SwiGLU MLP, pre-norm blocks, untied LM head;
- Muon (Nesterov momentum 0.95, Newton-Schulz 5 steps with coefficients
  (3.4445, -4.7750, 2.0315) in float32, update RMS matched to AdamW by
  0.2 sqrt(max(n, m)), decoupled weight decay) on the hidden matrices and AdamW
  (0.9, 0.95) on embedding, head and gains (Kimi K2 report, Algorithm 1);
- QK-Clip after the step (q_C, k_C by sqrt(gamma), q_R by gamma).

With ``--serve`` it reads commands from stdin, one per line: ``step``, ``fwd``,
``fwdbwd``, ``update``; it runs one of that piece, and prints the seconds it
took, and the process's minor page faults and system CPU seconds meanwhile.
The benchmark interleaves these with its own timings. Without ``--serve`` it
times ``--steps`` steps and prints ms/step.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = dict(
        dim=256,
        layers=4,
        heads=4,
        q_lora=96,
        kv_lora=64,
        nope=32,
        rope=16,
        v=32,
        mlp=704,
        vocab=256,
        seq=256,
        batch=8,
        steps=20,
        warmup=3,
        tau=100.0,
        lr=2e-3,
        threads=2,
    )
    for k, v in defaults.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward+backward")
    p.add_argument("--serve", action="store_true", help="time one piece per stdin command")
    return p.parse_args(argv)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def rope(x, cos, sin):  # interleaved pairs
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)


class MLA(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.q_a = nn.Linear(a.dim, a.q_lora, bias=False)
        self.q_norm = RMSNorm(a.q_lora)
        self.q_b = nn.Linear(a.q_lora, a.heads * (a.nope + a.rope), bias=False)
        self.kv_a = nn.Linear(a.dim, a.kv_lora + a.rope, bias=False)
        self.kv_norm = RMSNorm(a.kv_lora)
        self.kv_b = nn.Linear(a.kv_lora, a.heads * (a.nope + a.v), bias=False)
        self.o = nn.Linear(a.heads * a.v, a.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        a, (B, T, _) = self.a, x.shape
        q = self.q_b(self.q_norm(self.q_a(x))).view(B, T, a.heads, a.nope + a.rope).transpose(1, 2)
        q_c, q_r = q.split([a.nope, a.rope], -1)
        latent, k_r = self.kv_a(x).split([a.kv_lora, a.rope], -1)
        kv = self.kv_b(self.kv_norm(latent)).view(B, T, a.heads, a.nope + a.v).transpose(1, 2)
        k_c, v = kv.split([a.nope, a.v], -1)
        q_r, k_r = rope(q_r, cos, sin), rope(k_r[:, None], cos, sin)
        s = (q_c @ k_c.transpose(-1, -2) + q_r @ k_r.transpose(-1, -2)) / math.sqrt(a.nope + a.rope)
        s = s.masked_fill(mask, float("-inf"))
        s_max = s.detach().amax(dim=(0, 2, 3))  # [heads]
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, a.heads * a.v)
        return self.o(o), s_max


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n1, self.attn, self.n2 = RMSNorm(a.dim), MLA(a), RMSNorm(a.dim)
        self.w1 = nn.Linear(a.dim, a.mlp, bias=False)
        self.w3 = nn.Linear(a.dim, a.mlp, bias=False)
        self.w2 = nn.Linear(a.mlp, a.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        h, s = self.attn(self.n1(x), cos, sin, mask)
        x = x + h
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h)), s


class LM(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.emb = nn.Embedding(a.vocab, a.dim)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm, self.head = RMSNorm(a.dim), nn.Linear(a.dim, a.vocab, bias=False)
        inv = 1.0 / 10000 ** (torch.arange(0, a.rope, 2) / a.rope)
        ang = torch.arange(a.seq)[:, None] * inv[None]
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())
        self.register_buffer("mask", ~torch.ones(a.seq, a.seq, dtype=torch.bool).tril())

    def forward(self, t):
        x, ss = self.emb(t), []
        for b in self.blocks:
            x, s = b(x, self.cos, self.sin, self.mask)
            ss.append(s)
        return self.head(self.norm(x)), torch.stack(ss)


class Muon:
    """Muon with a float32 Newton-Schulz on the smaller Gram side."""

    def __init__(self, params, lr, wd=0.1, mu=0.95):
        self.params, self.lr, self.wd, self.mu = list(params), lr, wd, mu
        self.bufs = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.bufs):
            m.mul_(self.mu).add_(p.grad)
            g = p.grad.add(m, alpha=self.mu)  # Nesterov
            x = g / (g.norm() + 1e-7)
            tall = x.shape[0] > x.shape[1]
            if tall:
                x = x.T
            for _ in range(5):
                gram = x @ x.T
                x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
            if tall:
                x = x.T
            p.mul_(1 - self.lr * self.wd).add_(x, alpha=-self.lr * 0.2 * math.sqrt(max(p.shape)))

    def zero_grad(self):
        for p in self.params:
            p.grad = None


class Twin:
    def __init__(self, a):
        torch.manual_seed(0)
        torch.set_num_threads(a.threads)
        self.a, self.model = a, LM(a)
        named = list(self.model.named_parameters())
        hidden = [p for n, p in named if p.ndim == 2 and not n.startswith(("emb", "head"))]
        rest = [p for n, p in named if not (p.ndim == 2 and not n.startswith(("emb", "head")))]
        self.opts = [
            Muon(hidden, lr=a.lr),
            torch.optim.AdamW(rest, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1),
        ]
        g = torch.Generator().manual_seed(0)
        self.batches = [
            torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g) for _ in range(4)
        ]
        self.i = 0
        self.fwd_bwd = torch.compile(self._fwd_bwd) if a.compile else self._fwd_bwd

    def _batch(self):
        self.i += 1
        return self.batches[self.i % 4]

    def _loss(self, t):
        logits, s = self.model(t[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.a.vocab), t[:, 1:].reshape(-1)), s

    def _fwd_bwd(self, t):
        loss, s = self._loss(t)
        loss.backward()
        return loss, s

    @torch.no_grad()
    def qk_clip(self, s_all):
        a = self.a
        for blk, s in zip(self.model.blocks, s_all):
            g = torch.where(s > a.tau, a.tau / s, torch.ones_like(s))
            qb = blk.attn.q_b.weight.view(a.heads, a.nope + a.rope, -1)
            qb[:, : a.nope] *= g.sqrt()[:, None, None]
            qb[:, a.nope :] *= g[:, None, None]
            kvb = blk.attn.kv_b.weight.view(a.heads, a.nope + a.v, -1)
            kvb[:, : a.nope] *= g.sqrt()[:, None, None]

    def update(self):
        for o in self.opts:
            o.step()
            o.zero_grad()

    def step(self):
        _, s = self.fwd_bwd(self._batch())
        self.update()
        self.qk_clip(s)

    def fwd(self):
        with torch.no_grad():
            self._loss(self._batch())

    def fwdbwd(self):
        self.fwd_bwd(self._batch())
        for o in self.opts:
            o.zero_grad()


def main(argv=None) -> None:
    a = parse_args(argv)
    twin = Twin(a)
    for _ in range(a.warmup):
        twin.step()
    if not a.serve:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            twin.step()
        dt = (time.perf_counter() - t0) / a.steps
        print(
            f"torch {torch.__version__} threads={torch.get_num_threads()} compile={a.compile}: "
            f"{dt * 1e3:.1f} ms/step, {a.batch * a.seq / dt:.0f} tokens/s"
        )
        return
    print(f"ready torch {torch.__version__} threads={torch.get_num_threads()}", flush=True)
    pieces = {"step": twin.step, "fwd": twin.fwd, "fwdbwd": twin.fwdbwd, "update": twin.update}
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "update":
            twin.fwd_bwd(twin._batch())  # grads to update with, not timed
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        pieces[cmd]()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(dt, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime, flush=True)


if __name__ == "__main__":
    main()
