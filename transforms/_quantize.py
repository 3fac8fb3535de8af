"""Weight quantization (NF4 / int8 / int4) as a rewrite of the parameter tree.

Each targeted linear's ``weight`` leaf is replaced by a torchao quantized
tensor subclass. Those implement ``F.linear`` themselves, so the forward
(:func:`ftprog.core.linear`) is unchanged; :func:`ftprog.core.dense_weight`
dequantizes them where a plain tensor is needed (DoRA norms, merge, save).

torchao is imported inside the functions, never when ftprog is imported.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core import Model, flatten, is_plain, is_quantized, unflatten

from ._base import check_order, record
from ._lora import resolve_targets

SCHEMES = ("nf4", "int8", "int4")
GROUPED_SCHEMES = ("int8-dynamic-act-int4-weight", "int4-weight", "int8-weight")
"""Schemes with a group size, the ones :func:`ftprog.transforms.qat` trains for (torchao's QAT supports them)."""

NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
INT4_GROUP_SIZE = 32


def torchao_config(scheme: str, group_size: int) -> Any:
    """The torchao ``quantize_`` config of a grouped scheme (:data:`GROUPED_SCHEMES`).

    Symmetric integer weights in groups of ``group_size`` input features (0: one scale per output row),
    stored one int8 per value; ``int8-dynamic-act-int4-weight`` also quantizes each input token to int8
    (asymmetric, scale and zero point per token) when the linear runs.
    """
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis, PerGroup,
    )

    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    if scheme == "int8-dynamic-act-int4-weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity)
    if scheme in ("int4-weight", "int8-weight"):
        bits = torch.int4 if scheme == "int4-weight" else torch.int8
        return IntxWeightOnlyConfig(weight_dtype=bits, granularity=granularity)
    raise ValueError(f"unknown grouped scheme {scheme!r}; valid: {', '.join(GROUPED_SCHEMES)}")


def unsupported(scheme: str, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> str | None:
    """Why ``scheme`` cannot quantize ``weight`` (a rule torchao enforces), or None if it can."""
    if weight.dim() != 2:
        return f"a linear weight must be 2-D, got shape {tuple(weight.shape)}"
    if not weight.is_floating_point():
        return f"the weight must be floating point, got {weight.dtype}"
    if scheme == "nf4":
        # to_nf4: numel % block_size == 0, and the numel // block_size per-block scalers are
        # themselves quantized in blocks of scaler_block_size: numel % (64 * 256) == 0.
        unit = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
        if weight.numel() % unit:
            return (f"NF4 needs the element count divisible by block_size * scaler_block_size = "
                    f"{NF4_BLOCK_SIZE} * {NF4_SCALER_BLOCK_SIZE} = {unit}; shape {tuple(weight.shape)} has "
                    f"{weight.numel()} elements")
    elif scheme == "int4":
        if weight.shape[1] % INT4_GROUP_SIZE:
            return (f"int4 quantizes groups of {INT4_GROUP_SIZE} input features; in_features = "
                    f"{weight.shape[1]} (shape {tuple(weight.shape)}) is not divisible by {INT4_GROUP_SIZE}")
    elif scheme in GROUPED_SCHEMES and group_size and weight.shape[1] % group_size:
        return (f"{scheme} quantizes groups of group_size = {group_size} input features; in_features = "
                f"{weight.shape[1]} (shape {tuple(weight.shape)}) is not divisible by {group_size}")
    return None


def _via_quantize_(weight: torch.Tensor, config: Any) -> torch.Tensor:
    """Apply a torchao ``quantize_`` config to one weight through a temporary ``nn.Linear``."""
    from torchao.quantization import quantize_

    out_features, in_features = weight.shape
    holder = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
    holder.weight = torch.nn.Parameter(weight, requires_grad=False)
    quantize_(holder, config)
    # quantize_ wraps the result in an nn.Parameter; the tree holds the bare tensor subclass.
    return holder.weight.detach()


def _quantize_weight(scheme: str, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    weight = weight.detach().contiguous()
    with torch.no_grad():
        if scheme in GROUPED_SCHEMES:
            return _via_quantize_(weight, torchao_config(scheme, group_size))
        if scheme == "nf4":
            from torchao.quantization import to_nf4

            return to_nf4(weight, block_size=NF4_BLOCK_SIZE, scaler_block_size=NF4_SCALER_BLOCK_SIZE)
        if scheme == "int8":
            from torchao.quantization import Int8WeightOnlyConfig, PerRow

            # set_inductor_config=False: quantize_ must not change global torch._inductor settings.
            return _via_quantize_(weight, Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False))
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup

        return _via_quantize_(weight, IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                           granularity=PerGroup(INT4_GROUP_SIZE)))


