"""One decoder-only transformer for Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2/3, OLMo 2,
Gemma 2, Gemma 3, Phi-3/3.5/4, and the mixtures of experts Mixtral and Qwen3-MoE.

Pure functions over a parameter tree keyed like the Hugging Face checkpoint
(``model.layers.0.self_attn.q_proj.weight``). RMSNorm (pre, post or both
around each block), RoPE per layer (default, linear, llama3, longrope; partial or none),
grouped-query attention with causal, padding, sliding-window and document (packed) masks, either as
one dense boolean mask through ``F.scaled_dot_product_attention`` (an explicit softmax where scores are
soft-capped) or as a block mask through ``flex_attention`` (:func:`attention_path` picks per device),
SwiGLU or GeGLU; q/k/v and gate/up as separate or fused
projections, as the checkpoint holds them; sparse layers route each token to its top-k experts
(:func:`route`) and compute the experts grouped: tokens sorted by expert, each projection of every expert
through one :func:`ftprog.core._linear.grouped_linear` (:func:`grouped_experts`). Every other projection goes
through :func:`ftprog.core._linear.linear`. What differs between families is a
:class:`ModelConfig` field; nothing here reads the family name.

A layer is ``layer(params, x, ctx) -> x``: its own parameter sub-tree, the
hidden states and one :class:`LayerContext`. Transforms change how layers run
only by wrapping that function (:attr:`Decoder.layer_wraps`) and by mapping
each parameter sub-tree before use (:attr:`Decoder.prepares`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ._config import ModelConfig, Rotary
from ._linear import grouped_linear, linear, set_training


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
             scale_fp32: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, scaled by ``offset + weight``.

    ``scale_fp32``: scale in fp32, then cast back (Gemma, OLMo 2); else cast back, then scale (Llama).
    Below fp32, the backward keeps ``x`` and the fp32 ``1 / rms`` per row, not fp32 copies of ``x`` and of the
    normalised rows, and its gradients equal autograd's through the plain ops bit for bit. An fp32 ``x`` goes
    through the plain ops (autograd keeps no copy of it; its graph sums the gradient of ``x`` with the
    residual's in the order transformers' does), as does a call that needs no gradient (generation: the
    autograd function's own overhead, ~90 us a call, would be most of a decoding step's norm).
    """
    if x.dtype == torch.float32 or not _needs_grad(x, weight):
        return _rms_forward(x, weight, eps, offset, scale_fp32)[0]
    return _RMSNorm.apply(x, weight, eps, offset, scale_fp32)[0]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an op on ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, scale_fp32: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * rstd
    if scale_fp32:
        return (h * (offset + weight.float())).to(x.dtype), rstd
    return (weight + offset if offset else weight) * h.to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    """:func:`rms_norm` saving ``x`` and ``rstd [..., 1]`` (fp32) for its backward, which recomputes the
    normalised rows and runs the ops autograd would run for the plain composition."""

    @staticmethod
    def forward(x, weight, eps, offset, scale_fp32):
        return _rms_forward(x, weight, eps, offset, scale_fp32)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, offset, scale_fp32 = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.offset, ctx.scale_fp32 = offset, scale_fp32
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        if grad is None:
            return None, None, None, None, None
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        h = x32 * rstd
        batch_dims = tuple(range(grad.dim() - 1))
        grad_weight = None
        if ctx.scale_fp32:
            g32 = grad.float()
            grad_h = g32 * (ctx.offset + weight.float())
            if ctx.needs_input_grad[1]:
                grad_weight = (g32 * h).sum(batch_dims).to(weight.dtype)
        else:
            scale = weight + ctx.offset if ctx.offset else weight
            grad_h = (grad * scale).to(x.dtype).float()
            if ctx.needs_input_grad[1]:
                grad_weight = (grad * h.to(x.dtype)).sum(batch_dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # h = x * rstd, rstd = rsqrt(mean(x^2) + eps): autograd's formulas, in its order
            grad_rstd = (grad_h * x32).sum(-1, keepdim=True)
            grad_mean = -0.5 * grad_rstd * rstd.pow(3)
            grad_sq = grad_mean.expand(x32.shape) / x32.shape[-1]
            grad_x = (grad_h * rstd + grad_sq * (2 * x32)).to(x.dtype)
        return grad_x, grad_weight, None, None, None


def norm(x: torch.Tensor, node: Mapping, config: ModelConfig) -> torch.Tensor:
    """The family's RMSNorm of ``x`` with the norm node ``{"weight": ...}``."""
    return rms_norm(x, node["weight"], config.rms_norm_eps, offset=config.norm_offset,
                    scale_fp32=config.norm_scale_fp32)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (identity when ``cap`` is None)."""
    return x if cap is None else torch.tanh(x / cap) * cap


def rope_inv_freq(rotary: Rotary, device: torch.device | None = None, *, long: bool = False) -> torch.Tensor:
    """Inverse frequencies ``[rotary.dim // 2]`` (fp32), with linear, llama3 or longrope scaling applied.

    ``long``: longrope's long factors (for sequences past the original context), else its short ones.
    """
    dim = rotary.dim
    inv_freq = 1.0 / (rotary.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = rotary.scaling_dict
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
    elif kind == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32, device=device)
    return inv_freq


def rope_cos_sin(rotary: Rotary, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[batch, seq, rotary.dim]`` for integer ``positions [batch, seq]``.

    longrope takes its long factors when any position lies past the original context (as transformers decides,
    per forward call) and scales cos and sin by its attention factor.
    """
    inv_freq = rope_inv_freq(rotary, positions.device)
    scaling = rotary.scaling_dict
    if scaling.get("rope_type") == "longrope":
        past = positions.max() + 1 > scaling["original_max_position_embeddings"]
        inv_freq = torch.where(past, rope_inv_freq(rotary, positions.device, long=True), inv_freq)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    factor = scaling.get("attention_factor", 1.0)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` (half-split convention of HF checkpoints).

    With tables narrower than ``head_dim`` (partial rotary) only the leading dims rotate.
    """
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
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
        make = lambda: [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
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


ATTENTION_PATHS = ("auto", "dense", "flex")
"""How attention applies a mask: ``dense`` (a ``[batch, 1, q_len, kv_len]`` boolean mask through SDPA),
``flex`` (a block mask through ``flex_attention``), ``auto`` (:func:`attention_path` decides by device)."""


def attention_path(device: torch.device | str, *, triton: bool | None = None) -> str:
    """``"dense"`` or ``"flex"``: how masked attention (packed documents, padding, windows) runs on ``device``.

    The one place this is decided. CUDA with Triton (``triton``: whether it is installed; default: look): ``flex``,
    a compiled ``flex_attention`` over a block mask, which skips the blocks no query may see and keeps no
    ``[batch, 1, seq, seq]`` mask for the backward. Elsewhere ``dense``: torch 2.13 has no ``flex_attention``
    backward on the CPU, and SDPA over one dense mask measured as fast as plain causal SDPA there (per-document
    SDPA calls 1.8-15x slower; README), and without Triton flex_attention cannot compile.
    """
    if torch.device(device).type != "cuda":
        return "dense"
    if triton is None:
        triton = importlib.util.find_spec("triton") is not None
    return "flex" if triton else "dense"


def block_mask(
    q_len: int,
    kv_len: int,
    *,
    key_padding: torch.Tensor | None,
    documents: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> BlockMask:
    """The mask of :func:`attention_mask_4d` as a ``flex_attention`` block mask (same arguments, same rule).

    Only the per-row index tensors are captured (``[batch, kv_len]``); the dense mask exists block by block
    while the block mask is built and is never kept.
    """
    shift = kv_len - q_len

    def allowed(b, h, q_idx, kv_idx):
        q_pos = q_idx + shift
        ok = kv_idx <= q_pos
        if window is not None:
            ok = ok & (kv_idx > q_pos - window)
        if key_padding is not None:
            ok = ok & key_padding[b, kv_idx].bool()
        if documents is not None:
            ok = ok & (documents[b, q_pos] == documents[b, kv_idx])
        return ok | (kv_idx == q_pos)

    batch = None if key_padding is None and documents is None else (
        key_padding if key_padding is not None else documents).shape[0]
    return create_block_mask(allowed, batch, None, q_len, kv_len, device=device)


def flex_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float | None,
                cap: float | None) -> torch.Tensor:
    """``flex_attention`` of ``q [batch, heads, q_len, head_dim]`` over ``k``/``v [batch, kv_heads, kv_len,
    head_dim]`` with ``mask``, scores soft-capped by ``cap`` (after scaling, as :func:`softcapped_attention`).

    Compiled on CUDA (eager ``flex_attention`` is torch's unfused reference: it materialises the scores).
    """
    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return kernel(q, k, v, score_mod=_softcap_score(cap), block_mask=mask, scale=scale,
                  enable_gqa=k.shape[1] != q.shape[1])


@functools.cache
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


@functools.cache  # one function per cap, so a compiled kernel sees the same score_mod every step
def _softcap_score(cap: float | None) -> Callable | None:
    return None if cap is None else (lambda score, b, h, q_idx, kv_idx: softcap(score, cap))


# A frozen dataclass, not attrs: torch.compile traces a dataclass's construction, not attrs' frozen __init__.
@dataclasses.dataclass(frozen=True, eq=False)
class LayerContext:
    """Everything a decoder layer reads besides its parameters and input, as one record.

    Wrappers (checkpointing, sharding) pass it through whole, so adding a field
    changes no wrapper.

    Attributes:
        config: the architecture.
        index: the layer's position in the stack (0-based).
        cos, sin: RoPE tables ``[batch, seq, rotary dim]`` for this layer, or None (no RoPE).
        mask: boolean attention mask ``[batch or 1, 1, seq, kv_len]`` (True: may
            attend), the same as a ``flex_attention`` :class:`BlockMask`, or None for plain causal attention.
        cache: the :class:`KVCache` being read and extended, or None.
        training: training mode (dropout on).
        router_logits: where a sparse layer puts its router logits ``[batch * seq, experts]`` (under its
            index) when the caller asked for them, else None.
    """

    config: ModelConfig
    index: int
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    mask: torch.Tensor | BlockMask | None
    cache: KVCache | None
    training: bool
    router_logits: dict[int, torch.Tensor] | None = None


LayerFn = Callable[[Mapping, torch.Tensor, LayerContext], torch.Tensor]
"""``layer(params, x [batch, seq, hidden], ctx) -> [batch, seq, hidden]``."""
LayerWrap = Callable[[LayerFn, int], LayerFn]
"""``wrap(layer_fn, index) -> layer_fn``: a transform's change to how layer ``index`` runs."""
Prepare = Callable[[Mapping], Mapping]
"""``prepare(node) -> node``: a transform's change to a parameter sub-tree right before it is used."""


@attrs.frozen(eq=False)
class Decoder:
    """The forward function of a model: ``decoder(params, tokens, ...) -> logits``.

    Transforms change it only through two fields, each a tuple of ``(transform name, function)``
    pairs (the name lets a transform's own entries be removed again):

    - ``layer_wraps``: :data:`LayerWrap` functions applied to every layer in order (the
      first innermost), e.g. activation checkpointing;
    - ``prepares``: :data:`Prepare` functions applied in order to each parameter sub-tree
      (a layer's, the embeddings', the final norm's, the output layer's) right before
      use and inside any recomputation, e.g. sharding's all-gather.

    ``attention`` (one of :data:`ATTENTION_PATHS`) says how masked attention runs; ``auto`` lets
    :func:`attention_path` choose by the tokens' device. A forward with a KV cache always takes the dense mask.
    """

    config: ModelConfig
    layer_wraps: tuple[tuple[str, LayerWrap], ...] = ()
    prepares: tuple[tuple[str, Prepare], ...] = ()
    attention: str = attrs.field(default="auto", validator=attrs.validators.in_(ATTENTION_PATHS))

    def without(self, transform: str) -> Decoder:
        """This decoder without the layer wraps and prepares that ``transform`` added."""
        return attrs.evolve(self, layer_wraps=tuple(w for w in self.layer_wraps if w[0] != transform),
                            prepares=tuple(p for p in self.prepares if p[0] != transform))

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
        return_router_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits ``[batch, seq, vocab]`` for ``tokens [batch, seq]`` (int64).

        Args:
            attention_mask: ``[batch, seq]`` (``[batch, cache_len + seq]`` with a
                cache), 1 for real tokens, 0 for padding (left or right).
            position_ids: ``[batch, seq]``. Without a cache a position that is 0
                after the first column starts a new document: packed rows get
                document-causal masking. By default positions count real tokens
                (so left padding does not shift them).
            cache: a :class:`KVCache` to read past keys/values from and extend.
            training: training mode (dropout in the layers that have it).
            return_hidden: return the final normed hidden states ``[batch, seq,
                hidden]`` instead of logits (see :meth:`logits`).
            return_router_logits: return ``(logits or hidden, router_logits)``: each sparse layer's router
                logits ``[batch * seq, experts]``, in layer order (empty for a dense model); the input of
                :func:`router_aux_loss`.
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
        table = self._prepared(inner["embed_tokens"])["weight"]
        pad = cfg.pad_token_id
        # as transformers' nn.Embedding(padding_idx=pad_token_id): the padding row gets no gradient from the lookup
        x = F.embedding(tokens, table, padding_idx=pad if pad is not None and 0 <= pad < table.shape[0] else None)
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        tables = {r: rope_cos_sin(r, position_ids, x.dtype) for r in set(cfg.layer_rotary) if r is not None}
        kv_len = offset + seq
        path = attention_path(tokens.device) if self.attention == "auto" else self.attention
        make_mask = block_mask if path == "flex" and cache is None else attention_mask_4d
        masks: dict[int | None, torch.Tensor | BlockMask | None] = {}
        for window in set(cfg.layer_windows):
            plain = attention_mask is None and documents is None and (window is None or window >= kv_len)
            # SDPA's is_causal aligns top-left, so a multi-token step after a cache needs an explicit mask.
            needs_mask = not plain or (cache is not None and seq > 1)
            masks[window] = make_mask(
                seq, kv_len, key_padding=attention_mask, documents=documents, window=window, device=tokens.device
            ) if needs_mask else None

        router_logits: dict[int, torch.Tensor] | None = {} if return_router_logits else None
        for i in range(cfg.num_layers):
            cos, sin = tables.get(cfg.layer_rotary[i], (None, None))
            ctx = LayerContext(cfg, i, cos, sin, masks[cfg.layer_windows[i]], cache, training, router_logits)
            x = self.layer_fn(i)(inner["layers"][str(i)], x, ctx)
        x = norm(x, self._prepared(inner["norm"]), cfg)
        if cache is not None:
            cache.length = kv_len
        out = x if return_hidden else self.logits(params, x, training=training)
        return out if router_logits is None else (out, tuple(router_logits[i] for i in sorted(router_logits)))

    def layer_fn(self, index: int) -> LayerFn:
        """Layer ``index`` as it runs: parameters prepared, training mode set, then every wrap applied."""
        prepared = self._prepared

        def run(p: Mapping, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
            # inside the wraps, so a recomputed layer prepares its parameters and sets the mode again
            previous = set_training(ctx.training)
            try:
                return layer(prepared(p), x, ctx)
            finally:
                set_training(previous)

        fn: LayerFn = run
        for _, wrap in self.layer_wraps:
            fn = wrap(fn, index)
        return fn

    def _prepared(self, node: Mapping) -> Mapping:
        for _, prepare in self.prepares:
            node = prepare(node)
        return node

    def output_layer(self, params: Mapping) -> Mapping:
        """The linear node mapping hidden states to logits (the embeddings when tied), prepared for use."""
        return self._prepared(params["lm_head"] if "lm_head" in params else params["model"]["embed_tokens"])

    def logits(self, params: Mapping, hidden: torch.Tensor, *, training: bool = False,
               output_layer: Mapping | None = None) -> torch.Tensor:
        """Logits ``[..., vocab]`` from final hidden states ``[..., hidden]``: the one output-layer computation
        (soft-capped where the family does).

        ``output_layer``: the node :meth:`output_layer` returned, when the caller already holds it.
        """
        node = self.output_layer(params) if output_layer is None else output_layer
        previous = set_training(training)
        try:
            return softcap(linear(hidden, node), self.config.final_softcap)
        finally:
            set_training(previous)


def layer(p: Mapping, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """One decoder layer: ``x [batch, seq, hidden] -> same``, norms placed as ``config.norm_placement`` says."""
    cfg, attn = ctx.config, p["self_attn"]
    if cfg.norm_placement == "pre":
        x = x + attention(attn, norm(x, p["input_layernorm"], cfg), ctx)
        return x + feed_forward(p, norm(x, p["post_attention_layernorm"], cfg), ctx)
    if cfg.norm_placement == "post":
        x = x + norm(attention(attn, x, ctx), p["post_attention_layernorm"], cfg)
        return x + norm(feed_forward(p, x, ctx), p["post_feedforward_layernorm"], cfg)
    x = x + norm(attention(attn, norm(x, p["input_layernorm"], cfg), ctx), p["post_attention_layernorm"], cfg)
    return x + norm(feed_forward(p, norm(x, p["pre_feedforward_layernorm"], cfg), ctx),
                    p["post_feedforward_layernorm"], cfg)


def feed_forward(p: Mapping, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """The layer's MLP: dense, or its experts in a sparse layer. ``p`` is the layer's parameter node."""
    moe = ctx.config.moe
    if moe is not None and ctx.index in moe.sparse_layers:
        return sparse_mlp(p[moe.block], x, ctx)
    return mlp(p["mlp"], x, ctx.config)


def layer_norm_names(config: ModelConfig) -> tuple[str, ...]:
    """The RMSNorm nodes of one layer, in checkpoint order."""
    return {"pre": ("input_layernorm", "post_attention_layernorm"),
            "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
            "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm")}[config.norm_placement]


_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
_ACTIVATION_GRADS = {"silu": torch.ops.aten.silu_backward,
                     "gelu_pytorch_tanh": lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh")}


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` (SwiGLU / GeGLU's product, ``activation`` a ``hidden_act`` name). For the backward it
    keeps ``gate`` and ``up`` only and recomputes ``act(gate)``; the gradients equal autograd's bit for bit.
    Without a gradient to take, the plain ops run."""
    if not _needs_grad(gate, up):
        return _ACTIVATIONS[activation](gate) * up
    return _Gated.apply(gate, up, activation)


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(gate, up, activation):
        return _ACTIVATIONS[activation](gate) * up

    @staticmethod
    def setup_context(ctx, inputs, output):
        gate, up, ctx.activation = inputs
        ctx.save_for_backward(gate, up)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        gate, up = ctx.saved_tensors
        grad_up = grad * _ACTIVATIONS[ctx.activation](gate) if ctx.needs_input_grad[1] else None
        grad_gate = _ACTIVATION_GRADS[ctx.activation](grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None


def mlp(p: Mapping, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Gated MLP (SwiGLU / GeGLU): ``[batch, seq, hidden] -> same``."""
    if "gate_up_proj" in p:  # the checkpoint's layout (Phi-3), or transforms.fuse_projections
        gate, up = linear(x, p["gate_up_proj"]).chunk(2, dim=-1)
    else:
        gate, up = linear(x, p["gate_proj"]), linear(x, p["up_proj"])
    return linear(gated(gate, up, config.hidden_act), p["down_proj"])


def sparse_mlp(p: Mapping, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """A mixture-of-experts MLP: ``[batch, seq, hidden] -> same``; ``p`` holds the router ``gate`` and ``experts``."""
    moe = ctx.config.moe
    batch, seq, hidden = x.shape
    if ctx.training and moe.jitter > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - moe.jitter, 1.0 + moe.jitter)
    flat = x.reshape(batch * seq, hidden)
    logits = linear(flat, p["gate"])
    if ctx.router_logits is not None:
        ctx.router_logits[ctx.index] = logits
    weights, experts = route(logits, moe.top_k, moe.normalize_top_k)
    if moe.weights_in_hidden_dtype:
        weights = weights.to(logits.dtype)
    return grouped_experts(p["experts"], flat, weights, experts, ctx.config).view(batch, seq, hidden)


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: ``(weights [tokens, k] fp32, experts [tokens, k] int64)`` from router ``logits [tokens, E]``.

    The softmax over all experts (in fp32) gives each expert's probability; a token keeps its ``top_k`` most
    probable experts, weighted by their probabilities, renormalised to sum to 1 when ``normalize``.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def grouped_experts(p: Mapping, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                    config: ModelConfig) -> torch.Tensor:
    """``sum_k weights[t, k] * expert_{experts[t, k]}(x[t])`` for tokens ``x [tokens, hidden]``.

    The (token, expert) pairs are sorted by expert, so each expert's tokens form one contiguous slice; each of the
    gated MLP's projections then runs for every expert at once through :func:`grouped_linear` (which adapters
    may compute grouped; plain and quantized experts run one matmul per expert), never a loop over tokens.
    ``p`` holds ``{"0": expert node, ...}``.

    An expert no token chose still runs, on its empty slice: its parameters then get a (zero) gradient, so a
    sharded expert's gather has its backward (a collective every rank must join) on every rank.
    """
    top_k = experts.shape[1]
    slot_expert = experts.reshape(-1)
    order = torch.argsort(slot_expert, stable=True)
    token = order // top_k
    slot_weight = weights.reshape(-1)[order]
    if x.device.type == "meta":  # memory planning: no values to route by, so tokens spread evenly
        counts = [len(slot_expert) // len(p) + (e < len(slot_expert) % len(p)) for e in range(len(p))]
    else:
        counts = torch.bincount(slot_expert, minlength=len(p)).tolist()
    block = expert_row_block(x.device.type, len(token), len(p))
    if block > 1:
        token, slot_weight, counts = padded_slots(token, slot_weight, counts, block)
    # index_select, not indexing: its backward is an index_add, several times faster on CPU than index_put
    y = expert_mlps([p[str(e)] for e in range(len(p))], x.index_select(0, token), counts, config)
    y = y * slot_weight[:, None]
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


EXPERT_ROW_BLOCK = {"cpu": 32}
"""Per device, the most rows an expert's slice is padded to a multiple of (:func:`padded_slots`). On the CPU,
oneDNN builds a kernel for every new matrix shape (~1.5 ms for a bf16 matmul) and keeps the last 1,024; unpadded,
each expert's row count is a new shape almost every step."""


def expert_row_block(device_type: str, rows: int, experts: int) -> int:
    """The multiple each expert's slice of ``rows`` (token, expert) pairs is padded to: a power of 2, at most
    ``EXPERT_ROW_BLOCK`` for the device (1, no padding, elsewhere) and ``rows / (16 experts)``, so the padding
    (``experts`` blocks) adds at most 1/16 to the rows."""
    fair = min(EXPERT_ROW_BLOCK.get(device_type, 1), rows // (16 * experts))
    return 1 << (fair.bit_length() - 1) if fair > 1 else 1


def padded_slots(token: torch.Tensor, weight: torch.Tensor, counts: Sequence[int],
                 block: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The sorted (token, weight) slots with each expert's ``counts[e]`` rows padded to a multiple of ``block``,
    the last expert's further so that all rows are always ``ceil(sum counts / block) + len(counts)`` blocks: one
    shape per step size for the matmuls over all rows. Padding rows read token 0 with weight 0, so they add
    exactly nothing to the output or to any gradient. Returns ``(token, weight, padded counts)``."""
    padded = [-(-c // block) * block for c in counts]
    padded[-1] += (-(-sum(counts) // block) + len(counts)) * block - sum(padded)
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    padded_starts = torch.tensor([0, *padded[:-1]]).cumsum(0)
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts), output_size=len(token))
    dest = (torch.arange(len(token)) + (padded_starts - starts)[expert]).to(token.device)
    rows = torch.zeros(sum(padded), dtype=token.dtype, device=token.device).index_copy(0, dest, token)
    return rows, weight.new_zeros(sum(padded)).index_copy(0, dest, weight), padded


def expert_mlps(nodes: Sequence[Mapping], x: torch.Tensor, counts: Sequence[int], config: ModelConfig) -> torch.Tensor:
    """Every expert's gated MLP over its slice of ``x [rows, hidden]`` (rows sorted by expert, ``counts[e]`` for
    expert ``e``) ``-> same``; the projections are named as the checkpoint names them."""
    gate, up, down = config.moe.projections
    hidden = gated(grouped_linear(x, counts, [n[gate] for n in nodes]),
                   grouped_linear(x, counts, [n[up] for n in nodes]), config.hidden_act)
    return grouped_linear(hidden, counts, [n[down] for n in nodes])


def router_aux_loss(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], config: ModelConfig,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The router's load-balancing loss (Switch Transformer), as transformers' ``load_balancing_loss_func``.

    ``num_experts * sum_e f_e * P_e`` where, over the tokens of every sparse layer together, ``f_e`` is how
    many times expert ``e`` is among a token's top-k over the number of tokens and ``P_e`` its mean router
    probability. ``attention_mask [batch, seq]`` (1: real token) leaves padding out. Not yet multiplied by
    ``config.moe.aux_loss_coef``. fp32 scalar; 0 for a dense model.
    """
    moe = config.moe
    if moe is None or not router_logits:
        return torch.zeros(())
    device = router_logits[0].device
    counts = torch.zeros(moe.num_experts, device=device)
    prob_sums = torch.zeros(moe.num_experts, device=device)
    rows = torch.zeros((), device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1, 1).to(device, torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)  # in the logits' dtype, as transformers
        chosen = torch.topk(probs, moe.top_k, dim=-1).indices
        token_weight = torch.ones_like(chosen, dtype=torch.float32) if mask is None else mask.expand_as(chosen)
        counts = counts.scatter_add(0, chosen.reshape(-1), token_weight.reshape(-1))
        probs = probs.float()
        prob_sums = prob_sums + (probs if mask is None else probs * mask).sum(dim=0)
        rows = rows + (probs.shape[0] if mask is None else mask.sum())
    return moe.num_experts * torch.sum((counts / rows) * (prob_sums / rows))


def attention(p: Mapping, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """Grouped-query self-attention with RoPE: ``[batch, seq, hidden] -> same``."""
    cfg, cache = ctx.config, ctx.cache
    batch, seq, _ = x.shape
    if "qkv_proj" in p:  # the checkpoint's layout (Phi-3), or transforms.fuse_projections
        q, k, v = linear(x, p["qkv_proj"]).split((cfg.q_dim, cfg.kv_dim, cfg.kv_dim), dim=-1)
        v = v.contiguous()  # attention keeps v for the backward: as a view it would keep all of q/k/v alive
    else:
        q, k, v = linear(x, p["q_proj"]), linear(x, p["k_proj"]), linear(x, p["v_proj"])
    if cfg.qk_norm == "projection":
        q, k = norm(q, p["q_norm"], cfg), norm(k, p["k_norm"], cfg)
    q = q.view(batch, seq, cfg.num_heads, cfg.head_dim)
    k = k.view(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = v.view(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":
        q, k = norm(q, p["q_norm"], cfg), norm(k, p["k_norm"], cfg)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if ctx.cos is not None:
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    if cache is not None:
        start = cache.length
        if start + seq > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + seq} needed")
        cache.keys[ctx.index][:, :, start : start + seq] = k
        cache.values[ctx.index][:, :, start : start + seq] = v
        k, v = cache.keys[ctx.index][:, :, : start + seq], cache.values[ctx.index][:, :, : start + seq]
    mask = ctx.mask
    if isinstance(mask, BlockMask):
        out = flex_kernel(q, k, v, mask, cfg.attn_scale, cfg.attn_softcap)
    elif cfg.attn_softcap is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=bool(mask is None and seq > 1), scale=cfg.attn_scale,
            enable_gqa=cfg.num_kv_heads != cfg.num_heads,
        )
    else:
        out = softcapped_attention(q, k, v, mask, cfg.attn_scale or cfg.head_dim ** -0.5, cfg.attn_softcap)
    out = out.transpose(1, 2).reshape(batch, seq, cfg.q_dim)
    return linear(out, p["o_proj"])


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, cap: float) -> torch.Tensor:
    """Attention whose scores are soft-capped before masking (Gemma 2), softmax in fp32.

    ``q [batch, heads, q_len, head_dim]``, ``k``/``v [batch, kv_heads, kv_len, head_dim]``, ``mask`` as
    :func:`attention_mask_4d` (None: causal, queries the last ``q_len`` positions).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = softcap((q @ k.transpose(-1, -2)) * scale, cap)
    if mask is None:
        mask = attention_mask_4d(q.shape[2], k.shape[2], key_padding=None, documents=None, window=None,
                                 device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
