"""Masked attention's two paths: the dense boolean mask through SDPA and the flex_attention block mask.

The flex path runs on CUDA; here it is forced on the CPU, forward only (torch 2.13 has no flex_attention backward
on the CPU), and must give the dense path's logits: packed rows with several documents, left and right padding,
sliding windows with soft-capped scores (Gemma 2's layers).
"""

import attrs
import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from ftprog.core import from_config
from ftprog.core._decoder import attention_path

LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
GEMMA2 = {"model_type": "gemma2", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "query_pre_attn_scalar": 16, "max_position_embeddings": 256, "sliding_window": 8,
          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"}


def with_path(model, path):
    return model.replace(forward=attrs.evolve(model.decoder, attention=path))


def packed_positions(lengths_per_row):
    """``position_ids [rows, seq]``: each row the concatenation of ``arange(length)`` of its documents."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def both_paths(model, tokens, **kwargs):
    with torch.no_grad():
        return with_path(model, "dense")(tokens, **kwargs), with_path(model, "flex")(tokens, **kwargs)


@pytest.mark.parametrize("config", [LLAMA, GEMMA2], ids=["llama", "gemma2-window-softcap"])
def test_flex_equals_dense_on_packed_rows(config):
    """Several documents per row (one longer than Gemma's window of 8), the block mask built across a 128-block
    boundary (seq 160): the flex path's logits equal the dense mask's (fp32)."""
    model = from_config(config, seed=0)
    positions = packed_positions([[40, 7, 70, 1, 42], [100, 60], [5, 5, 5, 145]])
    tokens = torch.randint(0, 96, positions.shape, generator=torch.Generator().manual_seed(1))
    dense, flex = both_paths(model, tokens, position_ids=positions)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [LLAMA, GEMMA2], ids=["llama", "gemma2-window-softcap"])
def test_flex_equals_dense_with_left_and_right_padding(config):
    model = from_config(config, seed=0)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :9] = 0  # left padding
    mask[1, 20:] = 0  # right padding
    tokens = torch.randint(0, 96, mask.shape, generator=torch.Generator().manual_seed(2))
    dense, flex = both_paths(model, tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-5, atol=1e-5)


def test_the_path_is_chosen_by_device_in_one_place():
    """auto: dense on the CPU (no flex backward there), flex on CUDA with Triton; the forced path is used."""
    assert attention_path("cpu") == "dense" and attention_path(torch.device("cuda", 0), triton=True) == "flex"
    assert attention_path("cuda", triton=False) == "dense"  # flex_attention compiles through Triton
    model = from_config(LLAMA, seed=0)
    seen = []

    def spy(layer_fn, index):
        def run(p, x, ctx):
            seen.append(type(ctx.mask))
            return layer_fn(p, x, ctx)
        return run

    spied = model.replace(forward=attrs.evolve(model.decoder, layer_wraps=(("spy", spy),)))
    positions = packed_positions([[3, 5]])
    with torch.no_grad():
        spied(torch.zeros(1, 8, dtype=torch.long), position_ids=positions)
        with_path(spied, "flex")(torch.zeros(1, 8, dtype=torch.long), position_ids=positions)
    assert seen == [torch.Tensor] * 2 + [BlockMask] * 2
    with pytest.raises(ValueError, match="attention"):
        attrs.evolve(model.decoder, attention="sparse")


def test_plan_knows_the_memory_of_the_path_that_runs():
    """On CUDA the planner measures the flex path (no [batch, 1, seq, seq] mask kept per layer), on the CPU the
    dense one: the CUDA plan's activations are lower by at least one layer's fp32 additive mask."""
    from ftprog.programs.plan import estimate

    cpu, cuda = (estimate("tiny", method="full", dtype="fp32", batch_size=2, seq_len=256, device=device)
                 for device in ("cpu", "cuda"))
    assert cpu.activations - cuda.activations >= 2 * 256 * 256 * 4
