"""Architecture configuration: one decoder, configured per family.

:class:`ModelConfig` is read from a Hugging Face ``config.json`` (both the
older ``rope_theta`` / ``rope_scaling`` / ``torch_dtype`` fields and
transformers 5's ``rope_parameters`` / ``dtype``) and written back to one.
What differs between families (norm placement, activation, soft-capping,
RoPE per layer, ...) is a field here; the decoder reads the fields, never
the family name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

# model_type -> transformers class name written to ``architectures``.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_ROPE_TYPES = ("default", "llama3", "linear", "longrope")
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

# What transformers assumes for each family when config.json leaves a key out.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": False},
    "olmo2": {"tie_word_embeddings": False},
    "phi3": {"tie_word_embeddings": False, "original_max_position_embeddings": 4096},
    "mixtral": {"tie_word_embeddings": False, "rope_theta": 1000000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0},
    "qwen3_moe": {"tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 768, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "router_aux_loss_coef": 0.001},
    "smollm3": {"tie_word_embeddings": True, "rope_theta": 2000000.0},
    "gemma2": {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "sliding_window_pattern": 2},
    "gemma3_text": {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
                    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0},
}
_GEMMA = ("gemma2", "gemma3_text")
# Gemma3TextConfig's defaults: a multimodal ``gemma3`` config.json's ``text_config`` often lists only the keys that
# differ from them (e.g. google/gemma-3-4b-it), so they are filled in where ft-prog needs a value.
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
}


@attrs.frozen
class Rotary:
    """One RoPE table: base ``theta``, ``scaling`` (sorted ``(key, value)`` pairs of a
    linear/llama3/longrope ``rope_scaling``, lists as tuples; or None) and how many
    leading dims of a head it rotates (``dim``, even: partial rotary when below head_dim)."""

    theta: float
    scaling: tuple[tuple[str, Any], ...] | None
    dim: int

    @property
    def scaling_dict(self) -> dict[str, Any]:
        return dict(self.scaling or ())


@attrs.frozen
class MoE:
    """The sparse mixture-of-experts MLP of some layers (Mixtral, Qwen3-MoE), as the checkpoint lays it out.

    A sparse layer's node ``block`` holds the router ``gate`` (a linear ``[num_experts, hidden]``) and
    ``experts.{e}``, each a gated MLP whose ``projections`` (gate, up, down) are linears of width
    ``intermediate_size``. Each token goes to the ``top_k`` experts of highest router softmax probability,
    weighted by those probabilities (renormalised to sum to 1 when ``normalize_top_k``).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    sparse_layers: tuple[int, ...]
    """Indices of the layers with experts; the others have the dense MLP ``mlp``."""
    normalize_top_k: bool = True
    aux_loss_coef: float = 0.001
    """``router_aux_loss_coef``: the weight of the load-balancing loss in the training loss."""
    jitter: float = 0.0
    """Training only: the router and experts' input is multiplied by uniform noise in ``[1 - jitter, 1 + jitter]``
    (Mixtral's ``router_jitter_noise``)."""
    block: str = "mlp"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    weights_in_hidden_dtype: bool = False
    """Routing weights are cast to the hidden states' dtype before they scale the experts' outputs (Qwen3-MoE);
    else the scaling happens in fp32 and the product is cast back (Mixtral)."""


