"""``ftprog.core.recompute``: gradients equal to the plain function's, dropout replayed, only the tensor
arguments kept, and checkpointed training that never imports the compiler."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ftprog.core import recompute


def block(params, x, scale, *, p_drop):
    """Two outputs (a tuple and a dict), dropout, an integer output and a non-tensor argument."""
    h = F.dropout(torch.tanh(x @ params["w"]) * scale, p_drop, training=p_drop > 0)
    return h @ params["inner"]["v"], {"norm": h.pow(2).sum(), "argmax": h.argmax(-1)}


def grads_of(fn, params, x, *, seed):
    torch.manual_seed(seed)
    leaves = (x, params["w"], params["inner"]["v"])
    out, side = fn(params, x, 0.5)
    (out.sum() + side["norm"]).backward()
    after = torch.rand(3)  # the random stream after the backward
    return out.detach(), side["argmax"], [t.grad.clone() for t in leaves], after


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_recompute_gradients_equal_the_plain_function(p_drop):
    g = torch.Generator().manual_seed(0)

    def leaves():
        return ({"w": torch.randn(6, 5, generator=g).requires_grad_(), "inner": {"v": torch.randn(5, 4, generator=g)
                                                                                   .requires_grad_()}},
                torch.randn(3, 6, generator=g).requires_grad_())

    params, x = leaves()
    plain = grads_of(lambda p, x, s: block(p, x, s, p_drop=p_drop), params, x, seed=7)
    for t in (x, params["w"], params["inner"]["v"]):
        t.grad = None
    again = grads_of(lambda p, x, s: recompute(lambda p, x, s: block(p, x, s, p_drop=p_drop), p, x, s),
                     params, x, seed=7)
    assert torch.equal(plain[0], again[0]) and torch.equal(plain[1], again[1])
    for a, b in zip(plain[2], again[2]):
        assert torch.equal(a, b)
    assert torch.equal(plain[3], again[3])  # the replay left the random stream where the plain run left it


def test_the_recomputation_runs_under_the_forwards_autocast():
    """Under CPU autocast the matmul runs in bf16 in the forward; the backward's rerun must too (it runs
    outside the autocast region), or its gradients would be fp32 ones."""
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(8, 16)

    def fn(w, x):
        return (x @ w).float().sin().sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.autograd.grad(fn(w, x), w)[0]
        kept = recompute(fn, w, x)
    again = torch.autograd.grad(kept, w)[0]
    assert torch.equal(again, plain)
    assert not torch.equal(again, torch.autograd.grad(fn(w, x), w)[0])  # fp32 gradients differ


def test_recompute_keeps_only_its_tensor_arguments_and_needs_no_grad_for_frozen_ones():
    w = torch.randn(64, 64)  # frozen
    a = torch.randn(64, 4, requires_grad=True)
    x = torch.randn(32, 64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def fn(w, a, x):
        return torch.relu(torch.relu(x @ w) @ a).sin()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = recompute(fn, w, a, x)
    assert sorted(tuple(t.shape) for t in saved) == [(32, 64), (64, 4), (64, 64)]
    assert all(any(t is s for s in saved) for t in (w, a, x))  # the arguments themselves, no intermediate
    out.sum().backward()
    expected = torch.autograd.grad(fn(w, a, x).sum(), a)[0]
    assert torch.equal(a.grad, expected) and w.grad is None and x.grad is None
    with torch.no_grad():
        assert torch.equal(recompute(fn, w, a, x), fn(w, a, x))


def test_an_input_is_freed_by_its_backward_not_held_until_the_graph_goes():
    """The graph (here held by ``out``) outlives each node's backward; what recompute kept must not."""
    import weakref

    x = torch.randn(4, 8, requires_grad=True)
    h = x * 2  # a layer's input: alive only through what recompute keeps
    out = recompute(lambda h, scale: (h * scale).tanh(), h, 3.0)
    kept = weakref.ref(h)
    del h
    assert kept() is not None
    out.sum().backward()
    assert kept() is None and out.grad_fn is not None
    assert torch.allclose(x.grad, 6 * (1 - (x.detach() * 6).tanh() ** 2), atol=1e-6)


def test_under_compile_it_is_torch_checkpoint():
    """A compiled caller (a loss compiled whole) traces torch.utils.checkpoint: same values and gradients."""
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)

    def fn(w, x):
        return torch.tanh(x @ w).square().sum()

    compiled = torch.compile(lambda w, x: recompute(fn, w, x), backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(w, x), w)[0]
    assert torch.allclose(got, torch.autograd.grad(fn(w, x), w)[0], atol=1e-6)


def test_recompute_refuses_what_is_not_a_tensor():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="must return tensors"):
        recompute(lambda x: (x * 2, "label"), x)


CHECKPOINTED_TRAINING = """
import sys, torch
from ftprog.core import distill_loss_sum, from_config, preset, token_loss_sum, value_and_grad
from ftprog.transforms import checkpoint, lora
base = from_config({**preset("tiny"), "num_hidden_layers": 2}, seed=0)
model = checkpoint(lora(base, rank=4, alpha=8, targets="all-linear"))
adapted_head = checkpoint(lora(base, rank=4, alpha=8, targets=("q_proj", "lm_head")))  # the loss recomputes chunks
tokens = torch.randint(0, base.config.vocab_size, (2, 16))
for m in (model, adapted_head):
    loss, grads = value_and_grad(lambda m: token_loss_sum(m, tokens, tokens))(m)
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
loss, grads = value_and_grad(lambda m: sum(distill_loss_sum(m, base, tokens, tokens)))(model)
assert grads and loss > 0
print("torch._dynamo" in sys.modules)
"""


def test_checkpointed_training_never_imports_the_compiler():
    """Checkpointed layers, recomputed loss chunks (an adapted output layer) and distillation: the process
    never imports torch._dynamo (~73 MiB of host memory, ~1.3 s), which torch.utils.checkpoint would."""
    done = subprocess.run([sys.executable, "-c", CHECKPOINTED_TRAINING], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
    torch_checkpoint = CHECKPOINTED_TRAINING.replace(
        "from ftprog.core import", "import ftprog.transforms._runtime as r, torch.utils.checkpoint as c\n"
        "r.recompute = lambda f, *a: c.checkpoint(f, *a, use_reentrant=False)\nfrom ftprog.core import")
    done = subprocess.run([sys.executable, "-c", torch_checkpoint], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True"  # the probe sees the import when it happens
