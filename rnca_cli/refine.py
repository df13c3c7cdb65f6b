"""Inference: refine masks with a trained rNCA, from numpy arrays or from files and folders.

Decisions a user can rely on (also in the README):

* **Reproducible.** The stochastic update masks of a 2D case (or of slice k of a volume) are a
  hash of ``seed`` (``seed + k`` for slice k), the step and the pixel position
  (:class:`rnca_cli.model.FireNoise`). A case therefore refines to the same mask alone, in a folder,
  in any batch size, and tiled or not.
* **Bounded memory.** Images larger than ``tile`` pixels on a side are refined tile by tile with an
  exact halo (:mod:`rnca_cli.inference`).
* **What the model sees.** The image is adapted to the model's channel count (gray <-> RGB) and,
  for a model trained with ``--image-norm``, contrast-normalised per 2D image before tiling
  (:mod:`rnca_cli.preprocess`).
* **3D.** A NIfTI volume is refined slice by slice along ``axis`` (default 2) with a 2D model;
  slices go through the model in batches of ``batch``.
* **Labels.** With ``label=N`` the mask is a label map: label N is refined as a binary mask and
  written back into the map: pixels the refiner claims become N unless they belong to another label,
  pixels of N it drops become background; other labels are left exactly as they were.
* **Do no harm.** Files are refined with seeded runs, cleaned up and judged by
  :mod:`rnca_cli.guard`; a case the guard does not trust is written as its input mask and marked
  ``kept`` in the per-case report (``refine.csv`` in folder mode).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import guard, inference, io
from .errors import InputError, OutputError, UsageError
from .inference import DEFAULT_TILE, refine_image
from .options import RefineOptions
from .preprocess import match_channels, normalise
from .model import RNCA

# Told how many more pixels (voxels) are refined, for progress bars; None: nobody is told.
OnPixels = Callable[[int], None] | None


def _model_device(model: RNCA) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def refine_batch(
    model: RNCA, images: np.ndarray, masks: np.ndarray, steps: int, seeds: Sequence[int], tile: int = DEFAULT_TILE,
    precision: str = "fp32", progress: OnPixels = None,
) -> np.ndarray:
    """Refine a batch of equal-size 2D cases.

    images: (B, H, W, C) float in [0, 1] with the model's channel count (normalised here if the
    model's ``image_norm`` says so); masks: (B, H, W) in [0, 1]; seeds: one per case. Returns
    (B, H, W) float32 probability. Cases no larger than ``tile`` go through the model together, at
    most ``tile**2`` pixels per pass; larger ones are refined tile by tile. The result does not
    depend on either (bounded memory, same masks). ``precision``: see
    :func:`rnca_cli.inference.rollout`. ``progress``: called with the number of pixels refined
    after each forward pass (each tile of a large case).
    """
    b, h, w = masks.shape
    images = normalise(images, model.config.image_norm)  # on whole images, before any tiling
    if max(h, w) > tile:
        return np.stack([
            refine_image(model, images[i], masks[i], steps, int(seeds[i]), tile, precision=precision, progress=progress)
            for i in range(b)
        ])
    # At most one tile's worth of pixels per forward pass, whatever the batch size asked for.
    per_pass = max(1, (tile * tile) // (h * w))
    device = _model_device(model)
    out = np.empty((b, h, w), dtype=np.float32)
    for start in range(0, b, per_pass):
        rows = slice(start, start + per_pass)
        image = torch.from_numpy(np.ascontiguousarray(images[rows], dtype=np.float32)).to(device).permute(0, 3, 1, 2)
        mask = torch.from_numpy(np.ascontiguousarray(masks[rows], dtype=np.float32)).to(device)  # (b, H, W)
        seed_tensor = torch.tensor([int(x) for x in seeds[rows]], dtype=torch.int64, device=device)
        prob = inference.rollout(model, image, mask, steps, seed_tensor, precision=precision)
        out[rows] = prob.float().cpu().numpy()
        if progress is not None:
            progress(prob.numel())
    return out


def as_unit(array, what: str, mask: bool = False) -> np.ndarray:
    """Image or mask data as float32 in [0, 1], from the dtypes users pass: bool; uint8 (an image
    is divided by 255; a mask too unless it holds only 0 and 1); uint16 (divided by 65535); other
    integers and floats already in [0, 1]. NaN, infinities and values out of range are refused."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / (1.0 if mask and a.max(initial=0) <= 1 else 255.0)
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{what}: dtype {a.dtype} is not a number type")
    out = a.astype(np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"{what}: holds NaN or infinite values")
    if out.size and (out.min() < 0 or out.max() > 1):
        raise InputError(f"{what}: values must lie in [0, 1] (found {out.min():g}..{out.max():g}); "
                         "pass uint8 data as uint8, or divide it by 255")
    return out


