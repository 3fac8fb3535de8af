"""Architecture configuration: one decoder, configured per family.

:class:`ModelConfig` is read from a Hugging Face ``config.json`` (both the
older ``rope_theta`` / ``rope_scaling`` / ``torch_dtype`` fields and
transformers 5's ``rope_parameters`` / ``dtype``) and written back to one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

# model_type -> transformers class name written to ``architectures``.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = ("default", "llama3", "linear")


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
    for full causal attention.
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
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    layer_windows: tuple[int | None, ...] = ()
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

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed Hugging Face config dict; errors name ``source`` and the key."""

        def need(key: str, kind: type = int) -> Any:
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: missing required key {key!r}")
            value = d[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{source}: key {key!r} should be {kind.__name__}, got {value!r}")
            return value

        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; ft-prog supports "
                f"{', '.join(sorted(ARCHITECTURES))}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = d.get("head_dim") or hidden // heads
        num_layers = need("num_hidden_layers")

        rope = dict(d.get("rope_parameters") or {})
        if not rope or "rope_type" not in rope:
            rope.update(d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ConfigError(f"{source}: RoPE type {rope_type!r} is not supported ({', '.join(_ROPE_TYPES)})")
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = None if rope_type == "default" else {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": rope_type}
        if rope_type == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in scaling:
                    raise ConfigError(f"{source}: llama3 RoPE scaling needs {key!r}")
        if rope_type == "linear" and "factor" not in scaling:
            raise ConfigError(f"{source}: linear RoPE scaling needs 'factor'")

        attention_bias = bool(d.get("attention_bias", False))
        windows = _layer_windows(d, model_type, num_layers, source)
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
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            layer_windows=windows,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
            hf=dict(d),
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
            hidden_act="silu",
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
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        windows = {w for w in self.layer_windows if w is not None}
        if self.model_type == "mistral":
            d["sliding_window"] = windows.pop() if windows else None
        elif self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = bool(windows)
            d["sliding_window"] = windows.pop() if windows else None
            d["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in self.layer_windows]
            d.setdefault("max_window_layers", self.num_layers)
        return d


def _layer_windows(d: Mapping[str, Any], model_type: str, num_layers: int, source: str) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"{source}: sliding_window should be a positive integer, got {window!r}")
    if model_type == "mistral":
        return (window,) * num_layers
    layer_types = d.get("layer_types")
    if layer_types is None:
        start = d.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
