"""The ``rnca`` command line: argument parsing, progress, tables and exit codes. Nothing else.

Every command forwards to one library function. :class:`~rnca_cli.errors.RncaError` (and option
values that fail validation) are caught here, printed on one line to stderr, and exit with status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .errors import RncaError

app = typer.Typer(
    name="rnca",
    help="Repair segmentation masks with refinement neural cellular automata (rNCA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def fail(message: str) -> None:
    """Print one line to stderr and exit 1."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        out.print(f"rnca {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Repair segmentation masks with refinement neural cellular automata (rNCA)."""


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err, disable=quiet, transient=False,
    )


Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto takes a CUDA GPU when present.")]
Seed = Annotated[int, typer.Option(help="Seed of every random draw (the update masks included).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that already exist.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")]


@app.command()
def train(
    images: Annotated[Path, typer.Option(help="Folder of training images.")],
    labels: Annotated[Path, typer.Option(help="Folder of ground-truth masks, same case ids.")],
    states: Annotated[Path, typer.Option(help="Folder of coarse masks to learn to repair, same case ids.")],
    out: Annotated[Path, typer.Option(help="Run folder: model.pt and log.csv are written here.")],
    iterations: Annotated[int, typer.Option(help="Training iterations.")] = 2000,
    pool: Annotated[int, typer.Option(help="Pool size (paper: 256).")] = 256,
    batch: Annotated[int, typer.Option(help="Samples per iteration (paper: 32).")] = 32,
    replace: Annotated[int, typer.Option(help="Batch samples restarted from fresh coarse masks (paper: 2).")] = 2,
    steps: Annotated[int, typer.Option(help="Maximum unrolled steps T (paper: 64).")] = 64,
    min_step: Annotated[int, typer.Option(help="Loss step t* is drawn from [min-step, steps] (paper: 32).")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 1e-4).")] = 1e-4,
    clip: Annotated[float, typer.Option(help="Gradient norm clip.")] = 1.0,
    patch: Annotated[int, typer.Option(help="Training patch size; larger inputs are cut with sliding windows.")] = 64,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap of patches.")] = 0.25,
    val_cases: Annotated[int, typer.Option(help="Hold out the last N cases (by case id) and report their Dice.")] = 0,
    val_every: Annotated[int, typer.Option(help="Validate every N iterations.")] = 100,
    save_every: Annotated[int, typer.Option(help="Write the checkpoint every N iterations.")] = 100,
    channels: Annotated[int, typer.Option(help="State channels K.")] = 16,
    hidden: Annotated[int, typer.Option(help="Hidden width of the update MLP.")] = 128,
    fire_rate: Annotated[float, typer.Option(help="Probability that a cell updates in a step.")] = 0.5,
    label: Annotated[Optional[int], typer.Option(help="Train on this label of multi-label masks.")] = None,
    axis: Annotated[int, typer.Option(help="NIfTI volumes are cut into 2D slices along this axis.")] = 2,
    seed: Seed = 0,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a refiner on images, ground truths and coarse masks (pool training, paper §3.3)."""
    from .device import resolve_device
    from .model import ModelConfig
    from .train import TrainConfig, load_dataset, train as run_training

    try:
        config = TrainConfig(
            iterations=iterations, pool=pool, batch=batch, replace=replace, steps=steps, min_step=min_step,
            lr=lr, clip=clip, patch=patch, overlap=overlap, val_cases=val_cases, val_every=val_every,
            save_every=save_every, axis=axis, seed=seed,
        )
    except ValueError as exc:
        fail(str(exc))
    try:
        torch_device = resolve_device(device)
        data = load_dataset(images, labels, states, config, label=label)
        try:
            model_config = ModelConfig(
                channels=channels, hidden=hidden, fire_rate=fire_rate, image_channels=data.train.images.shape[1]
            )
        except ValueError as exc:
            fail(str(exc))
        if not quiet:
            err.print(f"{data.description}; device {torch_device}")
            for path in data.unmatched:
                err.print(f"[yellow]unmatched, not used:[/] {path}")
        with _progress(quiet) as bar:
            task = bar.add_task("training", total=iterations, info="")

            def report(p) -> None:
                info = f"loss {p.loss:.4f}  {p.its_per_sec:.2f} it/s"
                if p.val:
                    info += f"  val dice {p.val['val_dice_before']:.3f}->{p.val['val_dice_after']:.3f}"
                bar.update(task, completed=p.iteration, info=info)

            _, ckpt = run_training(data, out, config, model_config, torch_device, overwrite, report)
    except RncaError as exc:
        fail(str(exc))
    if not quiet:
        err.print(f"wrote {ckpt} and {ckpt.parent / 'log.csv'}")


@app.command()
def refine(
    image: Annotated[Path, typer.Option(help="Image file, or a folder of images.")],
    mask: Annotated[Path, typer.Option(help="Mask to repair, or a folder of masks (paired by case id).")],
    out: Annotated[
        Optional[Path],
        typer.Option(help="Output file (default: <mask>_refined beside the mask), or folder in folder mode."),
    ] = None,
    model: Annotated[str, typer.Option(help="Shipped model name (see models/) or path to a .pt checkpoint.")] = "rings",
    steps: Annotated[int, typer.Option(help="Automaton updates.")] = 64,
    threshold: Annotated[float, typer.Option(help="Refined probability >= threshold is foreground.")] = 0.5,
    save_prob: Annotated[bool, typer.Option("--save-prob", help="Also write the soft mask (<out>_prob, or prob/ in folder mode).")] = False,
    label: Annotated[Optional[int], typer.Option(help="Refine this label of a multi-label mask; others are kept.")] = None,
    axis: Annotated[int, typer.Option(help="NIfTI volumes are refined slice by slice along this axis.")] = 2,
    batch: Annotated[int, typer.Option(help="Cases (2D) or slices (3D) per forward pass.")] = 16,
    seed: Seed = 0,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Repair one mask, or every mask of a folder, and write it in the input's format and geometry."""
    import time

    from .checkpoint import load_model
    from .device import resolve_device
    from .refine import RefineOptions, plan_folder, plan_single, run_jobs

    try:
        options = RefineOptions(steps=steps, threshold=threshold, seed=seed, axis=axis, label=label,
                                save_prob=save_prob, batch=batch, overwrite=overwrite)
    except ValueError as exc:
        fail(str(exc))
    try:
        if image.is_dir() or mask.is_dir():
            if not (image.is_dir() and mask.is_dir()):
                fail(f"{image if not image.is_dir() else mask}: folder mode needs --image and --mask to be folders")
            if out is None:
                fail("folder mode needs --out DIR")
            jobs, pairing = plan_folder(image, mask, out, options)
            if not quiet:
                for path in pairing.unmatched_images + pairing.unmatched_masks:
                    err.print(f"[yellow]unmatched, skipped:[/] {path}")
        else:
            jobs = plan_single(image, mask, out, options)
        torch_device = resolve_device(device)
        net = load_model(model, torch_device)
        start = time.perf_counter()
        with _progress(quiet or len(jobs) == 1) as bar:
            task = bar.add_task("refining", total=len(jobs), info="")
            results = run_jobs(net, jobs, options, lambda r: bar.update(task, advance=1, info=r.case_id))
    except RncaError as exc:
        fail(str(exc))
    if not quiet:
        seconds = time.perf_counter() - start
        before = sum(r.foreground_before for r in results)
        after = sum(r.foreground_after for r in results)
        where = results[0].out if len(results) == 1 else out
        err.print(
            f"refined {len(results)} case(s) with {model} ({steps} steps, {torch_device}) in {seconds:.1f}s; "
            f"foreground {before} -> {after} pixels; wrote {where}",
            highlight=False,
        )


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(run())
