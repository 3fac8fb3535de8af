"""`ft-prog run dpo`: one step against a two-model transformers + peft implementation, the reference model,
the program end to end (metrics, resume, errors, precompute, KTO / SimPO / ORPO)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from _hf import save_hf
from _oracle import peft_grads, peft_reference
from ftprog.core import PreferenceBatch, load_pretrained, value_and_grad
from ftprog.programs import dpo
from ftprog.programs.cli import CONFIG_DIR
from ftprog.programs.config import load_config
from ftprog.transforms import lora, trainable, without_adapters


def random_pairs(vocab: int, pairs: int = 3, seq: int = 14, seed: int = 0) -> PreferenceBatch:
    """Chosen rows then rejected rows, right-padded, each scoring its last few tokens (a response)."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=g)
    attention = (torch.arange(seq)[None] < lengths[:, None]).long()
    targets = torch.full((rows, seq), -100)
    for r in range(rows):
        n = int(lengths[r])
        start = n // 2  # the prompt: first half; the response: the rest
        targets[r, start - 1 : n - 1] = tokens[r, start:n]
    return PreferenceBatch(tokens, targets, attention, pairs, int(attention.sum()), pairs, torch.arange(pairs))


def hf_sequence_logps(hf, batch):
    logits = hf(batch.tokens, attention_mask=batch.attention_mask).logits.float().log_softmax(-1)
    picked = logits.gather(2, batch.targets.clamp(min=0)[..., None]).squeeze(2)
    return torch.where(batch.targets != -100, picked, torch.zeros(())).sum(-1)


def config(**loss):
    cfg, _ = load_config(dpo.CONFIG, "demo", {"loss": loss}, builtin_dir=CONFIG_DIR / "dpo")
    return cfg


@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_step_equals_a_two_model_transformers_peft_implementation(method, tmp_path):
    """Loss and gradients of a DPO step (beta 0.1) equal policy/reference models written with transformers + peft."""
    hf = save_hf("llama3.1", tmp_path)
    reference_hf = copy.deepcopy(hf)
    base = load_pretrained(tmp_path)
    if method == "lora":
        model = lora(base, rank=4, alpha=8, targets="all-linear")
        model = model.with_params({p: t + 0.05 * torch.randn_like(t) for p, t in model.trainable_params().items()})
        policy_hf = peft_reference(hf, model)
        reference = without_adapters(model)
    else:
        model = trainable(base)
        model = model.with_params({p: t + 0.01 * torch.randn_like(t) for p, t in model.trainable_params().items()})
        policy_hf = hf
        with torch.no_grad():
            for name, p in policy_hf.named_parameters():
                p.copy_(dict(model.trainable_params())[name])
        reference = load_pretrained(tmp_path)
    batch = random_pairs(base.config.vocab_size)
    cfg = config(type="dpo", beta=0.1)

    ref_logps, _ = dpo._scored(reference, model, batch, cfg)
    (loss, _), grads = value_and_grad(dpo.step_loss, has_aux=True)(model, cfg, batch, ref_logps, None, 3)

    policy = hf_sequence_logps(policy_hf, batch)
    with torch.no_grad():
        ref = hf_sequence_logps(reference_hf, batch)
    margin = (policy[:3] - ref[:3]) - (policy[3:] - ref[3:])
    expected = -F.logsigmoid(0.1 * margin).mean()
    expected.backward()
    assert torch.allclose(ref_logps, ref, atol=1e-5, rtol=0)
    assert abs(loss.item() - expected.item()) <= 1e-5
    oracle = peft_grads(policy_hf) if method == "lora" else {n: p.grad for n, p in policy_hf.named_parameters()}
    assert grads.keys() == oracle.keys()
    for path, g in grads.items():
        assert (g - oracle[path]).norm() <= 1e-5 * oracle[path].norm() + 1e-9, path
