"""Test set-up: 8 simulated CPU devices, configured before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each
    executable's code into memory; the whole suite in one process otherwise
    passes Linux's default `vm.max_map_count` (65530) and LLVM fails with
    "Cannot allocate memory" while compiling a late test."""
    yield
    jax.clear_caches()
    gc.collect()
