"""ft-prog core: models as parameter trees with pure forwards, checkpoints, tokenizers.

Public API (everything else in ``ftprog.core._*`` modules is internal).
"""

from . import _optim as optim
from ._checkpoint import CheckpointError, as_dtype, load_pretrained, read_config, save_pretrained
from ._config import ConfigError, ModelConfig
from ._data import (
    Batch, DataConfig, DataError, DataLoader, PreferenceBatch, PreferenceDataset, PreferenceLoader, PreferenceStats,
    PromptDataset, PromptStats, TokenizedDataset, load_datasets, load_preference_datasets, load_prompt_datasets,
    read_rows, split_validation, tokenize_dataset, tokenize_preferences, tokenize_prompts,
)
from ._distill import DIVERGENCES, distill_divergence, distill_loss_sum
from ._decoder import Decoder, KVCache, LayerContext, LayerFn, LayerWrap, Prepare, router_aux_loss
from ._grad import value_and_grad
from ._linear import (
    CPU_MATMUL_UPCAST_ENV, dense_linear, dense_weight, grouped_linear, is_training, linear, linear_kind, matmul_dtype,
    per_node_linear, register_linear, set_training,
)
from ._loss import token_logprobs, token_loss_sum
from ._memory import reuse_freed_memory
from ._model import Model, from_config, linear_paths, make_model, param_shapes
from ._grpo import GRPO_LOSS_TYPES, group_advantages, grpo_loss_sum, grpo_normalizer, grpo_token_loss, nan_std
from ._perplexity import perplexity, perplexity_windows
from ._recompute import recompute
from ._preference import (
    LOSS_TYPES, PreferenceLoss, dpo_loss, kto_kl, kto_loss, needs_reference, orpo_loss, reward_metrics, simpo_loss,
    uses_average_logps,
)
from ._presets import PRESETS, preset
from ._tokenizer import CHATML_TEMPLATE, Tokenizer, fold_system, load_tokenizer
from ._tree import (
    combine, flatten, is_dtensor, is_plain, is_quantized, is_static, matches, partition, select, tree_map, unflatten,
)

__all__ = [
    "Batch", "CHATML_TEMPLATE", "CPU_MATMUL_UPCAST_ENV", "CheckpointError", "ConfigError", "DataConfig", "DataError",
    "DataLoader", "dense_linear", "matmul_dtype",
    "DIVERGENCES", "Decoder", "GRPO_LOSS_TYPES", "KVCache", "LOSS_TYPES", "LayerContext", "LayerFn", "LayerWrap", "Model",
    "ModelConfig", "PRESETS", "PreferenceBatch", "PreferenceDataset", "PreferenceLoader", "PreferenceLoss",
    "PreferenceStats", "Prepare", "PromptDataset", "PromptStats", "TokenizedDataset", "Tokenizer", "as_dtype",
    "combine", "dense_weight", "distill_divergence", "distill_loss_sum", "dpo_loss", "flatten", "fold_system", "from_config", "group_advantages",
    "grouped_linear", "grpo_loss_sum", "grpo_normalizer", "grpo_token_loss", "is_dtensor", "is_plain", "is_quantized",
    "is_static",
    "is_training", "kto_kl", "kto_loss", "linear", "linear_kind", "linear_paths", "load_datasets",
    "load_preference_datasets", "load_pretrained", "load_prompt_datasets", "load_tokenizer", "make_model",
    "matches", "nan_std", "needs_reference", "optim", "orpo_loss", "param_shapes", "partition", "per_node_linear",
    "perplexity",
    "perplexity_windows", "preset", "read_config", "recompute", "read_rows", "register_linear", "reuse_freed_memory",
    "reward_metrics", "router_aux_loss", "save_pretrained", "select", "set_training", "simpo_loss",
    "split_validation", "token_logprobs", "token_loss_sum", "tokenize_dataset", "tokenize_preferences",
    "tokenize_prompts", "tree_map", "unflatten", "uses_average_logps", "value_and_grad",
]

