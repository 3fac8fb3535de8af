"""ft-prog core: models as parameter trees with pure forwards, checkpoints, tokenizers.

Public API (everything else in ``ftprog.core._*`` modules is internal).
"""

from ._checkpoint import CheckpointError, as_dtype, load_pretrained, read_config, save_pretrained
from ._config import ConfigError, ModelConfig
from ._decoder import Decoder, KVCache, lm_head
from ._linear import LoraSpec, dense_weight, linear
from ._grad import value_and_grad
from ._loss import token_loss_sum
from ._model import Model, from_config, linear_paths, make_model, param_shapes
from ._presets import PRESETS, preset
# TOKENIZER from ._tokenizer import Tokenizer, load_tokenizer
from ._tree import flatten, matches, merge, partition, select, tree_map, unflatten

__all__ = [
    "CheckpointError", "ConfigError", "Decoder", "KVCache", "LoraSpec", "Model", "ModelConfig", "PRESETS", "Tokenizer",
    "as_dtype", "dense_weight", "flatten", "from_config", "linear", "linear_paths", "lm_head", "load_pretrained", "load_tokenizer", "make_model", "matches",
    "merge", "param_shapes", "partition", "preset", "read_config", "save_pretrained", "select", "token_loss_sum", "tree_map", "unflatten", "value_and_grad",
]
