"""One decoder-only transformer for Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Pure functions over a parameter tree keyed like the Hugging Face checkpoint
(``model.layers.0.self_attn.q_proj.weight``). RMSNorm, RoPE (default,
linear, llama3), grouped-query attention through
``F.scaled_dot_product_attention`` with causal, padding, sliding-window and
document (packed) masks, SwiGLU. Every projection goes through
:func:`ftprog.core._linear.linear`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import attrs
import torch
import torch.nn.functional as F

from ._config import ModelConfig
from ._linear import LoraSpec, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as transformers does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (fp32), with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[batch, seq, head_dim]`` for integer ``positions [batch, seq]``."""
    inv_freq = rope_inv_freq(config, positions.device)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` (half-split convention of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@attrs.define
class KVCache:
    """Keys and values of past positions for incremental decoding.

    ``keys[i]`` / ``values[i]``: ``[batch, kv_heads, max_len, head_dim]``;
    ``length``: how many positions are filled. The forward writes into it and
    advances ``length``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device=None) -> KVCache:
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        make = lambda: [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]  # noqa: E731
        return cls(make(), make())

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


def attention_mask_4d(
    q_len: int,
    kv_len: int,
    *,
    key_padding: torch.Tensor | None,
    documents: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask ``[batch or 1, 1, q_len, kv_len]``: True where a query may attend.

    Queries are the last ``q_len`` of ``kv_len`` positions. ``key_padding``
    ``[batch, kv_len]`` is True for real tokens; ``documents [batch, kv_len]``
    holds a document index per position (packed rows). Every query may see
    itself, so rows of padding never turn into NaN.
    """
    q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    allowed = allowed[None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, :].bool()
    if documents is not None:
        allowed = allowed & (documents[:, -q_len:, None] == documents[:, None, :])
    allowed = allowed | (k_idx == q_idx)[None]
    return allowed[:, None]


@attrs.frozen(eq=False)
class Decoder:
    """The forward function of a model: ``decoder(params, tokens, ...) -> logits``.

    Transforms change it only through these fields: ``adapter`` (the
    :class:`LoraSpec` the linear primitive needs for adapted linears) and ``wrap_layer`` (a function
    ``layer_fn -> layer_fn`` applied to every decoder layer, e.g. activation
    checkpointing).
    """

    config: ModelConfig
    adapter: LoraSpec | None = None
    wrap_layer: Callable | None = None

    def __call__(
        self,
        params: Mapping,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        training: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for ``tokens [batch, seq]`` (int64).

        Args:
            attention_mask: ``[batch, seq]`` (``[batch, cache_len + seq]`` with a
                cache), 1 for real tokens, 0 for padding (left or right).
            position_ids: ``[batch, seq]``. Without a cache a position that is 0
                after the first column starts a new document: packed rows get
                document-causal masking. By default positions count real tokens
                (so left padding does not shift them).
            cache: a :class:`KVCache` to read past keys/values from and extend.
            training: enables adapter dropout.
            return_hidden: return the final normed hidden states ``[batch, seq,
                hidden]`` instead of logits (see :func:`lm_head`).
        """
        cfg = self.config
        batch, seq = tokens.shape
        offset = 0 if cache is None else cache.length
        documents = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(offset, offset + seq, device=tokens.device).expand(batch, seq)
        elif cache is None and seq > 1:
            documents = (position_ids == 0).long().cumsum(-1)

        inner = params["model"]
        x = F.embedding(tokens, inner["embed_tokens"]["weight"])
        cos, sin = rope_cos_sin(cfg, position_ids, x.dtype)
        kv_len = offset + seq
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(cfg.layer_windows):
            plain = attention_mask is None and documents is None and (window is None or window >= kv_len)
            # SDPA's is_causal aligns top-left, so a multi-token step after a cache needs an explicit mask.
            needs_mask = not plain or (cache is not None and seq > 1)
            masks[window] = attention_mask_4d(
                seq, kv_len, key_padding=attention_mask, documents=documents, window=window, device=tokens.device
            ) if needs_mask else None

        layer_fn = layer if self.wrap_layer is None else self.wrap_layer(layer)
        for i in range(cfg.num_layers):
            x = layer_fn(
                inner["layers"][str(i)], x, cos, sin, masks[cfg.layer_windows[i]],
                cfg, self.adapter, training, cache, i,
            )
        x = rms_norm(x, inner["norm"]["weight"], cfg.rms_norm_eps)
        if cache is not None:
            cache.length = kv_len
        return x if return_hidden else lm_head(params, x, self.adapter, training)


    def output_layer(self, params: Mapping) -> Mapping:
        """The linear node that maps hidden states to logits (the embeddings when tied)."""
        return params["lm_head"] if "lm_head" in params else params["model"]["embed_tokens"]


def lm_head(params: Mapping, hidden: torch.Tensor, adapter: LoraSpec | None = None, training: bool = False) -> torch.Tensor:
    """Logits ``[..., vocab]`` from final hidden states ``[..., hidden]`` (tied or not)."""
    if "lm_head" in params:
        return linear(hidden, params["lm_head"], adapter, training)
    return F.linear(hidden, params["model"]["embed_tokens"]["weight"])


def layer(
    p: Mapping,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cfg: ModelConfig,
    adapter: LoraSpec | None,
    training: bool,
    cache: KVCache | None,
    index: int,
) -> torch.Tensor:
    """One pre-norm decoder layer: ``x [batch, seq, hidden] -> same``."""
    h = rms_norm(x, p["input_layernorm"]["weight"], cfg.rms_norm_eps)
    x = x + attention(p["self_attn"], h, cos, sin, mask, cfg, adapter, training, cache, index)
    h = rms_norm(x, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    mlp = p["mlp"]
    gate = linear(h, mlp["gate_proj"], adapter, training)
    up = linear(h, mlp["up_proj"], adapter, training)
    return x + linear(F.silu(gate) * up, mlp["down_proj"], adapter, training)


def attention(
    p: Mapping,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cfg: ModelConfig,
    adapter: LoraSpec | None,
    training: bool,
    cache: KVCache | None,
    index: int,
) -> torch.Tensor:
    """Grouped-query self-attention with RoPE: ``[batch, seq, hidden] -> same``."""
    batch, seq, _ = x.shape
    q = linear(x, p["q_proj"], adapter, training).view(batch, seq, cfg.num_heads, cfg.head_dim)
    k = linear(x, p["k_proj"], adapter, training).view(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = linear(x, p["v_proj"], adapter, training).view(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"]["weight"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["weight"], cfg.rms_norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        start = cache.length
        if start + seq > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + seq} needed")
        cache.keys[index][:, :, start : start + seq] = k
        cache.values[index][:, :, start : start + seq] = v
        k, v = cache.keys[index][:, :, : start + seq], cache.values[index][:, :, : start + seq]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=bool(mask is None and seq > 1),
        enable_gqa=cfg.num_kv_heads != cfg.num_heads,
    )
    out = out.transpose(1, 2).reshape(batch, seq, cfg.q_dim)
    return linear(out, p["o_proj"], adapter, training)
