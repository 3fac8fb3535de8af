"""Choosing which leaves a program trains."""

from __future__ import annotations

from collections.abc import Iterable

from ..core import Model, flatten, is_quantized, is_static, matches


def _paths(model: Model, patterns: str | Iterable[str], transform: str) -> set[str]:
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    flat = flatten(model.params)
    hit = {p for p, t in flat.items() if not is_static(t) and matches(p, patterns)}
    if not hit:
        raise ValueError(f"{transform}: patterns {list(patterns)} match no parameter (paths look like "
                         f"{next(iter(flat))!r})")
    return hit


def trainable(model: Model, patterns: str | Iterable[str] = "*") -> Model:
    """Make exactly the leaves matching ``patterns`` (globs over dotted paths) trainable.

    ``trainable(m)`` is full fine-tuning; ``trainable(m, ["*.mlp.*", "lm_head.*"])`` a partial one.
    Quantized leaves cannot be trained: selecting one is an error.
    """
    hit = _paths(model, patterns, "trainable")
    flat = flatten(model.params)
    quantized = sorted(p for p in hit if is_quantized(flat[p]))
    if quantized:
        raise ValueError(f"trainable: {quantized[0]!r} is quantized and cannot be trained; "
                         "train adapters on it (lora) or leave it out of the patterns")
    return model.replace(trainable=frozenset(hit))


def freeze(model: Model, patterns: str | Iterable[str]) -> Model:
    """Remove the leaves matching ``patterns`` from the trainable set (tensors are untouched)."""
    return model.replace(trainable=model.trainable - _paths(model, patterns, "freeze"))