def refine_array(
    model: RNCA,
    image: np.ndarray,
    mask: np.ndarray,
    steps: int = 64,
    seed: int = 0,
    axis: int | None = None,
    batch: int = 32,
    tile: int = DEFAULT_TILE,
    precision: str = "fp32",
    progress: OnPixels = None,
) -> np.ndarray:
    """Refine one mask; returns the refined probability map (threshold it with ``>= 0.5``).

    Args:
        model: from :func:`rnca_cli.load_model`, on the device to compute on.
        image: 2D (H, W) or (H, W, C), or 3D (X, Y, Z) or (X, Y, Z, C); float in [0, 1], or uint8 /
            uint16 / bool (:func:`as_unit`).
        mask: (H, W) or (X, Y, Z); binary or probability in [0, 1], or uint8 0/255, or bool.
        steps: automaton updates.
        seed: seed of the stochastic updates (same seed, same result).
        axis: for a 3D mask, the axis the volume is sliced along; it must be given, so that a stack
            of 2D images is never refined as a volume by accident (use :func:`refine_images`).
        batch: for 3D, slices per forward pass.
        tile: images (or slices) larger than this are refined in tiles of this size with an exact
            halo, bounding memory; the result is the same.
        precision: number format of the per-pixel MLP, ``fp32``, ``bf16`` or ``fp16`` (the state
            stays float32). Half precision is for GPUs: on CPUs without native support it is slower.
        progress: called with a number of pixels (voxels) each time that many are refined; they
            add up to ``mask.size``. For progress bars on large images and volumes.
    """
    mask = as_unit(mask, "mask", mask=True)
    image = as_unit(image, "image")
    if image.ndim == mask.ndim:
        image = image[..., None]
    if image.shape[:-1] != mask.shape or mask.ndim not in (2, 3):
        raise InputError(f"image shape {image.shape} does not match mask shape {mask.shape}")
    image = match_channels(image, model.config.image_channels)
    if mask.ndim == 2:
        return refine_batch(model, image[None], mask[None], steps, [seed], tile, precision, progress)[0]
    if axis is None:
        raise InputError(f"mask shape {mask.shape} is 3D: pass axis= to refine a volume slice by slice, "
                         "or refine_images() for a stack of 2D images")
    # 3D: slices along `axis` become a batch of 2D cases.
    img_slices = np.moveaxis(image, axis, 0)  # (S, A, B, C)
    mask_slices = np.moveaxis(mask, axis, 0)  # (S, A, B)
    out = np.empty(mask_slices.shape, dtype=np.float32)
    for start in range(0, len(mask_slices), batch):
        rows = slice(start, start + batch)
        seeds = [seed + k for k in range(start, min(start + batch, len(mask_slices)))]
        out[rows] = refine_batch(model, img_slices[rows], mask_slices[rows], steps, seeds, tile, precision, progress)
    return np.moveaxis(out, 0, axis)


