"""Folder evaluation: per-case metrics into CSV, summaries, baseline comparison, CI thresholds.

Binarisation is the same for every mask: a mask with two values by "nonzero"; a soft
prediction (more values, read as probability by ``rnca_cli.io.read_mask``) at ``threshold``; a
multi-label mask only with ``label``. Ground truth must be binary (or a label map with ``label``):
a soft ground truth is refused. Spacing comes from NIfTI header zooms (1 per axis for 2D images);
prediction and ground truth must agree in shape and spacing (relative tolerance 1e-4).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import io
from .errors import InputError, OutputError, RncaError, UsageError
from .metrics import HIGHER_IS_BETTER, METRIC_GROUPS, case_metrics

ALL_COLUMNS = (
    "dice", "cldice", "precision", "recall", "betti0_err", "betti1_err", "betti2_err", "betti_err", "hd", "hd95", "assd",
)


def columns_for(which: Sequence[str]) -> list[str]:
    """Metric columns produced by the metric groups ``which``, in CSV order."""
    expanded = set(which) | ({"betti0_err", "betti1_err", "betti2_err", "betti_err"} if "betti" in which else set())
    return [c for c in ALL_COLUMNS if c in expanded]


def parse_metrics(text: str) -> list[str]:
    """``"dice,hd95"`` -> groups; ``all`` -> every group. Raises ValueError naming unknown ones."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(METRIC_GROUPS)
    unknown = [n for n in names if n not in METRIC_GROUPS]
    if unknown or not names:
        raise UsageError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(METRIC_GROUPS)}")
    return [m for m in METRIC_GROUPS if m in names]


def parse_thresholds(text: str | None) -> dict[str, float]:
    """``"dice=0.8,hd95=10"`` -> {"dice": 0.8, "hd95": 10.0}; raises ValueError on bad syntax."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in ALL_COLUMNS:
            raise UsageError(f"{item!r}: expected METRIC=VALUE with METRIC one of {', '.join(ALL_COLUMNS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"{item!r}: {value!r} is not a number") from None
        if not math.isfinite(out[name]):
            raise UsageError(f"{item!r}: a threshold must be a finite number")
    return out


@dataclass(frozen=True)
class EvalOptions:
    metrics: tuple[str, ...] = METRIC_GROUPS
    threshold: float = 0.5
    label: int | None = None
    jobs: int = 0  # 0: all cores

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise UsageError("threshold must be in (0, 1]")
        if self.jobs < 0:
            raise UsageError("jobs must be >= 0")


@dataclass
class Pair:
    case_id: str
    pred: Path
    gt: Path


@dataclass
class Evaluation:
    rows: list[dict]  # one per case: case, status, metric columns
    columns: list[str]
    summary: dict[str, dict[str, float]]
    status_counts: dict[str, int]
    unmatched_pred: list[Path] = field(default_factory=list)
    unmatched_gt: list[Path] = field(default_factory=list)


# -- pairing and one case ------------------------------------------------------------------------


def pair_files(pred: Path, gt: Path) -> tuple[list[Pair], list[Path], list[Path]]:
    """File + file: one pair. Folder + folder: pairs by case id, plus unmatched of each side."""
    for path in (pred, gt):  # checked first: a missing path is neither a file nor a folder
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
    if pred.is_dir() != gt.is_dir():
        raise InputError(f"{pred if gt.is_dir() else gt}: --pred and --gt must both be files or both folders")
    if not pred.is_dir():
        return [Pair(io.case_id(gt), pred, gt)], [], []
    preds = io.by_case_id(io.list_files(pred))
    gts = io.by_case_id(io.list_files(gt))
    pairs = [Pair(cid, preds[cid], gts[cid]) for cid in sorted(preds.keys() & gts.keys())]
    if not pairs:
        raise InputError(f"{pred}: no prediction has a ground truth with the same case id in {gt}")
    return pairs, [p for c, p in sorted(preds.items()) if c not in gts], [g for c, g in sorted(gts.items()) if c not in preds]


def _read_binary(path: Path, options: EvalOptions, ground_truth: bool) -> io.Loaded:
    loaded = io.read_mask(path, label=options.label)
    if ground_truth and options.label is None and not np.isin(loaded.data, (0.0, 1.0)).all():
        raise InputError(f"{path}: ground truth is not binary (soft or several labels); pass --label N")
    loaded.data = loaded.data >= options.threshold
    return loaded


def _mm(spacing: Sequence[float]) -> str:
    """Voxel spacing as the header means it: float32 0.8 as 0.8, not 0.800000011920929."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in spacing) + ")"


def evaluate_pair(pair: Pair, options: EvalOptions) -> dict:
    """Metrics row of one case. Raises InputError on shape or spacing mismatch."""
    pred = _read_binary(pair.pred, options, ground_truth=False)
    gt = _read_binary(pair.gt, options, ground_truth=True)
    if pred.data.shape != gt.data.shape:
        raise InputError(f"{pair.pred}: shape {pred.data.shape} differs from ground truth {pair.gt} {gt.data.shape}")
    if not np.allclose(pred.spacing, gt.spacing, rtol=1e-4, atol=0):
        raise InputError(
            f"{pair.pred}: spacing {_mm(pred.spacing)} differs from ground truth {pair.gt} {_mm(gt.spacing)}"
        )
    row = case_metrics(pred.data, gt.data, gt.spacing, options.metrics)
    if gt.data.ndim == 2:
        row.pop("betti2_err", None)
    return {"case": pair.case_id, **row}


