"""The one linear primitive every projection of every architecture goes through.

What a transform puts at a linear's place in the parameter tree decides what
runs here, so the model code never mentions LoRA or quantization:

- ``{"weight": W[, "bias": b]}``: a plain linear. ``W`` may be a torchao
  quantized tensor (NF4, int8, int4): it implements ``F.linear`` itself.
- ``+ {"lora_A": {"weight": A}, "lora_B": {"weight": B}}``: LoRA,
  ``y = x W^T + b + scale * (dropout(x) A^T) B^T``, key names as PEFT saves them.
- ``+ {"lora_magnitude_vector": m}``: DoRA, the output rescaled by
  ``m / ||W + scale * B A||`` (row norms, treated as a constant as PEFT does).

The hyper-parameters that are not tensors (scale, dropout) live in
:class:`LoraSpec`, carried by the model's forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch
import torch.nn.functional as F


@attrs.frozen
class LoraSpec:
    """Static settings of a model's adapters (one value for all its adapted linears).

    Args:
        rank: adapter rank r (``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``).
        alpha: scale numerator: the update is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout probability on the adapter input, training only.
        targets: the module names or patterns the adapters were placed on.
        dora: weight-decomposed LoRA (a trainable magnitude per output row).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dora: bool = False
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)


def dense_weight(node: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight of a linear node as a plain tensor (NF4/int8/int4 dequantized)."""
    w = node["weight"]
    # Exact type test: torchao subclasses wrapped by quantize_ pass isinstance(w, Parameter).
    if type(w) not in (torch.Tensor, torch.nn.Parameter):
        # NF4Tensor.dequantize is a static lookup helper; its full dequantization is get_original_weight.
        w = w.get_original_weight() if hasattr(w, "get_original_weight") else w.dequantize()
    return w if dtype is None else w.to(dtype)


def lora_delta(node: Mapping, scale: float) -> torch.Tensor:
    """``scale * B @ A``: the adapter's change to the weight, ``[out, in]``."""
    a, b = node["lora_A"]["weight"], node["lora_B"]["weight"]
    return (b @ a) * scale


def linear(
    x: torch.Tensor,
    node: Mapping,
    lora: LoraSpec | None = None,
    training: bool = False,
) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` through whatever the tree holds at this linear."""
    weight, bias = node["weight"], node.get("bias")
    if "lora_A" not in node:
        return F.linear(x, weight, bias)
    if lora is None:
        raise ValueError("the parameter tree holds LoRA weights but the forward has no LoraSpec")
    a, b = node["lora_A"]["weight"], node["lora_B"]["weight"]
    x_drop = F.dropout(x, lora.dropout, training=True) if training and lora.dropout else x
    update = F.linear(F.linear(x_drop.to(a.dtype), a), b).to(x.dtype) * lora.scale
    magnitude = node.get("lora_magnitude_vector")
    if magnitude is None:
        return F.linear(x, weight, bias) + update
    # DoRA, as PEFT computes it: with dropout the rescaled base path uses the dropped input.
    with torch.no_grad():
        w = dense_weight(node, a.dtype)
        row_norm = (w + lora_delta(node, lora.scale).to(w.dtype)).norm(dim=1)
    mag_scale = (magnitude / row_norm).to(x.dtype)
    if x_drop is x:
        out = mag_scale * (F.linear(x, weight) + update)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias) + (mag_scale - 1) * F.linear(x_drop, weight) + mag_scale * update
