"""The forward's hand-written backward nodes (RMSNorm, the gated MLP product, the LoRA branch, the loss of a frozen
output layer): gradients equal to autograd's through the plain ops, and less kept for the backward."""

import pytest
import torch
import torch.nn.functional as F

from ftprog.core import _loss
from ftprog.core._decoder import _ACTIVATIONS, gated, rms_norm
from ftprog.transforms._lora import lora_branch


def _plain_rms_norm(x, weight, eps, offset=0.0, scale_fp32=False):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if scale_fp32:
        return (h * (offset + weight.float())).to(x.dtype)
    return (weight + offset if offset else weight) * h.to(x.dtype)


def _saved(fn, *args, **kwargs):
    """(output, [(dtype, shape) of each distinct storage saved for the backward])."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.dtype, tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, list(saved.values())


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    wanted = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad(out, wanted, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset,scale_fp32", [(0.0, False), (1.0, True), (1.0, False)])
@pytest.mark.parametrize("train_weight", [True, False])
def test_rms_norm_gradients_equal_autograd_and_keep_no_fp32_rows(dtype, offset, scale_fp32, train_weight):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, dtype=dtype, requires_grad=True)
    w = (torch.randn(32) * 0.1 + 1 - offset).to(dtype).requires_grad_(train_weight)
    out, saved = _saved(rms_norm, x, w, 1e-6, offset=offset, scale_fp32=scale_fp32)
    ref = _plain_rms_norm(x, w, 1e-6, offset, scale_fp32)
    assert torch.equal(out, ref)
    for a, b in zip(_grads(out, (x, w)), _grads(ref, (x, w))):
        assert torch.equal(a, b)
    if dtype == torch.bfloat16:  # (an fp32 x runs the plain ops, which keep no copy of it)
        assert [s for s in saved if s[1] == (2, 8, 32)] == [(dtype, (2, 8, 32))]  # x; no fp32 rows, no normalised
        assert (torch.float32, (2, 8, 1)) in saved  # 1 / rms per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
def test_gated_product_gradients_equal_autograd_and_keep_two_tensors(dtype, activation):
    torch.manual_seed(0)
    gate = torch.randn(2, 8, 48, dtype=dtype, requires_grad=True)
    up = torch.randn(2, 8, 48, dtype=dtype, requires_grad=True)
    out, saved = _saved(gated, gate, up, activation)
    ref = _ACTIVATIONS[activation](gate) * up
    assert torch.equal(out, ref)
    for a, b in zip(_grads(out, (gate, up)), _grads(ref, (gate, up))):
        assert torch.equal(a, b)
    _, saved_plain = _saved(lambda g, u: _ACTIVATIONS[activation](g) * u, gate, up)
    assert len(saved) == 2 and len(saved_plain) == 3  # gate and up; autograd also keeps act(gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_x", [True, False])
def test_lora_branch_gradients_equal_autograd_and_keep_the_input_in_its_dtype(dtype, need_x):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, dtype=dtype, requires_grad=need_x)
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    out, saved = _saved(lora_branch, x, a, b)
    ref = F.linear(F.linear(x.to(a.dtype), a), b)
    assert torch.equal(out, ref)
    for g1, g2 in zip(_grads(out, (x, a, b)), _grads(ref, (x, a, b))):
        assert torch.equal(g1, g2)
    if dtype == torch.bfloat16:  # (an fp32 x runs the plain ops, which keep no copy of it)
        inputs = [s for s in saved if s[1][-1] == 32 and s[1] != (4, 32)]
        assert inputs == [(dtype, (2, 8, 32))]  # x in its own dtype: no fp32 copy


def test_frozen_output_weight_takes_fewer_rows_at_a_time_with_the_same_result():
    assert _loss._frozen_chunk_rows(1024, 32000) == 512
    assert _loss._frozen_chunk_rows(1024, 128256) == 128
    assert _loss._frozen_chunk_rows(1024, 8000) == 1024  # capped at chunk_size
    assert _loss._frozen_chunk_rows(64, 128256) == 64
    assert _loss._frozen_chunk_rows(1024, 256000) == 128  # at least one bucket of rows
    torch.manual_seed(0)
    vocab, hidden = 70000, 16
    w = torch.randn(vocab, hidden) * 0.1
    h = torch.randn(300, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (300,))
    projected = []
    real_project = _loss._project

    def counting(rows, weight):
        projected.append(rows.shape[0])
        return real_project(rows, weight)

    _loss._project = counting
    try:
        total, grad_hidden, _ = _loss._LinearCrossEntropy.apply(h, w, t, 1024, True, False, None)
        nll, grad_hidden_nll = _loss._LinearTokenNLL.apply(h, w, t, 1024, True, None, 1.0)
    finally:
        _loss._project = real_project
    assert projected == [128, 128, 128] * 2  # 300 rows in chunks of at most 2**24 // 70000 -> 128 rows
    logits = h.detach() @ w.T
    ref = F.cross_entropy(logits, t, reduction="none")
    torch.testing.assert_close(total, ref.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    expected_grad = (torch.softmax(logits, -1) - F.one_hot(t, vocab)) @ w
    torch.testing.assert_close(grad_hidden, expected_grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_hidden_nll, expected_grad, rtol=1e-4, atol=1e-5)
    trained = w.clone().requires_grad_()
    projected.clear()
    _loss._project = counting
    try:
        _loss._LinearCrossEntropy.apply(h, trained, t, 1024, True, True, None)
    finally:
        _loss._project = real_project
    assert projected == [384]  # a trained weight keeps chunk_size (one weight-gradient product), padded to 128s


@pytest.mark.parametrize("family", ["tiny", "gemma-2-2b", "olmo-2-0425-1b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_whole_model_gradients_equal_the_plain_ops(family, method, monkeypatch):
    """bf16 models of four layouts (pre-norm, Gemma's sandwich with offset scales, OLMo's post-norm, experts):
    every trainable gradient with the hand-written nodes equals the one through the plain ops, bit for bit."""
    from ftprog.core import _decoder, from_config, token_loss_sum, value_and_grad
    from ftprog.core._presets import preset
    from ftprog.transforms import _lora, lora

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512)
    config = {**preset(family), **small}
    if "num_experts" in config:
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    model = from_config(config, dtype=torch.bfloat16)
    if method == "lora":
        model = lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "down_proj"))
        noise = torch.Generator().manual_seed(1)  # B starts at zero, which would leave A without a gradient
        model = model.with_params({p: t + 0.05 * torch.randn(t.shape, generator=noise).to(t.dtype)
                                   for p, t in model.trainable_params().items()})
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    step = value_and_grad(lambda m: token_loss_sum(m, tokens, tokens))
    loss, grads = step(model)
    monkeypatch.setattr(_decoder, "rms_norm", _plain_rms_norm)
    monkeypatch.setattr(_decoder, "gated", lambda gate, up, act: _ACTIVATIONS[act](gate) * up)
    monkeypatch.setattr(_lora, "lora_branch", lambda x, a, b: F.linear(F.linear(x.to(a.dtype), a), b))
    plain_loss, plain_grads = step(model)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for path, g in grads.items():
        assert torch.equal(g, plain_grads[path]), path


def test_without_a_gradient_the_plain_ops_run(monkeypatch):
    """Generation and evaluation skip the autograd functions (their per-call overhead), with the same output."""
    from ftprog.core import _decoder
    from ftprog.transforms import _lora

    def refuse(*args):
        raise AssertionError("an autograd function ran without a gradient to take")

    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.bfloat16)
    a, b = torch.randn(4, 32), torch.randn(24, 4)
    expected = (_plain_rms_norm(x, w, 1e-6), F.silu(x) * x, F.linear(F.linear(x.float(), a), b))
    for fn in (_decoder._RMSNorm, _decoder._Gated, _lora._LoraBranch):
        monkeypatch.setattr(fn, "apply", refuse)
    with torch.no_grad():
        got = (rms_norm(x, w, 1e-6), gated(x, x, "silu"), lora_branch(x, a, b))
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    with pytest.raises(AssertionError, match="autograd function"):
        rms_norm(x, w.requires_grad_(), 1e-6)
