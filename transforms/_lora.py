"""LoRA / DoRA adapters as a rewrite of the parameter tree, and merging them back."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ftprog.core import LoraSpec, Model, dense_weight, flatten, linear_paths, matches, unflatten
from ftprog.core._linear import lora_delta
from ftprog.core._tree import get

from ._base import decoder_of, is_quantized, with_decoder

ALL_LINEAR = "all-linear"


def resolve_targets(model: Model, targets: str | Sequence[str]) -> list[str]:
    """Module paths selected by ``targets``.

    A target is a module name (``"q_proj"``, matching the last part of the
    path, as PEFT's ``target_modules``), a glob over module paths
    (``"model.layers.1*.mlp.*"``), ``"all-linear"`` (every linear but
    ``lm_head``, as PEFT) or ``"lm_head"``.
    """
    if isinstance(targets, str):
        targets = (targets,)
    candidates = linear_paths(model.config)
    chosen = []
    for path in candidates:
        name = path.rsplit(".", 1)[-1]
        for t in targets:
            if (t == ALL_LINEAR and path != "lm_head") or t in (name, path) or matches(path, t):
                chosen.append(path)
                break
    unknown = [t for t in targets if t != ALL_LINEAR and not any(
        t in (p, p.rsplit(".", 1)[-1]) or matches(p, t) for p in candidates)]
    if unknown:
        names = sorted({p.rsplit(".", 1)[-1] for p in candidates})
        hint = " (tied embeddings: lm_head has no weight of its own)" if "lm_head" in unknown else ""
        raise ValueError(f"lora targets {unknown} match no linear layer{hint}; linear names are {names}")
    return chosen


def lora(model: Model, *, rank: int, alpha: float, dropout: float = 0.0,
         targets: str | Sequence[str] = ("q_proj", "v_proj"), dora: bool = False, rslora: bool = False,
         seed: int = 0, dtype: torch.dtype = torch.float32) -> Model:
    """Add LoRA (or DoRA) adapters to the targeted linears.

    Tree: each targeted node ``{weight[, bias]}`` gains ``lora_A.weight``
    ``[rank, in]`` (Kaiming-uniform, as PEFT) and ``lora_B.weight``
    ``[out, rank]`` (zeros), so the adapted model computes exactly the base
    model at first; DoRA adds ``lora_magnitude_vector [out]`` = the row norms of
    the base weight. Adapters are kept in ``dtype`` (fp32 by default, as PEFT
    does for half-precision bases). Base weights are shared, not copied.

    Trainable set afterwards: the adapter leaves (and DoRA magnitudes) only.
    Works on quantized bases (``quantize`` then ``lora`` is QLoRA).
    """
    if rank < 1:
        raise ValueError(f"lora: rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora: dropout must be in [0, 1), got {dropout}")
    decoder = decoder_of(model, "lora")
    if decoder.adapter is not None:
        raise ValueError("lora: the model already has adapters; merge them first (ftprog.transforms.merge)")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    paths = resolve_targets(model, targets)
    generator = torch.Generator().manual_seed(seed)
    flat = dict(flatten(model.params))
    new = []
    for path in paths:
        node = get(model.params, path)
        out_features, in_features = node["weight"].shape
        a = torch.empty(rank, in_features)
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
        a.uniform_(-bound, bound, generator=generator)
        entries = {f"{path}.lora_A.weight": a.to(dtype),
                   f"{path}.lora_B.weight": torch.zeros(out_features, rank, dtype=dtype)}
        if dora:
            entries[f"{path}.lora_magnitude_vector"] = dense_weight(node, dtype).norm(dim=1)
        device = node["weight"].device
        entries = {k: v.to(device) for k, v in entries.items()}
        flat.update(entries)
        new += entries
    spec = LoraSpec(rank=rank, alpha=float(alpha), dropout=dropout, targets=targets, dora=dora, rslora=rslora)
    adapted = with_decoder(model, "lora", adapter=spec)
    return adapted.replace(params=unflatten(flat), trainable=frozenset(new))


def merge(model: Model, dtype: torch.dtype | None = None) -> Model:
    """Fold the adapters into the base weights: a plain model with the same logits.

    ``W <- W + scale * B A`` (DoRA: then each row rescaled to its magnitude).
    Quantized weights are dequantized to ``dtype`` (default: the embedding's
    dtype). The result has no adapter leaves and every leaf trainable.
    """
    decoder = decoder_of(model, "merge")
    spec = decoder.adapter
    if spec is None:
        raise ValueError("merge: the model has no adapters to merge")
    dtype = dtype or model.dtype
    flat = flatten(model.params)
    merged = {}
    for path, tensor in flat.items():
        if path.endswith(".lora_A.weight"):
            module = path[: -len(".lora_A.weight")]
            node = get(model.params, module)
            with torch.no_grad():
                w = dense_weight(node, torch.float32) + lora_delta(node, spec.scale).float()
                if "lora_magnitude_vector" in node:
                    w = w * (node["lora_magnitude_vector"].float() / w.norm(dim=1))[:, None]
            merged[f"{module}.weight"] = w.to(dtype)
    params = {p: merged.get(p, dense_weight({"weight": t}, dtype) if is_quantized(t) else t)
              for p, t in flat.items() if ".lora_" not in p}
    plain = with_decoder(model, "merge", adapter=None)
    return plain.replace(params=unflatten(params), trainable=frozenset(params))
