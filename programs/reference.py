"""Reference log-probabilities computed once before training (``ref.precompute = true`` of `ft-prog run dpo`).

The frozen reference model scores every pair of the training and validation data once, the table is written
to ``output_dir/reference/logps.safetensors`` (with the data fingerprint and the reference model's path, so a
run with other data or another reference never reuses it), and the model is freed: full-fine-tuning DPO then
holds one model. The table is saved as it fills (every minute), so an interrupted precompute resumes where it
stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core import Model, token_logprobs
from . import distributed

FILE = Path("reference") / "logps.safetensors"
SAVE_SECONDS = 60.0


@attrs.frozen(eq=False)
class ReferenceTable:
    """``{split: [pairs, 2]}`` fp32 summed reference log-probs (chosen, rejected) by dataset index."""

    logps: dict[str, torch.Tensor]

    def lookup(self, batch: Any, split: str = "train") -> torch.Tensor:
        """``[2 * pairs]`` of this batch's rows (its chosen rows, then its rejected rows)."""
        rows = self.logps[split][batch.indices]
        return torch.cat([rows[:, 0], rows[:, 1]]).to(batch.tokens.device)


def precompute(ref: Model, datasets: dict[str, Any], out: Path, fingerprint: str, ref_path: str, batch_size: int,
               device: torch.device, dist: distributed.DistInfo, say=print) -> ReferenceTable:
    """The reference log-probs of every pair of ``datasets`` (``{"train": ..., "val": ...}``), read from
    ``out/reference`` when a matching (same data, same reference) table is there, else computed (continuing a
    partial one) and written. Every rank calls it; each scores its share of the pairs."""
    from ..core._data import PreferenceLoader

    file = out / FILE
    meta = {"fingerprint": fingerprint, "reference": str(ref_path)}
    tables, done = _read(file, meta, {k: len(v) for k, v in datasets.items()})
    todo = sum(int((~d).sum()) for d in done.values())
    if todo:
        say(f"reference: scoring {todo} pairs once with the frozen reference ({ref_path}); saved to {file}",
            flush=True)
    last_save = time.monotonic()
    for split, data in datasets.items():
        loader = PreferenceLoader(data, batch_size, shuffle=False, rank=dist.rank, world_size=dist.world_size)
        for index in range(loader.num_batches()):
            batch = loader.batch(0, index)
            if bool(done[split][batch.global_indices].all()):
                continue
            batch = batch.to(device)
            with torch.no_grad():
                logps = token_logprobs(ref, batch.tokens, batch.targets, attention_mask=batch.attention_mask,
                                       training=False).sum(-1).float().cpu()
            n = len(batch.indices)
            mine = torch.zeros(len(data), 2)
            mine[batch.indices, 0], mine[batch.indices, 1] = logps[:n], logps[n:]
            tables[split][batch.global_indices] = distributed.all_sum(mine)[batch.global_indices]
            done[split][batch.global_indices] = True
            if dist.is_main and time.monotonic() - last_save >= SAVE_SECONDS:
                _write(file, tables, done, meta)
                last_save = time.monotonic()
    if todo and dist.is_main:
        _write(file, tables, done, meta)
    distributed.barrier()
    return ReferenceTable(tables)


def _read(file: Path, meta: dict[str, str], sizes: dict[str, int]
          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The saved tables and done masks when ``file`` matches ``meta`` and ``sizes``, else empty ones."""
    tables = {k: torch.zeros(n, 2) for k, n in sizes.items()}
    done = {k: torch.zeros(n, dtype=torch.bool) for k, n in sizes.items()}
    try:
        with safe_open(str(file), "pt") as f:
            if f.metadata() != meta:
                return tables, done
            for split, n in sizes.items():
                saved, mask = f.get_tensor(f"{split}.logps"), f.get_tensor(f"{split}.done")
                if saved.shape != (n, 2):
                    return {k: torch.zeros(m, 2) for k, m in sizes.items()}, {
                        k: torch.zeros(m, dtype=torch.bool) for k, m in sizes.items()}
                tables[split], done[split] = saved.clone(), mask.clone()
    except (OSError, SafetensorError):
        pass  # none yet, or a torn write: computed again
    return tables, done


def _write(file: Path, tables: dict[str, torch.Tensor], done: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    flat = {f"{k}.logps": v.contiguous() for k, v in tables.items()}
    flat.update({f"{k}.done": v.contiguous() for k, v in done.items()})
    save_file(flat, str(tmp), metadata=meta)
    tmp.replace(file)
