"""The ``ft-prog`` command line. Imports torch only inside commands, so ``--help`` is instant.

Failures: every command runs inside :func:`_messages`. A failure about the user's input or environment
(``ValueError`` and its kinds: config, data, checkpoint, export errors; ``OSError``: missing files, full
or read-only disks; :class:`~ftprog.programs.run_guard.RunError`) prints one message and exits 1 (config
errors 2). Any other exception is a bug in ft-prog: its traceback is printed after a line saying so.
``--debug`` (or ``FTPROG_DEBUG=1``) prints the traceback of every failure.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from importlib.metadata import version as _dist_version
from pathlib import Path

import click
import typer

app = typer.Typer(
    help="ft-prog: fine-tune open LLMs. Models are parameter trees, techniques are transforms, programs are short loops.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Programs runnable with `ft-prog run NAME`: module (with `run(config)` and `CONFIG`), one-line summary.
# Each program's built-in configs are the TOML files in programs/configs/NAME/.
PROGRAMS: dict[str, tuple[str, str]] = {
    "sft": ("ftprog.programs.sft", "supervised fine-tuning: full, LoRA, DoRA, QLoRA"),
    "dpo": ("ftprog.programs.dpo", "preference tuning: DPO, IPO, hinge, robust, SimPO, ORPO, KTO"),
    "grpo": ("ftprog.programs.grpo", "RL with verifiable rewards: GRPO, Dr. GRPO, DAPO"),
    "distill": ("ftprog.programs.distill", "offline knowledge distillation: forward / reverse KL, JSD"),
    "generate": ("ftprog.programs.generate", "generate text (KV cache, greedy or sampled, chat, batches)"),
    "eval": ("ftprog.programs.evaluate", "lm-evaluation-harness tasks and perplexity"),
    "quantize": ("ftprog.programs.quantize", "post-training weight-only quantization (int8, int4, nf4)"),
}
CONFIG_DIR = Path(__file__).parent / "configs"


DEBUG_ENV = "FTPROG_DEBUG"


@contextlib.contextmanager
def _messages(prefix: str = "error", config_exit: int = 2) -> Iterator[None]:
    """Turn a failure into one line on stderr and an exit code (see the module docstring).

    ``config_exit``: the exit code of a :class:`ConfigError` (2: the program's config; 1 where it can only be a
    model's config.json).
    """
    from .config import ConfigError

    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        yield
    except (typer.Exit, click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        _say("aborted", debug)
        raise typer.Exit(130) from None
    except ConfigError as e:
        _say(f"config error: {e}", debug)
        raise typer.Exit(config_exit) from None
    except Exception as e:
        from .run_guard import RunError

        if isinstance(e, (ValueError, OSError, RunError)):
            _say(f"{prefix}: {e}", debug)
        elif _lost_peer(e):
            _say(f"{prefix}: lost contact with another process of this run (it failed, was killed or hangs; its own "
                 f"message, if any, is above): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", debug)
        elif isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            _say(f"{prefix}: out of memory ({e}); lower batch_size or seq_len, or set activation_checkpointing=true "
                 "(`ft-prog plan` predicts the peak)", debug)
        else:
            _say("ft-prog: unexpected error; this is a bug in ft-prog, please report it with this traceback:", False)
            traceback.print_exc()
        raise typer.Exit(1) from None


def _lost_peer(e: Exception) -> bool:
    """A collective that failed because another rank of a multi-process run is gone or stuck (not a bug here)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "pair closure", "Timed out"))


def _say(message: str, with_traceback: bool) -> None:
    """``message`` on stderr (prefixed with the rank in multi-process runs), after the traceback if asked."""
    if with_traceback:
        traceback.print_exc()
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    typer.echo(f"rank {rank}: {message}" if rank is not None else message, err=True)


def _builtin(program: str) -> dict:
    from .config import builtin_configs

    return builtin_configs(CONFIG_DIR / program)


