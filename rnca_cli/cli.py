"""The ``rnca`` command line: argument parsing, progress, tables and exit codes. Nothing else.

Every command forwards to the library. :class:`~rnca_cli.errors.RncaError` is caught in one place
(:func:`command`), printed on one line to stderr, and ends the command with an exit code of
:data:`EXIT`: 0 ok, 1 bad input or a runtime failure, 2 a usage error (a bad option value, an
unknown device), 3 ``rnca evaluate``'s thresholds missed.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import RncaError, UsageError
from .options import RefineOptions, TrainConfig

EXIT = {"ok": 0, "error": 1, "usage": 2, "thresholds missed": 3}
app = typer.Typer(
    name="rnca",
    help="Repair segmentation masks with refinement neural cellular automata (rNCA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # help texts are shown as written: "[min-step, steps]" is not markup
)
err = Console(stderr=True, soft_wrap=True)  # one message, one line, also when piped
stdout = Console()


def fail(message: str, code: int = EXIT["error"]) -> None:
    """Print one line to stderr and exit with ``code``. The message is printed as it is (a path
    with square brackets is not rich markup)."""
    err.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def command(examples: list[str]):
    """Register a command whose :class:`RncaError` ends it with one line and its exit code (the one
    catch of the CLI), and whose ``--help`` ends with ``examples``."""

    def register(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UsageError as exc:
                fail(str(exc), EXIT["usage"])
            except RncaError as exc:
                fail(str(exc), EXIT["error"])

        epilog = "Examples:\n\n" + "\n\n".join(f"  {line}" for line in examples)
        return app.command(epilog=epilog)(wrapper)

    return register


def _version(value: bool) -> None:
    if value:
        from . import kernels  # loads PyTorch: only here, not for every command
        from .engines import describe

        stdout.print(f"rnca {__version__}", highlight=False)
        stdout.print("engines (a CPU float32 rollout of the paper's model):", highlight=False)
        for line in describe():
            stdout.print(f"  {line}", highlight=False, markup=False)
        why = kernels.status()
        built = f"unavailable: {why}" if why else f"built, {'with' if kernels.openmp() else 'without'} OpenMP"
        stdout.print(f"compiled CPU kernels: {built}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Repair segmentation masks with refinement neural cellular automata (rNCA)."""
    from .device import keep_freed_memory

    keep_freed_memory()  # process-wide, so set here and not by the library: 25-30 % off large images


