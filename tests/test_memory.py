"""Host memory: reuse_freed_memory (a freed block comes back without page faults; in a fresh process, it is
process-wide) and the malloc `ft-prog run` re-executes itself with (programs/host_memory.py)."""

import os
import platform
import subprocess
import sys
from pathlib import Path


PROBE = r"""
import resource, sys, torch
from ftprog.core import reuse_freed_memory

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)  # 64 MiB, written (paged in), freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_block()
default = faults_of_a_fresh_block()
applied = reuse_freed_memory()
for _ in range(3):  # grow the heap (an aligned block may not fit the hole the last one left, at first)
    faults_of_a_fresh_block()
print(applied, default, max(faults_of_a_fresh_block() for _ in range(3)))
"""


def test_reuse_freed_memory_stops_page_faults_on_reallocation():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    applied, default, reused = out[0] == "True", int(out[1]), int(out[2])
    glibc = platform.libc_ver()[0] == "glibc"
    assert applied == glibc  # applied exactly where the C library is glibc; elsewhere it changes nothing
    if glibc:
        pages = (64 << 20) // 4096
        assert default > pages // 2  # glibc's default maps the block afresh each time
        assert reused < pages // 20


HOST_MEMORY_PROBE = r"""
import os, sys
from ftprog.programs.host_memory import allocator_note, preload_allocator
preload_allocator()  # re-executes this very command once, the library in LD_PRELOAD
print(os.getpid(), "torch" in sys.modules, os.environ.get("MIMALLOC_ALLOW_THP", "-"), allocator_note())
"""


def _a_preloadable_library() -> str:
    """mimalloc where installed, else the C library this process already runs on (preloading it changes nothing)."""
    from ftprog.programs.host_memory import allocator_library

    lib = allocator_library()
    if lib is not None:
        return str(lib)
    maps = Path("/proc/self/maps").read_text().split()
    return next(p for p in maps if Path(p).name.startswith("libc.so"))


def test_preload_allocator_reexecutes_once_with_the_library():
    lib = _a_preloadable_library()
    env = {**os.environ, "FTPROG_ALLOCATOR": lib}
    env.pop("FTPROG_ALLOCATOR_PRELOADED", None)
    env.pop("MIMALLOC_ALLOW_THP", None)
    proc = subprocess.Popen([sys.executable, "-c", HOST_MEMORY_PROBE], env=env, stdout=subprocess.PIPE, text=True)
    out = proc.communicate()[0].split(maxsplit=3)
    assert int(out[0]) == proc.pid and out[1] == "False"  # the same process, re-executed before torch loaded
    assert out[2] == ("0" if "mimalloc" in Path(lib).name else "-")  # MIMALLOC_OPTIONS, for mimalloc only
    assert out[3].strip().startswith(f"host memory: {Path(lib).name} (preloaded")
    system = subprocess.run([sys.executable, "-c", HOST_MEMORY_PROBE], env={**env, "FTPROG_ALLOCATOR": "system"},
                            capture_output=True, text=True, check=True).stdout
    assert "host memory: the C library's malloc (FTPROG_ALLOCATOR=system)" in system
    missing = subprocess.run([sys.executable, "-c", HOST_MEMORY_PROBE], env={**env, "FTPROG_ALLOCATOR": "/no/lib.so"},
                             capture_output=True, text=True, check=True).stdout
    assert "host memory: the C library's malloc (FTPROG_ALLOCATOR=/no/lib.so is not a file)" in missing


def test_preload_env_sets_mimallocs_options_unless_given():
    from ftprog.programs.host_memory import MIMALLOC_OPTIONS, preload_env

    given = {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}
    env = preload_env(Path("/x/libmimalloc.so"), given)
    assert env == {**given, "LD_PRELOAD": f"/x/libmimalloc.so{os.pathsep}/opt/other.so", **MIMALLOC_OPTIONS}
    assert given == {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}  # a new dict
    assert MIMALLOC_OPTIONS == {"MIMALLOC_ALLOW_THP": "0"}
    assert preload_env(Path("/x/libmimalloc.so"), {"MIMALLOC_ALLOW_THP": "1"})["MIMALLOC_ALLOW_THP"] == "1"
    assert preload_env(Path("/x/libjemalloc.so"), {}) == {"LD_PRELOAD": "/x/libjemalloc.so"}


def test_loss_matmuls_repeat_a_few_shapes():
    """The fused loss pads a chunk's target rows to 128-row buckets: batches with different target counts run the
    output projection in the same shapes (a new shape each batch grew RSS without bound), same loss as unpadded."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ftprog.core._loss import _LinearCrossEntropy

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default):
                self.seen.add(tuple(tuple(a.shape) for a in args))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 16, generator=g)
    shapes = Shapes()
    for n in (130, 200, 256):
        hidden, targets = torch.randn(n, 16, generator=g), torch.randint(0, 96, (n,), generator=g)
        with shapes:
            total, grad_h, grad_w = _LinearCrossEntropy.apply(hidden, weight, targets, 1024, True, True, None)
        logits = hidden @ weight.T
        torch.testing.assert_close(total, torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        torch.testing.assert_close(grad_h, (logits.softmax(-1) - torch.nn.functional.one_hot(targets, 96)) @ weight)
        assert grad_h.shape == (n, 16) and grad_w.shape == (96, 16)
    assert shapes.seen == {((256, 16), (16, 96)), ((256, 96), (96, 16)), ((96, 256), (256, 16))}


def test_a_default_install_runs_on_mimalloc(monkeypatch):
    """ft-prog depends on cmeel-mimalloc where it has a wheel (the dependency's platform marker), so there `ft-prog
    run` preloads it without any setting; elsewhere it runs on the C library's malloc and says so."""
    import tomllib

    from packaging.requirements import Requirement

    from ftprog.programs.host_memory import allocator_library, allocator_note

    deps = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    (dep,) = [Requirement(d) for d in deps["dependencies"] if d.startswith("cmeel-mimalloc")]
    monkeypatch.delenv("FTPROG_ALLOCATOR", raising=False)
    lib = allocator_library()
    if dep.marker is None or dep.marker.evaluate():
        assert lib is not None and lib.name == "libmimalloc.so" and lib.is_file()
    elif lib is None:
        assert "the C library's malloc" in allocator_note()
