"""ft-prog transforms: ``Model -> Model`` functions that stack.

The order they stack in is declared once, in ``ORDER`` (``ORDER_TEXT``:
cast/quantize -> lora -> checkpoint/merge -> shard -> compile), and every
transform checks it. Each returns a new model and leaves its input usable;
frozen tensors are shared.
"""

from ._adapter_io import load_adapter, save_adapter
from ._base import ORDER, ORDER_TEXT, check_order
from ._lora import LoraSpec, adapted_paths, has_adapters, lora, lora_spec, merge, resolve_targets
from ._quantize import SCHEMES, param_bytes, quantize
from ._runtime import Compiled, cast, checkpoint, compile
from ._shard import shard, unshard
from ._trainable import freeze, trainable

__all__ = [
    "ORDER", "ORDER_TEXT", "SCHEMES", "Compiled", "LoraSpec", "adapted_paths", "cast", "check_order", "checkpoint",
    "compile", "freeze", "has_adapters", "load_adapter", "lora", "lora_spec", "merge", "param_bytes", "quantize",
    "resolve_targets", "save_adapter", "shard", "trainable", "unshard",
]
