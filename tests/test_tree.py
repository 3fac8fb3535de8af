"""Parameter-tree utilities."""

import pytest
import torch

from ftprog.core import combine, flatten, matches, partition, select, tree_map, unflatten
from ftprog.core._tree import get, num_params, tree_map_with_path


def sample():
    return {"model": {"layers": {"0": {"q_proj": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}},
                                 "1": {"q_proj": {"weight": torch.ones(2, 2)}}},
                      "norm": {"weight": torch.ones(2)}}}


def test_flatten_unflatten_round_trip():
    flat = flatten(sample())
    assert list(flat) == ["model.layers.0.q_proj.weight", "model.layers.0.q_proj.bias",
                          "model.layers.1.q_proj.weight", "model.norm.weight"]
    assert flatten(unflatten(flat)).keys() == flat.keys()
    with pytest.raises(ValueError, match="passes through a leaf"):
        unflatten({"a": torch.ones(1), "a.b": torch.ones(1)})


def test_select_partition_combine_and_map():
    tree = sample()
    assert matches("model.layers.0.q_proj.weight", "*.q_proj.*") and not matches("model.norm.weight", ["*q_proj*"])
    assert list(flatten(select(tree, "*.weight"))) == ["model.layers.0.q_proj.weight",
                                                       "model.layers.1.q_proj.weight", "model.norm.weight"]
    hit, rest = partition(tree, "model.layers.*")
    assert list(flatten(rest)) == ["model.norm.weight"]
    assert flatten(combine(hit, rest)).keys() == flatten(tree).keys()
    doubled = tree_map(lambda t: t * 2, tree)
    assert torch.equal(doubled["model"]["norm"]["weight"], torch.full((2,), 2.0))
    assert torch.equal(tree["model"]["norm"]["weight"], torch.ones(2))  # input untouched
    named = tree_map_with_path(lambda p, t: p, tree)
    assert get(named, "model.norm.weight") == "model.norm.weight"
    assert num_params(tree) == 12
    with pytest.raises(KeyError, match="model.nope"):
        get(tree, "model.nope")


def test_combine_later_tree_wins_and_merge_means_adapters_only():
    import ftprog.core

    old, new = {"a": {"w": torch.zeros(1)}, "b": torch.zeros(1)}, {"a": {"w": torch.ones(1)}}
    combined = combine(old, new)
    assert list(flatten(combined)) == ["a.w", "b"] and torch.equal(combined["a"]["w"], torch.ones(1))
    assert torch.equal(old["a"]["w"], torch.zeros(1))  # inputs untouched
    assert not hasattr(ftprog.core, "merge")  # ftprog.transforms.merge folds adapters; the tree union is combine


def test_static_leaves_travel_with_the_tree_and_are_never_counted_or_mapped():
    from ftprog.core import is_dtensor, is_plain, is_quantized, is_static, tree_map

    setting = ("scale", 2.0)
    tree = {"lin": {"weight": torch.ones(2, 3), "spec": setting}}
    assert flatten(tree)["lin.spec"] is setting and unflatten(flatten(tree))["lin"]["spec"] is setting
    doubled = tree_map(lambda t: t * 2, tree)
    assert doubled["lin"]["spec"] is setting and torch.equal(doubled["lin"]["weight"], torch.full((2, 3), 2.0))
    assert num_params(tree) == 6
    assert combine(tree, {"lin": {"weight": torch.zeros(2, 3)}})["lin"]["spec"] is setting
    assert is_static(setting) and not is_static(torch.ones(1))
    assert is_plain(torch.ones(1)) and is_plain(torch.nn.Parameter(torch.ones(1))) and not is_plain(setting)
    assert not is_quantized(torch.ones(1)) and not is_dtensor(torch.ones(1)) and not is_quantized(setting)
