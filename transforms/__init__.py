"""ft-prog transforms: ``Model -> Model`` functions that stack.

Order that makes sense (as torchtitan's): quantize -> lora -> checkpoint -> compile.
Each returns a new model and leaves its input usable; frozen tensors are shared.
"""

from ._adapter_io import load_adapter, save_adapter
from ._lora import lora, merge, resolve_targets
from ._quantize import SCHEMES, param_bytes, quantize
from ._runtime import Compiled, cast, checkpoint, compile
from ._shard import Sharded, shard
from ._torchao import quiet_torchao_import
from ._trainable import freeze, trainable

quiet_torchao_import()

__all__ = [
    "SCHEMES", "Compiled", "cast", "checkpoint", "compile", "freeze", "load_adapter", "lora", "merge", "param_bytes", "quantize",
    "resolve_targets", "save_adapter", "shard", "Sharded", "trainable",
]
