"""Mutation check: does the suite catch small, plausible bugs?

Each mutant below is one (or a few) text replacements in the library, a bug of
a kind that a review could miss or that the paper's algorithm invites
(Kimi K2 report, arXiv 2507.20534, sec. 2.1 and Algorithm 1; Moonlight, arXiv
2502.16982). For each, one at a time, the script

1. restores a pristine temporary copy of the repository (never this checkout),
2. applies the mutant's replacements to the copy; a replacement whose target
   text does not occur exactly the expected number of times, or that changes
   only comments or docstrings, is an ERROR (the list has gone stale: fix the
   pattern), never silently skipped,
3. runs only the tests named for that mutant, ``pytest -x``, with the copy's
   ``src`` first on ``PYTHONPATH`` (and the copy as the working directory),
4. records KILLED (a test failed or errored) or SURVIVED (all passed).

All runs share one JAX compilation cache in the temporary directory
(:func:`compile_cache_env`), so a mutant compiles only what its edit changes.

Before the mutants, a baseline runs every named test on the unmutated copy:
they must pass, or a "kill" would mean nothing. Exit status 0 only if every
mutant is killed and nothing errored.

    python scripts/mutation_check.py                 # everything, one mutant at a time
    python scripts/mutation_check.py --jobs 2        # two at a time, each in its own copy (CI)
    python scripts/mutation_check.py --list          # the mutants and their tests
    python scripts/mutation_check.py -k optim -k clip   # mutants whose name contains a word
    python scripts/mutation_check.py --no-baseline   # skip the baseline run
    python scripts/mutation_check.py --targets       # only check that every target text is found

Patterns are regular expressions; :func:`lit` turns a literal into one that
allows any whitespace between its tokens, so that reformatting the target file
does not make the list go stale. ``.ci/run`` runs the whole list (``--jobs 2``)
after the two suites and fails when a mutant survives or a target is stale.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import importlib.util
import os
import py_compile
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = "src/qkclip_eqx/"
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", "venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"
)  # .venv* also skips CI's second venv, .venv-newest


def lit(text: str) -> str:
    """A regex for the literal ``text``, any run of whitespace matching any other."""
    return r"\s+".join(re.escape(part) for part in text.split())


@dataclasses.dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root
    pattern: str  # a regular expression (see lit)
    replacement: str  # re.sub replacement
    count: int = 1  # how many matches the target must have


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


def M(name: str, what: str, edits, tests) -> Mutant:
    edits = (edits,) if isinstance(edits, Edit) else tuple(edits)
    return Mutant(name, what, edits, tuple(tests))


K, A, C, O, L = (
    SRC + "_kernels.py",
    SRC + "_attention.py",
    SRC + "_clip.py",
    SRC + "_optim.py",
    SRC + "_layers.py",
)
S, P, CK, T, D = (
    SRC + "_step.py",
    SRC + "_parallel.py",
    SRC + "_checkpoint.py",
    SRC + "_train.py",
    SRC + "_data.py",
)
DEC, EV, RC = SRC + "_decode.py", SRC + "_evaluate.py", SRC + "_run_config.py"
OPT = SRC + "_options.py"  # the declarations' type checks, for RunConfig and config.json
CKF = SRC + "_checkpoint_format.py"
HF, EQA, RUN, CFG = SRC + "hf.py", SRC + "_eqx_attention.py", SRC + "_run.py", SRC + "_config.py"
SINKS, CLI_TRAIN = SRC + "_sinks.py", SRC + "cli/train.py"

HF_DEFAULTS = ["tests/test_hf_defaults.py::test_an_omitted_key_loads_as_transformers_default"]
MIXED = "tests/test_leaf_checks.py::"
SPLIT = ["tests/test_clip_properties.py::test_clip_identity_and_split_for_every_module"]
JSON_TYPES = [
    "tests/test_config_properties.py::test_a_value_of_the_wrong_json_type_is_refused_by_name"
]
FALLBACK = [
    "tests/test_fallback_and_sinks.py::test_load_run_returns_everything_from_the_checkpoint_it_loaded"
]
RESUMED_SINKS = [
    "tests/test_fallback_and_sinks.py::test_cli_resume_falls_back_and_every_sink_shows_each_step_once"
]

STEP_TAU = Edit(
    S,
    lit("gammas = [clip_factors(x, tau) for x in s_list]"),
    "gammas = [clip_factors(x, 1e9) for x in s_list]",
)

MUTANTS: list[Mutant] = [
    # ---- kernels ------------------------------------------------------------------------
    M(
        "kernels_causal_strict",
        "the causal mask drops the diagonal (k_pos < q_pos)",
        Edit(K, r"pos\[None, :\]\s*<=\s*", "pos[None, :] < "),
        ["tests/test_kernels.py::test_dense_and_blockwise_match_bruteforce"],
    ),
    M(
        "kernels_s_last_tile",
        "the running max S keeps only the last key tile's max",
        Edit(K, r"jnp\.maximum\(\s*s_max\s*,\s*tile_max\s*\)", "tile_max"),
        ["tests/test_kernels.py::test_dense_and_blockwise_match_bruteforce"],
    ),
    M(
        "kernels_padding_keys_valid",
        "padded keys (and queries) count as valid (attended with logit 0)",
        Edit(K, r"jnp\.arange\(n\)\s*<\s*pos\.shape\[0\]", "jnp.arange(n) >= 0"),
        ["tests/test_kernels.py::test_dense_and_blockwise_match_bruteforce"],
    ),
    M(
        "dpa_s_last_tile",
        "dot_product_attention's exact S keeps only the last key tile's max",
        Edit(
            K,
            lit("return jnp.maximum(s_max, jnp.max(s.reshape(kv, t.group, -1), axis=-1))"),
            "return jnp.max(s.reshape(kv, t.group, -1), axis=-1)",
        ),
        ["tests/test_kernels.py::test_dot_product_attention_matches_dense_and_s_is_exact"],
    ),
    M(
        "dpa_empty_rows_not_zeroed",
        "dot_product_attention: a query with no allowed key gets mean(v)",
        Edit(
            K,
            lit("out = (out[..., :dv] * has_any[:, None, None].astype(out.dtype)).astype(v.dtype)"),
            "out = out[..., :dv].astype(v.dtype)",
        ),
        ["tests/test_kernels.py::test_dot_product_attention_rows_without_allowed_keys_give_zeros"],
    ),
    M(
        "lse_bound_named_as_s",
        "the LSE bound reported under the name of S (max_logits)",
        Edit(S, lit("bound = any(m.reports_lse_bound() for m in modules)"), "bound = False"),
        ["tests/test_step.py::test_lse_bound_metrics_say_bound"],
    ),
    M(
        "kernels_backward_no_scale",
        "the hand-written backward forgets the softmax scale in dS",
        Edit(K, r"\(dp - deltab\[\.\.\., None\]\)\s*\*\s*f32\(scale\)", "(dp - deltab[..., None])"),
        ["tests/test_kernels.py::test_gradients_dense_equal_blockwise_and_s_has_none"],
    ),
    # ---- attention: how each layout is clipped ----------------------------------------------
    M(
        "gqa_exponents_swapped",
        "q and k exponents swapped in every GQA branch (MHA, query_key, group)",
        [
            Edit(
                A,
                lit("q_factor, k_factor = gamma**alpha, gamma ** (1 - alpha)"),
                "q_factor, k_factor = gamma ** (1 - alpha), gamma**alpha",
            ),
            Edit(A, lit("k_factor = eta ** (1 - alpha)"), "k_factor = eta**alpha"),
            Edit(
                A,
                lit("q_factor = jnp.repeat(eta**alpha, group)"),
                "q_factor = jnp.repeat(eta ** (1 - alpha), group)",
            ),
        ],
        ["tests/test_clip.py::test_transformer_clip_matches_numpy_for_any_alpha"],
    ),
    M(
        "query_key_exponents_swapped",
        "GQA query_key mode gives the key eta^alpha (still exact per head)",
        Edit(A, lit("k_factor = eta ** (1 - alpha)"), "k_factor = eta**alpha"),
        ["tests/test_clip.py::test_transformer_query_key_mode_matches_numpy"],
    ),
    M(
        "query_key_query_not_compensated",
        "GQA query_key mode scales q by gamma_h, not gamma_h / eta^(1-alpha)",
        Edit(A, lit("q_factor = gamma / jnp.repeat(k_factor, group)"), "q_factor = gamma"),
        ["tests/test_clip.py::test_gqa_query_key_mode_identity_and_key_factor"],
    ),
    M(
        "query_key_metric_counts_group",
        "GQA query_key mode reports the group-mates as scaled",
        Edit(
            A,
            lit('if group == 1 or c.clip_mode != "group":'),
            'if group == 1 or c.clip_mode == "query":',
        ),
        ["tests/test_clip.py::test_gqa_query_key_mode_identity_and_key_factor"],
    ),
    M(
        "mla_rope_query_by_sqrt_gamma",
        "MLA's q_R scaled by gamma^alpha instead of gamma",
        Edit(
            A,
            lit("wq = _scale_rows(wq, gamma, slice(nope, None))"),
            "wq = _scale_rows(wq, gamma**alpha, slice(nope, None))",
        ),
        ["tests/test_clip.py::test_mla_identity_and_untouched_weights"],
    ),
    M(
        "mla_value_rows_scaled",
        "MLA scales all of wkv_b (the v rows too), not only k_C",
        Edit(
            A,
            lit("wkv_b = _scale_rows(self.wkv_b, gamma ** (1 - alpha), slice(0, nope))"),
            "wkv_b = _scale_rows(self.wkv_b, gamma ** (1 - alpha), slice(None))",
        ),
        ["tests/test_clip.py::test_mla_identity_and_untouched_weights"],
    ),
    M(
        "group_metric_over_tau_only",
        "GQA group mode reports only the heads over tau as scaled",
        Edit(
            A,
            r"return jnp\.repeat\(jnp\.any\(gamma\.reshape\(c\.n_kv_heads, group\) < 1, axis=1\), group\)",
            "return gamma < 1",
        ),
        ["tests/test_step.py::test_group_mode_counts_the_heads_it_scales"],
    ),
    # ---- clip ---------------------------------------------------------------------------------
    M(
        "clip_min_one_tau_over_s",
        "gamma = min(1, tau / S): NaN and sign flips for S <= 0",
        Edit(
            C,
            lit("return jnp.where(over, tau / jnp.where(over, s, 1.0), 1.0)"),
            "return jnp.minimum(1.0, tau / s)",
        ),
        ["tests/test_clip.py::test_clip_factors_values"],
    ),
    M(
        "clip_one_gamma_for_all_layers",
        "stacked layers all get the smallest layer's gamma",
        Edit(
            C,
            lit("return eqx.filter_vmap(lambda m, g: _scale(m, g, alpha))(module, gamma)"),
            "return eqx.filter_vmap(lambda m, g: _scale(m, g, alpha))"
            "(module, jnp.broadcast_to(gamma.min(axis=0), gamma.shape))",
        ),
        ["tests/test_clip.py::test_scanned_layers_get_their_own_gamma"],
    ),
    # ---- optimizer ------------------------------------------------------------------------------
    M(
        "muon_momentum_zero",
        "Muon with momentum 0",
        Edit(O, r"beta\s*=\s*momentum", "beta=0.0"),
        ["tests/test_optim.py::test_muonclip_matches_numpy_over_several_steps"],
    ),
    M(
        "muon_no_nesterov",
        "Muon without Nesterov's look-ahead",
        # the signature's default (the module docstring also says `nesterov=True`)
        # (muon_adamw's and the sharded Muon transformation's signatures)
        Edit(O, lit("nesterov: bool = True,"), "nesterov: bool = False,", count=2),
        ["tests/test_optim.py::test_muonclip_matches_numpy_over_several_steps"],
    ),
    M(
        "muon_decay_after_lr",
        "Muon's weight decay added after the lr scaling (not lr * wd * W)",
        Edit(
            O,
            r"(optax\.add_decayed_weights\(weight_decay\),)(\s*)(optax\.scale_by_learning_rate\(learning_rate\),)",
            r"\3\2\1",
        ),
        ["tests/test_optim.py::test_muonclip_matches_numpy_over_several_steps"],
    ),
    M(
        "muon_rms_min",
        "Muon's RMS matching by sqrt(min(n, m)) instead of max",
        Edit(O, lit("math.sqrt(max(fan_in, fan_out))"), "math.sqrt(min(fan_in, fan_out))"),
        ["tests/test_optim.py::test_muonclip_matches_numpy_over_several_steps"],
    ),
    M(
        "adamw_beta2",
        "AdamW's beta2 0.999 instead of K2's 0.95",
        Edit(O, r"adam_b2:\s*float\s*=\s*0\.95", "adam_b2: float = 0.999"),
        ["tests/test_optim.py::test_muonclip_matches_numpy_over_several_steps"],
    ),
    # ---- layers ---------------------------------------------------------------------------------
    M(
        "swiglu_is_geglu",
        "SwiGLU replaced by GeGLU (another gated MLP)",
        Edit(L, r"jax\.nn\.silu\(", "jax.nn.gelu("),
        ["tests/test_layers.py::test_swiglu_matches_numpy", "tests/test_model.py"],
    ),
    M(
        "swiglu_is_geglu_model_only",
        "SwiGLU replaced by GeGLU, caught by the model test alone",
        Edit(L, r"jax\.nn\.silu\(", "jax.nn.gelu("),
        ["tests/test_model.py::test_per_layer_s_equals_unrolled_layers"],
    ),
    M(
        "rmsnorm_sum",
        "RMSNorm divides by the root of the SUM of squares",
        Edit(L, r"jnp\.mean\(\s*xf\s*\*\s*xf", "jnp.sum(xf * xf"),
        ["tests/test_layers.py::test_rms_norm_matches_numpy"],
    ),
    # ---- the whole model ------------------------------------------------------------------------
    M(
        "model_no_final_norm",
        "the LM head reads the residual stream without the final RMSNorm",
        [  # the forward (FSDP-gathered weights) and decode
            Edit(
                SRC + "_model.py",
                lit("logits = linear(final_norm(x), lm_head.astype(compute)"),
                "logits = linear(x, lm_head.astype(compute)",
            ),
            Edit(
                SRC + "_model.py",
                lit("logits = linear(self.final_norm(x), self.lm_head.astype(compute)"),
                "logits = linear(x, self.lm_head.astype(compute)",
            ),
        ],
        ["tests/test_reference_model.py::test_transformer_logits_and_s_match_the_reference"],
    ),
    # ---- the train step -------------------------------------------------------------------------
    M(
        "step_tau_1e9[test_step]",
        "QK-Clip switched off inside the step (tau -> 1e9)",
        STEP_TAU,
        ["tests/test_step.py::test_clip_model_is_qk_clip_of_the_manual_update"],
    ),
    M(
        "step_tau_1e9[test_train]",
        "QK-Clip switched off inside the step: the end-to-end tests",
        STEP_TAU,
        ["tests/test_train.py::test_adamw_can_clip_and_muon_cannot"],
    ),
    M(
        "step_tau_1e9[test_cli]",
        "QK-Clip switched off inside the step: the CLI test",
        STEP_TAU,
        ["tests/test_train.py::test_cli_train_then_eval"],
    ),
    M(
        "step_tau_1e9[test_readme]",
        "QK-Clip switched off inside the step: the README test",
        STEP_TAU,
        ["tests/test_readme.py::test_library_example_runs"],
    ),
    M(
        "step_tau_1e9[test_repro]",
        "QK-Clip switched off inside the step: the K2 reproduction's traced step no longer equals it",
        STEP_TAU,
        ["tests/test_repro.py::test_traced_step_is_the_library_step_and_compiles_once"],
    ),
    M(
        "repro_step_no_clip",
        "the reproduction's traced step skips QK-Clip",
        Edit(
            "paper_repro/kimi_k2/runner.py",
            lit('model = qc.qk_clip(model, s, hp["tau"])'),
            "model = model",
        ),
        [
            "tests/test_repro.py::test_traced_step_is_the_library_step_and_compiles_once",
            "tests/test_repro.py::test_overshoot_bounded_by_the_unclipped_update",
        ],
    ),
    M(
        "repro_clip_counts_s_at_tau",
        "the reproduction counts a head with S exactly at tau as clipped",
        Edit("paper_repro/kimi_k2/analysis.py", lit("(s > tau)"), "(s >= tau)"),
        ["tests/test_repro.py::test_clip_numbers_on_a_synthetic_log"],
    ),
    M(
        "clip_until_ignored",
        "the clip goes on after clip_until",
        Edit(S, lit("gammas = [jnp.where(active, g, 1.0) for g in gammas]"), "pass"),
        ["tests/test_step.py::test_clip_until_clips_before_and_not_after"],
    ),
    M(
        "clip_until_step_from_zero",
        "the loop passes a step index that restarts at 0 on resume",
        Edit(
            T,
            lit("place_batch(batch, mesh), step=step"),
            "place_batch(batch, mesh), step=step - start",
        ),
        ["tests/test_step.py::test_train_clip_until_counts_the_steps_across_a_resume"],
    ),
    M(
        "accum_first_micro_batch",
        "gradient accumulation keeps only the first micro-batch's grads",
        Edit(S, lit("jax.tree.map(jnp.add, grads, g)"), "grads"),
        ["tests/test_step.py::test_accumulation_equals_one_big_batch"],
    ),
    M(
        "accum_sum",
        "gradient accumulation sums the micro-batch grads instead of averaging",
        Edit(S, lit("jax.tree.map(lambda g: g * scale, grads)"), "grads"),
        ["tests/test_step.py::test_accumulation_equals_one_big_batch"],
    ),
    M(
        "accum_s_summed",
        "micro-batch S summed instead of maxed",
        Edit(S, lit("_tree_max(s, s_new)"), "jax.tree.map(jnp.add, s, s_new)"),
        ["tests/test_step.py::test_accumulation_maxes_s_and_means_loss"],
    ),
    M(
        "step_alpha_dropped",
        "the step ignores alpha (always 1/2)",
        Edit(
            S,
            lit("apply_clip_factors(model, modules, gammas, alpha)"),
            "apply_clip_factors(model, modules, gammas, 0.5)",
        ),
        ["tests/test_step.py::test_group_mode_counts_the_heads_it_scales"],
    ),
    M(
        "step_grad_norm_of_updates",
        "grad_norm reported of the updates, not the gradients",
        Edit(
            S,
            lit("GRAD_NORM.key: optax.tree.norm(grads)"),
            "GRAD_NORM.key: optax.tree.norm(updates)",
        ),
        ["tests/test_step.py::test_accumulation_equals_one_big_batch"],
    ),
    # ---- parallel --------------------------------------------------------------------------------
    M(
        "parallel_s_not_reduced_over_seq",
        "S reduced over data only, not over the sequence shards",
        Edit(
            P,
            lit("x = jax.lax.pmax(x, over)"),
            "x = jax.lax.pmax(x, tuple(a for a in over if a != parallel.seq))",
        ),
        ["tests/test_parallel.py::test_mesh_matches_single_device_mla[data2-seq4]"],
    ),
    M(
        "parallel_positions_no_offset",
        "context parallelism: each sequence shard's positions start at 0",
        Edit(S, lit("jax.lax.axis_index(seq_axis) * t"), "0 * t"),
        ["tests/test_parallel.py::test_mesh_matches_single_device_mla[data2-seq4]"],
    ),
    # ---- checkpoints of mesh runs -------------------------------------------------------------
    M(
        "ckpt_mesh_fresh_optimizer_state",
        "a mesh run checkpoints a fresh optimizer state",
        Edit(
            T,
            lit("step, (model, opt_state), meta="),
            "step, (model, opt_state if mesh is None else opt.init(eqx.filter(model, eqx.is_array))), meta=",
        ),
        ["tests/test_train.py::test_mesh_checkpoint_restores_on_one_device"],
    ),
    M(
        "ckpt_load_ignores_sharding",
        "a loaded checkpoint is not placed on the mesh",
        Edit(CKF, lit('sharding = getattr(data, "sharding", None)'), "sharding = None"),
        ["tests/test_train.py::test_one_device_checkpoint_restores_on_a_mesh"],
    ),
    # ---- the train loop ---------------------------------------------------------------------------
    M(
        "loop_no_checkpoint_on_interrupt",
        "Ctrl-C stops without writing a checkpoint",
        Edit(
            T,
            lit('save(step, model, opt_state) return model, step, "interrupted"'),
            'return model, step, "interrupted"',
        ),
        ["tests/test_train.py::test_resume_after_interrupt_is_bit_exact"],
    ),
    M(
        "loop_resume_skips_a_step",
        "a resumed run starts one step late",
        Edit(T, lit('start = stored["step"]'), 'start = stored["step"] + 1'),
        ["tests/test_train.py::test_resume_after_interrupt_is_bit_exact"],
    ),
    M(
        "loop_alpha_not_passed",
        "the loop passes alpha = 1/2 whatever the config says",
        Edit(T, lit("alpha=cfg.alpha,"), "alpha=0.5,"),
        ["tests/test_train.py::test_adamw_can_clip_and_muon_cannot"],
    ),
    M(
        "loop_adamw_never_clips",
        "optimizer adamw with mode clip only monitors",
        Edit(
            T,
            r"(make_train_step\(\s*opt,\s*)mode=cfg\.mode,",
            r'\1mode="monitor" if cfg.optimizer == "adamw" else cfg.mode,',
        ),
        ["tests/test_train.py::test_adamw_can_clip_and_muon_cannot"],
    ),
    M(
        "eval_reads_train",
        "evaluation reads the training split: the logged val_loss is a training loss",
        Edit(
            EV,
            lit("data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len"),
            "data.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len",
        ),
        ["tests/test_train.py::test_validation_loss_reads_the_val_split_only"],
    ),
    # ---- the resume rule (MUST_MATCH) ---------------------------------------------------------
    M(
        "resume_seed_dropped",
        "the data seed left out of MUST_MATCH: a resume may change it silently",
        Edit(
            RC,
            lit("if rule == MUST_MATCH_RULE:"),
            'if rule == MUST_MATCH_RULE and f.name != "seed":',
        ),
        [
            "tests/test_train.py::"
            "test_resume_rule_covers_every_field_and_may_change_fields_keep_the_stream"
        ],
    ),
    M(
        "resume_seed_may_change",
        "the data seed declared may-change instead of must-match",
        Edit(
            RC,
            lit('"seed of the initial weights and of the batches", resume=MUST_MATCH_RULE'),
            '"seed of the initial weights and of the batches", resume=_NO_EFFECT',
        ),
        [
            "tests/test_train.py::"
            "test_resume_rule_covers_every_field_and_may_change_fields_keep_the_stream"
        ],
    ),
    M(
        "resume_meta_skips_seed",
        "the checkpoint's meta leaves the seed out, so its check never sees it",
        Edit(
            RC,
            lit("{name: config[name] for name in MUST_MATCH}"),
            '{name: config[name] for name in MUST_MATCH if name != "seed"}',
        ),
        ["tests/test_train.py::test_resume_refuses_every_must_match_field"],
    ),
    # ---- decoding ------------------------------------------------------------------------------
    M(
        "decode_s_over_unwritten_slots",
        "decode's S also over the unwritten cache slots (logit 0 there)",
        Edit(
            DEC,
            lit("s_max = jax.lax.stop_gradient(jnp.max(logits, axis=(1, 2)))"),
            "s_max = jax.lax.stop_gradient(jnp.max(jnp.where("
            "jnp.arange(c_kv.shape[0]) > q_pos[-1], 0.0, logits), axis=(1, 2)))",
        ),
        ["tests/test_decode.py::test_attention_decode_s_with_every_logit_negative"],
    ),
    # ---- the clip metrics at the boundary S = tau -----------------------------------------------
    M(
        "metric_over_tau_counts_s_at_tau",
        "heads_over_tau counts S >= tau",
        Edit(
            S,
            lit("HEADS_OVER_TAU.key: sum(jnp.sum(g < 1) for g in gammas),"),
            "HEADS_OVER_TAU.key: sum(jnp.sum(jnp.isfinite(x) & (x >= tau)) for x in s_list),",
        ),
        ["tests/test_step.py::test_heads_at_tau_are_neither_over_tau_nor_clipped"],
    ),
    M(
        "metric_clipped_counts_s_at_tau",
        "heads_clipped counts the heads with S >= tau",
        Edit(
            S,
            lit("jnp.sum(heads_scaled(m, g)) for m, g in zip(modules, gammas)"),
            "jnp.sum(jnp.isfinite(x) & (x >= tau)) for x in s_list",
        ),
        ["tests/test_step.py::test_heads_at_tau_are_neither_over_tau_nor_clipped"],
    ),
    # ---- data ----------------------------------------------------------------------------------------
    M(
        "data_batches_ignore_seed",
        "batches depend on the step only, not the seed",
        Edit(
            D, lit("rng = np.random.default_rng([seed, step])"), "rng = np.random.default_rng(step)"
        ),
        ["tests/test_data.py::test_get_batch_deterministic_and_stateless"],
    ),
    # ---- users' own models: eqx.nn.MultiheadAttention, routing, GQA decoding ---------------------
    M(
        "eqx_mha_clip_leaves_biases",
        "QK-Clip of an eqx.nn.MultiheadAttention scales the q/k weights but not their biases",
        Edit(
            SRC + "_eqx_attention.py",
            lit("if lin.bias is not None:"),
            "if False:",
        ),
        ["tests/test_eqx_attention.py::test_clip_identity_per_head_with_biases_and_rope"],
    ),
    M(
        "routing_exclude_ignored",
        "matrix_dimension_numbers' exclude= leaves the embedding and head on Muon",
        Edit(O, lit("if exclude is not None and jax.tree.leaves(params):"), "if False:"),
        ["tests/test_routing.py"],
    ),
    M(
        "kv_decode_groups_tiled",
        "GQA decoding pairs query head h with kv head h % n_kv_heads, not h // group",
        Edit(
            DEC,
            lit("k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)"),
            "k, v = jnp.tile(k, (1, group, 1)), jnp.tile(v, (1, group, 1))",
        ),
        ["tests/test_decode.py::test_gqa_decode_equals_full_forward_and_s_the_float64_reference"],
    ),
    # ---- round two: the bug classes of a second held-out audit ------------------------------
    # defaults of optional keys in a Hugging Face config (transformers' DeepseekV3Config's)
    M(
        "hf_q_lora_rank_default_none",
        "an omitted q_lora_rank read as None (no query LoRA), not transformers' 1536",
        Edit(
            HF,
            lit('"q_lora_rank", int, 1536, nullable=True)'),
            '"q_lora_rank", int, None, nullable=True)',
        ),
        HF_DEFAULTS,
    ),
    M(
        "hf_first_dense_default",
        "an omitted first_k_dense_replace read as 1, not 3",
        Edit(HF, lit('"first_k_dense_replace", int, 3,'), '"first_k_dense_replace", int, 1,'),
        HF_DEFAULTS,
    ),
    M(
        "hf_rms_eps_default",
        "an omitted rms_norm_eps read as 1e-5, not 1e-6",
        Edit(HF, lit('"rms_norm_eps", float, 1e-6)'), '"rms_norm_eps", float, 1e-5)'),
        HF_DEFAULTS,
    ),
    M(
        "hf_tie_default",
        "an omitted tie_word_embeddings read as true",
        Edit(HF, lit('"tie_word_embeddings", bool, False)'), '"tie_word_embeddings", bool, True)'),
        HF_DEFAULTS,
    ),
    M(
        "hf_yarn_beta_fast_default",
        "an omitted YaRN beta_fast read as 16, not 32",
        Edit(HF, lit('"beta_fast", float, None) or 32)'), '"beta_fast", float, None) or 16)'),
        HF_DEFAULTS,
    ),
    M(
        "hf_rope_interleave_default",
        "an omitted rope_interleave read as false",
        Edit(HF, lit('"rope_interleave", bool, True,'), '"rope_interleave", bool, False,'),
        HF_DEFAULTS,
    ),
    # "any" where "all" is meant (and back) in a check over leaves
    M(
        "nonfinite_any_of_three",
        "first_nonfinite: the step counts as finite when any of loss, grad norm, params is",
        Edit(S, lit("jnp.where(jnp.all(oks), 0,"), "jnp.where(jnp.any(oks), 0,"),
        [MIXED + "test_first_nonfinite_with_quantities_in_mixed_states"],
    ),
    M(
        "nonfinite_any_element",
        "first_nonfinite: a parameter leaf is finite when any of its elements is",
        Edit(S, lit("jnp.all(jnp.isfinite(p))"), "jnp.any(jnp.isfinite(p))"),
        [MIXED + "test_first_nonfinite_with_quantities_in_mixed_states"],
    ),
    M(
        "nonfinite_any_leaf",
        "first_nonfinite: the parameters are finite when any leaf is",
        Edit(S, lit("params_ok = jnp.all(jnp.stack("), "params_ok = jnp.any(jnp.stack("),
        [MIXED + "test_first_nonfinite_with_quantities_in_mixed_states"],
    ),
    M(
        "group_heads_all",
        "GQA group mode scales a group only when all its heads are over tau",
        Edit(
            A,
            lit("jnp.repeat(jnp.any(gamma.reshape(c.n_kv_heads, group) < 1, axis=1), group)"),
            "jnp.repeat(jnp.all(gamma.reshape(c.n_kv_heads, group) < 1, axis=1), group)",
        ),
        [MIXED + "test_group_mode_scales_a_group_with_one_head_over_tau"],
    ),
    M(
        "ckpt_meta_list_any",
        "checkpoint meta: two lists are equal when any element is",
        Edit(
            CKF,
            lit("all(_json_equal(x, y) for x, y in zip(a, b))"),
            "any(_json_equal(x, y) for x, y in zip(a, b))",
        ),
        [MIXED + "test_meta_with_one_element_differing_is_refused"],
    ),
    M(
        "ckpt_meta_dict_any",
        "checkpoint meta: two dicts are equal when any value is",
        Edit(
            CKF,
            lit("all(_json_equal(a[k], b[k]) for k in a)"),
            "any(_json_equal(a[k], b[k]) for k in a)",
        ),
        [MIXED + "test_meta_diffs_mixed"],
    ),
    M(
        "ckpt_fingerprint_first_leaf_only",
        "a restore checks the first leaf's fingerprint only",
        Edit(
            CK,
            lit('zip(stored, fingerprints, header["fingerprints"])'),
            'zip(stored[:1], fingerprints, header["fingerprints"])',
        ),
        [MIXED + "test_one_corrupt_leaf_among_good_ones_is_named"],
    ),
    M(
        "clip_nonfinite_head_clipped",
        "an infinite S is clipped (gamma = tau / inf = 0 zeroes the head)",
        Edit(C, lit("over = jnp.isfinite(s) & (s > tau)"), "over = s > tau"),
        [MIXED + "test_clip_factors_per_head_with_heads_in_mixed_states"],
    ),
    M(
        "ckpt_header_step_takes_bool",
        "a checkpoint header whose step is JSON true passes the check",
        Edit(CK, lit("or isinstance(header.get(name), bool)"), "or False"),
        [MIXED + "test_one_malformed_header_field_among_good_ones_is_named"],
    ),
    M(
        "cudnn_dtypes_any",
        "cuDNN accepted when any of q, k, v is bfloat16/float16",
        Edit(
            CFG,
            lit("not all(n in CUDNN_DTYPES for n in names)"),
            "not any(n in CUDNN_DTYPES for n in names)",
        ),
        [MIXED + "test_cudnn_dtype_check_with_one_dtype_of_three_wrong"],
    ),
    M(
        "muon_axes_any",
        "Muon routing accepted when any of its axes fits the leaf",
        Edit(O, lit("inside = all(isinstance(a, int)"), "inside = any(isinstance(a, int)"),
        [MIXED + "test_muon_routing_with_one_axis_of_two_outside_the_leaf"],
    ),
    M(
        "run_config_union_all",
        "a RunConfig value must fit every arm of a union field (int | None refuses 4)",
        Edit(
            OPT,
            lit("return any(fits(value, a) for a in typing.get_args(tp))"),
            "return all(fits(value, a) for a in typing.get_args(tp))",
        ),
        [MIXED + "test_union_field_value_fitting_one_arm_only"],
    ),
    # the clip's split between query and key, at alpha != 1/2, in every clippable module
    M(
        "eqx_mha_exponents_swapped",
        "ClippableMultiheadAttention gives the query gamma^(1-alpha), the key gamma^alpha",
        Edit(
            EQA,
            lit('(("query_proj", gamma**alpha), ("key_proj", gamma ** (1 - alpha)))'),
            '(("query_proj", gamma ** (1 - alpha)), ("key_proj", gamma**alpha))',
        ),
        SPLIT,
    ),
    M(
        "mha_exponents_swapped",
        "GQAttention as MHA gives the query gamma^(1-alpha), the key gamma^alpha",
        Edit(
            A,
            lit("q_factor, k_factor = gamma**alpha, gamma ** (1 - alpha)"),
            "q_factor, k_factor = gamma ** (1 - alpha), gamma**alpha",
        ),
        SPLIT,
    ),
    M(
        "mla_exponents_swapped",
        "MLAttention gives q_C gamma^(1-alpha), k_C gamma^alpha",
        [
            Edit(
                A,
                lit("wq = _scale_rows(self.wq, gamma**alpha, slice(0, nope))"),
                "wq = _scale_rows(self.wq, gamma ** (1 - alpha), slice(0, nope))",
            ),
            Edit(
                A,
                lit("wkv_b = _scale_rows(self.wkv_b, gamma ** (1 - alpha), slice(0, nope))"),
                "wkv_b = _scale_rows(self.wkv_b, gamma**alpha, slice(0, nope))",
            ),
        ],
        SPLIT,
    ),
    M(
        "group_query_exponent",
        "GQA group mode gives the queries eta^(1-alpha)",
        Edit(
            A,
            lit("q_factor = jnp.repeat(eta**alpha, group)"),
            "q_factor = jnp.repeat(eta ** (1 - alpha), group)",
        ),
        SPLIT,
    ),
    # tensor-parallel biases
    M(
        "eqx_mha_output_bias_before_psum",
        "the output bias added on every model shard before the psum (n times on a mesh of n)",
        Edit(
            EQA,
            r"(\n\s*if model_axis is not None:\n\s*y = jax\.lax\.psum\(y, model_axis\).*)"
            r"(\n\s*if m\.output_proj\.bias is not None:\n\s*y = y \+ m\.output_proj\.bias)",
            r"\2\1",
        ),
        ["tests/test_mesh_biases.py"],
    ),
    # JSON type strictness: a bool is an int in Python
    M(
        "run_config_int_takes_bool",
        "a RunConfig int field accepts true",
        Edit(
            OPT,
            lit("return isinstance(value, int) and not isinstance(value, bool)"),
            "return isinstance(value, int)",
        ),
        JSON_TYPES,
    ),
    M(
        "run_config_float_takes_bool",
        "a RunConfig float field accepts true",
        Edit(
            OPT,
            lit("ok = isinstance(value, (int, float)) and not isinstance(value, bool)"),
            "ok = isinstance(value, (int, float))",
        ),
        JSON_TYPES,
    ),
    M(
        "hf_int_takes_bool",
        "a Hugging Face config's int key accepts true (a one-wide layer)",
        Edit(
            HF,
            lit("ok = isinstance(value, int) and not isinstance(value, bool)"),
            "ok = isinstance(value, int)",
        ),
        ["tests/test_hf_defaults.py::test_a_number_of_the_wrong_json_type_is_refused_by_name"],
    ),
    M(
        "model_config_positive_takes_bool",
        "a model config's positive int accepts true",
        Edit(
            CFG,
            lit("if not isinstance(value, int) or isinstance(value, bool) or value <= 0:"),
            "if not isinstance(value, int) or value <= 0:",
        ),
        ["tests/test_config_properties.py::test_model_config_fields_refuse_the_wrong_json_type"],
    ),
    # fallback paths: everything from the checkpoint actually loaded
    M(
        "load_run_config_of_newest",
        "load_run falls back to an older checkpoint but returns the newest one's config",
        Edit(RUN, lit("cfg = _config_of(checkpoint, meta)"), "pass"),
        FALLBACK,
    ),
    M(
        "load_run_step_of_newest",
        "load_run falls back but returns the newest checkpoint's step and vocabulary",
        Edit(
            RUN,
            lit("(model, opt_state), meta, checkpoint = loaded"),
            "(model, opt_state), _, checkpoint = loaded",
        ),
        FALLBACK,
    ),
    M(
        "load_latest_names_newest",
        "load_latest_checkpoint falls back but names the newest checkpoint as the one loaded",
        Edit(CK, lit("return state, meta, path"), "return state, meta, found[0]"),
        FALLBACK,
    ),
    M(
        "cli_finished_trusts_newest",
        "qkclip-train --resume calls a run finished from a newest checkpoint that does not restore",
        Edit(
            CLI_TRAIN, lit("start = load_run(cfg.out, warn=lambda msg: None).step"), "start = start"
        ),
        RESUMED_SINKS,
    ),
    # what a metrics sink shows after a resume
    M(
        "tensorboard_no_purge",
        "TensorBoard keeps the steps an interrupted process logged past its checkpoint",
        Edit(SINKS, lit("purge_step=step,"), "purge_step=None,"),
        RESUMED_SINKS,
    ),
    M(
        "metrics_jsonl_keeps_resume_step",
        "metrics.jsonl keeps the resume step's old record (it then appears twice)",
        Edit(
            T,
            lit('if json.loads(line)["step"] < from_step:'),
            'if json.loads(line)["step"] <= from_step:',
        ),
        RESUMED_SINKS,
    ),
]


# --------------------------------------------------------------------------------------------


def _code(source: str) -> str:
    """The module's AST without docstrings: equal for two sources whose code is."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]  # pyright: ignore[reportAttributeAccessIssue]
    return ast.dump(tree)


