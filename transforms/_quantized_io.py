"""Quantized checkpoints: a quantized model (:func:`ftprog.transforms.quantize`) as a folder, and back.

On-disk format, never pickled:

- ``config.json``: the model's Hugging Face config (``dtype`` = the compute dtype) and the
  tokenizer files of the source folder, as :func:`ftprog.core.save_pretrained` writes them.
- ``model-quantized.safetensors``: every unquantized tensor under its Hugging Face name, and each
  quantized weight as plain component tensors named ``<weight name>.<component>``:

  ======  ===============================================================================
  int8    ``qdata`` int8 ``[out, in]``, ``scale`` fp32 ``[out, 1]``, ``zero_point`` int8 ``[out, 1]``
  int4    ``qdata_packed`` uint8 ``[out, in / 2]`` (two's-complement nibbles, the low nibble holds
          the even column), ``scale`` ``[out, in / group]`` and ``zero_point`` int8 ``[out, in / group]``
          (also ``int4-weight`` and ``int8-dynamic-act-int4-weight``: its per-token input quantization
          is the weight's ``activation_quantization`` parameter)
  int8-weight  ``qdata`` int8 ``[out, in]``, ``scale`` and ``zero_point`` int8 ``[out, in / group]``
  nf4     ``quantized_data`` uint8 (two codes a byte), ``quantized_scalers`` int8,
          ``quantization_factor``, ``scaler_mean``, ``nf4`` (the 16-entry code book)
  ======  ===============================================================================

  The weights file is deliberately not named ``model.safetensors``: transformers (which would fill
  the missing plain weights with random values) and :func:`ftprog.core.load_pretrained` refuse the
  folder instead of misreading it.
- ``ft-prog-quantization.json``: format name and version, scheme, dtype, group/block sizes, the
  torchao version, and for every quantized weight its shape and per-tensor parameters.

:func:`load_quantized` rebuilds the torchao tensors from those components, bit-identical to the
in-memory quantized model, so ``generate`` and ``eval`` run on them directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core import (
    CheckpointError, Model, as_dtype, flatten, is_quantized, make_model, param_shapes, read_config, unflatten,
)
from ..core._checkpoint import atomic_folder, copy_tokenizer_files


QUANT_FILE = "ft-prog-quantization.json"
WEIGHTS_FILE = "model-quantized.safetensors"
FORMAT = "ft-prog-quantized"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ components


def _pack_int4(q: torch.Tensor, name: str) -> torch.Tensor:
    """int8 values in [-8, 7], ``[..., n]`` (n even) -> uint8 ``[..., n / 2]``."""
    if q.shape[-1] % 2:
        raise ValueError(f"{name}: int4 packing needs an even number of columns, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"{name}: int4 data outside [-8, 7]")
    nibbles = (q.to(torch.int16) & 0x0F).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(q >= 8, q - 16, q)


def _scheme_of(tensor: torch.Tensor) -> str:
    name = type(tensor).__name__
    if name == "NF4Tensor":
        return "nf4"
    if name == "Int8Tensor":
        return "int8"
    if name == "IntxUnpackedToInt8Tensor" and getattr(tensor, "target_dtype", None) in (torch.int4, torch.int8):
        return "int4" if tensor.target_dtype == torch.int4 else "int8-weight"
    raise ValueError(f"cannot save a weight of type {type(tensor).__module__}.{name}: ft-prog saves the "
                     "torchao tensors that ftprog.transforms.quantize makes (int8, int4, nf4, grouped int4/int8)")


def _components(path: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The plain tensors and JSON parameters that rebuild the quantized ``tensor`` (see the module docstring)."""
    scheme = _scheme_of(tensor)
    meta: dict[str, Any] = {"scheme": scheme, "shape": list(tensor.shape),
                            "dtype": str(tensor.dtype).removeprefix("torch.")}
    if scheme == "int8":
        if tensor.act_quant_kwargs is not None or tensor.act_quant_scale is not None:
            raise ValueError(f"{path}: int8 with activation quantization is not a weight-only tensor")
        parts = {"qdata": tensor.qdata, "scale": tensor.scale}
        if tensor.zero_point is not None:
            parts["zero_point"] = tensor.zero_point
        meta["block_size"] = [int(b) for b in tensor.block_size]
    elif scheme in ("int4", "int8-weight"):
        data = {"qdata_packed": _pack_int4(tensor.qdata, path)} if scheme == "int4" else {"qdata": tensor.qdata}
        parts = {**data, "scale": tensor.scale, "zero_point": tensor.zero_point}
        meta["block_size"] = [int(b) for b in tensor.block_size]
        if tensor.activation_quantization is not None:
            meta["activation_quantization"] = str(tensor.activation_quantization)
    else:
        parts = {name: getattr(tensor, name) for name in ("quantized_data", "quantized_scalers",
                                                           "quantization_factor", "scaler_mean", "nf4")}
        meta.update(block_size=int(tensor.block_size), n_blocks=int(tensor.n_blocks),
                    scaler_block_size=int(tensor.scaler_block_size))
    return {k: v.detach().contiguous().cpu() for k, v in parts.items()}, meta


