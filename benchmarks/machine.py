"""A description of the machine a benchmark ran on (without importing torch in the caller)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or "unknown"}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "model" not in info:
            info["model"] = value.strip()
        if key == "flags" and "flags" not in info:
            flags = set(value.split())
            info["flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                                     if f in flags)
    return info


def _meminfo() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe(python: str = sys.executable) -> dict:
    """CPU model and flags, cores, memory, load, OS, Python, and (from a subprocess) torch and friends."""
    cpu = _cpuinfo()
    out = {
        "cpu": cpu.get("model", "unknown"),
        "cpu_flags": cpu.get("flags", ""),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _meminfo(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    probe = (
        "import json, torch\n"
        "d = {'torch': torch.__version__, 'threads_default': torch.get_num_threads(),\n"
        "     'cuda': torch.cuda.is_available()}\n"
        "if d['cuda']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda_version=torch.version.cuda)\n"
        "for name in ('transformers', 'peft', 'torchao'):\n"
        "    try:\n"
        "        d[name] = __import__('importlib.metadata', fromlist=['x']).version(name)\n"
        "    except Exception:\n"
        "        d[name] = None\n"
        "print(json.dumps(d))\n"
    )
    try:
        res = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
        import json

        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    except Exception as e:  # noqa: BLE001 - a description never fails the run
        out["probe_error"] = repr(e)
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=root,
                               timeout=10).stdout.strip()
        out["git"] = commit + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        out["git"] = None
    return out