@contextmanager
def _progress(quiet: bool, counts: bool = True, show: bool = True) -> Iterator[Progress]:
    """A progress bar on stderr, showing done/total (``counts``) or a percentage; shown from the
    start with ``show``, else once the command calls ``bar.start()`` (when it knows the work is
    worth a bar). It stays after a command that succeeds; a command that fails removes it, so that
    its error is the one line left (the error names the file)."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn() if counts else TaskProgressColumn(),
        TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err, disable=quiet, transient=False,
    )
    if show:
        bar.start()
    try:
        yield bar
    except BaseException:
        if bar.live.is_started and not bar.disable:  # Progress.stop would add a blank line on a non-terminal stderr
            bar.live.transient = True
            bar.live.stop()
        raise
    if bar.live.is_started:
        bar.stop()


def _report_unmatched(items: list[tuple[str, Path]], limit: int = 10) -> None:
    """List unmatched files on stderr: the first ``limit``, then how many more."""
    for kind, path in items[:limit]:
        err.print(Text.assemble((f"unmatched {kind}: ", "yellow"), str(path)), highlight=False)
    if len(items) > limit:
        err.print(f"[yellow]... and {len(items) - limit} more unmatched file(s)[/]")


Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto takes a CUDA GPU when present.")]
Seed = Annotated[int, typer.Option(help="Seed of every random draw (the update masks included).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that already exist.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")]
Threads = Annotated[
    int, typer.Option(help="CPU threads for PyTorch (0: all cores). Use 1 per process when running several at once.")
]
R, T = RefineOptions(), TrainConfig()  # the defaults the commands show and pass on


def _set_threads(threads: int) -> None:
    import torch

    if threads < 0:
        raise UsageError(f"--threads {threads}: expected 0 (all cores) or a positive count")
    if threads:
        torch.set_num_threads(threads)


@command([
    "rnca train --images data/images --labels data/labels --states data/coarse -o runs/rings --val-fraction 0.1",
    'rnca train --images img --labels gt --perturb "breaks:0.7,specks:0.5" -o runs/vessels --time-budget 45m',
    "rnca train --images img --labels gt --perturb breaks:0.7 --resume runs/vessels --iterations 4000",
])
def train(
    images: Annotated[Path, typer.Option(help="Folder of training images.")],
    labels: Annotated[Path, typer.Option(help="Folder of ground-truth masks, same case ids.")],
    states: Annotated[Optional[Path], typer.Option(help="Folder of coarse masks to learn to repair, same case ids (or use --perturb).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder: config.json, log.csv, last.pt, best.pt.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder from its last.pt (same options and data).")] = None,
    perturb: Annotated[Optional[str], typer.Option(help="rnca perturb recipe: pool refills corrupt the ground truth afresh.")] = None,
    perturb_share: Annotated[Optional[float], typer.Option(help="Share of refills corrupted afresh (default 1 without --states, 0.5 with).", show_default=False)] = None,
    loss: Annotated[str, typer.Option(help="Objective: mse, bce, dice, cldice joined by +, each with an optional :weight.")] = T.loss,
    far_weight: Annotated[float, typer.Option(help="Extra weight of pixel errors more than 3 px from the ground truth (stray fragments).")] = T.far_weight,
    miss_weight: Annotated[float, typer.Option(help="Extra weight of pixel errors in the coarse mask's gaps (missed ground truth away from its walls).")] = T.miss_weight,
    ema: Annotated[float, typer.Option(help="Validate and keep best.pt with an EMA of the weights of this decay, e.g. 0.99 (0: off).")] = T.ema,
    iterations: Annotated[int, typer.Option(help="Training iterations.")] = T.iterations,
    time_budget: Annotated[Optional[str], typer.Option(help="Stop cleanly and save after this long, e.g. 45m, 2h, 90s.")] = None,
    pool: Annotated[int, typer.Option(help="Pool size (paper: 256).")] = T.pool,
    batch: Annotated[int, typer.Option(help="Samples per iteration (paper: 32).")] = T.batch,
    replace: Annotated[int, typer.Option(help="Batch samples restarted from fresh coarse masks (paper: 2).")] = T.replace,
    steps: Annotated[int, typer.Option(help="Maximum unrolled steps T (paper: 64).")] = T.steps,
    min_step: Annotated[
        Optional[int],
        typer.Option(help="Loss step t* is drawn from [min-step, steps]; default: half of --steps (paper: 32 of 64)."),
    ] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 1e-4).")] = T.lr,
    schedule: Annotated[str, typer.Option(help="Learning rate: constant, or cosine down to 0 at --iterations.")] = T.schedule,
    warmup: Annotated[int, typer.Option(help="Iterations of linear learning-rate warm-up.")] = T.warmup,
    clip: Annotated[float, typer.Option(help="Gradient norm clip.")] = T.clip,
    patch: Annotated[int, typer.Option(help="Training patch size; larger inputs are cut with sliding windows.")] = T.patch,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap of patches.")] = T.overlap,
    min_size: Annotated[int, typer.Option(help="Clean-up the model carries: refine removes mask components under this many pixels (0: none).")] = T.min_size,
    val_images: Annotated[Optional[Path], typer.Option(help="Folder of validation images (with --val-labels).")] = None,
    val_labels: Annotated[Optional[Path], typer.Option(help="Folder of validation ground truths.")] = None,
    val_states: Annotated[Optional[Path], typer.Option(help="Folder of validation coarse masks (default: corrupted by --perturb).")] = None,
    val_cases: Annotated[int, typer.Option(help="Hold out the last N cases (by case id) for validation (not with --val-images).")] = T.val_cases,
    val_fraction: Annotated[float, typer.Option(help="Hold out this share of the cases (the last by case id; not with --val-images).")] = T.val_fraction,
    val_every: Annotated[int, typer.Option(help="Validate every N iterations.")] = T.val_every,
    select: Annotated[str, typer.Option(help="Validation metric that keeps best.pt: betti_err, betti0_err, betti1_err, topology, cldice, dice, changed.")] = T.select,
    save_every: Annotated[int, typer.Option(help="Write last.pt every N iterations.")] = T.save_every,
    channels: Annotated[Optional[int], typer.Option(help="State channels K. Default: the paper's 16.", show_default=False)] = None,
    hidden: Annotated[Optional[int], typer.Option(help="Hidden width of the update MLP. Default: the paper's 128.", show_default=False)] = None,
    fire_rate: Annotated[Optional[float], typer.Option(help="Probability that a cell updates in a step. Default: the paper's 0.5.", show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option(help="Start from this model's weights (a shipped name or a .pt file) to fine-tune it; the architecture and --image-norm are the model's.")] = None,
    image_norm: Annotated[float, typer.Option(help="Local contrast normalisation of the images at this Gaussian sigma in pixels, stored in the model and applied by refine (0: none). For faint structures, e.g. 10 for fundus vessels.")] = 0.0,
    label: Annotated[Optional[int], typer.Option(help="Train on this label of multi-label masks.")] = None,
    axis: Annotated[int, typer.Option(help="NIfTI volumes are cut into 2D slices along this axis.")] = T.axis,
    seed: Seed = T.seed,
    device: Device = "auto",
    threads: Threads = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a refiner on images, ground truths and coarse masks (pool training, paper section 3.3)."""
    from .model import ModelConfig
    from .options import parse_duration
    from .train import train_files

    if (out is None) == (resume is None):
        raise UsageError("give --out for a new run or --resume RUN_DIR to continue one")
    import os

    quiet = quiet or os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 reports for all
    config = TrainConfig(
        iterations=iterations, time_budget=parse_duration(time_budget) if time_budget else None, pool=pool,
        batch=batch, replace=replace, steps=steps, min_step=min_step, lr=lr, schedule=schedule, warmup=warmup,
        clip=clip, patch=patch, overlap=overlap, perturb=perturb, perturb_share=perturb_share, loss=loss,
        far_weight=far_weight, miss_weight=miss_weight, ema=ema, min_size=min_size, val_cases=val_cases,
        val_fraction=val_fraction, val_every=val_every, select=select, save_every=save_every, axis=axis, seed=seed,
        init=init,
    )
    given = {"channels": channels, "hidden": hidden, "fire_rate": fire_rate, "image_norm": image_norm or None}
    given = {k: v for k, v in given.items() if v is not None}
    if init is not None:
        from .checkpoint import load_checkpoint, resolve_model

        if given:
            raise UsageError(f"--init {init}: the model's architecture and image normalisation are kept; "
                             f"drop --{', --'.join(k.replace('_', '-') for k in given)}")
        model_config = load_checkpoint(resolve_model(init))[0].config
    else:
        model_config = ModelConfig(**given)
    _set_threads(threads)
    with _progress(quiet, show=False) as bar:
        task = bar.add_task("training", total=iterations, info="")

        def start(data, torch_device) -> None:
            if not quiet:
                err.print(f"{data.description}; device {torch_device}", highlight=False, markup=False)
                _report_unmatched([("file, not used", p) for p in data.unmatched])
            bar.start()

        def report(p) -> None:
            info = f"loss {p.loss:.4f}  {p.its_per_sec:.2f} it/s"
            if p.val:
                info += f"  val dice {p.val['dice']:.3f} betti_err {p.val['betti_err']:.2f}"
            bar.update(task, completed=p.iteration, info=info)

        ckpt = train_files(images, labels, states, out or resume, config, model_config, label, device, overwrite,
                           start, report, resume is not None, val_images, val_labels, val_states)
    if not quiet:
        final = ckpt.parent / "final.csv"
        if final.exists():
            import csv

            with final.open() as f:
                rows = list(csv.reader(f))
            table = Table(title=Text(f"validation ({ckpt.parent})"), title_justify="left")
            for name in rows[0]:
                table.add_column(name, justify="left" if name == "masks" else "right")
            for row in rows[1:]:
                table.add_row(*row)
            err.print(table)
        err.print(f"wrote {ckpt.parent}: use {ckpt}", highlight=False, markup=False)