class ConfigError(ValueError):
    """A config that cannot be read or does not fit: a model's config.json, or a program's TOML config
    (:mod:`ftprog.programs.config`). ``key`` (dotted) and ``source`` (a file, "overrides", ...) when known.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key, self.source = key, source


@attrs.frozen(eq=False)
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer.

    ``layer_windows[i]`` is layer i's sliding attention window in tokens
    (a query sees the ``window`` most recent keys, itself included), or None
    for full causal attention; ``layer_rotary[i]`` its RoPE table, or None for
    a layer without position encoding.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    """The RoPE of full-attention layers (``rope_theta``, ``rope_scaling``); see ``layer_rotary``."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None
    """RMSNorm on queries and keys before RoPE: "head" (per head: Qwen3, Gemma 3), "projection" (the whole
    projection: OLMo 2) or None."""
    layer_windows: tuple[int | None, ...] = ()
    fused_projections: bool = False
    """q/k/v as one ``qkv_proj`` ``[q_dim + 2 kv_dim, hidden]`` and gate/up as one ``gate_up_proj``
    ``[2 intermediate, hidden]`` (Phi-3/4), kept fused as the checkpoint stores them."""
    partial_rotary_factor: float = 1.0
    """The share of each head's dims that RoPE rotates (Phi-4-mini: 0.75)."""
    hidden_act: str = "silu"
    """The MLP's gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, tanh-approximate)."""
    norm_placement: str = "pre"
    """Where a layer's RMSNorms sit: "pre" (before attention and MLP), "post" (on their outputs, before the
    residual add: OLMo 2) or "sandwich" (both: Gemma)."""
    norm_offset: float = 0.0
    """Norm scale = ``norm_offset + weight`` (Gemma stores ``scale - 1``: offset 1)."""
    norm_scale_fp32: bool = False
    """Multiply by the norm weight in fp32 before casting back (Gemma, OLMo 2); else cast, then multiply."""
    embed_scale: float = 1.0
    """Embeddings are multiplied by this (Gemma: sqrt(hidden_size), rounded to the weights' dtype)."""
    attn_scale: float | None = None
    """Attention score scale; None: ``head_dim ** -0.5`` (Gemma: ``query_pre_attn_scalar ** -0.5``)."""
    attn_softcap: float | None = None
    """Attention scores become ``cap * tanh(scores / cap)`` before masking (Gemma 2)."""
    final_softcap: float | None = None
    """Logits become ``cap * tanh(logits / cap)`` (Gemma 2)."""
    moe: MoE | None = None
    """The experts of sparse layers (Mixtral, Qwen3-MoE); None for a dense model."""
    layer_rotary: tuple[Rotary | None, ...] = attrs.field(
        default=attrs.Factory(lambda self: (self.rotary,) * self.num_layers, takes_self=True))
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None
    hf: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    """The config.json this came from (kept so saving writes back every field)."""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary(self) -> Rotary:
        """The RoPE of full-attention layers, from ``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor``."""
        return _rotary(self.rope_theta, self.rope_scaling, self.head_dim, self.partial_rotary_factor,
                       self.max_position_embeddings)

    @property
    def rope_switch_length(self) -> int | None:
        """LongRoPE's original context: a call whose positions reach past it rotates every position with the
        long factors, so keys cached by shorter calls are stale once a sequence grows past it. None otherwise."""
        lengths = {dict(r.scaling)["original_max_position_embeddings"] for r in self.layer_rotary
                   if r is not None and r.scaling and dict(r.scaling)["rope_type"] == "longrope"}
        return min(lengths) if lengths else None

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed Hugging Face config dict; errors name ``source`` and the key.

        A multimodal ``gemma3`` config (Gemma3ForConditionalGeneration) gives its language model: the
        ``gemma3_text`` config of its ``text_config`` (see :func:`multimodal_text_config`).
        """
        if d.get("model_type") in MULTIMODAL:
            d = multimodal_text_config(d, source)
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; ft-prog supports "
                f"{', '.join(sorted([*ARCHITECTURES, *MULTIMODAL]))}"
            )
        raw, d = d, {**_FAMILY_DEFAULTS[model_type], **d}

        def need(key: str, kind: type = int) -> Any:
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: missing required key {key!r}")
            value = d[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{source}: key {key!r} should be {kind.__name__}, got {value!r}")
            return value

        gemma = model_type in _GEMMA
        act_key = "hidden_activation" if gemma else "hidden_act"
        act = d.get(act_key) or d.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ConfigError(f"{source}: {act_key} {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = d.get("head_dim") or hidden // heads
        num_layers = need("num_hidden_layers")
        max_positions = int(d.get("max_position_embeddings", 4096))

        rope_parameters = dict(d.get("rope_parameters") or {})
        if model_type == "gemma3_text":
            full = {**rope_parameters.get("full_attention", {})}
            if "rope_type" not in full:
                full.update(d.get("rope_scaling") or {})
            full.setdefault("rope_theta", d["rope_theta"])
            local = {**rope_parameters.get("sliding_attention", {})}
            local.setdefault("rope_theta", d["rope_local_base_freq"])
            theta, scaling = _read_rope(full, d, source)
            local_theta, local_scaling = _read_rope(local, d, source, "sliding-window layers' ")
            local_rotary = _rotary(local_theta, local_scaling, head_dim, 1.0, max_positions)
        else:
            if "rope_type" not in rope_parameters:
                rope_parameters.update(d.get("rope_scaling") or {})
            theta, scaling = _read_rope(rope_parameters, d, source)
            local_rotary = None
        partial = float(rope_parameters.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
        if not 0 < partial <= 1 or int(head_dim * partial) % 2:
            raise ConfigError(f"{source}: partial_rotary_factor {partial} should give an even number of the "
                              f"{head_dim} head dims")

        attention_bias = bool(d.get("attention_bias", False))
        windows = _layer_windows(d, model_type, num_layers, source)
        rotary = _rotary(theta, scaling, head_dim, partial, max_positions)
        layer_rotary = tuple(local_rotary if local_rotary is not None and w is not None else rotary for w in windows)
        if model_type == "smollm3":
            uses_rope = _smollm3_rope_layers(d, num_layers, source)
            layer_rotary = tuple(r if use else None for r, use in zip(layer_rotary, uses_rope))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(d.get("tie_word_embeddings")),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type not in ("qwen2", "mistral", "mixtral") else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type in ("llama", "smollm3") else False,
            qk_norm={"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "olmo2": "projection"}.get(model_type),
            layer_windows=windows,
            fused_projections=model_type == "phi3",
            partial_rotary_factor=partial,
            hidden_act=act,
            norm_placement="sandwich" if gemma else "post" if model_type == "olmo2" else "pre",
            norm_offset=1.0 if gemma else 0.0,
            norm_scale_fp32=gemma or model_type == "olmo2",
            embed_scale=hidden ** 0.5 if gemma else 1.0,
            attn_scale=need("query_pre_attn_scalar", float) ** -0.5 if gemma else None,
            attn_softcap=d.get("attn_logit_softcapping") if gemma else None,
            final_softcap=d.get("final_logit_softcapping") if gemma else None,
            moe=_moe(d, model_type, num_layers, need, source),
            layer_rotary=layer_rotary,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
            hf=dict(raw),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) loads into the same model."""
        d = dict(self.hf)
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        d.pop("rope_parameters", None)
        d.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.dtype is not None:
            d["torch_dtype"] = d["dtype"] = self.dtype
        if self.model_type in ("llama", "qwen3", "qwen3_moe", "olmo2", "smollm3", *_GEMMA):
            d["attention_bias"] = self.qkv_bias
        if self.model_type in ("llama", "smollm3"):
            d["mlp_bias"] = self.mlp_bias
        if self.model_type in _GEMMA:
            d["hidden_activation"] = self.hidden_act
            d["attn_logit_softcapping"], d["final_logit_softcapping"] = self.attn_softcap, self.final_softcap
        local = {r.theta for r, w in zip(self.layer_rotary, self.layer_windows) if r is not None and w is not None}
        if self.model_type == "gemma3_text" and local:
            d["rope_local_base_freq"] = local.pop()
        if self.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = self.partial_rotary_factor
        if self.model_type == "smollm3":
            d["no_rope_layers"] = [int(r is not None) for r in self.layer_rotary]
        windows = {w for w in self.layer_windows if w is not None}
        layer_types = ["full_attention" if w is None else "sliding_attention" for w in self.layer_windows]
        if self.model_type in ("mistral", "phi3", "mixtral"):
            d["sliding_window"] = windows.pop() if windows else None
        elif self.model_type == "qwen3_moe":
            d["use_sliding_window"] = bool(windows)
            d["sliding_window"] = windows.pop() if windows else None
        elif self.model_type in ("qwen2", "qwen3", "smollm3"):
            d["use_sliding_window"] = bool(windows)
            d["sliding_window"] = windows.pop() if windows else None
            d["layer_types"] = layer_types
            if self.model_type != "smollm3":
                d.setdefault("max_window_layers", self.num_layers)
        elif self.model_type in _GEMMA:
            d["sliding_window"] = windows.pop() if windows else d.get("sliding_window")
            d["layer_types"] = layer_types
        if self.moe is not None:
            d.update(self._moe_hf())
        return d

    def _moe_hf(self) -> dict[str, Any]:
        """The config.json keys of :attr:`moe`."""
        m = self.moe
        d = {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.aux_loss_coef}
        if self.model_type == "mixtral":
            d.update(num_local_experts=m.num_experts, router_jitter_noise=m.jitter)
            return d
        # Qwen3-MoE: dense layers are those that mlp_only_layers names or decoder_sparse_step skips
        step = self.hf.get("decoder_sparse_step", 1) or 1
        by_step = [i for i in range(self.num_layers) if (i + 1) % step == 0]
        if not set(m.sparse_layers) <= set(by_step):
            raise ConfigError(f"{self.model_type}: sparse layers {list(m.sparse_layers)} cannot be written as "
                              f"decoder_sparse_step {step} and mlp_only_layers")
        d.update(moe_intermediate_size=m.intermediate_size, norm_topk_prob=m.normalize_top_k,
                 decoder_sparse_step=step, mlp_only_layers=sorted(set(by_step) - set(m.sparse_layers)))
        d["num_local_experts" if "num_local_experts" in self.hf else "num_experts"] = m.num_experts
        return d