def refine_images(
    model: RNCA, images: np.ndarray, masks: np.ndarray, steps: int = 64, seed: int = 0, batch: int = 32,
    tile: int = DEFAULT_TILE, precision: str = "fp32",
) -> np.ndarray:
    """Refine a stack of equal-size 2D cases, each as ``refine_array`` would alone with ``seed``
    (as a folder refine does): images (N, H, W) or (N, H, W, C), masks (N, H, W), dtypes as for
    :func:`refine_array`. Returns (N, H, W) float32 probabilities."""
    masks = as_unit(masks, "masks", mask=True)
    images = as_unit(images, "images")
    if images.ndim == masks.ndim:
        images = images[..., None]
    if masks.ndim != 3 or images.shape[:-1] != masks.shape:
        raise InputError(f"images shape {images.shape} and masks shape {masks.shape}: expected (N, H, W[, C]) and (N, H, W)")
    images = match_channels(images, model.config.image_channels)
    out = np.empty(masks.shape, dtype=np.float32)
    for start in range(0, len(masks), batch):
        rows = slice(start, start + batch)
        out[rows] = refine_batch(model, images[rows], masks[rows], steps, [seed] * len(masks[rows]), tile, precision)
    return out


# -- files and folders ---------------------------------------------------------------------------


@dataclass
class Job:
    """One case to refine and where its outputs go."""

    case_id: str
    images: list[Path]
    mask: Path
    out: Path
    prob_out: Path | None
    shape: tuple[int, ...]  # the mask's spatial shape, from its header
    pictures: dict[str, Path] = field(default_factory=dict)  # "overlay", "strip", "gif" -> where they go
    uncertainty_out: Path | None = None

    @property
    def pixels(self) -> int:
        """Pixels (voxels) to refine: the unit of :func:`run_jobs`' progress."""
        return math.prod(self.shape)


@dataclass
class CaseResult:
    """One written case: where, and the guard's numbers and decision."""

    case_id: str
    out: Path
    verdict: guard.Verdict

    @property
    def foreground_before(self) -> int:
        return self.verdict.foreground_before

    @property
    def foreground_after(self) -> int:
        """Foreground of the mask written (the input's when the guard kept it)."""
        return self.verdict.foreground_before if self.verdict.kept else self.verdict.foreground_refined


REPORT_COLUMNS = ["case", "status", "reason", "foreground_before", "foreground_refined", "change", "changed",
                  "agreement", "uncertainty", "output"]


def report_rows(results: list[CaseResult]) -> list[list]:
    """The per-case report: one row per case, :data:`REPORT_COLUMNS`."""
    return [[r.case_id, "kept" if r.verdict.kept else "refined", r.verdict.kept, r.verdict.foreground_before,
             r.verdict.foreground_refined, f"{r.verdict.change:.4f}", f"{r.verdict.changed:.4f}", f"{r.verdict.agreement:.4f}",
             f"{r.verdict.uncertainty:.4f}", str(r.out)] for r in results]


def plan_single(image: Path, mask: Path, out: Path | None, options: RefineOptions) -> list[Job]:
    """Job for one file pair. Output: ``out``; ``out/<case><suffix>`` if ``out`` is a folder;
    by default ``<mask stem>_refined<suffix>`` beside the mask."""
    cid = io.case_id(mask)
    if out is None:
        out = mask.with_name(f"{cid}_refined{io.output_suffix(mask)}")
    elif out.is_dir():
        out = out / f"{cid}{io.output_suffix(mask)}"
    _check_output_suffix(out, mask)
    prob = out.with_name(f"{io.case_id(out)}_prob{io.suffix_of(out)}") if options.save_prob else None
    spread = options.save_uncertainty / f"{cid}{io.output_suffix(mask)}" if options.save_uncertainty else None
    jobs = [Job(cid, [image], mask, out, prob, io.peek_shape(mask), _picture_paths(cid, options), spread)]
    _check_inputs(jobs[0])
    _check_outputs(jobs, options.overwrite, options.report)
    return jobs


