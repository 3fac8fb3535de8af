"""Running programs on several processes with PyTorch's own stack (torchrun, torch.distributed).

``ft-prog run --nproc N PROGRAM ...`` re-launches itself through
``torch.distributed.run`` (torchrun); each process then calls :func:`setup`,
which joins the process group (NCCL on GPUs, gloo on CPUs) with a bounded
timeout, so a rank that dies or hangs makes the whole job exit non-zero
instead of hanging.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import attrs

TIMEOUT_ENV = "FTPROG_DIST_TIMEOUT"
"""Seconds a collective may wait for the other ranks before the job fails (default 600)."""


@attrs.frozen
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup() -> DistInfo:
    """Join the process group when started by torchrun with more than one process; else a single-process info."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, mesh)


def teardown() -> None:
    """Leave the process group at the end of a run; every rank calls it. The barrier first: a rank whose part of
    the last collective is done may otherwise close its connections while another rank still receives from it
    (seen once in CI as a SIGABRT, "terminate called without an active exception", in a 2-process dpo run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def torchrun_command(args: list[str], *, nproc: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """The torchrun command line that runs ``ft-prog <args>`` on ``nproc`` processes per node."""
    cmd = [sys.executable, "-c", "from ftprog.programs.distributed import torchrun_main; torchrun_main()",
           f"--nproc-per-node={nproc}", f"--nnodes={nnodes}", "--max-restarts=0"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("multi-node runs need --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    elif rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "ftprog.programs.cli", *args]


def torchrun_main() -> None:
    """torchrun (``torch.distributed.run`` with ``sys.argv``), ending in one message instead of a traceback when
    it is stopped by a signal (the workers say what they saved) or a worker fails (which rank, its exit code)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:]))
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        print(e, file=sys.stderr)
        sys.exit(1)


def launch(args: list[str], **kwargs) -> int:
    """Run ``ft-prog <args>`` under torchrun and return its exit code (it names a failed rank).

    A stop signal this process receives (Ctrl-C, SIGTERM, SIGUSR1) is passed to torchrun, which passes it
    to every worker; each checkpoints after its current step and exits, and the code is then the
    signal's (128 + its number). torchrun runs in its own session so that a Ctrl-C in the terminal
    reaches the workers once, through torchrun, not also directly (a second Ctrl-C aborts).
    """
    import signal
    import subprocess

    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    proc = subprocess.Popen(torchrun_command(args, **kwargs), env=env, start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {s: signal.signal(s, forward) for s in stop_signals}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received and code != 0 else code


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def all_sum(value):
    """The sum of a tensor (or number) over the ranks; the value itself in a single process."""
    if not _initialized():
        return value
    import torch
    import torch.distributed as dist

    total = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    dist.all_reduce(total)
    return total if isinstance(value, torch.Tensor) else type(value)(total.item())


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (so every rank takes the same branch)."""
    return bool(all_sum(int(flag))) if _initialized() else flag


def all_max(value: int) -> int:
    """The largest of an integer over the ranks; the value itself in a single process."""
    if not _initialized():
        return value
    import torch
    import torch.distributed as dist

    total = torch.tensor(int(value))
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())
