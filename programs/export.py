"""`ft-prog export`: a model, optionally with its LoRA/DoRA adapter, in the format another runtime loads.

:func:`export` reads a Hugging Face model folder (or a quantized ft-prog folder, which is
dequantized), merges ``adapter`` when one is given, and writes one of:

- ``hf``: a Hugging Face folder (config.json, safetensors, tokenizer files) with the adapter merged
  into the weights; transformers loads it and computes the adapted model's logits.
- ``peft``: the adapter alone as a PEFT folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) plus the base model's tokenizer files; ``PeftModel.from_pretrained``
  loads it over the base. Needs ``adapter``; the base is loaded to check the adapter fits it.
- ``gguf``: one ``.gguf`` file for llama.cpp (and Ollama, LM Studio, ...), written with the ``gguf``
  package the way llama.cpp's ``convert_hf_to_gguf.py`` writes these families. general.architecture
  (:data:`_GGUF_ARCHS`): ``llama`` (Llama 2/3/3.1/3.2, SmolLM2, Mistral), ``qwen2``, ``qwen3``,
  ``gemma2``, ``gemma3`` (``gemma3_text``, also a multimodal ``gemma3`` folder's language model),
  ``phi3`` (Phi-3/3.5/4), ``olmo2``, ``smollm3``. Tensors are named by the ``gguf`` package's
  tensor-name map of that architecture (``token_embd``, ``blk.N.attn_q / attn_qkv / attn_q_norm /
  post_attention_norm / ffn_up / post_ffw_norm ...``, ``output_norm``, ``output`` unless tied); fused
  Phi-3 projections stay fused (``attn_qkv``, gate-and-up ``ffn_up``). Per family, from the
  :class:`ModelConfig`: norm scales get ``norm_offset`` added (Gemma's stored ``scale - 1``); Q/K
  (weights, biases) are permuted from Hugging Face's half-split rotary layout to the adjacent pairs
  of llama.cpp's ``llama`` and ``smollm3`` graphs; llama3 RoPE scaling writes ``rope_freqs``,
  LongRoPE ``rope_factors_long`` / ``rope_factors_short`` plus the original context and attention
  factor (llama.cpp picks the long factors by context size, n_ctx above the original, where
  ft-prog picks them per call); sliding windows (Gemma) write the window and the per-layer
  pattern, Gemma 3 the local layers' RoPE base, Gemma 2 its soft-caps. Matrices are stored in
  ``dtype`` (f32, f16 or bf16; default: the checkpoint's), 1-D tensors (norms, biases, factors)
  in f32. Metadata: context/embedding/feed-forward lengths, block count, head counts, key/value
  lengths, RoPE base, rotated dims (partial rotary) and linear scaling, RMS-norm epsilon,
  vocabulary size, and the tokenizer: ``gpt2`` (tokens, token types, merges, pre-tokenizer) for
  byte-level BPE ``tokenizer.json`` and Llama 3 tiktoken ``tokenizer.model``; ``llama`` (tokens,
  scores, token types) for sentencepiece ``tokenizer.model``; bos/eos/pad/unk ids, add-bos/add-eos
  and the chat template. What llama.cpp's graph of the architecture would compute differently is
  refused with an ExportError naming the model_type and the difference: a sliding window that binds
  where the graph has none (Mistral, Qwen2, Phi-3), biases the graph does not add, layers without
  RoPE other than SmolLM3's every 4th, a Gemma attention scale other than llama.cpp's (it takes
  ``head_dim ** -0.5``, ``(hidden / heads) ** -0.5`` for the 27B sizes), RoPE scalings the graph
  does not read.
- ``executorch``: ``torch.export`` of the whole-sequence forward (``tokens [1, seq] -> logits
  [1, seq, vocab]``, ``seq`` dynamic from 2 to ``max_seq_len``), saved as ``.pt2``
  (``torch.export.save``) and, when the ``executorch`` package is installed
  (``pip install ft-prog[executorch]``), lowered to an ExecuTorch ``.pte`` program (XNNPACK
  delegate when available). Without executorch the ``.pt2`` is written and a warning says how
  to get the ``.pte``. No KV cache: each call runs the whole sequence.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from ..core import (
    Model, as_dtype, dense_weight, flatten, is_plain, load_pretrained, load_tokenizer, unflatten,
)
from ..core._checkpoint import copy_tokenizer_files
from .demo_assets import resolve
from .run_guard import check_output

FORMATS = ("hf", "peft", "gguf", "executorch")


class ExportError(ValueError):
    """A model, adapter or option that the chosen export format cannot take."""


# ---------------------------------------------------------------------------------------------- loading


def _load_base(model_path: str, dtype: torch.dtype | None) -> Model:
    from ..transforms import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(model_path):
        model = load_quantized(model_path)
        if dtype is not None:
            from ..transforms import cast

            model = cast(model, dtype)
        return model
    return load_pretrained(model_path, dtype=dtype)


def load_merged(model_path: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                dtype: torch.dtype | str | None = None) -> Model:
    """The model of ``model_path`` with ``adapter`` merged and quantized weights dequantized: plain tensors only.

    ``dtype``: the dtype of the result (default: the checkpoint's).
    """
    from ..transforms import load_adapter, merge

    path = resolve(str(model_path))
    dtype = as_dtype(dtype)
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {str(adapter)!r} does not exist")
    model = _load_base(path, dtype)
    if adapter is not None:
        model = merge(load_adapter(model, adapter), dtype=dtype or model.dtype)
    flat = flatten(model.params)
    if any(not is_plain(t) for t in flat.values()):
        target = dtype or model.dtype
        model = model.replace(params=unflatten({p: t if is_plain(t) else dense_weight({"weight": t}, target)
                                                for p, t in flat.items()}),
                              trainable=frozenset(flat))
    return model


# ---------------------------------------------------------------------------------------------- export


def export(model_path: str | os.PathLike, output: str | os.PathLike, fmt: str, *,
           adapter: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
           max_seq_len: int | None = None, overwrite: bool = False) -> Path:
    """Write the model of ``model_path`` (+ ``adapter``) to ``output`` in format ``fmt``.

    Args:
        model_path: a Hugging Face model folder, a quantized ft-prog folder, or ``builtin:demo-model``.
        output: ``hf``/``peft``: the folder to write (replaced atomically). ``gguf``: the ``.gguf`` file
            (a path without that suffix is a folder that receives ``model.gguf``). ``executorch``: the
            ``.pte`` file (likewise ``model.pte`` in a folder); the ``.pt2`` goes beside it.
        fmt: ``"hf"``, ``"peft"``, ``"gguf"`` or ``"executorch"`` (see the module docstring).
        adapter: a PEFT LoRA/DoRA adapter folder, merged into the weights (``peft``: re-saved).
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` (or a torch dtype); default: the checkpoint's.
        max_seq_len: ``executorch`` only: the longest sequence the program accepts (default: the
            model's ``max_position_embeddings``).
        overwrite: replace an existing output (file, or non-empty folder); without it that is refused.
            An output that is, lies inside or holds ``model_path`` or ``adapter`` is always refused.

    Returns:
        The folder or file written (``executorch`` without the executorch package: the ``.pt2``).

    Raises:
        ExportError: unknown format, missing adapter for ``peft``, an architecture or option the
            format cannot represent. FileNotFoundError: a missing model or adapter folder.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    model_path = resolve(str(model_path))
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model folder {model_path!r} does not exist")
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {str(adapter)!r} does not exist")
    if max_seq_len is not None and fmt != "executorch":
        raise ExportError("max_seq_len applies to the executorch format only")
    out = Path(output)
    written = [out]  # hf, peft: the folder
    if fmt == "gguf":
        written = [out if out.suffix == ".gguf" else out / "model.gguf"]
    elif fmt == "executorch":
        pte = out if out.suffix == ".pte" else out / "model.pte"
        written = [pte, pte.with_suffix(".pt2")]
    for path in written:
        check_output(path, sources=[model_path, adapter], overwrite=overwrite, option="--overwrite")
    if fmt == "peft":
        return export_peft(model_path, adapter, out, dtype=dtype)
    if fmt == "gguf":
        from ..core import read_config

        # Architecture and tokenizer are checked before the weights load, so that a refusal comes at once.
        config = read_config(model_path)
        _gguf_arch(config)
        vocab = gguf_vocab(model_path, config.vocab_size)
        # Loaded as stored and converted tensor by tensor: norms stay exact f32 even in an f16 file.
        model = load_merged(model_path, adapter=adapter)
        return export_gguf(model, out if out.suffix == ".gguf" else out / "model.gguf", vocab=vocab, dtype=dtype)
    model = load_merged(model_path, adapter=adapter, dtype=dtype)
    if fmt == "hf":
        from ..core import save_pretrained

        return save_pretrained(model, out)
    return export_executorch(model, out if out.suffix == ".pte" else out / "model.pte", max_seq_len=max_seq_len)


def export_peft(model_path: str, adapter: str | os.PathLike | None, output: Path, *,
                dtype: torch.dtype | str | None = None) -> Path:
    """The adapter of ``adapter`` re-saved as a PEFT folder (checked against the base), plus tokenizer files."""
    from ..transforms import load_adapter, save_adapter

    if adapter is None:
        raise ExportError("the peft format exports an adapter: pass adapter=PATH (--adapter) of a PEFT adapter "
                          "folder; use fmt='hf' to export the model itself")
    dtype = as_dtype(dtype)
    base = _load_base(model_path, dtype)
    adapted = load_adapter(base, adapter, dtype=dtype or torch.float32)
    folder = save_adapter(adapted, output)
    copy_tokenizer_files(model_path, folder)
    return folder


# ---------------------------------------------------------------------------------------------- gguf

@attrs.frozen
class LlamaCppArch:
    """What llama.cpp's graph of one GGUF architecture represents beyond the plain pre-norm decoder.

    ``biases``: the checkpoint biases its graph adds (``qkv``, ``o``, ``mlp``); llama.cpp refuses a file with others.
    ``pairwise_rope``: the graph rotates adjacent pairs (GGML rope mode 0), so Q/K are permuted (:func:`llama_permute`).
    ``rope_types``: the RoPE scalings it reads. ``windows``: interleaved sliding-window layers (one window, per-layer
    pattern). ``softcap``: attention and final-logit soft-capping. ``no_rope_every``: it skips RoPE on every n-th
    layer, fixed in llama.cpp, not read from the file. ``scale_by_hidden_at``: Gemma: the attention scale is not
    in the file; llama.cpp takes ``head_dim ** -0.5``, or ``(hidden / heads) ** -0.5`` at this layer count (27B).
    """

    name: str
    biases: tuple[str, ...] = ()
    pairwise_rope: bool = False
    rope_types: tuple[str, ...] = ("default", "linear")
    windows: bool = False
    softcap: bool = False
    no_rope_every: int | None = None
    scale_by_hidden_at: int | None = None


# model_type -> the llama.cpp architecture its GGUF is written as.
_GGUF_ARCHS = {
    "llama": LlamaCppArch("llama", ("qkv", "o", "mlp"), pairwise_rope=True, rope_types=("default", "linear", "llama3")),
    "mistral": LlamaCppArch("llama", ("qkv", "o", "mlp"), pairwise_rope=True,
                            rope_types=("default", "linear", "llama3")),
    "qwen2": LlamaCppArch("qwen2", ("qkv",)),
    "qwen3": LlamaCppArch("qwen3"),
    "gemma2": LlamaCppArch("gemma2", windows=True, softcap=True, scale_by_hidden_at=46),
    "gemma3_text": LlamaCppArch("gemma3", windows=True, scale_by_hidden_at=62),
    "phi3": LlamaCppArch("phi3", rope_types=("default", "longrope")),
    "olmo2": LlamaCppArch("olmo2"),
    "smollm3": LlamaCppArch("smollm3", pairwise_rope=True, no_rope_every=4),
    # mixtures of experts: each layer's experts written as 3-D tensors (ffn_{gate,up,down}_exps), router ffn_gate_inp
    "mixtral": LlamaCppArch("llama", pairwise_rope=True),
    "qwen3_moe": LlamaCppArch("qwen3moe"),
}


@functools.cache
def _gguf_tensor_names(arch: str, num_layers: int):
    """gguf's ``TensorNameMap`` (Hugging Face names -> llama.cpp names) of the GGUF architecture ``arch``."""
    import gguf

    arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return gguf.get_tensor_name_map(arch_id, num_layers)


def gguf_tensor_name(hf_name: str, config) -> str:
    """llama.cpp's name of a tensor of a model with ``config``, from the ``gguf`` package's tensor-name map:
    ``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    arch = _gguf_arch(config).name
    name = _gguf_tensor_names(arch, config.num_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"no GGUF name for tensor {hf_name!r} in llama.cpp's {arch!r} architecture")
    return name


def llama_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face -> llama.cpp rotary layout of a Q or K projection (``[n_head * head_dim, ...]``, or its bias).

    HF rotates the two halves of each head (``x[:d/2]`` with ``x[d/2:]``); llama.cpp's ``llama`` graph rotates
    adjacent pairs. This interleaves the halves of every head, as ``LlamaModel.permute`` in llama.cpp's
    ``convert_hf_to_gguf.py`` does (``n_head`` is the KV head count for K).
    """
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_arch(config) -> LlamaCppArch:
    """llama.cpp's architecture for ``config``; ExportError when its graph would compute something else."""
    arch = _GGUF_ARCHS.get(config.model_type)
    if arch is None:
        raise ExportError(f"GGUF export does not support model_type {config.model_type!r} "
                          f"(supported: {', '.join(sorted(_GGUF_ARCHS))})")
    problem = _gguf_mismatch(config, arch)
    if problem:
        raise ExportError(f"GGUF export: model_type {config.model_type!r} {problem}, which llama.cpp's "
                          f"{arch.name!r} graph does not represent, so the exported model would compute something "
                          "else")
    return arch


def _gguf_mismatch(config, arch: LlamaCppArch) -> str | None:
    """What of ``config`` llama.cpp's ``arch`` graph cannot compute, as words; None when it can."""
    biases = {"qkv": config.qkv_bias, "o": config.o_bias, "mlp": config.mlp_bias}
    extra = [kind for kind, present in biases.items() if present and kind not in arch.biases]
    if extra:
        return f"has {'/'.join(extra)} projection biases"
    windows = {w for w in config.layer_windows if w is not None}
    binding = {w for w in windows if w < config.max_position_embeddings}  # wider windows never bind
    if binding and not arch.windows:
        return f"has sliding-window attention (window {min(binding)})"
    if len(windows) > 1:
        return f"has sliding windows of different sizes {sorted(windows)}"
    kinds = {dict(r.scaling or {}).get("rope_type", "default") for r in config.layer_rotary if r is not None}
    if kinds - set(arch.rope_types):
        return f"has {sorted(kinds - set(arch.rope_types))[0]} RoPE scaling"
    local = {r for r, w in zip(config.layer_rotary, config.layer_windows) if r is not None and w is not None}
    rotaries = {r for r in config.layer_rotary if r is not None} - (local if arch.windows else set())
    if len(rotaries) > 1 or len(local) > 1 or any(r.scaling for r in local if arch.windows):
        return "has a RoPE other than one global table (and, with sliding windows, one unscaled local one)"
    no_rope = tuple(r is None for r in config.layer_rotary)
    every = arch.no_rope_every
    if no_rope != tuple(every is not None and (i + 1) % every == 0 for i in range(config.num_layers)):
        layers = [i for i, skip in enumerate(no_rope) if skip]
        return f"has layers without RoPE {layers} (llama.cpp: every {every}th)" if every else \
            f"has layers without RoPE {layers}"
    moe = config.moe
    if moe is not None and moe.sparse_layers != tuple(range(config.num_layers)):
        return f"has dense layers among its sparse ones (sparse: {list(moe.sparse_layers)})"
    if moe is not None and not moe.normalize_top_k:
        return "does not renormalise its top-k routing weights (norm_topk_prob false)"
    if (config.attn_softcap or config.final_softcap) and not arch.softcap:
        return "has soft-capping"
    if arch.softcap and not (config.attn_softcap and config.final_softcap):
        return "has no attention or no final soft-capping (llama.cpp always caps both)"
    if arch.scale_by_hidden_at is not None:
        dims = config.hidden_size // config.num_heads if config.num_layers == arch.scale_by_hidden_at \
            else config.head_dim
        if not math.isclose(config.attn_scale, dims ** -0.5, rel_tol=1e-6):
            return (f"has attention scale {config.attn_scale:.6g} (query_pre_attn_scalar "
                    f"{config.attn_scale ** -2:.6g}; llama.cpp takes {dims})")
    elif config.attn_scale is not None:
        return f"has attention scale {config.attn_scale:.6g}"
    return None


def llama3_rope_factors(config) -> torch.Tensor:
    """The ``rope_freqs`` tensor of llama3 RoPE scaling: llama.cpp divides each base frequency by its factor."""
    s = config.rope_scaling
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def export_gguf(model: Model, output: Path, *, vocab: GGUFVocab | None = None,
                dtype: torch.dtype | str | None = None) -> Path:
    """Write a plain (merged, unquantized) ``model`` as one GGUF file.

    ``vocab``: the tokenizer (:func:`gguf_vocab`; default: read from the model's source folder).

    ``dtype`` of the matrices (default: the model's); 1-D tensors are always f32. Atomic: a temporary
    file is renamed onto ``output``.
    """
    import gguf
    import numpy as np

    config = model.config
    arch = _gguf_arch(config)
    dtype = as_dtype(dtype) or model.dtype
    qtypes = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
              torch.bfloat16: gguf.GGMLQuantizationType.BF16}
    file_types = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                  torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}
    if dtype not in qtypes:
        raise ExportError(f"GGUF export writes f32, f16 or bf16 tensors, not {dtype}")
    flat = flatten(model.params)
    if any(not is_plain(t) for t in flat.values()) or any(".lora_" in p for p in flat):
        raise ExportError("export_gguf needs a plain model: merge adapters and dequantize first (load_merged)")
    if vocab is None:
        if not model.source:
            raise ExportError("export_gguf: the model has no source folder to read the tokenizer from; pass vocab=")
        vocab = gguf_vocab(model.source, config.vocab_size)

    # (gguf name, Hugging Face name, tensor, ggml type) in file order; tensors are converted when written.
    entries: list[tuple[str, str, Any, Any]] = [
        (gguf_tensor_name(hf_name, config), hf_name, tensor,
         qtypes[dtype] if len(tensor.shape) >= 2 else gguf.GGMLQuantizationType.F32)
        for hf_name, tensor in _stacked_experts(flat).items()]
    f32 = gguf.GGMLQuantizationType.F32
    entries += [(name, name, t, f32) for name, t in _gguf_extra_tensors(config).items()]

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, arch.name)
    try:
        writer.add_name(Path(model.source).name if model.source else "ft-prog model")
        writer.add_file_type(file_types[dtype])
        _add_gguf_hparams(writer, config, arch)
        vocab.add_to(writer)

        numpy_of = {gguf.GGMLQuantizationType.F32: (torch.float32, np.float32),
                    gguf.GGMLQuantizationType.F16: (torch.float16, np.float16),
                    gguf.GGMLQuantizationType.BF16: (torch.bfloat16, np.uint16)}
        for name, _, t, qtype in entries:
            np_dtype = np.dtype(numpy_of[qtype][1])
            writer.add_tensor_info(name, tuple(t.shape), np_dtype, t.numel() * np_dtype.itemsize, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, hf_name, t, qtype in entries:  # one tensor converted (a layer's experts stacked) at a time
            t = _gguf_tensor(hf_name, t() if callable(t) else t, config, arch)
            torch_dtype = numpy_of[qtype][0]
            t = t.detach().to("cpu", torch_dtype).contiguous()
            array = t.view(torch.int16).numpy().view(np.uint16) if torch_dtype == torch.bfloat16 else t.numpy()
            writer.write_tensor_data(array)
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return output


@attrs.frozen
class _Stack:
    """One layer's experts' tensors of one projection, stacked into ``[experts, out, in]`` when called."""

    parts: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    def numel(self) -> int:
        return len(self.parts) * self.parts[0].numel()

    def __call__(self) -> torch.Tensor:
        return torch.stack(self.parts)


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def _stacked_experts(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | _Stack]:
    """``flat`` with each layer's per-expert weights (``...experts.{e}.{proj}.weight``) as one :class:`_Stack`
    under the merged name llama.cpp's converter maps (``...experts.{proj}.weight``), in expert order."""
    out: dict[str, Any] = {}
    for name, tensor in flat.items():
        match = _EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        merged = f"{match[1]}.{match[3]}.weight"
        out.setdefault(merged, {})[int(match[2])] = tensor
    return {name: _Stack(tuple(t[e] for e in sorted(t))) if isinstance(t, dict) else t for name, t in out.items()}


def _add_gguf_hparams(writer, config, arch: LlamaCppArch) -> None:
    """The model's shape and behaviour as the ``{arch}.*`` metadata keys llama.cpp reads."""
    import gguf

    rotary = config.rotary
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(rotary.dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    scaling = rotary.scaling_dict
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if scaling.get("rope_type") == "longrope":  # the factors are tensors (_gguf_extra_tensors)
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_attn_factors(float(scaling["attention_factor"]))
    windows = [w for w in config.layer_windows if w is not None]
    if arch.windows and windows:
        writer.add_sliding_window(windows[0])
        writer.add_sliding_window_pattern([w is not None for w in config.layer_windows])
        local = next(r for r, w in zip(config.layer_rotary, config.layer_windows) if w is not None)
        writer.add_rope_freq_base_swa(local.theta)
    if arch.softcap:
        writer.add_attn_logit_softcapping(config.attn_softcap)
        writer.add_final_logit_softcapping(config.final_softcap)
    if config.moe is not None:
        writer.add_expert_count(config.moe.num_experts)
        writer.add_expert_used_count(config.moe.top_k)
        writer.add_expert_feed_forward_length(config.moe.intermediate_size)


def _gguf_extra_tensors(config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp reads that the checkpoint does not hold: RoPE frequency factors (f32)."""
    import gguf

    scaling = config.rotary.scaling_dict
    if scaling.get("rope_type") == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(config)}
    if scaling.get("rope_type") == "longrope":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight":
                torch.tensor(scaling["long_factor"], dtype=torch.float32),
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight":
                torch.tensor(scaling["short_factor"], dtype=torch.float32)}
    return {}


def _gguf_tensor(hf_name: str, tensor: torch.Tensor, config, arch: LlamaCppArch) -> torch.Tensor:
    """A checkpoint tensor as llama.cpp computes with it: norm scales with ``norm_offset`` added (Gemma stores
    ``scale - 1``), Q/K in the pairwise rotary layout for ``pairwise_rope`` graphs."""
    if config.norm_offset and hf_name.endswith("norm.weight"):
        return tensor.float() + config.norm_offset
    if arch.pairwise_rope and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return llama_permute(tensor, config.num_heads)
    if arch.pairwise_rope and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return llama_permute(tensor, config.num_kv_heads)
    return tensor


# ------------------------------------------------------------------------------------- gguf tokenizer


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's convert script treats as control tokens even when not marked special."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


# Pre-tokenizer split regexes of tokenizer.json files -> llama.cpp's tokenizer.ggml.pre names.
_SPLIT_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_REGEXES = {
    _SPLIT_HEAD + r"\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",  # Llama 3 (digits in groups of up to 3)
    _SPLIT_HEAD + r"\p{N}" + _SPLIT_TAIL: "qwen2",  # Qwen2, Qwen2.5, Qwen3 (single digits)
}


def _bpe_pre(tokenizer_json: Mapping[str, Any], source: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, read from its ``pre_tokenizer``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in items if p.get("type") == "Split"]
    byte_level_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in items)
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in items)
    if len(regexes) == 1 and regexes[0] in _PRE_REGEXES and not byte_level_regex:
        return _PRE_REGEXES[regexes[0]]
    if not regexes and byte_level_regex:
        return "smollm" if digits else "gpt-2"
    warnings.warn(f"{source}: pre-tokenizer not recognised; GGUF tokenizer.ggml.pre = 'default' (llama.cpp may "
                  "split text differently from the original tokenizer)", stacklevel=3)
    return "default"


class GGUFVocab:
    """The tokenizer as GGUF metadata: ``model`` ("gpt2" or "llama"), tokens, types, scores or merges, ids."""

    def __init__(self, model: str, pre: str, tokens: list[str], types: list[int], *,
                 scores: list[float] | None = None, merges: list[str] | None = None,
                 unk_id: int | None = None, tokenizer=None):
        self.model, self.pre, self.tokens, self.types = model, pre, tokens, types
        self.scores, self.merges, self.unk_id = scores, merges, unk_id
        self.tokenizer = tokenizer

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        # Special ids, add-bos/eos and the template come from ft-prog's tokenizer, not gguf.SpecialVocab, so that
        # llama.cpp tokenizes as ft-prog does: SpecialVocab takes config.json's ids where the tokenizer has none (a
        # bos for tokenizers without one; a tiktoken tokenizer.model gets only those), finds no unk without a
        # tokenizer.json, writes add_bos/add_eos only when tokenizer_config.json sets them, and prefers
        # tokenizer_config.json's chat template to chat_template.jinja.
        tok = self.tokenizer
        for kind, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", self.unk_id)):
            if token_id is not None and 0 <= token_id < len(self.tokens):
                getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(tok.add_bos_token)
        writer.add_add_eos_token(tok.add_eos_token)
        if tok.chat_template is not None:
            writer.add_chat_template(tok.chat_template)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{file}: not valid JSON ({e})") from None


def _config_added(folder: Path) -> dict[int, tuple[str, bool]]:
    added = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
    return {int(i): (t["content"], bool(t.get("special", True))) for i, t in added.items()}


def _fill(size: int, known: Mapping[int, tuple[str, int]], source: Path) -> tuple[list[str], list[int]]:
    """Token texts and types for ids ``0..size-1``; unknown ids become ``[PAD<id>]`` (UNUSED)."""
    too_big = [i for i in known if i >= size]
    if too_big:
        raise ExportError(f"{source}: the tokenizer has token id {max(too_big)}, but the model's vocab_size is "
                          f"{size}; is this tokenizer for this model?")
    tokens, types = [], []
    for i in range(size):
        text, kind = known.get(i, (f"[PAD{i}]", 5))  # gguf.TokenType.UNUSED
        tokens.append(text)
        types.append(kind)
    return tokens, types


def gguf_vocab(folder: str | os.PathLike, vocab_size: int) -> GGUFVocab:
    """Read the tokenizer of ``folder`` into GGUF form, in the order llama.cpp's convert script tries them:

    a sentencepiece ``tokenizer.model`` ("llama" model: pieces, scores, types), a byte-level BPE
    ``tokenizer.json`` ("gpt2": tokens, merges), a Llama 3 tiktoken ``tokenizer.model`` ("gpt2",
    merges rebuilt from the ranks). Special ids, add-bos/eos and the chat template come from
    :func:`ftprog.core.load_tokenizer`.
    """
    import gguf

    folder = Path(folder)
    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError as e:
        raise ExportError(f"GGUF export needs the model's tokenizer (tokenizer.json or tokenizer.model) in "
                          f"{folder}: {e}") from None
    T = gguf.TokenType
    config_added = _config_added(folder)
    spm = folder / "tokenizer.model"
    if spm.is_file():
        proto = _sentencepiece_proto(spm.read_bytes())
        if proto is not None:
            known: dict[int, tuple[str, int]] = {}
            scores = [-1000.0] * vocab_size
            unk_id = None
            for i, piece in enumerate(proto.pieces):
                if i < vocab_size:
                    known[i] = (piece.piece, int(piece.type))  # sentencepiece's type numbers are GGUF's
                    scores[i] = piece.score
                    if piece.type == T.UNKNOWN:
                        unk_id = i
            for i, (content, special) in sorted(config_added.items()):
                if i < vocab_size:
                    kind = T.CONTROL if special or _looks_special(content) else T.USER_DEFINED
                    known[i] = (content if kind == T.CONTROL else content.replace("▁", " "), int(kind))
                    scores[i] = -1000.0
            tokens, types = _fill(vocab_size, known, spm)
            for i in range(len(proto.pieces), vocab_size):
                scores[i] = -1000.0
            return GGUFVocab("llama", "default", tokens, types, scores=scores, unk_id=unk_id, tokenizer=tokenizer)
    tj_file = folder / "tokenizer.json"
    if tj_file.is_file():
        tj = _read_json(tj_file)
        model = tj.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            hint = " with byte_fallback (sentencepiece-style): add its tokenizer.model" \
                if model.get("byte_fallback") else ""
            raise ExportError(f"{tj_file}: GGUF export reads byte-level BPE tokenizer.json files (Llama 3, Qwen, "
                              f"SmolLM); this one is {model.get('type')!r}{hint}")
        known = {i: (t, int(T.NORMAL)) for t, i in model["vocab"].items()}
        for t in tj.get("added_tokens") or []:
            special = t.get("special", False) or _looks_special(t["content"])
            known[t["id"]] = (t["content"], int(T.CONTROL if special else T.USER_DEFINED))
        for i, (content, special) in config_added.items():
            if i not in known or known[i][1] == T.NORMAL and known[i][0] != content:
                known[i] = (content, int(T.CONTROL if special or _looks_special(content) else T.USER_DEFINED))
        tokens, types = _fill(vocab_size, known, tj_file)
        merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m)
                  for m in model.get("merges") or []]
        # Without merges every token is one byte: how text is split first cannot matter.
        pre = _bpe_pre(tj, tj_file) if merges else "default"
        if not merges:
            # llama.cpp refuses a gpt2 vocabulary without a merges key, and the gguf package cannot write an empty
            # list: write one merge of two NUL bytes, whose result is no token, so it never changes a tokenization.
            nul = gguf.bytes_to_unicode()[0]
            if nul * 2 in model["vocab"]:
                raise ExportError(f"{tj_file}: a BPE vocabulary without merges cannot be written to GGUF")
            merges = [f"{nul} {nul}"]
        return GGUFVocab("gpt2", pre, tokens, types, merges=merges, tokenizer=tokenizer)
    if spm.is_file():  # tiktoken ranks (Meta's Llama 3 "original" tokenizer.model)
        from ..core._tokenizer import LLAMA3_SPECIAL_TOKENS, _read_tiktoken_ranks

        ranks = _read_tiktoken_ranks(spm, spm.read_bytes())
        table = gguf.bytes_to_unicode()  # GPT-2's byte -> printable character table
        text = lambda b: "".join(table[x] for x in b)  # noqa: E731
        known = {rank: (text(token), int(T.NORMAL)) for token, rank in ranks.items()}
        n = len(ranks)
        added = {n + i: (t, True) for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)} | config_added
        known |= {i: (content, int(T.CONTROL if special or _looks_special(content) else T.USER_DEFINED))
                  for i, (content, special) in added.items()}
        tokens, types = _fill(vocab_size, known, spm)
        merges = []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) > 1:
                parts = _bpe_parts(ranks, token, rank)
                if len(parts) != 2:
                    raise ExportError(f"{spm}: token of rank {rank} is not the merge of two earlier tokens")
                merges.append(f"{text(parts[0])} {text(parts[1])}")
        return GGUFVocab("gpt2", "llama-bpe", tokens, types, merges=merges, tokenizer=tokenizer)
    raise ExportError(f"GGUF export needs tokenizer.json or tokenizer.model in {folder}")


def _sentencepiece_proto(data: bytes):
    """The parsed sentencepiece ModelProto, or None if ``data`` is not one (e.g. tiktoken ranks)."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError):
        return None
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto.FromString(data)


def _bpe_parts(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merges of ``token`` using only ranks below ``max_rank`` (its last merge left undone)."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            return parts
        parts = [*parts[:best], parts[best] + parts[best + 1], *parts[best + 2:]]


# ---------------------------------------------------------------------------------------------- executorch


class ExportModule(torch.nn.Module):
    """``forward(tokens [1, seq]) -> logits [1, seq, vocab]`` of a plain model, as an ``nn.Module`` for torch.export.

    The parameter tree is registered as buffers (``model__layers__0__...``) and the pure forward is
    called on them. The forward passes an all-ones attention mask so that no Python branch depends
    on the (symbolic) sequence length.
    """

    def __init__(self, model: Model):
        super().__init__()
        flat = flatten(model.params)
        if any(not is_plain(t) for t in flat.values()) or any(".lora_" in p for p in flat):
            raise ExportError("ExportModule needs a plain model: merge adapters and dequantize first (load_merged)")
        self._forward = model.forward
        self._names = list(flat)
        for name, tensor in flat.items():
            self.register_buffer(name.replace(".", "__"), tensor.detach())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        params = unflatten({name: getattr(self, name.replace(".", "__")) for name in self._names})
        return self._forward(params, tokens, attention_mask=torch.ones_like(tokens))


def export_program(model: Model, *, max_seq_len: int | None = None, example_len: int = 8):
    """``torch.export`` the model's forward with a dynamic sequence length in ``[2, max_seq_len]`` (batch 1)."""
    limit = max_seq_len or model.config.max_position_embeddings
    if not 2 <= limit <= model.config.max_position_embeddings:
        raise ExportError(f"max_seq_len must be in [2, {model.config.max_position_embeddings}], got {limit}")
    example_len = max(2, min(example_len, limit))
    module = ExportModule(model).eval()
    example = torch.zeros(1, example_len, dtype=torch.long, device=model.device)
    seq = torch.export.Dim("seq", min=2, max=limit)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({1: seq},), strict=False)


def executorch_available() -> bool:
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        return False
    return True


def export_executorch(model: Model, output: Path, *, max_seq_len: int | None = None) -> Path:
    """Write ``output.with_suffix('.pt2')`` (torch.export.save) and, with executorch installed, the ``.pte``."""
    program = export_program(model, max_seq_len=max_seq_len)
    output.parent.mkdir(parents=True, exist_ok=True)
    pt2 = output.with_suffix(".pt2")
    _atomic_write(pt2, lambda f: torch.export.save(program, f))
    if not executorch_available():
        warnings.warn(f"the executorch package is not installed, so no .pte was written; the exported program is in "
                      f"{pt2}. Install it with `pip install ft-prog[executorch]` (or `pip install executorch`) and "
                      "export again to get the ExecuTorch program.", stacklevel=2)
        return pt2
    from executorch.exir import to_edge_transform_and_lower

    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners = [XnnpackPartitioner()]
    except ImportError:
        partitioners = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lowered = to_edge_transform_and_lower(program, partitioner=partitioners).to_executorch()
    _atomic_write(output, lambda f: f.write(lowered.buffer))
    return output


def _atomic_write(target: Path, write: Callable[[Any], Any]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
