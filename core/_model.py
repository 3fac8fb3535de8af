"""The Model value: a config, a parameter tree, a pure forward and the trainable set."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch

from . import _tree
from ._config import ModelConfig
from ._decoder import Decoder, layer_norm_names
from ._presets import preset


@attrs.frozen(eq=False)
class Model:
    """An immutable model: ``model(tokens)`` runs ``forward(params, tokens)``.

    Attributes:
        config: the architecture (:class:`ModelConfig`).
        params: nested dict of tensors keyed like the HF checkpoint.
        forward: pure ``forward(params, tokens, **kwargs) -> logits [batch, seq, vocab]``
            (a :class:`Decoder`, or a wrapper of one that exposes it as ``.inner``).
        trainable: dotted paths of the leaves a program differentiates.
        source: folder the weights came from (its tokenizer files travel on save).
        transforms: names of the transforms applied so far, in order (``ftprog.transforms``
            checks its order table against them).
    """

    config: ModelConfig
    params: dict[str, Any]
    forward: Callable
    trainable: frozenset[str]
    source: str | None = None
    transforms: tuple[str, ...] = ()

    def __call__(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``; keyword arguments as :class:`Decoder`'s."""
        return self.forward(self.params, tokens, **kwargs)

    def hidden_states(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final normed hidden states ``[batch, seq, hidden]`` (the output layer not applied)."""
        return self.forward(self.params, tokens, return_hidden=True, **kwargs)

    def with_router_logits(self, sink: list) -> Model:
        """This model, whose every forward also appends its router logits to ``sink``.

        For a loss that runs the forward itself (``token_loss_sum``) while the router's load-balancing loss
        (:func:`ftprog.core.router_aux_loss`) needs the same forward's router logits: each sparse layer's
        ``[batch * seq, experts]``, in layer order (nothing for a dense model).
        """
        return self.replace(forward=RouterLogitsTap(self.forward, sink))

    def output_layer(self) -> Mapping:
        """The linear node that maps hidden states to logits (the embeddings when tied), ready for use."""
        return self.decoder.output_layer(self.params)

    def logits(self, hidden: torch.Tensor, *, training: bool = False, output_layer: Mapping | None = None
               ) -> torch.Tensor:
        """Logits ``[..., vocab]`` from hidden states ``[..., hidden]``.

        ``output_layer``: what :meth:`output_layer` returned, when the caller holds it already
        (a sharded model then gathers it once for many calls).
        """
        return self.decoder.logits(self.params, hidden, training=training, output_layer=output_layer)

    def replace(self, **changes: Any) -> Model:
        """A copy with some fields changed (the original stays usable)."""
        return attrs.evolve(self, **changes)

    def trainable_params(self) -> dict[str, torch.Tensor]:
        """``{path: tensor}`` of the trainable leaves, in tree order."""
        return {p: v for p, v in _tree.flatten(self.params).items() if p in self.trainable}

    def with_params(self, flat: Mapping[str, torch.Tensor]) -> Model:
        """A copy whose leaves at the given dotted paths are replaced."""
        unknown = set(flat) - set(_tree.flatten(self.params))
        if unknown:
            raise KeyError(f"no such parameters: {sorted(unknown)[:5]}")
        return self.replace(params=_tree.combine(self.params, _tree.unflatten(dict(flat))))

    @property
    def decoder(self) -> Decoder:
        """The :class:`Decoder` under any forward wrappers (those expose ``.inner``)."""
        forward = self.forward
        while not isinstance(forward, Decoder):
            if not hasattr(forward, "inner"):
                raise TypeError(f"the model's forward {type(forward).__name__} wraps no Decoder")
            forward = forward.inner
        return forward

    @property
    def dtype(self) -> torch.dtype:
        return self.params["model"]["embed_tokens"]["weight"].dtype

    @property
    def device(self) -> torch.device:
        return self.params["model"]["embed_tokens"]["weight"].device

    def num_params(self) -> int:
        return _tree.num_params(self.params)


@attrs.frozen(eq=False)
class RouterLogitsTap:
    """A forward wrapper (see :meth:`Model.with_router_logits`): runs ``inner`` with ``return_router_logits``,
    appends the router logits to ``sink`` and returns the rest."""

    inner: Callable
    sink: list

    def __call__(self, params: Mapping, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out, router_logits = self.inner(params, tokens, return_router_logits=True, **kwargs)
        self.sink.extend(router_logits)
        return out


def make_model(config: ModelConfig, params: dict[str, Any], source: str | None = None,
               trainable: Iterable[str] | None = None) -> Model:
    """A model with the standard decoder forward; every leaf trainable unless given."""
    flat = _tree.flatten(params)
    return Model(config, params, Decoder(config), frozenset(flat if trainable is None else trainable), source)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, ``{hf_name: shape}``, in model order."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        for name in layer_norm_names(c):
            shapes[f"{pre}{name}.weight"] = (c.hidden_size,)
        attn = (("qkv_proj", c.q_dim + 2 * c.kv_dim),) if c.fused_projections else (
            ("q_proj", c.q_dim), ("k_proj", c.kv_dim), ("v_proj", c.kv_dim))
        for name, out_dim in attn:
            shapes[f"{pre}self_attn.{name}.weight"] = (out_dim, c.hidden_size)
            if c.qkv_bias:
                shapes[f"{pre}self_attn.{name}.bias"] = (out_dim,)
        shapes[pre + "self_attn.o_proj.weight"] = (c.hidden_size, c.q_dim)
        if c.o_bias:
            shapes[pre + "self_attn.o_proj.bias"] = (c.hidden_size,)
        if c.qk_norm:
            whole = c.qk_norm == "projection"
            shapes[pre + "self_attn.q_norm.weight"] = (c.q_dim if whole else c.head_dim,)
            shapes[pre + "self_attn.k_norm.weight"] = (c.kv_dim if whole else c.head_dim,)
        if c.moe is not None and i in c.moe.sparse_layers:
            shapes.update(_expert_shapes(c, f"{pre}{c.moe.block}."))
            continue
        mlp = (("gate_up_proj", (2 * c.intermediate_size, c.hidden_size)),) if c.fused_projections else (
            ("gate_proj", (c.intermediate_size, c.hidden_size)), ("up_proj", (c.intermediate_size, c.hidden_size)))
        for name, shape in (*mlp, ("down_proj", (c.hidden_size, c.intermediate_size))):
            shapes[f"{pre}mlp.{name}.weight"] = shape
            if c.mlp_bias:
                shapes[f"{pre}mlp.{name}.bias"] = shape[:1]
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def _expert_shapes(c: ModelConfig, block: str) -> dict[str, tuple[int, ...]]:
    """The router and experts of one sparse layer, ``{hf_name: shape}`` (``block``: ``model.layers.{i}.mlp.``)."""
    m = c.moe
    gate, up, down = m.projections
    shapes = {f"{block}gate.weight": (m.num_experts, c.hidden_size)}
    for e in range(m.num_experts):
        shapes[f"{block}experts.{e}.{gate}.weight"] = (m.intermediate_size, c.hidden_size)
        shapes[f"{block}experts.{e}.{up}.weight"] = (m.intermediate_size, c.hidden_size)
        shapes[f"{block}experts.{e}.{down}.weight"] = (c.hidden_size, m.intermediate_size)
    return shapes


def linear_paths(config: ModelConfig) -> list[str]:
    """Module paths of every linear layer (``model.layers.0.self_attn.q_proj``, ..., ``lm_head``).

    A sparse layer lists each expert's projections (``model.layers.0.mlp.experts.3.gate_proj``); its router
    (``...mlp.gate``) is not listed, so LoRA's ``all-linear`` and quantization leave it as it is.
    ``lm_head`` is listed only when it has its own weight (untied embeddings).
    """
    attn = (("self_attn.qkv_proj", "self_attn.o_proj") if config.fused_projections else
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))
    dense = (("mlp.gate_up_proj", "mlp.down_proj") if config.fused_projections else
             ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    moe = config.moe
    paths = []
    for i in range(config.num_layers):
        names = attn + dense
        if moe is not None and i in moe.sparse_layers:
            names = attn + tuple(f"{moe.block}.experts.{e}.{proj}" for e in range(moe.num_experts)
                                 for proj in moe.projections)
        paths += [f"model.layers.{i}.{name}" for name in names]
    return paths if config.tie_word_embeddings else paths + ["lm_head"]


def from_config(config: ModelConfig | Mapping[str, Any] | str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Model:
    """A randomly initialised model (normal(0, 0.02) weights, unit norm scales, zero biases).

    ``config`` is a :class:`ModelConfig`, a config.json-style dict, or a preset
    name from ``ftprog.core.PRESETS`` ("tiny", "cpu-default", "llama-3.2-1b", ...).
    """
    if isinstance(config, str):
        config = preset(config)
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_hf(config, source="config")
    generator = torch.Generator().manual_seed(seed)
    flat = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm.weight"):
            t = torch.full(shape, 1.0 - config.norm_offset)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=generator) * 0.02
        flat[name] = t.to(dtype=dtype, device=device)
    return make_model(config, _tree.unflatten(flat))