# multimodal model_type -> the model_type of its language model (loaded without the vision tower).
MULTIMODAL = {"gemma3": "gemma3_text"}


def multimodal_text_config(d: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The language model's config.json dict of a multimodal config ``d`` (``gemma3``): its ``text_config`` with
    Gemma3TextConfig's defaults filled in and the top level's token ids, dtype and tying where it has none."""
    text = d.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError(f"{source}: model_type {d['model_type']!r} needs a 'text_config' object (the language "
                          "model's config)")
    top = {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
                             "tie_word_embeddings") if d.get(k) is not None}
    return {**_GEMMA3_TEXT_DEFAULTS, **top, **text, "model_type": MULTIMODAL[d["model_type"]],
            "architectures": [ARCHITECTURES[MULTIMODAL[d["model_type"]]]]}


def _rotary(theta: float, scaling: Mapping[str, Any] | None, head_dim: int, partial: float, max_positions: int
            ) -> Rotary:
    """The :class:`Rotary` of a RoPE config; longrope's attention factor is resolved here, as transformers does."""
    if scaling is not None and scaling["rope_type"] == "longrope":
        original = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or max_positions / original
        attention = scaling.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original)))
        scaling = {**scaling, "attention_factor": attention}
    items = None if scaling is None else tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))
    return Rotary(theta, items, int(head_dim * partial))