def quantize(model: Model, scheme: str, *, group_size: int = INT4_GROUP_SIZE,
             targets: str | Sequence[str] = "all-linear", skip_unsupported: bool = False) -> Model:
    """Quantize the weights of the targeted linears (weight-only, but for ``int8-dynamic-act-int4-weight``).

    Schemes (all from torchao):

    - ``"nf4"``: 4-bit NormalFloat with double-quantized scalers (block 64,
      scaler block 256), the QLoRA base; the tensor keeps the weight's dtype
      (bf16 typically) and computes in the input's dtype. About 0.26x the bytes
      of bf16.
    - ``"int8"``: symmetric per-row int8 (``Int8WeightOnlyConfig``). About
      0.5x the bytes of bf16 (0.25x of fp32).
    - ``"int4"``: symmetric int4 in groups of 32 input features
      (``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``),
      chosen on every device because it runs on CPU (``Int4WeightOnlyConfig``
      needs GPU kernels). Values are stored unpacked, one int8 per weight, so it
      saves about as much memory as int8; use it for int4 accuracy, nf4 for memory.
      Its linear needs activations in the weight's dtype.
    - ``"int4-weight"``, ``"int8-weight"``, ``"int8-dynamic-act-int4-weight"``: the
      schemes :func:`ftprog.transforms.qat` trains for, in groups of ``group_size``
      input features (0: per output row; see :func:`torchao_config`). ``"int4"`` is
      ``"int4-weight"`` with ``group_size=32``. The last also quantizes the
      linear's input per token to int8 at run time.

    ``targets`` selects linears as :func:`ftprog.transforms.lora` does
    (default: every linear but ``lm_head``); embeddings, norms and biases are
    never quantized. A targeted weight whose shape the scheme cannot handle
    (nf4: element count divisible by 64 * 256 = 16384; int4: in_features
    divisible by 32; grouped schemes: by ``group_size``) is an error naming it, unless ``skip_unsupported``: then
    it stays unquantized and a warning lists it.

    Returns a new model: quantized leaves leave the trainable set, every other
    tensor is shared with the input, which stays usable. Apply before ``lora``
    (``quantize -> lora`` is QLoRA) and before ``compile``.
    """
    if scheme not in SCHEMES + GROUPED_SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; valid schemes are "
                         f"{', '.join(SCHEMES + GROUPED_SCHEMES)}")
    if group_size < 0:
        raise ValueError(f"quantize: group_size must be >= 0 (0: per output row), got {group_size}")
    if "qat" in model.transforms:
        raise ValueError("quantize: the model is fake-quantized for training (qat); convert it with "
                         "ftprog.transforms.convert_qat, which quantizes with the scheme it trained for")
    check_order(model, "quantize")
    flat = flatten(model.params)
    already = [p for p, t in flat.items() if is_quantized(t)]
    if already:
        raise ValueError(f"quantize: the model is already quantized ({len(already)} quantized weights, "
                         f"e.g. {already[0]!r}); quantize a plain model")
    try:
        modules = resolve_targets(model, targets)
    except ValueError as e:
        raise ValueError("quantize: " + str(e).replace("lora targets", "targets", 1)) from None
    if not modules:
        raise ValueError(f"quantize: targets {targets!r} select no linear layer")

    paths = [f"{m}.weight" for m in modules]
    problems = {p: why for p in paths if (why := unsupported(scheme, flat[p], group_size)) is not None}
    if problems and not skip_unsupported:
        first, why = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more: {sorted(problems)[:4]})" if len(problems) > 1 else ""
        raise ValueError(f"quantize({scheme!r}): cannot quantize {first!r}: {why}{more}. "
                         "Pass skip_unsupported=True to keep such weights unquantized, or narrow targets")
    if problems:
        warnings.warn(f"quantize({scheme!r}): {len(problems)} weights left unquantized (unsupported shapes): "
                      f"{sorted(problems)}", stacklevel=2)

    new = dict(flat)
    done = []
    for path in paths:
        if path in problems:
            continue
        new[path] = _quantize_weight(scheme, flat[path], group_size)
        if not is_quantized(new[path]):  # torchao skips some shapes silently; never pass that on
            raise RuntimeError(f"quantize({scheme!r}): torchao returned {path!r} unquantized")
        done.append(path)
    return record(model, "quantize", params=unflatten(new), trainable=model.trainable - frozenset(done))


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes held by one leaf; a quantized tensor counts its inner tensors (data, scales, ...)."""
    if is_plain(tensor) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_nbytes(getattr(tensor, name)) for name in names)


def param_bytes(params: Model | Mapping[str, Any], patterns: str | Sequence[str] | None = None) -> int:
    """Bytes of a model's (or tree's) leaves, quantized ones as stored; ``patterns`` globs restrict the sum."""
    from ..core import matches

    tree = params.params if isinstance(params, Model) else params
    return sum(tensor_nbytes(t) for p, t in flatten(tree).items()
               if isinstance(t, torch.Tensor) and (patterns is None or matches(p, patterns)))
