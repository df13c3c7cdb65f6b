"""The ``rnca`` command line: argument parsing, progress, tables and exit codes. Nothing else.

Every command forwards to one library function. :class:`~rnca_cli.errors.RncaError` (and option
values that fail validation) are caught here, printed on one line to stderr, and exit with status 1.
"""

from __future__ import annotations

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

from . import __version__
from .errors import RncaError

app = typer.Typer(
    name="rnca",
    help="Repair segmentation masks with refinement neural cellular automata (rNCA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # one message, one line, also when piped
stdout = Console()


def fail(message: str) -> None:
    """Print one line to stderr and exit 1."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


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
def _progress(quiet: bool, counts: bool = True) -> Iterator[Progress]:
    """A progress bar on stderr, showing done/total (``counts``) or a percentage. It stays after a
    command that succeeds; a command that fails removes it, so that its error is the one line left
    (the error names the file)."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn() if counts else TaskProgressColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err, disable=quiet, transient=False,
    )
    bar.start()
    try:
        yield bar
    except BaseException:
        if not bar.disable:  # Progress.stop would add a blank line on a non-terminal stderr
            bar.live.transient = True
            bar.live.stop()
        raise
    bar.stop()


def _report_unmatched(items: list[tuple[str, Path]], limit: int = 10) -> None:
    """List unmatched files on stderr: the first ``limit``, then how many more."""
    for kind, path in items[:limit]:
        err.print(f"[yellow]unmatched {kind}:[/] {path}", highlight=False)
    if len(items) > limit:
        err.print(f"[yellow]... and {len(items) - limit} more unmatched file(s)[/]")


Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto takes a CUDA GPU when present.")]
Seed = Annotated[int, typer.Option(help="Seed of every random draw (the update masks included).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that already exist.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")]
Threads = Annotated[
    int, typer.Option(help="CPU threads for PyTorch (0: all cores). Use 1 per process when running several at once.")
]


