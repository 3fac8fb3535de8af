"""The ``ft-prog`` command line. Imports torch only inside commands, so ``--help`` is instant."""

from __future__ import annotations

from importlib.metadata import version as _dist_version
from pathlib import Path

import typer

app = typer.Typer(
    help="ft-prog: fine-tune open LLMs. Models are parameter trees, techniques are transforms, programs are short loops.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Programs runnable with `ft-prog run NAME` and their built-in configs; filled in as programs land.
PROGRAMS: dict[str, str] = {}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ft-prog {_dist_version('ft-prog')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ft-prog: fine-tune open LLMs."""


@app.command("ls")
def list_programs() -> None:
    """List programs and built-in configs."""
    from ftprog.core._presets import PRESETS

    typer.echo("programs:")
    for name, summary in PROGRAMS.items():
        typer.echo(f"  {name:12s} {summary}")
    if not PROGRAMS:
        typer.echo("  (none yet)")
    typer.echo("model presets (random weights, for demos and benchmarks):")
    for name in PRESETS:
        typer.echo(f"  {name}")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("ft-prog-demo"), help="Where the demo model is written."),
    preset: str = typer.Option("tiny", help="Model shape (see `ft-prog ls`)."),
    new_tokens: int = typer.Option(32, help="Tokens to generate per prompt."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Build a model from a preset, save it as a Hugging Face folder, load it back and generate."""
    import time

    import torch

    from ftprog.core import flatten, from_config, load_pretrained, save_pretrained
    from ftprog.programs.generate import generate

    start = time.perf_counter()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