def apply(copy: Path, mutant: Mutant) -> str | None:
    """Apply the mutant's edits in ``copy``; an error message if a target is stale."""
    for e in mutant.edits:
        path = copy / e.file
        text = path.read_text()
        n = len(re.findall(e.pattern, text))
        if n != e.count:
            return f"{e.file}: pattern {e.pattern!r} matches {n} times, expected {e.count}"
        new = re.sub(e.pattern, e.replacement, text)
        if new == text:
            return f"{e.file}: replacing {e.pattern!r} changed nothing"
        try:
            if _code(new) == _code(text):
                return f"{e.file}: replacing {e.pattern!r} changes only comments or docstrings"
        except SyntaxError as err:
            return f"{e.file}: the mutated file does not parse: {err}"
        path.write_text(new)
        try:
            py_compile.compile(str(path), doraise=True)
        except py_compile.PyCompileError as err:
            return f"{e.file}: the mutated file does not compile: {err}"
    return None


def compile_cache_env(tmp: Path) -> dict[str, str]:
    """JAX's persistent compilation cache, shared by the baseline and every
    mutant: a mutant recompiles only the programs its edit changes (the key
    hashes the program without source locations, so the copies share it).
    Eviction on (a size limit) makes JAX lock the directory around each read
    and write, so two mutants never read a half-written entry; that lock needs
    the filelock package, and without it nothing is cached."""
    if importlib.util.find_spec("filelock") is None:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_tests(copy: Path, tests, timeout: float, workers: int = 0) -> tuple[int | str, float, str]:
    env = {
        **os.environ,
        **compile_cache_env(copy.parent),
        "PYTHONPATH": os.pathsep.join(
            [str(copy / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-n",
        str(workers),  # 0: one process; a mutant's few named tests gain nothing from workers
        "-q",
        "--no-header",
        "-p",
        "no:cacheprovider",
        *tests,
    ]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, time.perf_counter() - t0, r.stdout + r.stderr
    except subprocess.TimeoutExpired as err:
        out = (
            (err.stdout or b"").decode(errors="replace")
            if isinstance(err.stdout, bytes)
            else (err.stdout or "")
        )
        return "timeout", time.perf_counter() - t0, out


def verdict(rc) -> str:
    """pytest's exit codes: 1 tests failed, 2 interrupted (e.g. a collection
    error), 4 usage error (e.g. a test id that does not exist), 5 no tests."""
    if rc == 0:
        return "SURVIVED"
    if rc in (1, 2, "timeout"):
        return "KILLED" if rc != "timeout" else "KILLED (timeout)"
    return "ERROR"


def _restore(copy: Path, pristine: dict[str, str]) -> None:
    for f, text in pristine.items():
        (copy / f).write_text(text)


def _run_mutant(copy: Path, m: Mutant, pristine: dict[str, str], timeout: float):
    """Apply ``m`` to a pristine ``copy``, run its tests: (verdict, seconds, detail)."""
    _restore(copy, pristine)
    msg = apply(copy, m)
    if msg:
        return "ERROR", 0.0, msg
    rc, secs, out = run_tests(copy, m.tests, timeout)
    v = verdict(rc)
    detail = ""
    if v.startswith("KILLED"):
        failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
        detail = failed[0] if failed else out.strip().splitlines()[-1] if out.strip() else ""
    elif v == "ERROR":
        detail = f"pytest exit code {rc}: " + out.strip()[-500:]
    return v, secs, detail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-k", action="append", default=[], help="only mutants whose name contains this"
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the unmutated baseline run"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="mutants tested at once, each in its own copy (and baseline workers)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    parser.add_argument(
        "--targets",
        action="store_true",
        help="only apply each mutant (no tests): report stale targets and exit",
    )
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.k or any(k in m.name for k in args.k)]
    if args.list:
        for m in mutants:
            print(f"{m.name:36s} {m.what}\n{'':36s} tests: {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants")
        return 0
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="qkclip_mutation_"))
    copies = [tmp / f"repo{i}" for i in range(args.jobs)]
    for c in copies:
        shutil.copytree(ROOT, c, ignore=COPY_IGNORE)
    copy = copies[0]
    pristine = {e.file: (copy / e.file).read_text() for m in mutants for e in m.edits}
    print(f"{len(copies)} copies of {ROOT} in {tmp}")
    for c in copies:
        probe = subprocess.run(
            [sys.executable, "-c", "import qkclip_eqx; print(qkclip_eqx.__file__)"],
            cwd=c,
            env={**os.environ, "PYTHONPATH": str(c / "src")},
            capture_output=True,
            text=True,
        )
        if not probe.stdout.strip().startswith(str(c)):
            print(f"the copy's qkclip_eqx is not the one imported: {probe.stdout}{probe.stderr}")
            return 2

    results = {}
    try:
        # stale targets are reported before anything runs
        stale = {}
        for m in mutants:
            msg = apply(copy, m)
            _restore(copy, pristine)
            if msg:
                stale[m.name] = msg
        if args.targets:
            for m in mutants:
                print(f"{'STALE' if m.name in stale else 'ok':6s} {m.name} {stale.get(m.name, '')}")
            print(f"{len(stale)} stale of {len(mutants)}")
            return 1 if stale else 0
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            workers = 0 if args.jobs == 1 else args.jobs
            rc, secs, out = run_tests(copy, tests, args.timeout * 3, workers=workers)
            print(
                f"baseline (unmutated, {len(tests)} test selections): rc={rc} in {secs:.0f}s",
                flush=True,
            )
            if rc != 0:
                print(out[-5000:])
                print("the baseline must pass: fix the tests (or the copy) first")
                return 2
        for m in mutants:
            if m.name in stale:
                results[m.name] = ("ERROR", 0.0, stale[m.name])
                print(f"ERROR     {m.name}: {stale[m.name]}", flush=True)
        free: queue.Queue[Path] = queue.Queue()
        for c in copies:
            free.put(c)

        def work(m: Mutant):
            c = free.get()
            try:
                return m, _run_mutant(c, m, pristine, args.timeout)
            finally:
                _restore(c, pristine)
                free.put(c)

        todo = [m for m in mutants if m.name not in stale]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for future in concurrent.futures.as_completed([pool.submit(work, m) for m in todo]):
                m, (v, secs, detail) = future.result()
                results[m.name] = (v, secs, detail)
                print(f"{v:9s} {m.name} ({secs:.0f}s) {detail[:150]}", flush=True)
    finally:
        for c in copies:
            _restore(c, pristine)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    total = time.perf_counter() - t_start
    ordered = [(m, *results[m.name]) for m in mutants if m.name in results]
    killed = [r for r in ordered if r[1].startswith("KILLED")]
    survived = [r for r in ordered if r[1] == "SURVIVED"]
    errors = [r for r in ordered if r[1] == "ERROR"]
    print(
        f"\n{len(killed)} killed, {len(survived)} survived, {len(errors)} errors, "
        f"of {len(mutants)} mutants, in {total:.0f}s ({args.jobs} at a time)"
    )
    for m, v, _, detail in survived + errors:
        print(f"  {v}: {m.name}: {m.what} {detail}")
    return 0 if len(killed) == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
