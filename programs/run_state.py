"""Resumable training checkpoints: ``output_dir/step_N/`` written atomically.

A checkpoint folder holds:

- ``model/``: the trained weights: a Hugging Face folder for full fine-tuning,
  a PEFT adapter folder for LoRA / DoRA / QLoRA;
- ``optimizer.safetensors``: the optimizer state (fp32 moments and step);
- ``rng_<rank>.safetensors``: each process's CPU (and CUDA) generator states;
- ``state.json``: step, data-loader position, tokens seen, and the metrics so far;
- ``config.toml``: the resolved config of the run.

The folder is filled under a temporary name and renamed when complete, so a
``step_N`` folder that exists is whole; older ones beyond ``keep_last`` are
removed only afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ftprog.core import Model, flatten, load_pretrained, save_pretrained, unflatten
from ftprog.core._checkpoint import _replace_dir
from ftprog.programs import distributed
from ftprog.transforms import load_adapter, save_adapter

_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_model(model: Model, folder: Path) -> None:
    """The trained part of ``model``: its adapter if it has one, else the whole HF model."""
    if model.decoder.adapter is not None:
        save_adapter(model, folder)
    else:
        save_pretrained(model, folder)


def consolidate(model: Model) -> Model:
    """``model`` with sharded (DTensor) leaves gathered to plain tensors (a collective: every rank calls it)."""
    flat = flatten(model.params)
    if not any(_is_dtensor(t) for t in flat.values()):
        return model
    full = {p: t.full_tensor() if _is_dtensor(t) else t for p, t in flat.items()}
    return model.replace(params=unflatten(full), forward=model.decoder)


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_checkpoint(output_dir: Path, step: int, model: Model, optimizer_state: dict[str, torch.Tensor],
                    state: dict[str, Any], config_toml: str, keep_last: int) -> Path:
    """Write ``output_dir/step_{step}`` atomically, then prune to the newest ``keep_last``.

    Under torchrun every rank calls it: sharded weights and optimizer state are
    gathered (so any number of processes can resume), each rank writes its RNG
    state, and rank 0 writes the rest and renames the folder into place.
    """
    model = consolidate(model)
    optimizer_state = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in optimizer_state.items()}
    rank = _rank()
    target = output_dir / f"step_{step}"
    tmp = output_dir / f".step_{step}.tmp"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    error = None
    try:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / f"rng_{rank}.safetensors"))
        distributed.barrier()
        if rank == 0:
            save_model(model, tmp / "model")
            save_file({k: v.contiguous() for k, v in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state))
            (tmp / "config.toml").write_text(config_toml)
            _replace_dir(tmp, target)
    except Exception as e:  # KeyboardInterrupt / SystemExit pass through
        error = e
    if distributed.any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoints(output_dir)
        reason = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
        raise RuntimeError(f"could not save checkpoint {target} ({reason}); the earlier checkpoint "
                           f"{kept[-1] if kept else '(none)'} is untouched") from error
    if rank == 0:
        for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return target


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``step_N`` folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(folder: Path, model: Model, base: Model) -> tuple[Model, dict[str, torch.Tensor], dict]:
    """``(model, optimizer_state, state)`` from a checkpoint; restores the RNG states too.

    ``model`` is the model as the program built it (all transforms applied);
    ``base`` the same before adapters were added. The checkpoint's trained
    leaves (adapter or full weights) replace ``model``'s, bit for bit.
    """
    if model.decoder.adapter is not None:
        saved = flatten(load_adapter(base, folder / "model").params)
    else:
        saved = flatten(load_pretrained(folder / "model", device=model.device).params)
    model = model.with_params({p: _like(saved[p].to(t.dtype), t) for p, t in model.trainable_params().items()})
    rank_file = folder / f"rng_{_rank()}.safetensors"
    rng = load_file(str(rank_file if rank_file.is_file() else folder / "rng_0.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    state = json.loads((folder / "state.json").read_text())
    return model, load_file(str(folder / "optimizer.safetensors")), state


def _like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` sharded as ``like`` is (when ``like`` is a DTensor), else as it is."""
    if not _is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, like.device_mesh, like.placements)