@dataclass
class FolderPlan:
    """The jobs of a folder refine, and what was left out: unpaired files, cases already finished
    (their mask outputs), cases that failed their checks as (case id, message)."""

    jobs: list[Job]
    pairing: io.Pairing
    existing: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def plan_folder(image_dir: Path, mask_dir: Path, out_dir: Path, options: RefineOptions) -> FolderPlan:
    """Jobs for every paired case (with ``num_parts`` > 1, every ``num_parts``-th case by case id from
    ``part_id`` on, so that a job array's parts together make one whole run); outputs
    ``out_dir/<case><suffix>``, probabilities in ``out_dir/prob``.

    With ``skip_existing``, a case whose mask output exists is left out (a finished case: the mask
    is written last). With ``continue_on_error``, a case whose files are unreadable or disagree is
    left out and recorded in ``failed`` as (case id, message) instead of stopping the plan."""
    pairing = io.pair_folders(image_dir, mask_dir)
    if not pairing.cases:
        raise InputError(f"{image_dir}: no image has a mask with the same case id in {mask_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    for folder, option in ((out_dir, "--out"), (options.save_overlay, "--save-overlay"),
                           (options.save_trajectory, "--save-trajectory"), (options.save_uncertainty, "--save-uncertainty")):
        if folder is not None:
            io.refuse_input_folders(folder, (image_dir, mask_dir), option)
    plan = FolderPlan([], pairing)
    for case in pairing.cases[options.part_id :: options.num_parts]:  # parts of a job array, nnU-Net's way
        name = case.case_id + io.output_suffix(case.mask)
        if options.skip_existing and (out_dir / name).exists():
            plan.existing.append(out_dir / name)
            continue
        prob = out_dir / "prob" / name if options.save_prob else None
        spread = options.save_uncertainty / name if options.save_uncertainty else None
        try:
            job = Job(case.case_id, case.images, case.mask, out_dir / name, prob, io.peek_shape(case.mask),
                      _picture_paths(case.case_id, options), spread)
            _check_inputs(job)
        except InputError as exc:
            if not options.continue_on_error:
                raise
            plan.failed.append((case.case_id, str(exc)))
            continue
        plan.jobs.append(job)
    # a case left unfinished by a killed run may have its other outputs: those are replaced
    _check_outputs(plan.jobs, options.overwrite or options.skip_existing, options.report)
    return plan


def default_report(out_dir: Path, options: RefineOptions) -> Path:
    """Folder mode's per-case report: ``refine.csv``, one per part of a job array."""
    if options.num_parts > 1:
        return out_dir / f"refine_part{options.part_id}of{options.num_parts}.csv"
    return out_dir / "refine.csv"


def _picture_paths(case_id: str, options: RefineOptions) -> dict[str, Path]:
    paths = {}
    if options.save_overlay is not None:
        paths["overlay"] = options.save_overlay / f"{case_id}.png"
    if options.save_trajectory is not None:
        paths["strip"] = options.save_trajectory / f"{case_id}.png"
        paths["gif"] = options.save_trajectory / f"{case_id}.gif"
    return paths


def _check_output_suffix(out: Path, mask: Path) -> None:
    if io.suffix_of(out) == "":
        raise OutputError(f"{out}: not an existing folder and no file suffix; name a file such as "
                          f"{out}{io.output_suffix(mask)}, or create the folder to write {out}/<case>{io.output_suffix(mask)}")
    if io.is_nifti(mask) != io.is_nifti(out):
        raise OutputError(f"{out}: output must be {'NIfTI' if io.is_nifti(mask) else 'PNG or TIFF'} like its mask {mask}")
    if not io.is_nifti(out) and io.suffix_of(out) not in io.LOSSLESS_2D:
        raise OutputError(f"{out}: masks are written only as PNG or TIFF, not {io.suffix_of(out)!r}")