def _read_rope(rope: Mapping[str, Any], d: Mapping[str, Any], source: str, what: str = ""
               ) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling or None)`` from a rope_parameters-style dict (``d``'s ``rope_theta`` as fallback)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"{source}: {what}RoPE type {rope_type!r} is not supported ({', '.join(_ROPE_TYPES)})")
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = None if rope_type == "default" else {
        **{k: v for k, v in rope.items() if k not in ("type", "rope_theta")}, "rope_type": rope_type}
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"{source}: llama3 RoPE scaling needs {key!r}")
    if rope_type == "linear" and "factor" not in scaling:
        raise ConfigError(f"{source}: linear RoPE scaling needs 'factor'")
    if rope_type == "longrope":
        scaling.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if not scaling.get(key):
                raise ConfigError(f"{source}: longrope RoPE scaling needs {key!r}")
    return theta, scaling


def _moe(d: Mapping[str, Any], model_type: str, num_layers: int, need: Any, source: str) -> MoE | None:
    """The :class:`MoE` of a Mixtral or Qwen3-MoE config (None for other families)."""
    if model_type not in ("mixtral", "qwen3_moe"):
        return None
    experts_key = "num_local_experts" if model_type == "mixtral" or "num_local_experts" in d else "num_experts"
    num_experts, top_k = need(experts_key), need("num_experts_per_tok")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"{source}: num_experts_per_tok {top_k} should be between 1 and {experts_key} "
                          f"{num_experts}")
    coef = float(d.get("router_aux_loss_coef", 0.001))
    if model_type == "mixtral":
        return MoE(num_experts, top_k, need("intermediate_size"), tuple(range(num_layers)), normalize_top_k=True,
                   aux_loss_coef=coef, jitter=float(d.get("router_jitter_noise") or 0.0), block="block_sparse_moe",
                   projections=("w1", "w3", "w2"))
    step = need("decoder_sparse_step")
    if step < 1:
        raise ConfigError(f"{source}: decoder_sparse_step should be >= 1, got {step}")
    dense = set(d.get("mlp_only_layers") or ())
    if not dense <= set(range(num_layers)):
        raise ConfigError(f"{source}: mlp_only_layers {sorted(dense)} name layers outside 0..{num_layers - 1}")
    sparse = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    return MoE(num_experts, top_k, need("moe_intermediate_size"), sparse,
               normalize_top_k=bool(d.get("norm_topk_prob")), aux_loss_coef=coef, weights_in_hidden_dtype=True)


def _layer_windows(d: Mapping[str, Any], model_type: str, num_layers: int, source: str) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe", "smollm3") and not d.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"{source}: sliding_window should be a positive integer, got {window!r}")
    if model_type in ("mistral", "phi3", "mixtral", "qwen3_moe"):
        return (window,) * num_layers
    layer_types = d.get("layer_types")
    if layer_types is None and model_type == "smollm3":
        uses_rope = _smollm3_rope_layers(d, num_layers, source)
        layer_types = ["full_attention" if use else "sliding_attention" for use in uses_rope]
    if layer_types is None and model_type in _GEMMA:
        pattern = d["sliding_window_pattern"]
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if layer_types is None:
        start = d.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _smollm3_rope_layers(d: Mapping[str, Any], num_layers: int, source: str) -> list[int]:
    """SmolLM3's ``no_rope_layers``: 1 where layer i uses RoPE (default: all but every ``interval``-th)."""
    interval = d.get("no_rope_layer_interval", 4)
    uses_rope = d.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(uses_rope) != num_layers:
        raise ConfigError(f"{source}: no_rope_layers has {len(uses_rope)} entries for {num_layers} layers")
    return uses_rope
