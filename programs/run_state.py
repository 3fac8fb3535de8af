"""Resumable training checkpoints: ``output_dir/step_N/`` written atomically.

A checkpoint folder holds:

- ``model/``: the trained weights: a Hugging Face folder for full fine-tuning,
  a PEFT adapter folder for LoRA / DoRA / QLoRA;
- ``optimizer.safetensors``: the optimizer state (fp32 moments and step);
- ``rng.safetensors``: torch's CPU (and CUDA) generator states;
- ``state.json``: step, data-loader position, tokens seen, and the metrics so far;
- ``config.toml``: the resolved config of the run.

The folder is filled under a temporary name and renamed when complete, so a
``step_N`` folder that exists is whole; older ones beyond ``keep_last`` are
removed only afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ftprog.core import Model, flatten, load_pretrained, save_pretrained
from ftprog.core._checkpoint import _replace_dir
from ftprog.transforms import load_adapter, save_adapter

_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_model(model: Model, folder: Path) -> None:
    """The trained part of ``model``: its adapter if it has one, else the whole HF model."""
    if model.decoder.adapter is not None:
        save_adapter(model, folder)
    else:
        save_pretrained(model, folder)


def save_checkpoint(output_dir: Path, step: int, model: Model, optimizer_state: dict[str, torch.Tensor],
                    state: dict[str, Any], config_toml: str, keep_last: int) -> Path:
    """Write ``output_dir/step_{step}`` atomically, then prune to the newest ``keep_last``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step}.tmp-", dir=output_dir))
    try:
        save_model(model, tmp / "model")
        save_file({k: v.contiguous() for k, v in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "config.toml").write_text(config_toml)
        _replace_dir(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
            raise
        kept = checkpoints(output_dir)
        raise RuntimeError(f"could not save checkpoint {target} ({type(e).__name__}: {e}); the earlier checkpoint "
                           f"{kept[-1] if kept else '(none)'} is untouched") from e
    for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
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
    model = model.with_params({p: saved[p].to(t.dtype) for p, t in model.trainable_params().items()})
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    state = json.loads((folder / "state.json").read_text())
    return model, load_file(str(folder / "optimizer.safetensors")), state


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
