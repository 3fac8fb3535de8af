"""Logits of ft-prog's decoder against transformers on tiny checkpoints of every architecture."""

import pytest
import torch

from _hf import ARCHS, save_hf
from ftprog.core import load_pretrained

ARCH_NAMES = sorted(ARCHS)
# bf16 logits against transformers' bf16 logits, max |diff| over the largest |logit| (measured: 1.8e-3 smollm3,
# llama3.2-tied; 3.1e-3 to 8.9e-3 the other Llama/Mistral/Qwen/SmolLM2 configs and phi; 1.2e-2 gemma2, gemma3,
# olmo2): two or three bf16 steps of the largest logit
BF16_LOGIT_TOL = 1.5e-2


def padded_batch(vocab: int, seq: int = 12):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (3, seq), generator=g)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    return tokens, mask


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_logits_match_transformers(arch, tmp_path):
    ref = save_hf(arch, tmp_path)
    model = load_pretrained(tmp_path)
    tokens, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = ref(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(tokens, attention_mask=mask, position_ids=positions).logits
        got = model(tokens, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama3.1", "qwen3", "mistral-window"])
def test_left_padding_equals_unpadded(arch, tmp_path):
    save_hf(arch, tmp_path)
    model = load_pretrained(tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask)[:, 3:], model(tokens), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama2", "qwen2-window"])
def test_packed_rows_equal_separate_sequences(arch, tmp_path):
    """position_ids that restart at 0 give document-causal attention: no attention across samples."""
    save_hf(arch, tmp_path)
    model = load_pretrained(tmp_path)
    a = torch.randint(0, model.config.vocab_size, (1, 7))
    b = torch.randint(0, model.config.vocab_size, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=positions)
        assert torch.allclose(got[:, :7], model(a), atol=1e-5)
        assert torch.allclose(got[:, 7:], model(b), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama3.2-tied", "mistral-window", "qwen3"])
def test_kv_cache_decoding_equals_full_forward(arch, tmp_path):
    from ftprog.core import KVCache

    save_hf(arch, tmp_path)
    model = load_pretrained(tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10))
    cache = KVCache.empty(model.config, batch=2, max_len=16, dtype=torch.float32)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :6], cache=cache)]
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 8)]
        steps.append(model(tokens[:, 8:], cache=cache))
    assert cache.length == 10
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_bf16_logits_match_transformers(arch, tmp_path):
    """The same checkpoint run in bf16 by both: each family rounds where transformers does (norm scales, embedding
    scale, soft-caps), so the gap stays at a few bf16 steps of the logits."""
    ref = save_hf(arch, tmp_path).to(torch.bfloat16)
    model = load_pretrained(tmp_path, dtype="bf16")
    tokens, _ = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = ref(tokens).logits.float()
        got = model(tokens).float()
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= BF16_LOGIT_TOL * scale, (arch, ((got - expected).abs().max() / scale).item())
