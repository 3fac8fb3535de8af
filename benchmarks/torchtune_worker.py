"""The torchtune baseline (system ``torchtune``) of the fixed-shape ``train`` cases and the realistic ``sft``
workload.

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

The realistic SFT workload (:func:`sft_step`, LoRA) feeds that step torchtune's own data path: default, its
instruct/chat default (unpacked samples, ``padded_collate_sft``); best, ``packed=True`` (``PackedDataset`` +
``padded_collate_packed``); the recipe's ``compile`` only where the case asks for it (:data:`BEST_COMPILES`).
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
    recipe_step = _recipe_step(model, params, CEWithChunkedOutputLoss(num_output_chunks=NUM_OUTPUT_CHUNKS,
                                                                      ignore_index=IGNORE_INDEX))
    ignore = torch.full((tokens.shape[0], 1), IGNORE_INDEX, device=tokens.device)
    labels = torch.hstack((tokens[..., 1:], ignore))  # the recipe's shift: position i predicts tokens[i + 1]
    return lambda: recipe_step({"tokens": tokens}, labels), out


def _recipe_step(model, params, loss_fn):
    """``step(inputs, targets) -> detached loss``: the recipe's step for one batch (forward with ``inputs`` as
    keywords, chunked loss, backward, ``clip_grad_norm_``, AdamW, ``zero_grad``)."""
    import torch

    from benchmarks.worker import MAX_GRAD_NORM, baseline_adamw

    opt = baseline_adamw(params)

    def step(inputs, targets):
        logits = model(**inputs)
        loss = loss_fn(logits, targets)
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ----------------------------------------------------------------------------------------- realistic SFT

PAD_ID = 0  # the workload's token ids start at 3, so id 0 marks padding only
# best = packing alone. torchtune's compile (training.compile_model + compile_loss, the recipe's compile: True)
# runs on CPU with torch 2.13, but in a quick check (tiny shape, 96 samples, seq_len 256, 1 thread) its median
# step was no faster (33.8 ms both) and the epoch's last, smaller batch recompiles inside the timed epoch (the
# recipe drops that batch, drop_last=True; the other systems train it): 2.5k against 12.7k effective tokens/s.
# A case with "compile": true turns it on.
BEST_COMPILES = False


def instruct_records(data, order: list[int]) -> list[dict[str, list[int]]]:
    """The workload's samples in ``order`` as torchtune's SFT datasets yield them (``train_on_input`` False):
    ``tokens``, and ``labels`` equal to the tokens on the response and -100 on the prompt (unshifted)."""
    return [{"tokens": list(data[i][0]),
             "labels": [t if trained else IGNORE_INDEX for t, trained in zip(*data[i])]} for i in order]


def _collate_sft():
    """``(collate, name)``: torchtune's unpacked collate (pad to the batch's longest sample, labels -100 on
    padding), or the benchmark's own padded batches where ``padded_collate_sft`` does not import."""
    from functools import partial

    try:
        from torchtune.data import padded_collate_sft
    except ImportError:
        from benchmarks.worker import padded_batch

        def collate(records):
            rows = [(r["tokens"], [x != IGNORE_INDEX for x in r["labels"]]) for r in records]
            ids, labels, _ = padded_batch(rows, list(range(len(rows))))
            return {"tokens": ids, "labels": labels}

        return collate, "padded batches (padded_collate_sft does not import)"
    return partial(padded_collate_sft, padding_idx=PAD_ID, ignore_idx=IGNORE_INDEX), "padded_collate_sft batches"


def packed_attention(mask) -> str:
    """What torchtune 0.6.1 runs for a packed batch's ``mask``: flex attention for a ``BlockMask`` (made where
    ``_SUPPORTS_FLEX_ATTENTION``: CUDA, sm75+), else SDPA with the dense boolean block-causal mask."""
    import torch

    if isinstance(mask, torch.Tensor):
        return f"SDPA with a dense {list(mask.shape)} {str(mask.dtype).replace('torch.', '')} block-causal mask"
    return f"flex attention ({type(mask).__name__})"


