"""Quantization-aware training: linears that compute with torchao's fake-quantized weights (and inputs).

A fake-quantized linear node holds, beside its ``weight`` (and ``bias``), one static leaf ``qat``
(a :class:`QatSpec`: the scheme and group size). :func:`ftprog.core.linear` dispatches such nodes
to :func:`qat_linear` through that key, which runs the linear on ``fake_quantize(weight)`` (and, for
``int8-dynamic-act-int4-weight``, on the input fake-quantized per token): quantized and dequantized
again with the scales and rounding torchao's ``quantize_`` uses for the real conversion, and
torchao's straight-through gradient (rounding passes the gradient through, clamped values get
none). The fake-quantize configs are the ones torchao's own ``QATConfig(base_config,
step="prepare")`` derives from the post-training config (:func:`ftprog.transforms._quantize.torchao_config`),
so training and conversion cannot disagree.

With LoRA on top (``qat`` then ``lora``), the adapter computes its base linear through
:func:`ftprog.core.linear` on the base keys, so the frozen base is fake-quantized and the adapter
runs in float on the unquantized input, which is what the converted model (a quantized base
under the same adapter) computes.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from ..core import Model, dense_linear, flatten, is_quantized, linear, register_linear, unflatten
from ..core._tree import get

from ._base import BASE_KEYS, check_order, record
from ._lora import resolve_targets
from ._quantize import GROUPED_SCHEMES, INT4_GROUP_SIZE, _quantize_weight, torchao_config, unsupported

QAT_SCHEMES = GROUPED_SCHEMES
QAT_KEY = "qat"
"""The key of a fake-quantized node's static :class:`QatSpec` leaf."""
QAT_FILE = "ft-prog-qat.json"
"""What a saved QAT-trained model needs to be converted: written beside its weights (or adapter)."""


@attrs.frozen
class QatSpec:
    """Static settings of one fake-quantized linear.

    Args:
        scheme: one of :data:`QAT_SCHEMES`.
        group_size: input features per weight scale (0: one scale per output row).
    """

    scheme: str
    group_size: int


@functools.cache
def fake_quantize_configs(spec: QatSpec) -> tuple[Any, Any]:
    """``(input config or None, weight config)``: the ``IntxFakeQuantizeConfig`` s torchao's QAT prepares for ``spec``.

    Read off torchao's own ``QATConfig(base_config, step="prepare")`` applied to a meta-device linear,
    so they are exactly what torchao pairs with the conversion config.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    holder = torch.nn.Sequential(torch.nn.Linear(2 * max(spec.group_size, 1), 1, bias=False, device="meta"))
    quantize_(holder, QATConfig(torchao_config(spec.scheme, spec.group_size), step="prepare"))
    prepared = holder[0]
    act = prepared.activation_fake_quantizer
    return (None if act is None else act.config), prepared.weight_fake_quantizer.config


def fake_quantize_weight(weight: torch.Tensor, spec: QatSpec) -> torch.Tensor:
    """``weight [out, in]`` quantized and dequantized as torchao converts it for ``spec`` (same dtype)."""
    from torchao.quantization.qat import IntxFakeQuantizer

    # A fresh quantizer per call: torchao's keeps the last scales on itself, which would tie this call's
    # autograd graph to a module shared by every call.
    return IntxFakeQuantizer(fake_quantize_configs(spec)[1])(weight)


def fake_quantize_input(x: torch.Tensor, spec: QatSpec) -> torch.Tensor:
    """``x [..., in]`` as the converted linear sees it: per-token int8 for ``int8-dynamic-act-*``, else ``x``."""
    config = fake_quantize_configs(spec)[0]
    if config is None:
        return x
    from torchao.quantization.qat import IntxFakeQuantizer

    return IntxFakeQuantizer(config)(x)


def qat_linear(x: torch.Tensor, node: Mapping) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` through a fake-quantized node."""
    spec: QatSpec = node[QAT_KEY]
    if any(k not in BASE_KEYS for k in node):
        # An adapter holds this node too: it runs, and computes its base through linear() on the base keys
        # (which come back here). Moving the qat key last makes the adapter's key the one linear() finds first.
        return linear(x, {**{k: v for k, v in node.items() if k != QAT_KEY}, QAT_KEY: spec})
    return dense_linear(fake_quantize_input(x, spec), fake_quantize_weight(node["weight"], spec), node.get("bias"))


register_linear(QAT_KEY, qat_linear)


def qat_paths(model: Model) -> list[str]:
    """Module paths of the fake-quantized linears."""
    return [p.removesuffix("." + QAT_KEY) for p, v in flatten(model.params).items()
            if p.endswith("." + QAT_KEY) and isinstance(v, QatSpec)]


def qat_spec(model: Model) -> QatSpec | None:
    """The :class:`QatSpec` of the model's fake-quantized linears; None without ``qat``."""
    specs = {get(model.params, p)[QAT_KEY] for p in qat_paths(model)}
    if len(specs) > 1:
        raise ValueError(f"the model's fake-quantized linears have different settings: {sorted(map(repr, specs))}")
    return next(iter(specs), None)