def _check_inputs(job: Job) -> None:
    """Refuse, from the file headers, a case whose image and mask disagree (shape, spacing, 2D or NIfTI)."""
    for image in job.images:
        if io.is_nifti(image) != io.is_nifti(job.mask):
            raise InputError(f"{job.mask}: mask and image {image} must both be 2D images or both NIfTI")
        if io.peek_shape(image) != job.shape:
            raise InputError(f"{job.mask}: mask shape {job.shape} differs from image {image} shape {io.peek_shape(image)}")
        spacing, image_spacing = io.peek_spacing(job.mask), io.peek_spacing(image)
        if spacing is not None and not np.allclose(spacing, image_spacing, rtol=1e-4, atol=0):
            raise InputError(f"{job.mask}: mask spacing {spacing} differs from image {image} spacing {image_spacing}")


def _check_outputs(jobs: list[Job], overwrite: bool, report: Path | None = None) -> None:
    """Refuse before any work: existing outputs without overwrite, outputs that are inputs, two
    outputs on one path (the inputs' headers are :func:`_check_inputs`' part)."""
    inputs = {p.resolve() for job in jobs for p in (*job.images, job.mask)}
    if report is not None:
        if report.resolve() in inputs:
            raise OutputError(f"{report}: is an input file; inputs are never overwritten")
        if report.exists() and not overwrite:
            raise OutputError(f"{report}: already exists; pass --overwrite to replace it")
    claimed: dict[Path, Path] = {report.resolve(): report} if report is not None else {}
    for job in jobs:
        for target in filter(None, (job.out, job.prob_out, job.uncertainty_out, *job.pictures.values())):
            if target.resolve() in claimed:  # e.g. --save-overlay and --save-trajectory in one folder
                raise OutputError(f"{target}: two outputs of this run would share this path "
                                  f"(also {claimed[target.resolve()]}); give the output options different folders")
            claimed[target.resolve()] = target
            if target.resolve() in inputs:
                raise OutputError(f"{target}: is an input file; inputs are never overwritten")
            if target.exists() and not overwrite:
                raise OutputError(f"{target}: already exists; pass --overwrite to replace it")


def _load(job: Job, model: RNCA, options: RefineOptions) -> tuple[io.Loaded, io.Loaded, np.ndarray]:
    image = io.read_images(job.images)
    mask = io.read_mask(job.mask, label=options.label)
    if image.data.shape[:-1] != mask.data.shape:
        raise InputError(
            f"{job.mask}: mask shape {mask.data.shape} differs from image {image.path} shape {image.data.shape[:-1]}"
        )
    return image, mask, match_channels(image.data, model.config.image_channels, image.path)


