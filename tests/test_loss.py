"""Chunked, masked cross-entropy against the plain full-logits computation."""

import attrs
import pytest
import torch
import torch.nn.functional as F

from ftprog.core import _loss, from_config, preset, token_logprobs, token_loss_sum, value_and_grad
from ftprog.transforms import cast, lora


def reference_sum(model, tokens, targets):
    logits = model(tokens, training=True).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def batch(vocab):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (3, 20), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :7] = -100  # a masked prompt
    targets[2, 12:] = -100  # padding
    return tokens, targets


def perturb(model):
    return model.with_params({p: t + 0.05 * torch.randn_like(t) for p, t in model.trainable_params().items()})


# (a tied model has no lm_head of its own to adapt)
@pytest.mark.parametrize("chunk_size", [7, 1024])  # several chunks (fp32 weight-grad sum) / one chunk
@pytest.mark.parametrize("tied,method", [(False, "full"), (True, "full"), (False, "lora"), (True, "lora"),
                                         (False, "lora-lm_head")])
def test_matches_full_logits_loss_and_grads(tied, method, chunk_size):
    model = from_config({**preset("tiny"), "tie_word_embeddings": tied}, seed=1)
    if method == "lora":
        model = perturb(lora(model, rank=4, alpha=8, targets="all-linear"))
    if method == "lora-lm_head":
        model = perturb(lora(model, rank=4, alpha=8, targets=["q_proj", "lm_head"]))
    tokens, targets = batch(model.config.vocab_size)
    ref_loss, ref_grads = value_and_grad(reference_sum)(model, tokens, targets)
    loss, grads = value_and_grad(lambda m, a, b: token_loss_sum(m, a, b, chunk_size=chunk_size))(model, tokens, targets)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for path, g in grads.items():
        assert (g - ref_grads[path]).norm() <= 1e-5 * ref_grads[path].norm(), path


@pytest.mark.parametrize("rows", [1, 3])
def test_softmax_in_row_blocks_matches_one_pass(monkeypatch, rows):
    """The softmax runs ``rows`` logits rows at a time (a cache-sized block on CPU): same loss and grads."""
    model = from_config("tiny", seed=7)
    vocab = model.config.vocab_size
    tokens, targets = batch(vocab)
    ref_loss, ref_grads = value_and_grad(reference_sum)(model, tokens, targets)
    monkeypatch.setattr(_loss, "_SOFTMAX_BLOCK_CPU", rows * vocab + vocab // 2)
    assert _loss._softmax_rows(vocab, torch.device("cpu")) == rows
    loss, grads = value_and_grad(lambda m, a, b: token_loss_sum(m, a, b, chunk_size=7))(model, tokens, targets)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for path, g in grads.items():
        assert (g - ref_grads[path]).norm() <= 1e-5 * ref_grads[path].norm(), path


@pytest.mark.parametrize("device, block", [("cpu", "_SOFTMAX_BLOCK_CPU"), ("cuda", "_SOFTMAX_BLOCK_CUDA")])
def test_softmax_block_is_the_most_rows_that_fit_the_block(device, block):
    """As many ``[rows, vocab]`` fp32 rows as the device's block holds, at least one (a vocabulary wider than it)."""
    elements = getattr(_loss, block)
    for vocab in (96, 32000, 128256, 151936, elements - 1, elements, elements + 1, 10 * elements):
        rows = _loss._softmax_rows(vocab, torch.device(device))
        assert rows >= 1, vocab
        assert rows * vocab <= elements or rows == 1, vocab  # fits, unless one row alone is wider
        assert (rows + 1) * vocab > elements, vocab  # and one more row would not


def test_bf16_close_to_fp32_and_no_grad_path():
    model = cast(from_config("tiny", seed=2), "bf16")
    tokens, targets = batch(model.config.vocab_size)
    with torch.no_grad():
        loss = token_loss_sum(model, tokens, targets, chunk_size=16)
        ref = reference_sum(model, tokens, targets)
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, rtol=1e-3)
    _, grads = value_and_grad(lambda m, a, b: token_loss_sum(m, a, b))(model, tokens, targets)
    assert grads["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_no_targets_gives_zero_loss_and_grads(chunk_size):
    """A batch without a single target (an empty data-parallel slice, all prompt) still differentiates."""
    model = from_config("tiny", seed=3)
    tokens, targets = batch(model.config.vocab_size)
    loss, grads = value_and_grad(lambda m, a, b: token_loss_sum(m, a, b, chunk_size=chunk_size))(
        model, tokens, torch.full_like(targets, -100))
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_bf16_one_chunk_and_several_chunks_agree():
    model = cast(from_config("tiny", seed=4), "bf16")
    tokens, targets = batch(model.config.vocab_size)
    (l1, g1), (l7, g7) = (value_and_grad(lambda m, a, b, c=c: token_loss_sum(m, a, b, chunk_size=c))(
        model, tokens, targets) for c in (1024, 7))
    assert torch.allclose(l1, l7, rtol=1e-6)
    for path in g1:
        assert g1[path].dtype == torch.bfloat16
        assert (g1[path].float() - g7[path].float()).norm() <= 1e-2 * g7[path].float().norm(), path


def test_exact_for_targets_far_below_the_top_logit():
    """Per-token losses past fp32's exp range (p_target < 1e-38) stay exact: no -log(0) = inf."""
    model = from_config("tiny", seed=5)
    head = model.params["lm_head"]["weight"]
    model = model.with_params({"lm_head.weight": head * 400})
    tokens, targets = batch(model.config.vocab_size)
    with torch.no_grad():
        loss, ref = token_loss_sum(model, tokens, targets), reference_sum(model, tokens, targets)
    per_token = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten(), reduction="none")
    assert per_token.max() > 150  # the case being tested
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-6)