def qat(model: Model, scheme: str, *, group_size: int = INT4_GROUP_SIZE, targets: str | Sequence[str] = "all-linear",
        skip_unsupported: bool = False) -> Model:
    """Fake-quantize the targeted linears while training, for conversion to ``scheme`` afterwards.

    Schemes (what :func:`convert_qat` then makes with torchao; see :func:`ftprog.transforms.quantize`):

    - ``"int8-dynamic-act-int4-weight"``: int4 weights in groups of ``group_size``, inputs int8 per token;
    - ``"int4-weight"`` / ``"int8-weight"``: weight-only int4 / int8 in groups of ``group_size``.

    ``group_size`` counts input features per scale (0: one scale per output row). ``targets`` selects
    linears as :func:`ftprog.transforms.quantize` does (default: every linear but ``lm_head``); a
    weight whose in_features the group size does not divide is an error, or with ``skip_unsupported``
    stays float (a warning lists it), as ``quantize`` decides for the same weights.

    Tree: each targeted node gains the static leaf ``qat`` (:class:`QatSpec`); weights are shared, the
    trainable set is unchanged (full QAT trains the float weights; ``lora`` afterwards trains adapters
    over the fake-quantized base). Apply before ``lora``, ``checkpoint``, ``shard`` and ``compile``.
    """
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"qat: unknown scheme {scheme!r}; valid schemes are {', '.join(QAT_SCHEMES)}")
    if group_size < 0:
        raise ValueError(f"qat: group_size must be >= 0 (0: one scale per output row), got {group_size}")
    check_order(model, "qat")
    flat = flatten(model.params)
    if qat_paths(model):
        raise ValueError("qat: the model is already fake-quantized (qat applied twice)")
    if any(is_quantized(t) for t in flat.values()):
        raise ValueError("qat: the model is quantized; QAT trains float weights for a later quantization")
    try:
        modules = resolve_targets(model, targets)
    except ValueError as e:
        raise ValueError("qat: " + str(e).replace("lora targets", "targets", 1)) from None
    if not modules:
        raise ValueError(f"qat: targets {targets!r} select no linear layer")
    problems = {m: why for m in modules if (why := unsupported(scheme, flat[f"{m}.weight"], group_size))}
    if problems and not skip_unsupported:
        first, why = next(iter(problems.items()))
        raise ValueError(f"qat({scheme!r}): cannot fake-quantize {first!r}: {why}. Pass skip_unsupported=True "
                         "to keep such linears float, or choose another group_size")
    if problems:
        warnings.warn(f"qat({scheme!r}): {len(problems)} linears stay float (unsupported shapes): {sorted(problems)}",
                      stacklevel=2)
    spec = QatSpec(scheme, group_size)
    new = dict(flat)
    new.update({f"{m}.{QAT_KEY}": spec for m in modules if m not in problems})
    return record(model, "qat", params=unflatten(new))


def without_qat(model: Model) -> Model:
    """The model with plain linears again: the ``qat`` leaves left out, every tensor shared (to save or evaluate)."""
    kept = {p: v for p, v in flatten(model.params).items() if not (p.endswith("." + QAT_KEY) and isinstance(v, QatSpec))}
    return model.replace(params=unflatten(kept), transforms=tuple(t for t in model.transforms if t != "qat"))


def convert_qat(model: Model) -> Model:
    """The real torchao quantized model a QAT-trained ``model`` was trained for (an eager, gathered model).

    Every fake-quantized weight is quantized by torchao with the spec's scheme and group size (as
    :func:`ftprog.transforms.quantize` does); adapters stay, over the quantized base. Its logits equal
    the fake-quantized model's up to float rounding. Every other tensor is shared; quantized weights
    leave the trainable set.
    """
    spec = qat_spec(model)
    if spec is None:
        raise ValueError("convert_qat: the model has no fake-quantized linears (apply qat before training)")
    weights = [f"{m}.weight" for m in qat_paths(model)]
    plain = without_qat(model)
    flat = flatten(plain.params)
    for path in weights:
        flat[path] = _quantize_weight(spec.scheme, flat[path], spec.group_size)
        if not is_quantized(flat[path]):  # torchao skips some shapes silently; never pass that on
            raise RuntimeError(f"convert_qat: torchao returned {path!r} unquantized")
    return plain.replace(params=unflatten(flat), trainable=plain.trainable - frozenset(weights),
                         transforms=(*plain.transforms, "quantize"))


def save_qat_record(model: Model, folder: str | os.PathLike) -> None:
    """Write ``folder/ft-prog-qat.json`` (scheme, group size, the fake-quantized linears) when ``model`` has ``qat``."""
    spec = qat_spec(model)
    if spec is None:
        return
    record_ = {"scheme": spec.scheme, "group_size": spec.group_size, "linears": qat_paths(model),
               "convert": f"ft-prog run quantize model.path=... scheme={spec.scheme} group_size={spec.group_size} "
                          "dtype=<the training dtype>"}
    (Path(folder) / QAT_FILE).write_text(json.dumps(record_, indent=2) + "\n")


def read_qat_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``ft-prog-qat.json`` of a saved QAT-trained model (a dict with scheme and group_size), or None."""
    file = Path(folder) / QAT_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if data.get("scheme") not in QAT_SCHEMES or not isinstance(data.get("group_size"), int):
        raise ValueError(f"{file}: expected a scheme in {QAT_SCHEMES} and an integer group_size, got "
                         f"scheme={data.get('scheme')!r} group_size={data.get('group_size')!r}")
    return data
