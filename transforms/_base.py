"""Helpers shared by the transforms."""

from __future__ import annotations

from typing import Any

import attrs

from ftprog.core import Decoder, Model


def decoder_of(model: Model, transform: str) -> Decoder:
    """The model's :class:`Decoder`; a compiled forward is an error (compile goes last)."""
    if not isinstance(model.forward, Decoder):
        raise ValueError(
            f"{transform}: the model's forward is {type(model.forward).__name__}, not a Decoder; "
            "apply compile last (order: quantize -> lora -> checkpoint -> compile)"
        )
    return model.forward


def with_decoder(model: Model, transform: str, **changes: Any) -> Model:
    """A copy of ``model`` whose Decoder has ``changes`` applied."""
    return model.replace(forward=attrs.evolve(decoder_of(model, transform), **changes))


def is_quantized(tensor) -> bool:
    """True for torchao quantized weights (NF4, int8, int4): anything but a plain tensor."""
    import torch

    return not isinstance(tensor, torch.Tensor) or type(tensor) not in (torch.Tensor, torch.nn.Parameter)