def test_second_backward_through_the_same_loss_fails_loudly():
    """The output-weight gradient is scaled in place by the one backward: a second backward through the same
    graph (``retain_graph``) raises instead of returning a twice-scaled gradient."""
    model = from_config("tiny", seed=6)
    params = {k: v.detach().requires_grad_() for k, v in model.trainable_params().items()}
    tokens, targets = batch(model.config.vocab_size)
    loss = token_loss_sum(model.with_params(params), tokens, targets) / 10
    weight = params["lm_head.weight"]
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    ref = torch.autograd.grad(reference_sum(model.with_params(params), tokens, targets) / 10, weight)[0]
    assert (grad - ref).norm() <= 1e-5 * ref.norm()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, weight)


def reference_logprobs(model, tokens, targets):
    logits = model(tokens, training=True).float().log_softmax(-1)
    picked = logits.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return torch.where(targets != -100, picked, torch.zeros(()))


def weighted(fn):
    """A loss that weights each sequence's summed log-prob differently (as preference losses do)."""
    weights = torch.tensor([1.0, -2.0, 0.5])
    return lambda m, a, b: (fn(m, a, b).sum(-1) * weights).sum()


@pytest.mark.parametrize("chunk_size", [7, 1024])
@pytest.mark.parametrize("tied,method", [(False, "full"), (True, "full"), (False, "lora"), (True, "lora"),
                                         (False, "lora-lm_head"), (False, "softcap")])
def test_token_logprobs_match_full_logits_values_and_grads(tied, method, chunk_size):
    config = from_config({**preset("tiny"), "tie_word_embeddings": tied}).config
    if method == "softcap":  # Gemma 2's final-logit soft-capping, on the tiny shape
        config = attrs.evolve(config, final_softcap=3.0)
    model = from_config(config, seed=1)
    if method in ("lora", "softcap"):
        model = perturb(lora(model, rank=4, alpha=8, targets="all-linear"))
    if method == "lora-lm_head":
        model = perturb(lora(model, rank=4, alpha=8, targets=["q_proj", "lm_head"]))
    tokens, targets = batch(model.config.vocab_size)
    ref = reference_logprobs(model, tokens, targets)
    got = token_logprobs(model, tokens, targets, chunk_size=chunk_size)
    assert got.shape == targets.shape and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5, rtol=0) and bool((got[targets == -100] == 0).all())
    ref_loss, ref_grads = value_and_grad(weighted(reference_logprobs))(model, tokens, targets)
    loss, grads = value_and_grad(weighted(lambda m, a, b: token_logprobs(m, a, b, chunk_size=chunk_size)))(
        model, tokens, targets)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for path, g in grads.items():
        assert (g - ref_grads[path]).norm() <= 1e-5 * ref_grads[path].norm(), path


def test_token_logprobs_without_grad_and_without_targets():
    model = lora(from_config("tiny", seed=2), rank=4, alpha=8)
    tokens, targets = batch(model.config.vocab_size)
    with torch.no_grad():
        got = token_logprobs(model, tokens, targets, training=False)
    assert torch.allclose(got, reference_logprobs(model, tokens, targets), atol=1e-5)
    empty = torch.full_like(targets, -100)
    assert not token_logprobs(model, tokens, empty).any()


@pytest.mark.parametrize("method", ["lora", "full", "softcap"])
def test_token_logprobs_at_a_temperature(method):
    """log softmax(logits / T): what sampling at temperature T draws from (GRPO's ratios use it)."""
    config = from_config("tiny").config
    if method == "softcap":
        config = attrs.evolve(config, final_softcap=3.0)
    model = from_config(config, seed=4)
    model = perturb(lora(model, rank=4, alpha=8, targets="all-linear")) if method != "full" else model
    tokens, targets = batch(model.config.vocab_size)

    def reference(m, a, b):
        logits = (m(a, training=True).float() / 0.7).log_softmax(-1)
        picked = logits.gather(2, b.clamp(min=0)[..., None]).squeeze(2)
        return torch.where(b != -100, picked, torch.zeros(()))

    fused = lambda m, a, b: token_logprobs(m, a, b, chunk_size=7, temperature=0.7)
    assert torch.allclose(fused(model, tokens, targets), reference(model, tokens, targets), atol=1e-5)
    (ref_loss, ref_grads), (loss, grads) = (value_and_grad(weighted(f))(model, tokens, targets)
                                            for f in (reference, fused))
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for path, g in grads.items():
        assert (g - ref_grads[path]).norm() <= 1e-5 * ref_grads[path].norm(), path