def _load(program: str, config: str, overrides: list[str]):
    import importlib

    from .config import load_config

    if program not in PROGRAMS:
        import difflib

        close = difflib.get_close_matches(program, PROGRAMS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise typer.BadParameter(f"unknown program {program!r}{hint} (programs: {', '.join(PROGRAMS)})")
    module = importlib.import_module(PROGRAMS[program][0])
    cfg, resolved = load_config(module.CONFIG, config, overrides, builtin_dir=CONFIG_DIR / program)
    return module, cfg, resolved


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ft-prog {_dist_version('ft-prog')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help=f"Print the traceback of every failure (also: {DEBUG_ENV}=1)."),
) -> None:
    """ft-prog: fine-tune open LLMs."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # inherited by torchrun's workers


@app.command("ls")
def list_programs() -> None:
    """List programs and built-in configs."""
    from ..core._presets import PRESETS

    typer.echo("programs (ft-prog run PROGRAM --config NAME_OR_FILE key=value ...):")
    for name, (_, summary) in PROGRAMS.items():
        typer.echo(f"  {name:12s} {summary}")
        for config in _builtin(name).values():
            typer.echo(f"      {config.name:28s} {config.description}")
    typer.echo("model presets (random weights, for demos and benchmarks):")
    for name in PRESETS:
        typer.echo(f"  {name}")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("ft-prog-demo"), help="Where the demo model is written."),
    preset: str = typer.Option("tiny", help="Model shape (see `ft-prog ls`)."),
    new_tokens: int = typer.Option(32, help="Tokens to generate per prompt."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output_dir."),
) -> None:
    """Build a model from a preset, save it as a Hugging Face folder, load it back and generate."""
    import time

    import torch

    from ..core import flatten, from_config, load_pretrained, save_pretrained
    from .generate import generate
    from .run_guard import check_output

    start = time.perf_counter()
    with _messages():
        check_output(output_dir, sources=[], overwrite=overwrite, option="--overwrite")
        model = from_config(preset, seed=seed)
        save_pretrained(model, output_dir)
    loaded = load_pretrained(output_dir)
    before, after = flatten(model.params), flatten(loaded.params)
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    typer.echo(f"built {preset!r} ({model.num_params() / 1e6:.2f}M params), saved to {output_dir}/ and "
               f"loaded back ({'identical' if same else 'DIFFERENT'}) in {time.perf_counter() - start:.2f}s")
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    start = time.perf_counter()
    outputs = generate(loaded, prompts, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        typer.echo(f"  prompt {prompt} -> {out}")
    total = sum(len(o) for o in outputs)
    typer.echo(f"generated {total} tokens in {seconds:.2f}s ({total / seconds:.0f} tokens/s, greedy, KV cache)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    program: str = typer.Argument(..., help="Program to run (see `ft-prog ls`)."),
    config: str = typer.Option("default", "--config", "-c", help="Built-in config name or a .toml file."),
    nproc: int = typer.Option(1, "--nproc", help="Processes per node (torchrun); one per GPU."),
    nnodes: int = typer.Option(1, "--nnodes", help="Number of nodes (multi-node runs)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's index, 0 .. nnodes-1."),
    rdzv_endpoint: str = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node)."),
) -> None:
    """Run a program: `ft-prog run sft --config demo seq_len=256 peft.rank=16`.

    With --nproc N (and --nnodes/--node-rank/--rdzv-endpoint for several
    nodes) the program runs on N processes per node through torchrun.
    """
    from .distributed import launch, under_torchrun

    if (nproc > 1 or nnodes > 1) and not under_torchrun():
        with _messages():
            _load(program, config, list(ctx.args))  # a config error is one message, not one per process
            code = launch(["run", program, "--config", config, *ctx.args], nproc=nproc, nnodes=nnodes,
                          node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
        raise typer.Exit(code)
    with _messages():
        module, cfg, resolved = _load(program, config, list(ctx.args))
    with _messages(config_exit=1):  # here a config error is a model's config.json: bad input, exit 1
        module.run(cfg, resolved)


@app.command()
def validate(
    file: str = typer.Argument(..., help="Config file (or built-in name) to check."),
    program: str = typer.Option("sft", help="Program the config is for."),
) -> None:
    """Check a config without running it; prints the resolved config."""
    from .config import to_toml

    with _messages():
        _, _, resolved = _load(program, file, [])
    typer.echo(to_toml(resolved))
    typer.echo(f"# {file}: valid {program} config", err=True)


@app.command("cp")
def copy_config(
    name: str = typer.Argument(..., help="Built-in config name (see `ft-prog ls`)."),
    dest: Path = typer.Argument(..., help="Where to write the copy."),
) -> None:
    """Copy a built-in config to a file you can edit."""
    for program in PROGRAMS:
        found = _builtin(program).get(name)
        if found is not None:
            if dest.exists():
                typer.echo(f"{dest} exists; not overwriting", err=True)
                raise typer.Exit(1)
            with _messages():
                dest.write_text(Path(found.path).read_text())
            typer.echo(f"copied {program} config {name!r} to {dest}")
            return
    names = [n for p in PROGRAMS for n in _builtin(p)]
    typer.echo(f"no built-in config {name!r}; available: {', '.join(names)}", err=True)
    raise typer.Exit(1)


@app.command("download")
def download_cmd(
    repo_id: str = typer.Argument(..., help="Hub repository, e.g. meta-llama/Llama-3.2-1B-Instruct."),
    output_dir: Path = typer.Option(None, help="Folder to place the files in (default: the Hub cache)."),
    include: list[str] = typer.Option([], help="Only files matching this glob (repeatable)."),
    exclude: list[str] = typer.Option(None, help="Skip files matching this glob (default: original/*.pth)."),
    revision: str = typer.Option(None, help="Branch, tag or commit."),
    dataset: bool = typer.Option(False, help="The repository is a dataset."),
) -> None:
    """Download a model or dataset from the Hugging Face Hub (token from HF_TOKEN)."""
    from .download import DEFAULT_EXCLUDE, download

    with _messages("download failed"):
        folder = download(repo_id, output_dir=output_dir, include=include,
                          exclude=DEFAULT_EXCLUDE if exclude is None else exclude, revision=revision,
                          repo_type="dataset" if dataset else "model")
    typer.echo(str(folder))


@app.command("export")
def export_cmd(
    model_path: str = typer.Argument(..., help="Model folder (HF, or an ft-prog quantized one)."),
    output: Path = typer.Argument(..., help="Output folder (hf, peft) or file prefix (gguf, executorch)."),
    fmt: str = typer.Option(..., "--format", "-f", help="hf | peft | gguf | executorch"),
    adapter: str = typer.Option(None, help="PEFT adapter folder to merge (hf, gguf, executorch) or export (peft)."),
    dtype: str = typer.Option(None, help="fp32 | fp16 | bf16 tensors in the output."),
    max_seq_len: int = typer.Option(None, help="executorch: longest sequence the program accepts."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (never the input)."),
) -> None:
    """Export a (fine-tuned) model: Hugging Face, PEFT, GGUF (llama.cpp) or ExecuTorch."""
    from .export import export

    with _messages("export failed"):
        path = export(model_path, output, fmt, adapter=adapter, dtype=dtype, max_seq_len=max_seq_len,
                      overwrite=overwrite)
    typer.echo(str(path))


@app.command("plan", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan_cmd(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="sft config (built-in name or .toml), then key=value overrides."),
    memory: str = typer.Option(None, "--memory", help="Device memory to fit in, e.g. 24GiB."),
    nproc: int = typer.Option(1, "--nproc", help="Processes the run is sharded over."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Predict the peak training memory of an sft config before loading anything."""
    from .config import ConfigError
    from .plan import PlanError, format_plan, plan

    with _messages("plan error"):
        try:
            result = plan(config, list(ctx.args), memory=memory, nproc=nproc, device=device)
        except (ConfigError, PlanError) as e:
            typer.echo(f"plan error: {e}", err=True)
            raise typer.Exit(2) from None
    typer.echo(format_plan(result))
    if result.fits is False:
        raise typer.Exit(1)


def main() -> None:
    if sys.argv[1:2] == ["run"]:  # training and the other programs: a non-fragmenting malloc, before torch loads
        from .host_memory import preload_allocator

        preload_allocator()
    app()


if __name__ == "__main__":
    main()
