"""`ft-prog run quantize`: post-training weight-only quantization (int8, int4, nf4) to a loadable folder.

Read it top to bottom: load the model (a base, merged or fine-tuned Hugging Face folder; with
``adapter=PATH`` the PEFT adapter is merged first), cast it to ``dtype``, measure its perplexity on
``eval_text`` (:func:`ftprog.core.perplexity`, as ``run eval`` does), quantize every linear but
``lm_head`` with :func:`ftprog.transforms.quantize`, save the quantized folder, load it back and
measure again. Sizes and perplexities before and after are printed and written to
``quantize_report.json`` in the output folder.

Schemes (torchao, see :func:`ftprog.transforms.quantize`): ``int8`` (symmetric per-row),
``int4`` (symmetric, groups of 32 input features; the ``IntxWeightOnlyConfig`` variant that runs on
CPU), ``nf4`` (4-bit NormalFloat, block 64, double-quantized scalers in blocks of 256), and the
schemes quantization-aware training trains for (``qat.scheme`` of sft), in groups of ``group_size``:
``int4-weight``, ``int8-weight``, ``int8-dynamic-act-int4-weight`` (int8 inputs per token too). A model
trained with ``qat`` carries ``ft-prog-qat.json``: quantizing it with another scheme or group size is
refused, since the result would not be the model it trained for.

The output folder is a quantized checkpoint (:func:`ftprog.transforms.save_quantized`: config.json,
``model-quantized.safetensors`` with the torchao components, ``ft-prog-quantization.json``) that
:func:`ftprog.transforms.load_quantized` reads back, bit-identical, so ``generate`` and ``eval`` run on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from ..core import (
    ConfigError, Model, as_dtype, flatten, is_plain, is_quantized, load_pretrained, load_tokenizer, perplexity, read_config,
)
from ..transforms import is_quantized_checkpoint, load_quantized, save_quantized
from .config import in_range
from .demo_assets import resolve
from .run_guard import check_output
from .sft_config import ModelSection

REPORT_FILE = "quantize_report.json"


@attrs.frozen
class QuantizeConfig:
    model: ModelSection = ModelSection()
    adapter: str = ""
    """A PEFT adapter folder merged into the model before quantizing (empty: none)."""
    scheme: Literal["int8", "int4", "nf4", "int4-weight", "int8-weight", "int8-dynamic-act-int4-weight"] = "int8"
    group_size: int = attrs.field(default=32, validator=in_range(0))
    """Input features per scale for int4-weight, int8-weight and int8-dynamic-act-int4-weight (0: per row)."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """Dtype of the model before quantization: of the unquantized tensors and of the computation."""
    output_dir: str = "runs/quantize"
    """The quantized model folder that is written; never the model's own folder."""
    overwrite: bool = False
    """Replace an existing, non-empty ``output_dir`` (atomically: the old one goes once the new one is whole)."""
    eval_text: str = ""
    """A UTF-8 text file whose perplexity is measured before and after (empty: no perplexity)."""
    max_length: int = attrs.field(default=512, validator=in_range(1))
    """Tokens per perplexity window (as ``run eval``'s max_length, see :func:`ftprog.core.perplexity`)."""
    stride: int = attrs.field(default=0, validator=in_range(0))
    """Perplexity windows start this many tokens apart, < max_length (0: max_length // 2), as ``run eval``'s."""
    skip_unsupported: bool = True
    """Leave weights whose shape the scheme cannot take (nf4: element count not divisible by 16384;
    int4: in_features not divisible by 32, the grouped schemes by group_size) unquantized, listed in the
    report; false: an error."""


CONFIG = QuantizeConfig


# ------------------------------------------------------------------------------------------ measuring


def _folder_weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _eval_ids(cfg: QuantizeConfig, model_path: str, max_positions: int) -> list[int] | None:
    if not cfg.eval_text:
        return None
    text_file = Path(cfg.eval_text)
    if not text_file.is_file():
        raise FileNotFoundError(f"eval_text {cfg.eval_text!r}: no such file")
    if cfg.max_length < 2 or cfg.max_length > max_positions:
        raise ValueError(f"max_length={cfg.max_length} must be in [2, {max_positions}] (the model's context)")
    if not 0 <= cfg.stride < cfg.max_length:
        raise ValueError(f"stride={cfg.stride} must be in [0, max_length - 1 = {cfg.max_length - 1}] "
                         "(0: max_length // 2)")
    tokenizer = load_tokenizer(model_path)
    ids = tokenizer.encode(text_file.read_text(encoding="utf-8"),
                           add_bos=tokenizer.add_bos_token and tokenizer.bos_id is not None)
    if len(ids) < 2:
        raise ValueError(f"eval_text {cfg.eval_text!r} has fewer than 2 tokens")
    return ids


# ------------------------------------------------------------------------------------------ the program


