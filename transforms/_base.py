"""The order transforms stack in, declared once, and the helpers every transform uses to follow it."""

from __future__ import annotations

from typing import Any

import attrs

from ..core import Model

ORDER: tuple[tuple[str, ...], ...] = (
    ("cast",),  # the dtype of the base weights (a quantized weight's dtype is fixed when it is quantized)
    ("quantize", "qat"),  # what the base weights are (qat: fake-quantized while training; one or the other)
    ("lora", "load_adapter", "merge"),  # adapters on them (merge folds them back)
    ("checkpoint",),  # how layers run: recomputed in the backward
    ("shard",),  # where the leaves live: split across the data-parallel ranks
    # how a layer runs, over the (gathered) weights: projections fused; saved activations kept on the host
    ("fuse_projections", "offload_activations"),
    ("compile",),  # the whole forward compiled: always last
)
"""Stages in the order transforms apply; within a stage any order. ``trainable``/``freeze`` go anywhere."""

COMMUTES: dict[str, tuple[str, ...]] = {
    "checkpoint": ("quantize", "qat", "cast", "lora", "load_adapter", "merge",  # it changes how layers run,
                   "fuse_projections"),  # not the tree
    "cast": ("lora", "load_adapter", "merge"),  # adapters keep their dtype
}
"""Pairs that may come in either order although their stages differ."""

ORDER_TEXT = " -> ".join("/".join(names) for names in ORDER) + " (checkpoint anywhere before shard; cast also after lora)"

BASE_KEYS = frozenset({"weight", "bias", "qat"})
"""Keys of a linear node that make up its base linear (``qat``: how ``transforms.qat`` fake-quantizes it);
an adapter's keys are all the others."""

_STAGE = {name: i for i, names in enumerate(ORDER) for name in names}


def _commute(a: str, b: str) -> bool:
    return b in COMMUTES.get(a, ()) or a in COMMUTES.get(b, ())


def check_order(model: Model, transform: str) -> None:
    """Raise ValueError naming both transforms when ``transform`` may not follow one already applied."""
    stage = _STAGE[transform]
    later = [done for done in model.transforms if _STAGE[done] > stage and not _commute(done, transform)]
    if later:
        done = max(later, key=_STAGE.__getitem__)
        fix = f"apply {done} last" if _STAGE[done] == len(ORDER) - 1 else f"apply {transform} before {done}"
        raise ValueError(f"{transform} after {done}: {fix} (order: {ORDER_TEXT})")


def record(model: Model, transform: str, **changes: Any) -> Model:
    """``model`` with ``changes`` applied and ``transform`` appended to its record.

    Every transform calls :func:`check_order` on its input first and this on its result.
    """
    return model.replace(transforms=(*model.transforms, transform), **changes)


def with_decoder(model: Model, transform: str, **changes: Any) -> Model:
    """:func:`record` with the model's :class:`Decoder` changed by ``changes``."""
    return record(model, transform, forward=attrs.evolve(model.decoder, **changes))