def _set_threads(threads: int) -> None:
    import torch

    if threads < 0:
        fail(f"--threads {threads}: expected 0 (all cores) or a positive count")
    if threads:
        torch.set_num_threads(threads)


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
    min_step: Annotated[
        Optional[int],
        typer.Option(help="Loss step t* is drawn from [min-step, steps]; default: half of --steps (paper: 32 of 64)."),
    ] = None,
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
    threads: Threads = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a refiner on images, ground truths and coarse masks (pool training, paper §3.3)."""
    from dataclasses import replace as with_fields

    from .device import resolve_device
    from .model import ModelConfig
    from .train import TrainConfig, load_dataset, train as run_training

    try:
        config = TrainConfig(
            iterations=iterations, pool=pool, batch=batch, replace=replace, steps=steps, min_step=min_step,
            lr=lr, clip=clip, patch=patch, overlap=overlap, val_cases=val_cases, val_every=val_every,
            save_every=save_every, axis=axis, seed=seed,
        )
        model_config = ModelConfig(channels=channels, hidden=hidden, fire_rate=fire_rate)
    except ValueError as exc:
        fail(str(exc))
    _set_threads(threads)
    try:
        torch_device = resolve_device(device)
        data = load_dataset(images, labels, states, config, label=label)
        model_config = with_fields(model_config, image_channels=data.train.images.shape[1])
        if not quiet:
            err.print(f"{data.description}; device {torch_device}")
            _report_unmatched([("file, not used", p) for p in data.unmatched])
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
    batch: Annotated[int, typer.Option(help="Cases (2D) or slices (3D) per forward pass (at most --tile squared pixels).")] = 32,
    tile: Annotated[int, typer.Option(help="Larger images are refined in tiles of this side (exact halo).")] = 768,
    precision: Annotated[
        str, typer.Option(help="Number format of the per-pixel MLP: fp32, bf16 or fp16 (half precision is for GPUs).")
    ] = "fp32",
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = 0,
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
                                save_prob=save_prob, batch=batch, tile=tile, precision=precision, overwrite=overwrite)
    except ValueError as exc:
        fail(str(exc))
    _set_threads(threads)
    try:
        if image.is_dir() or mask.is_dir():
            if not (image.is_dir() and mask.is_dir()):
                fail(f"{image if not image.is_dir() else mask}: folder mode needs --image and --mask to be folders")
            if out is None:
                fail("folder mode needs --out DIR")
            jobs, pairing = plan_folder(image, mask, out, options)
            if not quiet:
                _report_unmatched([("image, skipped", p) for p in pairing.unmatched_images]
                                  + [("mask, skipped", p) for p in pairing.unmatched_masks])
        else:
            jobs = plan_single(image, mask, out, options)
        torch_device = resolve_device(device)
        net = load_model(model, torch_device)
        start = time.perf_counter()
        # The bar counts pixels, so that one large image or volume shows progress too (tile by
        # tile, pass by pass); it is left out for a single case that is one forward pass.
        pixels = sum(job.pixels for job in jobs)
        single_pass = len(jobs) == 1 and pixels <= options.tile**2
        with _progress(quiet or single_pass, counts=False) as bar:
            task = bar.add_task("refining", total=pixels, info="")
            done = []

            def case_done(result) -> None:
                done.append(result)
                bar.update(task, info=f"{len(done)}/{len(jobs)} {result.case_id}")

            results = run_jobs(net, jobs, options, case_done, lambda n: bar.update(task, advance=n))
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


def _metric_list(value: str) -> list[str]:
    from .evaluate import parse_metrics

    try:
        return parse_metrics(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _limits(value: Optional[str]) -> dict[str, float]:
    from .evaluate import parse_thresholds

    try:
        return parse_thresholds(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _summary_table(title: str, summary: dict) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("metric", "mean", "std", "median", "valid", "nan"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for metric, s in summary.items():
        table.add_row(metric, f"{s['mean']:.4g}", f"{s['std']:.4g}", f"{s['median']:.4g}", str(s["count"]), str(s["nan"]))
    return table


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option(help="Predicted mask, or folder of predicted masks.")],
    gt: Annotated[Path, typer.Option(help="Ground-truth mask, or folder (paired by case id).")],
    out: Annotated[Optional[Path], typer.Option(help="Per-case CSV; <stem>_summary.csv (and _comparison.csv) beside it.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the summary as JSON.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Second prediction folder (e.g. before refinement) to compare against.")] = None,
    metrics: Annotated[str, typer.Option(help="Comma list of dice, cldice, precision, recall, betti, hd, hd95, assd, or all.")] = "all",
    fail_under: Annotated[Optional[str], typer.Option(help="Fail (exit 1) if a mean is below, e.g. dice=0.8,cldice=0.75.")] = None,
    fail_over: Annotated[Optional[str], typer.Option(help="Fail (exit 1) if a mean is above, e.g. hd95=10,betti0_err=2.")] = None,
    label: Annotated[Optional[int], typer.Option(help="Evaluate this label value of multi-label masks.")] = None,
    threshold: Annotated[float, typer.Option(help="Soft predictions: probability >= threshold is foreground.")] = 0.5,
    jobs: Annotated[int, typer.Option(help="Parallel processes (0: all cores).")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Unmatched files are an error.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Score masks against ground truth (overlap, topology, surface distances) into a CSV; gate CI."""
    from . import evaluate as ev
    from .io import check_writable

    which = _metric_list(metrics)
    under, over = _limits(fail_under), _limits(fail_over)
    try:
        options = ev.EvalOptions(metrics=tuple(which), threshold=threshold, label=label, jobs=jobs)
    except ValueError as exc:
        fail(str(exc))
    try:
        targets = ev.output_paths(out, baseline is not None) if out is not None else []
        for target in targets + ([json_file] if json_file is not None else []):
            check_writable(target, overwrite)
        pairs, lonely_pred, lonely_gt = ev.pair_files(pred, gt)
        base_pairs = ev.pair_files(baseline, gt)[0] if baseline is not None else []
        lonely = [("prediction", p) for p in lonely_pred] + [("ground truth", p) for p in lonely_gt]
        if baseline is not None:
            have = {p.case_id for p in base_pairs}
            lonely += [("baseline missing for", p.pred) for p in pairs if p.case_id not in have]
        if lonely and strict:
            kind, path = lonely[0]
            fail(f"{path}: unmatched {kind} ({len(lonely)} unmatched file(s) in all; --strict)")
        if not quiet:
            _report_unmatched(lonely)
        with _progress(quiet or len(pairs) == 1) as bar:
            task = bar.add_task("evaluating", total=len(pairs) + len(base_pairs), info="")
            tick = lambda row: bar.update(task, advance=1, info=row["case"])  # noqa: E731
            result = ev.evaluate(pairs, options, tick)
            result.unmatched_pred, result.unmatched_gt = lonely_pred, lonely_gt
            comparison = ev.compare(result, ev.evaluate(base_pairs, options, tick)) if base_pairs else None
        misses = ev.check_thresholds(result.summary, under, over)
        thresholds = {"fail_under": under, "fail_over": over, "misses": misses} if (under or over) else None
        ev.write_results(result, out, json_file, comparison, thresholds)
    except RncaError as exc:
        fail(str(exc))
    if not quiet:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(result.status_counts.items()))
        out_console = stdout
        out_console.print(_summary_table(f"{len(result.rows)} case(s): {statuses}", result.summary))
        if comparison:
            table = Table(title=f"vs baseline {baseline} ({comparison['cases']} cases)", title_justify="left")
            for name in ("metric", "baseline", "now", "change", "improved", "same", "worse"):
                table.add_column(name, justify="left" if name == "metric" else "right")
            for metric, c in comparison["metrics"].items():
                table.add_row(metric, f"{c['baseline_mean']:.4g}", f"{c['mean']:.4g}", f"{c['mean_change']:+.4g}",
                              str(c["improved"]), str(c["same"]), str(c["worse"]))
            out_console.print(table)
            if "topology" in comparison:
                t = comparison["topology"]
                out_console.print(
                    f"topology correct (Betti numbers equal to the ground truth's): {t['correct_baseline']} -> "
                    f"{t['correct']} cases; repaired {t['repaired']}, broken {t['broken']}",
                    soft_wrap=True,
                )
        if out is not None:
            err.print(f"wrote {out}", highlight=False)
    if misses:
        err.print("[bold red]thresholds missed:[/] " + "; ".join(misses), highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def perturb(
    labels: Annotated[Path, typer.Option(help="Folder of ground-truth masks (binary, or use --label).")],
    out: Annotated[Path, typer.Option(help="Output folder: <case>_<k> masks and manifest.csv.")],
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

    try:
        with _progress(quiet) as bar:
            task = bar.add_task("perturbing", total=None, info="")
            written = perturb_folder(labels, out, n, ops, keep, seed, label, overwrite,
                                     lambda p: bar.update(task, advance=1, info=p.name))
    except RncaError as exc:
        fail(str(exc))
    if not quiet:
        err.print(f"wrote {len(written)} masks and {out / 'manifest.csv'}", highlight=False)


@app.command()
def synth(
    kind: Annotated[str, typer.Option(help="vessels, rings or blobs.")],
    out: Annotated[Path, typer.Option(help="Output folder: images/, labels/, states/, manifest.csv.")],
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

    try:
        with _progress(quiet) as bar:
            task = bar.add_task(f"synth {kind}", total=n, info="")
            write_dataset(kind, n, size, out, seed, ops, keep, preview, overwrite,
                          lambda c: bar.update(task, advance=1, info=c.case_id))
    except RncaError as exc:
        fail(str(exc))
    if not quiet:
        err.print(f"wrote {n} {kind} cases to {out}" + (f" and {out / 'preview.png'}" if preview else ""), highlight=False)


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(run())
