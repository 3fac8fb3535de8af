"""Named model shapes: config.json dicts for random-weight models (demos, tests, benchmarks)."""

from __future__ import annotations

from typing import Any

_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "max_position_embeddings": 32768}
_QWEN3 = {"model_type": "qwen3", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "max_position_embeddings": 40960, "head_dim": 128, "attention_bias": False, "vocab_size": 151936,
          "bos_token_id": 151643, "eos_token_id": 151645}
_GEMMA = {"hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "head_dim": 256, "query_pre_attn_scalar": 256,
          "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def _llama32(hidden, layers, heads, inter, tied=True) -> dict[str, Any]:
    return {**_LLAMA, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 8, "intermediate_size": inter, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
            "tie_word_embeddings": tied, "bos_token_id": 128000, "eos_token_id": 128001}


def _qwen25(hidden, layers, heads, kv, inter, tied) -> dict[str, Any]:
    return {**_QWEN2, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": 151936, "tie_word_embeddings": tied}


def _qwen3(hidden, layers, heads, inter, tied) -> dict[str, Any]:
    return {**_QWEN3, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 8, "intermediate_size": inter, "tie_word_embeddings": tied}


# Besides tiny and cpu-default: the shapes of the models the built-in configs train (their config.json on the Hub),
# so that `ft-prog plan` answers before the download.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**_LLAMA, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 176, "vocab_size": 512, "max_position_embeddings": 2048, "rope_theta": 10000.0},
    "cpu-default": {**_LLAMA, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "intermediate_size": 1408, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0},
    # a 254M Llama shape closer to what people fine-tune, for the CPU benchmarks (issue 20)
    "cpu-250m": {**_LLAMA, "hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
                 "num_key_value_heads": 8, "intermediate_size": 2816, "vocab_size": 32000,
                 "max_position_embeddings": 4096, "rope_theta": 10000.0},
    # cpu-default's size in Gemma 2's architecture: sliding-window (128) and global layers, both soft-caps
    "gemma2-cpu": {**_GEMMA, "model_type": "gemma2", "hidden_size": 512, "intermediate_size": 1408,
                   "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
                   "query_pre_attn_scalar": 64, "vocab_size": 32000, "max_position_embeddings": 4096,
                   "sliding_window": 128, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                   "rope_theta": 10000.0},
    "llama-3.2-1b": _llama32(2048, 16, 32, 8192),
    "llama-3.2-3b": _llama32(3072, 28, 24, 8192),
    "llama-3.1-8b": {**_llama32(4096, 32, 32, 14336, tied=False), "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, True),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 2, 11008, True),
    "qwen2.5-7b": {**_qwen25(3584, 28, 28, 4, 18944, False), "vocab_size": 152064},
    "qwen3-0.6b": _qwen3(1024, 28, 16, 3072, True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 6144, True),
    "qwen3-4b": _qwen3(2560, 36, 32, 9728, True),
    "qwen3-8b": _qwen3(4096, 36, 32, 12288, False),
    "mistral-7b-v0.3": {"model_type": "mistral", "hidden_act": "silu", "rms_norm_eps": 1e-5, "hidden_size": 4096,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "intermediate_size": 14336, "vocab_size": 32768, "max_position_embeddings": 32768,
                        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                        "bos_token_id": 1, "eos_token_id": 2},
    "gemma-2-2b": {**_GEMMA, "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                   "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 256000,
                   "max_position_embeddings": 8192, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "rope_theta": 10000.0},
    "gemma-3-1b": {**_GEMMA, "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912,
                   "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 262144,
                   "max_position_embeddings": 32768, "sliding_window": 512, "sliding_window_pattern": 6,
                   "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0},
    # Phi-4-mini's LongRoPE factors are left out: a preset is a shape (memory plans, benchmarks), not weights
    "phi-4-mini": {"model_type": "phi3", "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
                   "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
                   "max_position_embeddings": 131072, "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "olmo-2-0425-1b": {"model_type": "olmo2", "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
                       "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
                       "vocab_size": 100352, "max_position_embeddings": 4096, "rope_theta": 500000.0,
                       "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "smollm3-3b": {"model_type": "smollm3", "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11008,
                   "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 128256,
                   "max_position_embeddings": 65536, "rope_theta": 5000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "no_rope_layer_interval": 4},
    # mixtures of experts
    "mixtral-8x7b-v0.1": {"model_type": "mixtral", "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                     "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
                     "bos_token_id": 1, "eos_token_id": 2},
    "qwen3-30b-a3b": {**_QWEN3, "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8,
                      "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "router_aux_loss_coef": 0.001},
}


def preset(name: str) -> dict[str, Any]:
    """The config.json dict of a named shape (a copy); KeyError lists the names."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return {**PRESETS[name]}