def _run(pair_and_options):
    pair, options = pair_and_options
    try:
        return evaluate_pair(pair, options)
    except RncaError as exc:  # pickled back to the parent as a value, raised there
        return exc


# -- many cases ----------------------------------------------------------------------------------


def summarize(rows: list[dict], columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per column: mean, std, median over valid (finite) values, their count, and the NaN count."""
    summary = {}
    for column in columns:
        values = np.array([r[column] for r in rows if column in r], dtype=float)
        valid = values[np.isfinite(values)]
        summary[column] = {
            "mean": float(valid.mean()) if len(valid) else math.nan,
            "std": float(valid.std()) if len(valid) else math.nan,
            "median": float(np.median(valid)) if len(valid) else math.nan,
            "count": int(len(valid)),
            "nan": int(len(values) - len(valid)),
        }
    return summary


def evaluate(
    pairs: list[Pair], options: EvalOptions, on_case: Callable[[dict], None] | None = None
) -> Evaluation:
    """Evaluate every pair (in parallel over ``options.jobs`` processes) in case order."""
    jobs = options.jobs or os.cpu_count() or 1
    work = [(p, options) for p in pairs]
    rows: list[dict] = []
    if jobs == 1 or len(pairs) == 1:
        results = map(_run, work)
        executor = None
    else:
        executor = ProcessPoolExecutor(max_workers=min(jobs, len(pairs)))
        results = executor.map(_run, work)
    try:
        for result in results:
            if isinstance(result, Exception):
                raise result
            rows.append(result)
            if on_case:
                on_case(result)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    present = set().union(*(r.keys() for r in rows))
    columns = [c for c in columns_for(options.metrics) if c in present]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return Evaluation(rows, columns, summarize(rows, columns), counts)


def compare(current: Evaluation, baseline: Evaluation) -> dict:
    """Per metric: mean change and how many cases improved / stayed / got worse; topology repairs.

    Only cases present in both evaluations count. A change is "same" within 1e-9. Topology: a case
    is topologically correct when its ``betti_err`` is 0; ``repaired`` counts cases correct now
    but not in the baseline, ``broken`` the reverse.
    """
    base = {r["case"]: r for r in baseline.rows}
    both = [(r, base[r["case"]]) for r in current.rows if r["case"] in base]
    metrics = {}
    for column in current.columns:
        diffs = np.array([float(r[column]) - float(b[column]) for r, b in both], dtype=float)
        diffs = diffs[np.isfinite(diffs)]
        sign = 1.0 if column in HIGHER_IS_BETTER else -1.0
        metrics[column] = {
            "baseline_mean": baseline.summary[column]["mean"],
            "mean": current.summary[column]["mean"],
            "mean_change": float(diffs.mean()) if len(diffs) else math.nan,
            "improved": int((sign * diffs > 1e-9).sum()),
            "same": int((np.abs(diffs) <= 1e-9).sum()),
            "worse": int((sign * diffs < -1e-9).sum()),
        }
    result: dict = {"cases": len(both), "metrics": metrics}
    if "betti_err" in current.columns:
        now = [r["betti_err"] == 0 for r, _ in both]
        before = [b["betti_err"] == 0 for _, b in both]
        result["topology"] = {
            "correct_baseline": int(sum(before)),
            "correct": int(sum(now)),
            "repaired": int(sum(n and not b for n, b in zip(now, before))),
            "broken": int(sum(b and not n for n, b in zip(now, before))),
        }
    return result


def check_thresholds(summary: dict, under: dict[str, float], over: dict[str, float]) -> list[str]:
    """Misses of ``mean >= under[m]`` and ``mean <= over[m]``, as readable lines."""
    misses = []
    for name, limit, ok, word in [(n, v, lambda m, v: m >= v, "below") for n, v in under.items()] + [
        (n, v, lambda m, v: m <= v, "above") for n, v in over.items()
    ]:
        if name not in summary:
            misses.append(f"{name}: not computed (check --metrics)")
            continue
        mean = summary[name]["mean"]
        if not math.isfinite(mean):
            misses.append(f"{name}: no valid values")
        elif not ok(mean, limit):
            misses.append(f"{name}: mean {mean:.4g} is {word} the limit {limit:g}")
    return misses


# -- files ---------------------------------------------------------------------------------------


def _json_safe(value):
    """NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def output_paths(out: Path, with_comparison: bool) -> list[Path]:
    """The files ``write_results`` writes for per-case CSV ``out``: itself, ``<stem>_summary.csv``
    and, with a baseline, ``<stem>_comparison.csv``."""
    paths = [out, out.with_name(out.stem + "_summary.csv")]
    return paths + [out.with_name(out.stem + "_comparison.csv")] if with_comparison else paths


def write_results(
    ev: Evaluation, out: Path | None, json_path: Path | None, comparison: dict | None = None,
    thresholds: dict | None = None,
) -> list[Path]:
    """Write ``out`` (per case), ``<out stem>_summary.csv`` and, with a baseline,
    ``<out stem>_comparison.csv``; ``json_path`` gets the summary as JSON. All atomic."""
    written = []
    if out is not None:
        paths = output_paths(out, bool(comparison))
        header = ["case", "status", *ev.columns]
        io.write_csv(paths[0], header, [[r.get(c, "") for c in header] for r in ev.rows])
        stats = ["mean", "std", "median", "count", "nan"]
        io.write_csv(paths[1], ["metric", *stats], [[m, *(s[k] for k in stats)] for m, s in ev.summary.items()])
        if comparison:
            keys = ["baseline_mean", "mean", "mean_change", "improved", "same", "worse"]
            rows = [[m, *(v[k] for k in keys)] for m, v in comparison["metrics"].items()]
            io.write_csv(paths[2], ["metric", *keys], rows)
        written += paths
    if json_path is not None:
        payload = {
            "cases": len(ev.rows), "status": ev.status_counts, "summary": ev.summary,
            "unmatched_pred": [str(p) for p in ev.unmatched_pred], "unmatched_gt": [str(p) for p in ev.unmatched_gt],
        }
        if comparison:
            payload["comparison"] = comparison
        if thresholds:
            payload["thresholds"] = thresholds
        io.write_text(json_path, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
        written.append(json_path)
    return written



@dataclass
class Report:
    """What :func:`evaluate_paths` found: the evaluation, the comparison with the baseline (or
    None), the thresholds missed, and the unmatched files as (kind, path)."""

    result: Evaluation
    comparison: dict | None
    misses: list[str]
    unmatched: list[tuple[str, Path]]


def evaluate_paths(
    pred: Path, gt: Path, options: EvalOptions = EvalOptions(), out: Path | None = None,
    json_path: Path | None = None, baseline: Path | None = None, fail_under: str | None = None,
    fail_over: str | None = None, strict: bool = False, overwrite: bool = False,
    on_start: Callable[[int, list[tuple[str, Path]]], None] | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> Report:
    """``rnca evaluate``: score the prediction file or folder ``pred`` against ``gt`` (and the
    ``baseline`` predictions, if given), write ``out`` and ``json_path``, and check the
    ``fail_under`` / ``fail_over`` thresholds (``"dice=0.8,hd95=10"``).

    Everything that can be refused is refused before any work: bad thresholds (a
    :class:`~rnca_cli.errors.UsageError`, also for a threshold on a metric not computed), outputs
    that exist without ``overwrite``, unmatched files with ``strict``. ``on_start(cases,
    unmatched)`` is told how many evaluations will run; ``on_case`` gets each case's row.
    """
    under, over = parse_thresholds(fail_under), parse_thresholds(fail_over)
    computed = set(columns_for(options.metrics))
    for name in [*under, *over]:
        if name not in computed:
            raise UsageError(f"threshold on {name}: not computed with --metrics {','.join(options.metrics)}")
    targets = (output_paths(out, baseline is not None) if out is not None else []) + ([json_path] if json_path else [])
    if len({t.resolve() for t in targets}) < len(targets):
        raise UsageError(f"{json_path}: --out and --json would write the same file; name two files")
    for target in targets:
        io.check_writable(target, overwrite)
    pairs, lonely_pred, lonely_gt = pair_files(pred, gt)
    base_pairs = pair_files(baseline, gt)[0] if baseline is not None else []
    inputs = {p.resolve() for pair in pairs + base_pairs for p in (pair.pred, pair.gt)}
    folders = {Path(f).resolve() for f in (pred, gt, baseline) if f is not None and Path(f).is_dir()}
    for target in targets:  # an output never replaces an input, nor lands in an input folder
        if target.resolve() in inputs or target.resolve().parent in folders:
            raise OutputError(f"{target}: is an input or inside an input folder; write the results elsewhere")
    lonely = [("prediction", p) for p in lonely_pred] + [("ground truth", p) for p in lonely_gt]
    if baseline is not None:
        have = {p.case_id for p in base_pairs}
        lonely += [("baseline missing for", p.pred) for p in pairs if p.case_id not in have]
    if lonely and strict:
        kind, path = lonely[0]
        raise InputError(f"{path}: unmatched {kind} ({len(lonely)} unmatched file(s) in all; --strict)")
    if on_start:
        on_start(len(pairs) + len(base_pairs), lonely)
    result = evaluate(pairs, options, on_case)
    result.unmatched_pred, result.unmatched_gt = lonely_pred, lonely_gt
    comparison = compare(result, evaluate(base_pairs, options, on_case)) if base_pairs else None
    misses = check_thresholds(result.summary, under, over)
    thresholds = {"fail_under": under, "fail_over": over, "misses": misses} if (under or over) else None
    write_results(result, out, json_path, comparison, thresholds)
    return Report(result, comparison, misses, lonely)
