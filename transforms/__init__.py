"""ft-prog transforms: ``Model -> Model`` functions that stack.

The order they stack in is declared once, in ``ORDER`` (``ORDER_TEXT``: cast -> quantize/qat ->
lora -> checkpoint -> shard -> fuse_projections/offload_activations -> compile, with the exceptions
``COMMUTES`` lists), and every transform checks it. Each returns a new model and leaves its input usable; frozen tensors are
shared. Beside them, the file formats of what they make: PEFT adapter folders
(``save_adapter`` / ``load_adapter``) and quantized checkpoints (``save_quantized`` /
``load_quantized``).
"""

from ._adapter_io import load_adapter, save_adapter
from ._base import COMMUTES, ORDER, ORDER_TEXT, check_order
from ._fuse import fuse_projections
from ._offload import offload_activations
from ._qat import (
    QAT_SCHEMES, QatSpec, convert_qat, qat, qat_spec, read_qat_record, save_qat_record, without_qat,
)
from ._lora import LoraSpec, adapted_paths, has_adapters, lora, lora_spec, merge, resolve_targets, without_adapters
from ._quantize import GROUPED_SCHEMES, SCHEMES, param_bytes, quantize
from ._quantized_io import is_quantized_checkpoint, load_quantized, save_quantized
from ._runtime import Compiled, cast, checkpoint, compile, uncompile
from ._shard import shard, unshard
from ._torchao import quiet_torchao_import
from ._trainable import freeze, trainable

quiet_torchao_import()

__all__ = [
    "COMMUTES", "Compiled", "GROUPED_SCHEMES", "LoraSpec", "ORDER", "ORDER_TEXT", "QAT_SCHEMES", "QatSpec",
    "SCHEMES", "adapted_paths", "cast", "check_order", "checkpoint", "compile", "convert_qat", "freeze",
    "fuse_projections", "has_adapters", "is_quantized_checkpoint", "load_adapter", "load_quantized", "lora",
    "lora_spec", "merge", "offload_activations", "param_bytes", "qat", "qat_spec", "quantize", "read_qat_record",
    "resolve_targets", "save_adapter", "save_qat_record", "save_quantized", "shard", "trainable", "uncompile",
    "unshard", "without_adapters", "without_qat",
]