def quantized_model(cfg: QuantizeConfig, device: torch.device | None = None) -> tuple[Model, Model]:
    """``(float model, quantized model)``: loaded (adapter merged), cast to ``dtype``, quantized."""
    from ..transforms import load_adapter, merge, quantize

    model_path = resolve(cfg.model.path)
    if is_quantized_checkpoint(model_path):
        raise ValueError(f"model.path {model_path!r} is already quantized; quantize the float model")
    if cfg.adapter and not Path(cfg.adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {cfg.adapter!r} does not exist")
    _check_qat_record(cfg, [model_path, cfg.adapter])
    dtype = as_dtype(cfg.dtype)
    model = load_pretrained(model_path, dtype=dtype, device=device)
    if cfg.adapter:
        model = merge(load_adapter(model, cfg.adapter), dtype=dtype)
    return model, quantize(model, cfg.scheme, group_size=cfg.group_size, skip_unsupported=cfg.skip_unsupported)


def _check_qat_record(cfg: QuantizeConfig, folders: list[str]) -> None:
    """Refuse a scheme or group size other than the one a QAT-trained model (or adapter) trained for."""
    from ..transforms import read_qat_record

    for folder in filter(None, folders):
        trained = read_qat_record(folder)
        if trained is None:
            continue
        grouped = cfg.scheme in ("int4-weight", "int8-weight", "int8-dynamic-act-int4-weight")
        if cfg.scheme != trained["scheme"] or (grouped and cfg.group_size != trained["group_size"]):
            raise ConfigError(f"{Path(folder) / 'ft-prog-qat.json'}: this model was trained (qat) for "
                              f"scheme={trained['scheme']} group_size={trained['group_size']}; quantize it with "
                              f"those (got scheme={cfg.scheme} group_size={cfg.group_size})", key="scheme")


def run(cfg: QuantizeConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """Quantize, save, reload, measure; returns the report (also written to ``output_dir/quantize_report.json``)."""
    import warnings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.output_dir)
    model_path = resolve(cfg.model.path)

    # 1. Inputs and the output first: a missing text or adapter, or an output that would replace the model or
    # another folder, fails before any weights load.
    check_output(out, sources=[model_path, cfg.adapter], overwrite=cfg.overwrite)
    ids = _eval_ids(cfg, model_path, read_config(model_path).max_position_embeddings)

    # 2. The float model (adapter merged), and its quantized version.
    start = time.perf_counter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, qmodel = quantized_model(cfg, device)
    quantize_s = time.perf_counter() - start
    left = sorted(p for p, t in flatten(qmodel.params).items() if is_plain(t) and p.endswith("_proj.weight"))
    print(f"quantized {cfg.scheme}: {sum(is_quantized(t) for t in flatten(qmodel.params).values())} weights "
          f"in {quantize_s:.1f}s" + (f"; {len(left)} left in {cfg.dtype} (unsupported shapes)" if left else ""),
          flush=True)

    # 3. Save, and load back what was written: the numbers below are those of the files.
    save_quantized(qmodel, out, extra={"source": str(Path(model_path).resolve()),
                                       "adapter": str(Path(cfg.adapter).resolve()) if cfg.adapter else None})
    del qmodel
    loaded = load_quantized(out, device=device)

    from ..transforms import param_bytes

    report: dict[str, Any] = {
        "scheme": cfg.scheme, "group_size": cfg.group_size, "dtype": cfg.dtype, "output_dir": str(out),
        "source_disk_bytes": _folder_weight_bytes(Path(model_path)),
        "float_bytes": param_bytes(model),
        "quantized_disk_bytes": _folder_weight_bytes(out),
        "quantized_memory_bytes": param_bytes(loaded),
        "unquantized_linears": left,
        "config": resolved,
    }
    report["disk_ratio"] = report["quantized_disk_bytes"] / report["float_bytes"]
    mb = {k: report[k] / 1e6 for k in ("float_bytes", "source_disk_bytes", "quantized_disk_bytes",
                                        "quantized_memory_bytes")}
    print(f"size: {mb['float_bytes']:.2f} MB as {cfg.dtype} (source files {mb['source_disk_bytes']:.2f} MB) -> "
          f"{mb['quantized_disk_bytes']:.2f} MB on disk ({report['disk_ratio']:.3f}x), "
          f"{mb['quantized_memory_bytes']:.2f} MB in memory", flush=True)

    # 4. Perplexity before and after.
    if ids is not None:
        before, after = (perplexity(m, [ids], max_length=cfg.max_length, stride=cfg.stride or None)
                         for m in (model, loaded))
        delta = after["perplexity"] - before["perplexity"]
        report.update(eval_tokens=before["tokens"], perplexity_before=before["perplexity"],
                      perplexity_after=after["perplexity"], perplexity_delta=delta)
        print(f"perplexity on {cfg.eval_text} ({before['tokens']} tokens, windows of {cfg.max_length} tokens, "
              f"stride {before['stride']}): {before['perplexity']:.4f} -> {after['perplexity']:.4f} ({delta:+.4f})",
              flush=True)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}/ (load with ftprog.transforms.load_quantized)", flush=True)
    return report
