"""qkclip-generate: sample from a trained checkpoint with its KV cache (latent for MLA, k/v for GQA).

    qkclip-generate runs/default --prompt "def main(" --max-new-tokens 256
    qkclip-generate runs/default/ckpt_00000600 --prompt "import " --temperature 0.8 --top-k 40 --seed 1
    qkclip-generate runs/gpt2 --prompt-tokens 464,2068 --max-new-tokens 64

Byte-level models (vocab 256) take `--prompt` as text (its bytes) and print
text; a run trained with `--tokenizer` encodes `--prompt` and decodes with its
tokenizer.json; other vocabularies take `--prompt-tokens` and print token ids. Greedy
(`--temperature 0`, the default) is deterministic; sampling draws with
`--seed`. Also prints S, the max logit per layer and head over the prompt
and the generated tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._evaluate import format_table, marked_tau
from .._generate import generate
from .._run import load_run
from ._flags import add_cache_flag, use_compilation_cache


def _tokenizer(path: str | None) -> Any:
    """The run's own `tokenizer.json` (a run trained with `--tokenizer`), or None."""
    if path is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(
            f'the run was tokenised by {path}: pip install "qkclip_eqx[tokenizers]" to read it'
        ) from None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the library raises its own Exception subclass
        raise ValueError(f"the run's tokenizer {path}: {e}") from None


def _prompt(args: argparse.Namespace, vocab_size: int, tokenizer: Any = None) -> np.ndarray:
    if (args.prompt is None) == (args.prompt_tokens is None):
        raise ValueError("give exactly one of --prompt and --prompt-tokens")
    if args.prompt is not None and tokenizer is not None:
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        tokens = np.asarray(ids, np.int32)
    elif args.prompt is not None:
        if vocab_size != 256:
            raise ValueError(
                f"--prompt is UTF-8 bytes for a byte-level model (vocab 256); this "
                f"model's vocab is {vocab_size}: use --prompt-tokens"
            )
        # the prompt's own bytes: a byte-level model takes any, UTF-8 or not (the
        # command line hands undecodable bytes over as surrogates)
        tokens = np.frombuffer(args.prompt.encode("utf-8", "surrogateescape"), np.uint8)
        tokens = tokens.astype(np.int32)
    else:
        tokens = np.array([int(t) for t in args.prompt_tokens.split(",") if t.strip()], np.int32)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(
                f"--prompt-tokens must lie in [0, {vocab_size}), got {args.prompt_tokens!r}"
            )
    if tokens.size == 0:
        raise ValueError("the prompt is empty")
    return tokens


def _naming(path: str, e: Exception) -> str:
    """The error, with the checkpoint path said once: a message that names it
    already (a checkpoint error) is not prefixed with it again."""
    return str(e) if path.rstrip("/") in str(e) else f"{path}: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qkclip-generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        help="a run directory (its newest checkpoint that restores), or one checkpoint "
        "directory in it (RUN/ckpt_00000600)",
    )
    parser.add_argument("--prompt", default=None, help="text (byte-level models)")
    parser.add_argument("--prompt-tokens", default=None, help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="the sampling key (temperature > 0)")
    add_cache_flag(parser)
    args = parser.parse_args(argv)
    use_compilation_cache(args)
    try:
        if args.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_k is not None and args.top_k <= 0:
            raise ValueError(f"--top-k must be > 0, got {args.top_k}")
        run = load_run(args.checkpoint, warn=lambda msg: print(msg, file=sys.stderr))
        model, cfg = run.model, run.config
        meta = {"step": run.step, "vocab_size": run.vocab_size, "path": str(run.checkpoint)}
        tokenizer = _tokenizer(cfg.tokenizer)
        prompt = _prompt(args, meta["vocab_size"], tokenizer)
    except (ValueError, KeyError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"qkclip-generate: error: {_naming(args.checkpoint, e)}", file=sys.stderr)
        return 2
    key = jax.random.key(args.seed) if args.temperature > 0 else None
    start = time.perf_counter()
    tokens, s = eqx.filter_jit(generate)(
        model,
        jnp.asarray(prompt),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        key=key,
    )
    tokens = np.asarray(tokens)
    seconds = time.perf_counter() - start
    print(f"checkpoint {meta['path']} (step {meta['step']})")
    if tokenizer is not None:
        print(tokenizer.decode([int(t) for t in np.concatenate([prompt, tokens])]))
    elif meta["vocab_size"] == 256:
        print(
            (prompt.astype(np.uint8).tobytes() + tokens.astype(np.uint8).tobytes()).decode(
                "utf-8", "replace"
            )
        )
    else:
        print(",".join(str(t) for t in np.concatenate([prompt, tokens])))
    print(f"{len(tokens)} tokens in {seconds:.2f} s (compile included)", file=sys.stderr)
    print(
        "max logit S per layer and head over the prompt and the generated tokens:", file=sys.stderr
    )
    print(format_table(np.asarray(s), marked_tau(cfg)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
