"""The torchtune baseline of the fixed-shape ``train`` cases (system ``torchtune``).

Runs in the torchtune environment's interpreter (``--torchtune-python``), which need not have ft-prog,
transformers or PEFT: this module imports only torch, torchtune, safetensors and :mod:`benchmarks`.
The model is built the way torchtune's single-device recipes (``lora_finetune_single_device``,
``full_finetune_single_device``) build it for the same work:

- ``torchtune.models.llama3._component_builders.llama3`` / ``lora_llama3`` with the checkpoint's
  ``config.json`` dimensions, under ``training.set_default_dtype`` (so LoRA adapters are in the model
  dtype, bf16, where PEFT and ft-prog keep them in fp32);
- weights from the same ``model.safetensors`` through ``convert_weights.hf_to_tune`` (which permutes
  ``q_proj`` / ``k_proj`` rows from the HF rotate-half RoPE layout to torchtune's interleaved one);
- LoRA on the case's targets, rank ``r``, alpha ``2 r``, dropout 0, ``A`` set to
  :func:`benchmarks.worker.lora_a_init` (rounded to the model dtype), ``B`` zero; only adapter params
  trainable (``get_adapter_params`` + ``set_trainable_params``);
- ``model.set_num_output_chunks(8)`` + ``CEWithChunkedOutputLoss`` (``ignore_index`` -100), labels
  shifted as the recipe shifts them (``hstack(labels[:, 1:], ignore)``);
- stack ``checkpoint``: ``training.set_activation_checkpointing(model,
  auto_wrap_policy={TransformerSelfAttentionLayer})``.

The step is the recipe's for one batch without accumulation (it multiplies the loss by the token count and
divides the gradients by it again, which is the same gradient): forward, chunked loss, ``backward``,
``clip_grad_norm_(1.0)``, ``torch.optim.AdamW(fused=True)`` (as for transformers), ``zero_grad``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NUM_OUTPUT_CHUNKS = 8
IGNORE_INDEX = -100


def _rope_checks(cfg: dict[str, Any]) -> None:
    """Settings torchtune's plain ``llama3`` builder does not model: refuse rather than measure other work."""
    if cfg.get("rope_scaling"):
        raise RuntimeError(f"unavailable: rope_scaling {cfg['rope_scaling']} (torchtune llama3 builder: none)")
    if cfg.get("tie_word_embeddings"):
        raise RuntimeError("unavailable: tied output (the llama3 builder has an untied output projection; "
                           "llama3_2 ties)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise RuntimeError("unavailable: biases (the llama3 builder has none)")
    hd = cfg.get("head_dim")
    if hd and hd != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise RuntimeError("unavailable: head_dim != hidden_size / num_attention_heads")


def build_torchtune(case: dict[str, Any], seq: int):
    """``(model, trainable params, info)`` for a ``train`` case."""
    import torch
    from safetensors.torch import load_file
    from torchtune import modules, training
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3._component_builders import llama3, lora_llama3
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from benchmarks.flops import adapted_names
    from benchmarks.worker import lora_a_init, torch_dtype

    method, stack = case["method"], case.get("stack", [])
    if method not in ("lora", "full"):
        raise RuntimeError(f"unavailable: method {method!r} is not wired for torchtune (lora, full)")
    if any(x not in ("checkpoint",) for x in stack):
        raise RuntimeError(f"unavailable: stack {stack} is not wired for torchtune (checkpoint only)")
    ckpt = Path(case["checkpoint"])
    cfg = json.loads((ckpt / "config.json").read_text())
    _rope_checks(cfg)
    dims = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"],
                num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                embed_dim=cfg["hidden_size"], intermediate_dim=cfg["intermediate_size"],
                max_seq_len=max(seq, cfg.get("max_position_embeddings", seq)), norm_eps=cfg["rms_norm_eps"],
                rope_base=cfg.get("rope_theta", 10000.0))
    dtype = torch_dtype(case["dtype"])
    device = torch.device(case["device"])
    targets = sorted(adapted_names(case["targets"])) if method == "lora" else []
    if set(targets) - {"q_proj", "k_proj", "v_proj", "o_proj"}:
        raise RuntimeError(f"unavailable: LoRA targets {targets} (attention projections only wired here)")
    tt_name = {"o_proj": "output_proj"}  # torchtune's name of the attention output projection
    with training.set_default_dtype(dtype), device:
        if method == "lora":
            model = lora_llama3(lora_attn_modules=[tt_name.get(t, t) for t in targets], apply_lora_to_mlp=False,
                                apply_lora_to_output=False, lora_rank=case["rank"], lora_alpha=2 * case["rank"],
                                lora_dropout=0.0, **dims)
        else:
            model = llama3(**dims)

    state = hf_to_tune(load_file(str(ckpt / "model.safetensors")), num_heads=dims["num_heads"],
                       num_kv_heads=dims["num_kv_heads"], dim=dims["embed_dim"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    if unexpected or any("lora" not in k for k in missing):
        raise RuntimeError(f"checkpoint mismatch: missing {[k for k in missing if 'lora' not in k][:4]}, "
                           f"unexpected {unexpected[:4]}")
    info: dict[str, Any] = {}
    if method == "lora":
        inits = lora_a_init(cfg, case["rank"], set(targets))
        with torch.no_grad():
            for (i, name), a in inits.items():
                proj = getattr(model.layers[i].attn, tt_name.get(name, name))
                proj.lora_a.weight.copy_(a)
                proj.lora_b.weight.zero_()
        adapter = get_adapter_params(model)
        set_trainable_params(model, adapter)
        info["adapter_dtype"] = str(next(iter(adapter.values())).dtype).replace("torch.", "")
    if "checkpoint" in stack:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    model.set_num_output_chunks(NUM_OUTPUT_CHUNKS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, info


def train_step(case: dict[str, Any], tokens):
    """``(step, out)``: a zero-argument training step returning the detached loss, and model facts."""
    import torch
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    import torchtune

    model, params, info = build_torchtune(case, tokens.shape[1])
    out = {"params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params),
           "torchtune_version": torchtune.__version__, **info}
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=NUM_OUTPUT_CHUNKS, ignore_index=IGNORE_INDEX)
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=1e-4)
    ignore = torch.full((tokens.shape[0], 1), IGNORE_INDEX, device=tokens.device)
    labels = torch.hstack((tokens[..., 1:], ignore))  # the recipe's shift: position i predicts tokens[i + 1]

    def step():
        logits = model(tokens)
        loss = loss_fn(logits, labels)
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, out
