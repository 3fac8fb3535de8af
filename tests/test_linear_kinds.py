"""A new adapter kind defined entirely here, through the linear primitive's registry: nothing in core/ knows it.

IA3-style scaling: an adapted node holds ``ia3_l [out]`` and computes ``(x W^T + b) * l``. It trains through
the same model, loss, checkpointing, compile and optimizer as LoRA; its gradients equal those of a plain model
whose weights are ``l[:, None] * W`` (and bias ``l * b``), differentiated by autograd.
"""

import pytest
import torch
import torch.nn.functional as F

from ftprog.core import (
    flatten, from_config, linear, optim, register_linear, token_loss_sum, unflatten, value_and_grad,
)
from ftprog.core._tree import get
from ftprog.transforms import checkpoint, compile, has_adapters, resolve_targets

CONFIG = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def ia3_linear(x, node):
    return F.linear(x, node["weight"], node.get("bias")) * node["ia3_l"].to(x.dtype)


register_linear("ia3_l", ia3_linear)


def ia3(model, targets=("k_proj", "v_proj", "down_proj")):
    """The test's transform: ``ia3_l`` = ones on each targeted linear; only those vectors train."""
    new = {}
    for path in resolve_targets(model, targets):
        new[f"{path}.ia3_l"] = torch.ones(get(model.params, path)["weight"].shape[0])
    params = {**flatten(model.params), **new}
    return model.replace(params=unflatten(params), trainable=frozenset(new))


def folded(model, scales):
    """A plain model whose targeted weights are ``l[:, None] * W``: the straightforward reference."""
    flat = {p: t for p, t in flatten(model.params).items() if not p.endswith(".ia3_l")}
    for path, l in scales.items():
        module = path.removesuffix(".ia3_l")
        flat[f"{module}.weight"] = l[:, None] * flat[f"{module}.weight"]
    return model.replace(params=unflatten(flat), trainable=frozenset())


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    return tokens, targets


def loss_fn(model, tokens, targets):
    return token_loss_sum(model, tokens, targets) / (targets != -100).sum()


def reference_grads(model, tokens, targets):
    scales = {p: t.detach().clone().requires_grad_(True) for p, t in model.trainable_params().items()}
    loss = loss_fn(folded(model, scales), tokens, targets)
    return dict(zip(scales, torch.autograd.grad(loss, list(scales.values()))))


@pytest.mark.parametrize("stack", ["plain", "checkpoint", "compile"])
def test_new_adapter_kind_trains_with_reference_gradients(stack):
    model = ia3(from_config(CONFIG, seed=0))
    assert has_adapters(model)
    model = {"plain": lambda m: m, "checkpoint": checkpoint,
             "compile": lambda m: compile(checkpoint(m), backend="aot_eager")}[stack](model)
    opt = optim.adamw(1e-2)
    state = opt.init(model.trainable_params())
    grad_fn = value_and_grad(loss_fn)
    losses = []
    tokens, targets = batch()
    for _ in range(3):
        loss, grads = grad_fn(model, tokens, targets)
        expected = reference_grads(model, tokens, targets)
        assert grads.keys() == expected.keys() and grads
        for path, g in grads.items():
            assert (g - expected[path]).norm() <= 1e-5 * expected[path].norm(), path
        params, state = opt.update(grads, state, model.trainable_params())
        model = model.with_params(params)
        losses.append(loss.item())
    assert any((t != 1).any() for t in model.trainable_params().values())  # the scales moved
    assert losses[2] < losses[1] < losses[0]


def test_unregistered_node_key_is_an_error():
    node = {"weight": torch.ones(3, 4), "mystery": torch.ones(3)}
    with pytest.raises(ValueError, match=r"no kind is registered for 'mystery'"):
        linear(torch.ones(2, 4), node)
    with pytest.raises(ValueError, match="part of every plain linear node"):
        register_linear("bias", ia3_linear)