@command([
    "rnca refine -i scan.png -m pred.png -o repaired.png",
    "rnca refine -i imagesTs/ -m predictions/ -o repaired/ --model rings --save-prob",
    "rnca refine -i ct.nii.gz -m liver.nii.gz -o liver_refined.nii.gz --label 1 --device cuda",
])
def refine(
    image: Annotated[Path, typer.Option("--image", "-i", help="Image file, or a folder of images.")],
    mask: Annotated[Path, typer.Option("--mask", "-m", help="Mask to repair, or a folder of masks (paired by case id).")],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Output file (default: <mask>_refined beside the mask), or folder in folder mode."),
    ] = None,
    model: Annotated[str, typer.Option(help="Shipped model name (see models/) or path to a .pt checkpoint.")] = "rings",
    steps: Annotated[int, typer.Option(help="Automaton updates.")] = R.steps,
    threshold: Annotated[float, typer.Option(help="Refined probability >= threshold is foreground.")] = R.threshold,
    save_prob: Annotated[bool, typer.Option("--save-prob", help="Also write the soft mask (<out>_prob, or prob/ in folder mode).")] = False,
    save_overlay: Annotated[Optional[Path], typer.Option(help="Folder: per case, the image with the pixels added (green) and removed (red).")] = None,
    save_trajectory: Annotated[Optional[Path], typer.Option(help="Folder: per case, the repair step by step (<case>.png strip, <case>.gif).")] = None,
    label: Annotated[Optional[int], typer.Option(help="Refine this label of a multi-label mask; others are kept.")] = None,
    axis: Annotated[int, typer.Option(help="NIfTI volumes are refined slice by slice along this axis.")] = R.axis,
    batch: Annotated[int, typer.Option(help="Cases (2D) or slices (3D) per forward pass (at most --tile squared pixels).")] = R.batch,
    tile: Annotated[int, typer.Option(help="Larger images are refined in tiles of this side (exact halo).")] = R.tile,
    precision: Annotated[
        str, typer.Option(help="Number format of the per-pixel MLP: fp32, bf16 or fp16 (half precision is for GPUs).")
    ] = R.precision,
    ensemble: Annotated[int, typer.Option(help="Seeded runs per case; their mean is written.")] = R.ensemble,
    save_uncertainty: Annotated[Optional[Path], typer.Option(help="Folder: per case, the per-pixel standard deviation of the runs (needs --ensemble 2+).")] = None,
    min_size: Annotated[Optional[int], typer.Option(help="Remove mask components under this many pixels (default: the model's own, see models/README.md).")] = None,
    guard: Annotated[bool, typer.Option("--guard/--no-guard", help="Keep the input mask of a case whose refinement looks unreliable.")] = R.guard,
    guard_change: Annotated[Optional[float], typer.Option(help="Guard: largest change trusted (pixels added plus removed), as a share of the input's foreground (default: the model's, else 0.5).")] = None,
    guard_agreement: Annotated[Optional[float], typer.Option(help="Guard: lowest Dice between seeded runs trusted (default: the model's, else 0.9).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Per-case CSV: guard decision, foreground change, agreement, uncertainty (folder mode default: <out>/refine.csv).")] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Folder mode: leave out cases whose output mask exists (finish an interrupted batch).")] = False,
    continue_on_error: Annotated[bool, typer.Option("--continue-on-error", help="Folder mode: refine the good cases, list the bad ones at the end, exit 1.")] = False,
    num_parts: Annotated[int, typer.Option("--num-parts", "-num_parts", help="Folder mode: split the cases into this many parts (a cluster job array).")] = R.num_parts,
    part_id: Annotated[int, typer.Option("--part-id", "-part_id", help="Which part this run refines, 0..num-parts-1 (every num-parts-th case by case id).")] = R.part_id,
    seed: Seed = R.seed,
    device: Device = "auto",
    threads: Threads = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Repair one mask, or every mask of a folder, and write it in the input's format and geometry."""
    from .refine import refine_files

    options = RefineOptions(steps=steps, threshold=threshold, seed=seed, axis=axis, label=label,
                            save_prob=save_prob, batch=batch, tile=tile, precision=precision, overwrite=overwrite,
                            save_overlay=save_overlay, save_trajectory=save_trajectory, num_parts=num_parts,
                            part_id=part_id, ensemble=ensemble, save_uncertainty=save_uncertainty, min_size=min_size,
                            guard=guard, guard_change=guard_change, guard_agreement=guard_agreement, report=report,
                            skip_existing=skip_existing, continue_on_error=continue_on_error)
    _set_threads(threads)
    # The bar counts pixels, so that one large image or volume shows progress too (tile by tile,
    # pass by pass); it stays hidden for a single case that is one forward pass.
    with _progress(quiet, counts=False, show=False) as bar:
        task = bar.add_task("refining", total=None, info="")
        done = []

        def start(jobs, unmatched) -> None:
            if not quiet:
                _report_unmatched(unmatched)
            pixels = sum(job.pixels for job in jobs) * options.runs
            bar.update(task, total=pixels)
            if len(jobs) > 1 or pixels > options.tile**2 * options.runs:
                bar.start()
            done.append(len(jobs))

        def case_done(result) -> None:
            done.append(result)
            bar.update(task, info=f"{len(done) - 1}/{done[0]} {result.case_id}")

        run = refine_files(image, mask, out, model, options, device, start, case_done,
                           lambda n: bar.update(task, advance=n))
    if not quiet:
        before = sum(r.foreground_before for r in run.results)
        after = sum(r.foreground_after for r in run.results)
        where = run.results[0].out if len(run.results) == 1 else out
        err.print(
            f"refined {len(run.results)} case(s) with {model} ({steps} steps, {run.device}) in {run.seconds:.1f}s; "
            f"foreground {before} -> {after} pixels; wrote {where}",
            highlight=False, markup=False,
        )
        if run.existing:
            err.print(f"skipped {len(run.existing)} finished case(s) whose output exists", highlight=False, markup=False)
        if run.swept:
            err.print(f"removed {len(run.swept)} temporary file(s) left by an interrupted run", highlight=False, markup=False)
        kept = [r for r in run.results if r.verdict.kept]
        if kept:
            shown = "; ".join(f"{r.case_id}: {r.verdict.kept}" for r in kept[:5]) + ("; ..." if len(kept) > 5 else "")
            err.print(f"guard: kept the input mask of {len(kept)} of {len(run.results)} case(s) ({shown})"
                      + (f"; see {run.report}" if run.report else ""), highlight=False, markup=False)
    if run.failed:  # --continue-on-error: the good cases are written; the bad ones are listed, even with -q
        for _case, message in run.failed:
            err.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
        fail(f"{len(run.failed)} case(s) failed and were not refined; the other {len(run.results)} were written")


