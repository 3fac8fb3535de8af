"""transformers + peft reference models holding the same weights as an ft-prog model; optional oracles."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

REQUIRE_OPTIONAL = "FTPROG_REQUIRE_OPTIONAL"


def optional_oracle(module: str, install: str):
    """``module`` imported, or the test skipped with the reason and ``install`` (how to get it). With
    FTPROG_REQUIRE_OPTIONAL=1 (set by .ci/run) the test fails instead, so CI cannot silently skip an oracle."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e  # reported below, outside the except block, so the failure is one line and not a chained trace
    reason = f"optional oracle {module} is not importable ({error}); install it with {install}"
    if os.environ.get(REQUIRE_OPTIONAL) == "1":
        pytest.fail(f"{reason} ({REQUIRE_OPTIONAL}=1 makes this a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy ``logits [B, S, V]`` vs ``tokens [B, S]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def peft_reference(hf_model, adapted):
    """A peft model over ``hf_model`` with ``adapted``'s adapter values copied in."""
    import peft

    from ftprog.transforms import lora_spec

    spec = lora_spec(adapted)
    modules = sorted({p.split(".lora_")[0] for p in adapted.trainable})
    dora = any(p.endswith(".lora_magnitude_vector") for p in adapted.trainable)
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, use_dora=dora,
                             use_rslora=spec.rslora, target_modules=modules)
    ref = peft.get_peft_model(hf_model, config)
    flat = {k: v for k, v in adapted.trainable_params().items()}
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "lora_" not in name:
                continue
            key = name.removeprefix("base_model.model.").replace(".default", "")
            if key.endswith("lora_magnitude_vector.weight"):
                key = key.removesuffix(".weight")
            param.copy_(flat.pop(key))
    assert not flat, f"adapter leaves without a peft counterpart: {sorted(flat)[:3]}"
    return ref.eval()


def peft_grads(ref) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in ref.named_parameters():
        if param.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            out[key.removesuffix(".weight") if "magnitude" in key else key] = param.grad
    return out