def _middle(a: np.ndarray, axis: int, volume: bool) -> np.ndarray:
    """The middle slice along ``axis`` of a volume's array; a 2D array as it is."""
    return np.take(a, a.shape[axis] // 2, axis=axis) if volume else a


def _pictures(job: Job, model: RNCA, image: np.ndarray, mask: io.Loaded, binary: np.ndarray,
              options: RefineOptions) -> None:
    """The overlay and trajectory pictures of one case (a volume: of its middle slice along ``axis``)."""
    from . import pictures

    volume = mask.is_volume
    img, before, after = (_middle(a, options.axis, volume) for a in (image, mask.data, binary))
    if "overlay" in job.pictures:
        io.make_folder(job.pictures["overlay"].parent)
        pictures.overlay(img, before, after, job.pictures["overlay"])
    if "strip" in job.pictures:
        seed = options.seed + (mask.data.shape[options.axis] // 2 if volume else 0)  # the slice's seed
        maps = inference.trajectory(model, img, before, options.steps, seed)
        scale = max(1, 256 // max(before.shape))
        io.make_folder(job.pictures["strip"].parent)
        pictures.trajectory_strip([{"image": img, "coarse": before, "steps": {
            t: maps[t - 1] for t in pictures.recorded_steps(options.steps)}}], job.pictures["strip"], scale)
        pictures.trajectory_gif(img, [before, *maps], job.pictures["gif"], scale)


@dataclass
class Judged:
    """One case's runs combined (:func:`rnca_cli.guard.combine`): what will be written."""

    verdict: guard.Verdict
    prob: np.ndarray  # the probability written with --save-prob (the input's when kept)
    binary: np.ndarray  # the mask decided (the input's when kept)
    result: np.ndarray  # what the mask file holds (a label map with --label)
    spread: np.ndarray  # per-pixel std of the runs


def _judge(mask: io.Loaded, probs: np.ndarray, options: RefineOptions, min_size: int,
           limits: guard.GuardLimits) -> Judged:
    """Combine and judge a case's runs (``probs``: (runs, *shape)); nothing is written."""
    prob, binary, spread, verdict = guard.combine(probs, mask.data, options.threshold, min_size, limits,
                                                  options.ensemble)
    if options.label is not None:
        labels = mask.meta["labels"]
        if verdict.kept:
            result = labels
        else:
            result = np.where(labels == options.label, 0, labels)
            result = np.where(binary & (result == 0), options.label, result).astype(labels.dtype)
    else:
        result = binary
    return Judged(verdict, mask.data if verdict.kept else prob, binary, result, spread)


def _write(job: Job, mask: io.Loaded, judged: Judged) -> CaseResult:
    """Write a case's outputs, the mask last: a case whose mask exists is finished (--skip-existing)."""
    if job.prob_out is not None:
        io.make_folder(job.prob_out.parent)
        io.write_mask(job.prob_out, judged.prob, mask, soft=True)
    if job.uncertainty_out is not None:
        io.make_folder(job.uncertainty_out.parent)
        io.write_mask(job.uncertainty_out, judged.spread, mask, soft=True)
    io.make_folder(job.out.parent)
    io.write_mask(job.out, judged.result, mask)
    return CaseResult(job.case_id, job.out, judged.verdict)


def run_jobs(
    model: RNCA, jobs: list[Job], options: RefineOptions, on_case: Callable[[CaseResult], None] | None = None,
    progress: OnPixels = None, on_error: Callable[[Job, InputError], None] | None = None,
) -> list[CaseResult]:
    """Refine and write every job. Consecutive 2D cases of equal shape share a forward pass.

    Each case is refined with ``options.runs`` seeded runs and judged by
    :func:`rnca_cli.guard.combine`; ``min_size`` and the guard's limits are the options', or else
    the model's stored defaults.
    ``on_case`` gets each case's result once it is written; ``progress`` gets numbers of pixels as
    they are refined (after each forward pass or tile), adding up to the jobs' ``pixels`` times ``options.runs``.
    ``on_error``, if given, gets a case whose files cannot be read, and the run goes on without it;
    otherwise the error stops the run."""
    results: list[CaseResult] = []
    pending: list[tuple[Job, io.Loaded, np.ndarray]] = []
    runs = options.runs
    defaults = getattr(model, "refine_defaults", {})  # what the checkpoint carries (rnca train --min-size)
    min_size = options.min_size if options.min_size is not None else int(defaults.get("min_size", 0))
    limits = guard.limits_for(defaults, options.guard, options.guard_change, options.guard_agreement)

    def finish(job: Job, mask: io.Loaded, probs: np.ndarray, image: np.ndarray) -> None:
        judged = _judge(mask, probs, options, min_size, limits)
        if job.pictures:
            _pictures(job, model, image, mask, judged.binary, options)
        results.append(_write(job, mask, judged))
        if on_case:
            on_case(results[-1])

    def flush() -> None:
        if not pending:
            return
        images = np.stack([img for _, _, img in pending])
        masks = np.stack([m.data for _, m, _ in pending])
        probs = np.stack([
            refine_batch(model, images, masks, options.steps, [guard.run_seed(options.seed, r)] * len(pending),
                         options.tile, options.precision, progress)
            for r in range(runs)
        ], axis=1)  # (cases, runs, H, W)
        for (job, mask, image), case_probs in zip(pending, probs):
            finish(job, mask, case_probs, image)
        pending.clear()

    for job in jobs:
        try:
            image, mask, image_data = _load(job, model, options)
        except InputError as exc:
            if on_error is None:
                raise
            on_error(job, exc)
            continue
        if mask.is_volume:
            flush()
            finish(job, mask, np.stack([refine_array(
                model, image_data, mask.data, options.steps, guard.run_seed(options.seed, r), options.axis,
                options.batch, options.tile, options.precision, progress,
            ) for r in range(runs)]), image_data)
            continue
        if pending and pending[0][1].data.shape != mask.data.shape:
            flush()
        pending.append((job, mask, image_data))
        if len(pending) >= options.batch:
            flush()
    flush()
    return results


@dataclass
class RefineRun:
    """What :func:`refine_files` did: the cases written, the unmatched files as (kind, path), the
    device it ran on, the seconds it took, the per-case report written (or None), the cases skipped
    because their outputs exist, those that failed as (case id, message), and the stale temporary
    files of a killed run that were removed."""

    results: list[CaseResult]
    unmatched: list[tuple[str, Path]]
    device: str
    seconds: float
    report: Path | None = None
    existing: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    swept: list[Path] = field(default_factory=list)


def refine_files(
    image: Path, mask: Path, out: Path | None, model: str = "rings", options: RefineOptions = RefineOptions(),
    device: str = "auto", on_start: Callable[[list[Job], list[tuple[str, Path]]], None] | None = None,
    on_case: Callable[[CaseResult], None] | None = None, progress: OnPixels = None,
) -> RefineRun:
    """``rnca refine``: one image and mask (files), or every paired case of two folders, refined
    with ``model`` (a shipped name or a checkpoint path) and written to ``out`` (folder mode needs
    it; for one case it defaults to ``<mask>_refined`` beside the mask).

    Every input header and output path is checked before any work. ``on_start(jobs, unmatched)``
    is called once the work is planned; ``on_case`` and ``progress`` as for :func:`run_jobs`.
    """
    import time

    from .checkpoint import load_model
    from .device import resolve_device

    unmatched: list[tuple[str, Path]] = []
    folder = image.is_dir() or mask.is_dir()
    plan = None
    if folder:
        if not (image.is_dir() and mask.is_dir()):
            raise UsageError(f"{image if not image.is_dir() else mask}: folder mode needs --image and --mask to be folders")
        if out is None:
            raise UsageError("folder mode needs --out DIR")
        if options.report is None:
            options = replace(options, report=default_report(out, options))
        plan = plan_folder(image, mask, out, options)  # every check, before the folder is made
        unmatched = [("image, skipped", p) for p in plan.pairing.unmatched_images]
        unmatched += [("mask, skipped", p) for p in plan.pairing.unmatched_masks]
        jobs = plan.jobs
    else:
        if options.num_parts > 1:
            raise UsageError("--num-parts splits a folder; give --image and --mask folders")
        if options.skip_existing or options.continue_on_error:
            raise UsageError("--skip-existing and --continue-on-error are for folders; give --image and --mask folders")
        jobs = plan_single(image, mask, out, options)
    torch_device = resolve_device(device)
    net = load_model(model, torch_device)
    failed: list[tuple[str, str]] = list(plan.failed) if plan else []
    swept: list[Path] = []
    with io.claim_folder(out) if folder else contextlib.nullcontext():
        if folder:  # held now: plan again (another run may have written meanwhile), sweep what a killed run left
            plan = plan_folder(image, mask, out, options)
            jobs, failed = plan.jobs, list(plan.failed)
            for where in {out, *(j.prob_out.parent for j in jobs if j.prob_out)}:
                swept += io.sweep_temporaries(where)
        if on_start:
            on_start(jobs, unmatched)
        start = time.perf_counter()
        on_error = (lambda job, exc: failed.append((job.case_id, str(exc)))) if options.continue_on_error else None
        results = run_jobs(net, jobs, options, on_case, progress, on_error)
        if options.report is not None:
            io.make_folder(options.report.parent)
            io.write_csv(options.report, REPORT_COLUMNS, report_rows(results))
    return RefineRun(results, unmatched, str(torch_device), time.perf_counter() - start, options.report,
                     plan.existing if plan else [], failed, swept)
