"""Parameter trees: nested ``dict[str, ...]`` whose leaves are tensors (and, rarely, static settings).

Paths are dotted strings mirroring Hugging Face checkpoint names
(``model.layers.0.self_attn.q_proj.weight``). Patterns are shell globs over
those paths (``*`` also crosses dots), so ``"*.q_proj.*"`` selects every
query projection.

A leaf is a tensor, or a *static* leaf: an immutable non-tensor value a
transform stores beside the tensors it describes (a LoRA node's scale and
dropout). Static leaves travel with the tree through every function here and
are never trained, counted, cast or sharded. Tensor leaves come in three
kinds, told apart by :func:`is_plain`, :func:`is_dtensor` and
:func:`is_quantized`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

Tree = dict[str, Any]


def is_plain(leaf: Any) -> bool:
    """True for a plain ``torch.Tensor`` (or ``Parameter``): not quantized, not a DTensor, not static."""
    return type(leaf) in (torch.Tensor, torch.nn.Parameter)


def is_dtensor(leaf: Any) -> bool:
    """True for a ``torch.distributed`` DTensor (a sharded leaf); never imports torch.distributed."""
    return type(leaf).__name__ == "DTensor" and type(leaf).__module__.startswith("torch.distributed")


def is_quantized(leaf: Any) -> bool:
    """True for a quantized weight (a torchao tensor subclass: NF4, int8, int4)."""
    return isinstance(leaf, torch.Tensor) and not is_plain(leaf) and not is_dtensor(leaf)


def is_static(leaf: Any) -> bool:
    """True for a static leaf: a setting stored in the tree, not a tensor."""
    return not isinstance(leaf, torch.Tensor)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested tree -> ``{dotted.path: leaf}`` in depth-first insertion order."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """``{dotted.path: leaf}`` -> nested tree (inverse of :func:`flatten`)."""
    tree: Tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} passes through a leaf at {part!r}")
        if leaf in node:
            raise ValueError(f"duplicate path {path!r}")
        node[leaf] = value
    return tree


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Mapping[str, Any]) -> Tree:
    """Apply ``fn`` to every tensor leaf (static leaves are kept); returns a new tree of the same structure."""
    return {k: tree_map(fn, v) if isinstance(v, Mapping) else v if is_static(v) else fn(v) for k, v in tree.items()}


def tree_map_with_path(fn: Callable[[str, torch.Tensor], Any], tree: Mapping[str, Any]) -> Tree:
    """Like :func:`tree_map` but ``fn(path, leaf)`` also receives the dotted path."""
    return unflatten({p: v if is_static(v) else fn(p, v) for p, v in flatten(tree).items()})


def matches(path: str, patterns: str | Iterable[str]) -> bool:
    """True if ``path`` matches any glob in ``patterns`` (a string is one pattern)."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def select(tree: Mapping[str, Any], patterns: str | Iterable[str]) -> Tree:
    """The sub-tree of leaves whose path matches any of ``patterns``."""
    return unflatten({p: v for p, v in flatten(tree).items() if matches(p, patterns)})


def partition(tree: Mapping[str, Any], patterns: str | Iterable[str]) -> tuple[Tree, Tree]:
    """Split into ``(matching, rest)``; :func:`combine` puts them back together."""
    flat = flatten(tree)
    hit = {p: v for p, v in flat.items() if matches(p, patterns)}
    return unflatten(hit), unflatten({p: v for p, v in flat.items() if p not in hit})


def combine(*trees: Mapping[str, Any]) -> Tree:
    """Union of trees; a leaf in a later tree replaces the same path in an earlier one."""
    flat: dict[str, Any] = {}
    for tree in trees:
        flat.update(flatten(tree))
    return unflatten(flat)


def get(tree: Mapping[str, Any], path: str) -> Any:
    """The node (leaf or sub-tree) at a dotted ``path``; KeyError names the path."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"no {path!r} in the parameter tree")
        node = node[part]
    return node


def num_params(tree: Mapping[str, Any]) -> int:
    """Total number of elements over all tensor leaves."""
    return sum(v.numel() for v in flatten(tree).values() if not is_static(v))
