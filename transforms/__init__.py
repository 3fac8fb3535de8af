"""ft-prog transforms: ``Model -> Model`` functions that stack.

Order that makes sense (as torchtitan's): quantize -> lora -> checkpoint -> compile.
Each returns a new model and leaves its input usable; frozen tensors are shared.
Beside them, the file formats of what they make: PEFT adapter folders (``save_adapter`` /
``load_adapter``) and quantized checkpoints (``save_quantized`` / ``load_quantized``).
"""

from ._adapter_io import load_adapter, save_adapter
from ._lora import lora, merge, resolve_targets
from ._quantize import SCHEMES, param_bytes, quantize
from ._quantized_io import is_quantized_checkpoint, load_quantized, save_quantized
from ._runtime import Compiled, cast, checkpoint, compile
from ._shard import Sharded, shard
from ._trainable import freeze, trainable

__all__ = [
    "SCHEMES", "Compiled", "cast", "checkpoint", "compile", "freeze", "is_quantized_checkpoint", "load_adapter",
    "load_quantized", "lora", "merge", "param_bytes", "quantize", "resolve_targets", "save_adapter", "save_quantized",
    "shard", "Sharded", "trainable",
]