def sft_step(case: dict[str, Any], data):
    """``(step, n_batches, out)`` for the realistic SFT workload: ``step(i)`` trains batch ``i`` and returns
    ``(loss, trained tokens, real tokens, batch cells)``; ``out`` holds the description, ``check_loss`` and model
    facts.

    default: unpacked samples in the workload's shuffled order, ``padded_collate_sft`` batches of ``batch``;
    best: ``PackedDataset`` (``max_seq_len`` = the workload's ``seq_len``) + ``padded_collate_packed``
    (per-document positions, block-causal mask), compiled only where the case says ``compile: true``
    (:data:`BEST_COMPILES`). Every batch, the last partial one included, is trained (the recipe drops it:
    ``drop_last=True``)."""
    import torch
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    import torchtune
    from benchmarks import workload
    from benchmarks.worker import padded_batch

    device, spec, B, setting = case["device"], case["workload"], case["batch"], case["setting"]
    if setting not in ("default", "best"):
        raise RuntimeError(f"unavailable: setting {setting!r} (default, best)")
    order = workload.order(len(data), spec.get("seed", 0))
    records = instruct_records(data, order)
    model, params, info = build_torchtune(case, spec["seq_len"])
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=NUM_OUTPUT_CHUNKS, ignore_index=IGNORE_INDEX)
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()),
                           "trainable_params": sum(p.numel() for p in params),
                           "torchtune_version": torchtune.__version__, **info}
    ignore = torch.full((max(B, 1), 1), IGNORE_INDEX, device=device)

    def shifted(labels):  # the recipe's shift: position i predicts token i + 1
        return torch.hstack((labels[:, 1:], ignore[: labels.shape[0]]))

    collate, collate_name = _collate_sft()
    # the same-work check: the loss on the baseline's first padded batch at the initial weights (uncompiled)
    first = collate(records[:B])
    ids, labels, _ = padded_batch(data, order[:B])
    if not (torch.equal(first["tokens"], ids) and torch.equal(first["labels"], labels)):
        raise RuntimeError("padded_collate_sft's first batch differs from the baseline's padded batch")
    with torch.no_grad():
        logits = model(first["tokens"].to(device))
        out["check_loss"] = float(loss_fn(logits, shifted(first["labels"].to(device))))
    del logits

    if setting == "default":
        groups = [records[k : k + B] for k in range(0, len(records), B)]
        out["description"] = (f"unpacked shuffled samples, {collate_name} (pad to longest), chunked loss "
                              "(8 chunks, every position's logits)")

        def batch(i: int):
            return collate(groups[i])
    else:
        try:
            from torchtune.data import padded_collate_packed
            from torchtune.datasets import PackedDataset
        except ImportError as e:
            raise RuntimeError(f"unavailable: torchtune packing does not import ({e})") from e
        packs = PackedDataset(records, max_seq_len=spec["seq_len"], padding_idx=PAD_ID)
        groups = [[packs[j] for j in range(k, min(k + B, len(packs)))] for k in range(0, len(packs), B)]
        out["attention"] = packed_attention(padded_collate_packed(groups[0])["mask"])
        out["description"] = f"PackedDataset rows of {spec['seq_len']} + padded_collate_packed ({out['attention']})"
        if case.get("compile", BEST_COMPILES):
            training.compile_model(model, verbose=False)
            loss_fn = training.compile_loss(loss_fn, verbose=False)
            out["description"] += ", compile_model + compile_loss"
        else:
            out["description"] += ("; not compiled (compile_model: no faster per step in a quick CPU check, and "
                                   "the last partial batch recompiles)")

        def batch(i: int):
            return padded_collate_packed(groups[i])

    recipe_step = _recipe_step(model, params, loss_fn)

    def step(i: int):
        inputs = {k: v.to(device) for k, v in batch(i).items()}
        targets = shifted(inputs.pop("labels"))
        loss = recipe_step(inputs, targets)  # tokens (+ mask, input_pos when packed), as the recipe calls it
        tokens = inputs["tokens"]
        return loss, int((targets != IGNORE_INDEX).sum()), int((tokens != PAD_ID).sum()), tokens.numel()

    return step, len(groups), out
