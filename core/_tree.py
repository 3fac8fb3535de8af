"""Parameter trees: nested ``dict[str, ...]`` whose leaves are tensors.

Paths are dotted strings mirroring Hugging Face checkpoint names
(``model.layers.0.self_attn.q_proj.weight``). Patterns are shell globs over
those paths (``*`` also crosses dots), so ``"*.q_proj.*"`` selects every
query projection.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

Tree = dict[str, Any]


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
    """Apply ``fn`` to every leaf; returns a new tree of the same structure."""
    return {k: tree_map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def tree_map_with_path(fn: Callable[[str, torch.Tensor], Any], tree: Mapping[str, Any]) -> Tree:
    """Like :func:`tree_map` but ``fn(path, leaf)`` also receives the dotted path."""
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


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
    """Total number of elements over all leaves."""
    return sum(v.numel() for v in flatten(tree).values())