def _summary_table(title: str, summary: dict) -> Table:
    table = Table(title=Text(title), title_justify="left")
    for name in ("metric", "mean", "std", "median", "valid", "nan"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for metric, s in summary.items():
        table.add_row(metric, f"{s['mean']:.4g}", f"{s['std']:.4g}", f"{s['median']:.4g}", str(s["count"]), str(s["nan"]))
    return table


@command([
    "rnca evaluate --pred refined/ --gt labels/ -o metrics.csv",
    "rnca evaluate --pred refined/ --gt labels/ --baseline coarse/ -o metrics.csv --json summary.json",
    "rnca evaluate --pred refined/ --gt labels/ --metrics dice,betti --fail-under dice=0.8 --fail-over betti0_err=2",
])
def evaluate(
    pred: Annotated[Path, typer.Option(help="Predicted mask, or folder of predicted masks.")],
    gt: Annotated[Path, typer.Option(help="Ground-truth mask, or folder (paired by case id).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Per-case CSV; <stem>_summary.csv (and _comparison.csv) beside it.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the summary as JSON.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Second prediction folder (e.g. before refinement) to compare against.")] = None,
    metrics: Annotated[str, typer.Option(help="Comma list of dice, cldice, precision, recall, betti, hd, hd95, assd, or all.")] = "all",
    fail_under: Annotated[Optional[str], typer.Option(help="Exit 3 if a mean is below, e.g. dice=0.8,cldice=0.75.")] = None,
    fail_over: Annotated[Optional[str], typer.Option(help="Exit 3 if a mean is above, e.g. hd95=10,betti0_err=2.")] = None,
    label: Annotated[Optional[int], typer.Option(help="Evaluate this label value of multi-label masks.")] = None,
    threshold: Annotated[float, typer.Option(help="Soft predictions: probability >= threshold is foreground.")] = 0.5,
    jobs: Annotated[int, typer.Option(help="Parallel processes (0: all cores).")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Unmatched files are an error.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Score masks against ground truth (overlap, topology, surface distances) into a CSV; gate CI."""
    from . import evaluate as ev

    options = ev.EvalOptions(metrics=tuple(ev.parse_metrics(metrics)), threshold=threshold, label=label, jobs=jobs)
    with _progress(quiet, show=False) as bar:
        task = bar.add_task("evaluating", total=None, info="")

        def start(total: int, unmatched) -> None:
            if not quiet:
                _report_unmatched(unmatched)
            bar.update(task, total=total)
            if total > 1:
                bar.start()

        report = ev.evaluate_paths(pred, gt, options, out, json_file, baseline, fail_under, fail_over, strict,
                                   overwrite, start, lambda row: bar.update(task, advance=1, info=row["case"]))
    result, comparison = report.result, report.comparison
    if not quiet:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(result.status_counts.items()))
        stdout.print(_summary_table(f"{len(result.rows)} case(s): {statuses}", result.summary))
        if comparison:
            table = Table(title=Text(f"vs baseline {baseline} ({comparison['cases']} cases)"), title_justify="left")
            for name in ("metric", "baseline", "now", "change", "improved", "same", "worse"):
                table.add_column(name, justify="left" if name == "metric" else "right")
            for metric, c in comparison["metrics"].items():
                table.add_row(metric, f"{c['baseline_mean']:.4g}", f"{c['mean']:.4g}", f"{c['mean_change']:+.4g}",
                              str(c["improved"]), str(c["same"]), str(c["worse"]))
            stdout.print(table)
            if "topology" in comparison:
                t = comparison["topology"]
                stdout.print(
                    f"topology correct (Betti numbers equal to the ground truth's): {t['correct_baseline']} -> "
                    f"{t['correct']} cases; repaired {t['repaired']}, broken {t['broken']}",
                    soft_wrap=True, highlight=False, markup=False,
                )
        if out is not None:
            err.print(f"wrote {out}", highlight=False, markup=False)
    if report.misses:
        err.print(Text.assemble(("thresholds missed: ", "bold red"), "; ".join(report.misses)), highlight=False,
                  soft_wrap=True)
        raise typer.Exit(EXIT["thresholds missed"])


@command([
    "rnca perturb --labels labels/ -o coarse/ --n 5",
    'rnca perturb --labels labels/ -o coarse/ --ops "breaks:0.8:count=3,specks:0.5" --keep 0.2',
])
def perturb(
    labels: Annotated[Path, typer.Option(help="Folder of ground-truth masks (binary, or use --label).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: <case>_<k> masks and manifest.csv.")],
    n: Annotated[int, typer.Option(help="Corrupted masks per label.")] = 3,
    ops: Annotated[str, typer.Option(help="Recipe: name:probability[:key=value...], comma separated.")] = "breaks:0.5,holes:0.3,specks:0.3,erode:0.2",
    keep: Annotated[float, typer.Option(help="Share of outputs left untouched (prevents over-refinement).")] = 0.1,
    label: Annotated[Optional[int], typer.Option(help="Use this label of multi-label masks.")] = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Make realistic coarse masks from ground truth, to train a refiner on."""
    from .perturb import perturb_folder

    with _progress(quiet) as bar:
        task = bar.add_task("perturbing", total=None, info="")
        written = perturb_folder(labels, out, n, ops, keep, seed, label, overwrite,
                                 lambda p: bar.update(task, advance=1, info=p.name))
    if not quiet:
        err.print(f"wrote {len(written)} masks and {out / 'manifest.csv'}", highlight=False, markup=False)


@command([
    "rnca synth --kind rings -o data/rings --n 200 --preview",
    "rnca synth --kind vessels -o data/vessels --size 128 --ops breaks:1.0,specks:0.5",
])
def synth(
    kind: Annotated[str, typer.Option(help="vessels, rings or blobs.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: images/, labels/, states/, manifest.csv.")],
    n: Annotated[int, typer.Option(help="Number of cases.")] = 500,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    ops: Annotated[Optional[str], typer.Option(help="Recipe for the coarse masks (default: one per kind; see README).")] = None,
    keep: Annotated[float, typer.Option(help="Share of coarse masks left equal to the ground truth.")] = 0.0,
    preview: Annotated[bool, typer.Option("--preview", help="Also write preview.png, a contact sheet of 16 cases.")] = False,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write a synthetic dataset (image, ground truth, coarse mask per case) for tutorials and training."""
    from .synth import write_dataset

    with _progress(quiet) as bar:
        task = bar.add_task(f"synth {kind}", total=n, info="")
        write_dataset(kind, n, size, out, seed, ops, keep, preview, overwrite,
                      lambda c: bar.update(task, advance=1, info=c.case_id))
    if not quiet:
        err.print(f"wrote {n} {kind} cases to {out}" + (f" and {out / 'preview.png'}" if preview else ""),
                  highlight=False, markup=False)


@command([
    "rnca export --model runs/vessels/best.pt -o models/vessels.pt",
])
def export(
    model: Annotated[Path, typer.Option(help="Checkpoint of a training run (last.pt or best.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write.")],
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write a run's checkpoint as a model to share: weights, config, provenance and refine defaults, without the training state."""
    from .checkpoint import export_model

    written = export_model(model, out, overwrite)
    if not quiet:
        err.print(f"wrote {written} ({written.stat().st_size / 1024:.0f} KB)", highlight=False, markup=False)


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(run())
