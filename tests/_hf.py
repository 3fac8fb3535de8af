"""Tiny real-format Hugging Face checkpoints, built offline with transformers."""

from __future__ import annotations

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}

# the families' defaults (Llama 3's, OLMo's, ...) lie outside the tiny vocabulary
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# name -> (transformers config class name, config overrides)
ARCHS = {
    "llama2": ("LlamaConfig", {}),
    "llama3.1": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE}),
    "llama3.2-tied": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "llama-bias-headdim": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True, "head_dim": 24}),
    "mistral-window": ("MistralConfig", {"sliding_window": 4}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2-window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "smollm2": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "smollm3": ("SmolLM3Config", {**SPECIAL_IDS, "num_hidden_layers": 4, "no_rope_layer_interval": 2,
                                  "attention_bias": True}),
    "olmo2": ("Olmo2Config", {**SPECIAL_IDS, "num_hidden_layers": 3}),
    # soft-caps small enough that tanh bends the tiny model's scores and logits
    "gemma2": ("Gemma2Config", {**SPECIAL_IDS, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 4,
                                "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.3}),
    "gemma3": ("Gemma3TextConfig", {
        **SPECIAL_IDS, "head_dim": 32, "num_hidden_layers": 3, "sliding_window": 4, "query_pre_attn_scalar": 32,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    # LongRoPE with an original context of 8: the tests' longer inputs take the long factors, shorter ones the
    # short factors (and generation crosses from one to the other)
    "phi3": ("Phi3Config", {**SPECIAL_IDS, "sliding_window": 6, "original_max_position_embeddings": 8,
                            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                "long_factor": [1.5 + 0.5 * i for i in range(8)]}}),
    "phi4-mini": ("Phi3Config", {**SPECIAL_IDS, "tie_word_embeddings": True, "partial_rotary_factor": 0.75,
                                 "original_max_position_embeddings": 8,
                                 "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.75,
                                                     "short_factor": [1.0 + 0.2 * i for i in range(6)],
                                                     "long_factor": [2.0 + 0.3 * i for i in range(6)]}}),
}
# Mixtures of experts (tests/test_moe.py): 4-8 experts, top-2; a sliding window for Mixtral; dense and sparse layers
# mixed for Qwen3-MoE (mlp_only_layers, decoder_sparse_step), renormalised top-k or not. Kept out of ARCHS while
# load_adapter refuses peft's fused-expert adapters (``target_parameters``), which peft writes for Qwen3-MoE when
# test_generate's adapter names ``down_proj``.
MOE_ARCHS = {
    "mixtral": ("MixtralConfig", {**SPECIAL_IDS, "num_local_experts": 4, "num_experts_per_tok": 2,
                                  "sliding_window": 5, "router_aux_loss_coef": 0.02}),
    "qwen3-moe": ("Qwen3MoeConfig", {**SPECIAL_IDS, "head_dim": 32, "num_hidden_layers": 3, "num_experts": 8,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": True,
                                     "mlp_only_layers": [1], "decoder_sparse_step": 1, "router_aux_loss_coef": 0.02}),
    "qwen3-moe-step2": ("Qwen3MoeConfig", {**SPECIAL_IDS, "num_hidden_layers": 4, "num_experts": 6,
                                           "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                           "decoder_sparse_step": 2, "use_sliding_window": True,
                                           "sliding_window": 6}),
}
# Routers are drawn this much sharper than transformers' init (std 0.02), so that routing is decisive: a token's
# top-k experts do not hinge on rounding.
ROUTER_SCALE = 20.0


def hf_config(arch: str, **overrides):
    import transformers

    cls_name, extra = ARCHS[arch] if arch in ARCHS else MOE_ARCHS[arch]
    kw = {**TINY, **extra, **overrides}
    return getattr(transformers, cls_name)(**kw)


def hf_model(arch: str, seed: int = 0, **overrides):
    """A random transformers model in fp32 eval mode, norms and biases randomised too."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):
                p.mul_(ROUTER_SCALE)
    return model.eval()


def save_hf(arch: str, folder, seed: int = 0, **save_kwargs):
    """Save a tiny random checkpoint of ``arch`` to ``folder``; returns the transformers model."""
    model = hf_model(arch, seed)
    model.save_pretrained(folder, **save_kwargs)
    return model


def hf_gemma3_multimodal(seed: int = 0, **text_overrides):
    """A random Gemma3ForConditionalGeneration (fp32, eval) whose language model is ``ARCHS["gemma3"]``'s, with a
    one-layer vision tower (image token id 95); norms and biases randomised too."""
    import transformers

    torch.manual_seed(seed)
    text = hf_config("gemma3", **text_overrides).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=95, boi_token_index=93, eoi_token_index=94)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
