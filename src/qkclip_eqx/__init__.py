"""qkclip_eqx: QK-Clip and MuonClip (Kimi K2) for Equinox MLA, MHA and GQA attention."""

from . import hf as hf
from ._attention import GQAttention as GQAttention
from ._attention import MLAttention as MLAttention
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import load_latest_checkpoint as load_latest_checkpoint
from ._clip import clip_factors as clip_factors
from ._clip import clipped_heads as clipped_heads
from ._clip import qk_clip as qk_clip
from ._config import GQAConfig as GQAConfig
from ._config import MLAConfig as MLAConfig
from ._config import MoEConfig as MoEConfig
from ._config import ParallelAxes as ParallelAxes
from ._config import TransformerConfig as TransformerConfig
from ._config import YaRN as YaRN
from ._data import TokenData as TokenData
from ._data import check_batch_tokens as check_batch_tokens
from ._data import eval_batches as eval_batches
from ._data import get_batch as get_batch
from ._data import load_data as load_data
from ._data import stdlib_corpus as stdlib_corpus
from ._decode import KVCache as KVCache
from ._decode import MLACache as MLACache
from ._eqx_attention import ClippableMultiheadAttention as ClippableMultiheadAttention
from ._evaluate import evaluate as evaluate
from ._generate import generate as generate
from ._generate import sample_token as sample_token
from ._interfaces import AbstractHeadwiseQKClippable as AbstractHeadwiseQKClippable
from ._interfaces import AbstractPackedModel as AbstractPackedModel
from ._interfaces import AbstractQKClippable as AbstractQKClippable
from ._kernels import attend as attend
from ._loglines import LogLines as LogLines
from ._loglines import train_flops_per_token as train_flops_per_token
from ._metrics import RunMetrics as RunMetrics
from ._metrics import read_metrics as read_metrics
from ._model import Block as Block
from ._model import MoEBlock as MoEBlock
from ._model import Transformer as Transformer
from ._moe import Experts as Experts
from ._moe import MoE as MoE
from ._moe import RouterStats as RouterStats
from ._moe import expert_load_metrics as expert_load_metrics
from ._moe import update_expert_bias as update_expert_bias
from ._optim import matrix_dimension_numbers as matrix_dimension_numbers
from ._optim import muon_adamw as muon_adamw
from ._optim import warmup_cosine as warmup_cosine
from ._optim import wsd as wsd
from ._parallel import make_mesh as make_mesh
from ._parallel import partition_specs as partition_specs
from ._parallel import shard_batch as shard_batch
from ._parallel import shard_loss as shard_loss
from ._parallel import shard_train_state as shard_train_state
from ._run import LoadedRun as LoadedRun
from ._run import load_run as load_run
from ._run_config import PRESETS as PRESETS
from ._run_config import RunConfig as RunConfig
from ._run_config import preset as preset
from ._sinks import MetricSink as MetricSink
from ._sinks import TensorBoardSink as TensorBoardSink
from ._sinks import WandbSink as WandbSink
from ._sinks import on_step_for as on_step_for
from ._step import make_train_step as make_train_step
from ._step import next_token_loss as next_token_loss
from ._train import RunResult as RunResult
from ._train import train as train

__all__ = [
    "update_expert_bias",
    "expert_load_metrics",
    "RouterStats",
    "Experts",
    "MoE",
    "MoEBlock",
    "MoEConfig",
    "PRESETS",
    "AbstractQKClippable",
    "AbstractHeadwiseQKClippable",
    "AbstractPackedModel",
    "Block",
    "CheckpointError",
    "ClippableMultiheadAttention",
    "GQAConfig",
    "GQAttention",
    "KVCache",
    "LoadedRun",
    "MLACache",
    "MLAConfig",
    "MLAttention",
    "MetricSink",
    "LogLines",
    "train_flops_per_token",
    "ParallelAxes",
    "RunConfig",
    "RunMetrics",
    "RunResult",
    "TokenData",
    "Transformer",
    "TransformerConfig",
    "TensorBoardSink",
    "WandbSink",
    "attend",
    "clip_factors",
    "clipped_heads",
    "eval_batches",
    "evaluate",
    "generate",
    "get_batch",
    "check_batch_tokens",
    "hf",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "load_data",
    "load_run",
    "make_mesh",
    "make_train_step",
    "matrix_dimension_numbers",
    "muon_adamw",
    "next_token_loss",
    "on_step_for",
    "partition_specs",
    "preset",
    "qk_clip",
    "read_metrics",
    "sample_token",
    "shard_batch",
    "shard_loss",
    "shard_train_state",
    "stdlib_corpus",
    "train",
    "warmup_cosine",
    "wsd",
    "YaRN",
]
