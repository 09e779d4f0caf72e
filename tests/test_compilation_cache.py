"""The CLIs' persistent compilation cache: on by default in the user's cache
directory, so that a second identical run compiles nothing; off with the flag
or the environment variable; never turned on by importing the library."""

import os
import subprocess
import sys

from qkclip_eqx.cli._flags import CACHE_ENV

# What a CLI does first (cli/_flags.py), then one jitted program, in a fresh process.
SCRIPT = """
import argparse, sys
import jax, jax.numpy as jnp
import qkclip_eqx
assert jax.config.jax_compilation_cache_dir is None, "importing the library set the cache"
from qkclip_eqx.cli._flags import add_cache_flag, use_compilation_cache
parser = argparse.ArgumentParser()
add_cache_flag(parser)
print(use_compilation_cache(parser.parse_args(sys.argv[1:])))
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((3, 3))).sum()))
"""


def _run(tmp_path, *args, **env):
    full = {
        k: v for k, v in os.environ.items() if k not in (CACHE_ENV, "JAX_COMPILATION_CACHE_DIR")
    }
    full.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu", **env)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], env=full, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()[0]


def _entries(tmp_path):
    cache = tmp_path / "xdg" / "qkclip_eqx" / "jax"
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_a_second_run_compiles_nothing(tmp_path):
    assert _run(tmp_path) == str(tmp_path / "xdg" / "qkclip_eqx" / "jax")
    first = _entries(tmp_path)
    assert first  # the program was written, although it compiled in well under 1 s
    _run(tmp_path)
    assert _entries(tmp_path) == first  # every program came from the cache


def test_the_flag_and_the_environment_turn_it_off(tmp_path):
    assert _run(tmp_path, "--no-compilation-cache") == "None"
    assert _run(tmp_path, **{CACHE_ENV: "0"}) == "None"
    assert _entries(tmp_path) == []
