"""qkclip_eqx: QK-Clip and MuonClip (Kimi K2) for Equinox MLA, MHA and GQA attention."""

from . import hf as hf
from ._attention import AbstractQKClippable as AbstractQKClippable
from ._attention import GQAttention as GQAttention
from ._attention import MLAttention as MLAttention
from ._clip import clip_factors as clip_factors
from ._clip import qk_clip as qk_clip
from ._config import GQAConfig as GQAConfig
from ._config import ParallelAxes as ParallelAxes
from ._config import MLAConfig as MLAConfig
from ._config import TransformerConfig as TransformerConfig
from ._config import YaRN as YaRN
from ._data import TokenData as TokenData
from ._decode import MLACache as MLACache
from ._data import eval_batches as eval_batches
from ._data import get_batch as get_batch
from ._data import load_data as load_data
from ._data import stdlib_corpus as stdlib_corpus
from ._kernels import attend as attend
from ._model import Block as Block
from ._model import Transformer as Transformer
from ._optim import ADAMW as ADAMW
from ._parallel import make_mesh as make_mesh
from ._parallel import param_specs as param_specs
from ._parallel import shard_batch as shard_batch
from ._parallel import shard_train_state as shard_train_state
from ._optim import muonclip as muonclip
from ._optim import param_spec as param_spec
from ._optim import warmup_cosine as warmup_cosine
from ._optim import wsd as wsd
from ._step import make_train_step as make_train_step
from ._step import next_token_loss as next_token_loss
from ._generate import generate as generate
from ._generate import sample_token as sample_token

__all__ = [
    "ADAMW", "AbstractQKClippable", "Block", "GQAConfig", "GQAttention", "MLACache", "MLAConfig",
    "MLAttention", "ParallelAxes", "TokenData", "Transformer", "TransformerConfig", "attend", "clip_factors",
    "eval_batches", "generate", "get_batch", "hf", "load_data", "make_mesh", "make_train_step", "muonclip",
    "next_token_loss", "param_spec", "param_specs", "qk_clip", "sample_token", "shard_batch",
    "shard_train_state", "stdlib_corpus", "warmup_cosine", "wsd", "YaRN",
]