def _rebuild(path: str, meta: Mapping[str, Any], parts: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """The torchao tensor of one quantized weight, from its components (on their device)."""
    scheme = meta.get("scheme")
    shape = tuple(meta.get("shape") or ())
    dtype = as_dtype(meta.get("dtype"))

    def need(name: str, kind: torch.dtype | None = None, want: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in parts:
            raise CheckpointError(f"{source}: tensor {path + '.' + name!r} is missing ({scheme} weight {path!r})")
        t = parts[name]
        if (kind is not None and t.dtype != kind) or (want is not None and tuple(t.shape) != want):
            raise CheckpointError(f"{source}: tensor {path + '.' + name!r} is {t.dtype} {tuple(t.shape)}, "
                                  f"expected {kind} {want}")
        return t

    if len(shape) != 2:
        raise CheckpointError(f"{source}: {QUANT_FILE} gives {path!r} the shape {shape}; a linear weight is 2-D")
    out_features, in_features = shape
    if scheme == "int8":
        from torchao.quantization import Int8Tensor

        qdata = need("qdata", torch.int8, shape)
        zero_point = parts.get("zero_point")
        return Int8Tensor(qdata, need("scale"), list(meta["block_size"]), dtype, zero_point=zero_point)
    if scheme in ("int4", "int8-weight"):
        from torchao.quantization import IntxUnpackedToInt8Tensor

        if scheme == "int4":
            qdata = _unpack_int4(need("qdata_packed", torch.uint8, (out_features, in_features // 2)))
        else:
            qdata = need("qdata", torch.int8, shape)
        return IntxUnpackedToInt8Tensor(qdata, need("scale"), need("zero_point", torch.int8),
                                        torch.int4 if scheme == "int4" else torch.int8, tuple(meta["block_size"]),
                                        dtype, meta.get("activation_quantization"))
    if scheme == "nf4":
        from torchao.quantization import NF4Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

        data = need("quantized_data", torch.uint8, (out_features * in_features // 2,))
        tensor_meta = SubclassTensorArgs(torch.Size(shape), (in_features, 1), 0, dtype, data.device, False)
        return NF4Tensor(tensor_meta, int(meta["block_size"]), int(meta["n_blocks"]),
                         int(meta["scaler_block_size"]), need("quantized_scalers", torch.int8),
                         need("quantization_factor"), need("scaler_mean"), data, need("nf4"))
    raise CheckpointError(f"{source}: unknown quantization scheme {scheme!r} for {path!r}")


# ------------------------------------------------------------------------------------------ save / load


def save_quantized(model: Model, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a quantized ``model`` (:func:`ftprog.transforms.quantize`) as a folder :func:`load_quantized` reads.

    Atomic like :func:`ftprog.core.save_pretrained`: the folder is filled under a temporary name and
    swapped in whole. ``extra`` (JSON-able) is stored under ``"extra"`` in ``ft-prog-quantization.json``.
    """
    from safetensors.torch import save_file
    import torchao

    flat = flatten(model.params)
    expected = param_shapes(model.config)
    unknown = [p for p in flat if p not in expected]
    if unknown:
        raise ValueError(f"save_quantized: the model holds non-checkpoint tensors such as {unknown[0]!r}: "
                         "merge adapters before quantizing")
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, Any]] = {}
    schemes = set()
    for name, tensor in flat.items():
        if not is_quantized(tensor):
            tensors[name] = tensor.detach().contiguous().cpu()
            continue
        parts, meta = _components(name, tensor)
        schemes.add(meta["scheme"])
        quantized[name] = meta
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
    if not quantized:
        raise ValueError("save_quantized: the model has no quantized weight; use ftprog.core.save_pretrained")
    if len(schemes) > 1:
        raise ValueError(f"save_quantized: the model mixes quantization schemes {sorted(schemes)}")
    scheme = schemes.pop()
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "scheme": scheme, "weights_file": WEIGHTS_FILE,
        "dtype": str(model.dtype).removeprefix("torch."), "torchao_version": torchao.__version__,
        **_scheme_parameters(scheme, quantized),
        "quantized": quantized,
        "unquantized_linears": sorted(p for p in flat if not is_quantized(flat[p]) and p.endswith("_proj.weight")),
        "extra": dict(extra or {}),
    }

    target = Path(path)
    with atomic_folder(target) as tmp:
        config = model.config.to_hf()
        config["dtype"] = config["torch_dtype"] = header["dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "ft-prog": FORMAT, "scheme": scheme})
        (tmp / QUANT_FILE).write_text(json.dumps(header, indent=2) + "\n")
        copy_tokenizer_files(model.source, tmp)
    return target


def _scheme_parameters(scheme: str, quantized: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    first = next(iter(quantized.values()))
    if scheme == "int8":
        return {"granularity": "per-row", "symmetric": True}
    if scheme in ("int4", "int8-weight"):
        packed = {"packed": "two int4 per uint8"} if scheme == "int4" else {}
        act = {"activation_quantization": first["activation_quantization"]} if "activation_quantization" in first else {}
        return {"group_size": first["block_size"][-1], "symmetric": True, **packed, **act}
    return {"block_size": first["block_size"], "scaler_block_size": first["scaler_block_size"]}


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder written by :func:`save_quantized` (it holds ``ft-prog-quantization.json``)."""
    return (Path(path) / QUANT_FILE).is_file()


def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None) -> Model:
    """Load a folder written by :func:`save_quantized` (or ``ft-prog run quantize``) into a :class:`Model`.

    The quantized weights come back as the torchao tensors the quantization made (bit-identical),
    so the model computes exactly what the in-memory quantized model did. Reads only JSON and
    safetensors (nothing is unpickled). Anything missing, unexpected or mis-shaped is an error
    naming the file and the tensor.

    Args:
        path: the quantized model folder.
        device: where the tensors go (default: CPU).

    Returns:
        A model whose quantized leaves are frozen (not trainable), as after ``transforms.quantize``.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    meta_file = folder / QUANT_FILE
    if not meta_file.is_file():
        if (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: no {QUANT_FILE}; this is not a quantized ft-prog checkpoint "
                                  "(load a plain Hugging Face folder with ftprog.core.load_pretrained)")
        raise FileNotFoundError(f"{folder}: no {QUANT_FILE}; not a quantized ft-prog checkpoint")
    try:
        header = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: format is {header.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(header.get("format_version"), int) or header["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format_version {header.get('format_version')!r} is newer than this "
                              f"ft-prog reads ({FORMAT_VERSION}); upgrade ft-prog")
    config = read_config(folder)
    expected = param_shapes(config)
    quantized: dict[str, Any] = header.get("quantized") or {}
    weights_name = header.get("weights_file", WEIGHTS_FILE)
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name:
        raise CheckpointError(f"{meta_file}: weights_file must be a file name in the folder, got {weights_name!r}")
    weights = folder / weights_name
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the weights file named in {QUANT_FILE} is missing")
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None

    def read(key: str) -> torch.Tensor:
        try:
            t = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights}: cannot read tensor {key!r} ({e})") from None
        return t.to(device) if device is not None else t

    flat: dict[str, torch.Tensor] = {}
    with handle:
        keys = set(handle.keys())
        used: set[str] = set()
        for name in quantized:
            if name not in expected:
                raise CheckpointError(f"{meta_file}: quantized weight {name!r} is not a tensor of model_type "
                                      f"{config.model_type!r}; is config.json for these weights?")
        for name, shape in expected.items():
            if name in quantized:
                meta = quantized[name]
                if tuple(meta.get("shape") or ()) != shape:
                    raise CheckpointError(f"{meta_file}: {name!r} has shape {meta.get('shape')}, config.json "
                                          f"implies {shape}")
                prefix = name + "."
                parts = {k[len(prefix):]: read(k) for k in keys if k.startswith(prefix)}
                used.update(prefix + k for k in parts)
                flat[name] = _rebuild(name, meta, parts, str(weights))
                continue
            if name not in keys:
                raise CheckpointError(f"{weights}: tensor {name!r} is missing; refusing to initialise it randomly")
            tensor = read(name)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json "
                                      f"implies {shape}")
            flat[name] = tensor
            used.add(name)
        unexpected = sorted(keys - used)
        if unexpected:
            raise CheckpointError(f"{weights}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    trainable = [n for n in expected if n not in quantized]
    return make_model(config, unflatten(flat), source=str(folder.resolve()), trainable=trainable)
