"""Held-out quality of the shipped refiners against the classical fixes a user would try first.

    python benchmarks/quality.py                     # every task whose data is present
    python benchmarks/quality.py --json benchmarks/quality.json --pictures benchmarks/quality --cases benchmarks/quality
    python benchmarks/quality.py --tasks rings --model rings=runs/x/best.pt   # one task, another checkpoint

For each task, on held-out cases the model never trained on, scored by ``rnca evaluate``'s core
(:func:`rnca_cli.evaluate.evaluate_paths`): Dice, clDice, β0 / β1 errors, HD95, ASSD, the share of
cases whose topology equals the ground truth's, and the share of pixels changed when the input is
already correct (the ground truth itself is refined). ``--json`` stores the means, ``--cases``
one CSV per task with every method's scores on every case. Methods:

* ``coarse``: the input masks;
* ``rnca``: ``rnca refine --model TASK`` with its defaults (guard on, the model's own clean-up);
  ``rnca (no clean-up)`` with ``--min-size 0`` where the model carries one, and ``rnca (no guard)``;
* classical fixes tuned on the task's *training* cases (never the held-out ones) by the task's
  headline metric: ``remove`` components under k pixels, ``close`` with a disk of radius r,
  ``close+remove`` (both), and ``fill`` holes (followed by removal, for fill).

The guard is also run out of domain: each model on the other tasks' held-out cases (the first 16
of each); the share of cases it keeps, and the Dice and β0 + β1 error of the input and of what is
written, are reported beside the in-domain ones.

Data (paths relative to the repository root; a task whose data is missing is skipped and named):

* rings: ``../shared/data/rings-train``; cases 449-512 held out, 1-384 tune the classical fixes.
* fill: ``data/fill`` (training, tuning) and ``data/fill-test`` (held out), made with
  ``rnca synth --kind blobs -o data/fill --n 640 --keep 0.15 --seed 1`` and
  ``rnca synth --kind blobs -o data/fill-test --n 64 --seed 2``.
* vessels: ``../shared/data/drive-train`` images and labels; coarse masks from
  ``python scripts/coarse_unet.py`` in ``data/drive-coarse``: ``oof/`` (cases 21-35, the model's
  training states, tune the classical fixes) and ``unseen/`` (cases 36-40, held out, from a network
  the model never saw).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from rnca_cli import available_models, io, load_model, pictures
from rnca_cli.evaluate import EvalOptions, evaluate_paths
from rnca_cli.guard import remove_small
from rnca_cli.metrics import dice
from rnca_cli.options import RefineOptions
from rnca_cli.perturb import ball
from rnca_cli.refine import refine_files

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METRICS = ("dice", "cldice", "betti0_err", "betti1_err", "hd95", "assd")


@dataclass(frozen=True)
class Task:
    """Where a task's cases are: ``test`` and ``tune`` are (images, coarse, labels, case ids or None: all)."""

    model: str
    test: tuple[Path, Path, Path, list[str] | None]
    tune: tuple[Path, Path, Path, list[str] | None]
    select: str  # headline metric the classical fixes are tuned by
    fill: bool  # whether hole filling is a sensible fix (closed objects)


def ring_ids(first: int, last: int) -> list[str]:
    return [f"example_{k:03d}" for k in range(first, last + 1)]


RINGS = SHARED / "rings-train"
DRIVE = SHARED / "drive-train"
TASKS = {
    "rings": Task("rings", (RINGS / "images", RINGS / "states", RINGS / "labels", ring_ids(449, 512)),
                  (RINGS / "images", RINGS / "states", RINGS / "labels", ring_ids(1, 384)), "topology", True),
    "fill": Task("fill", (ROOT / "data/fill-test/images", ROOT / "data/fill-test/states", ROOT / "data/fill-test/labels", None),
                 (ROOT / "data/fill/images", ROOT / "data/fill/states", ROOT / "data/fill/labels", None), "dice", True),
    "vessels": Task("vessels", (DRIVE / "images", ROOT / "data/drive-coarse/unseen", DRIVE / "labels", None),
                    (DRIVE / "images", ROOT / "data/drive-coarse/oof", DRIVE / "labels", None), "betti_err", False),
}


# -- the classical fixes -------------------------------------------------------------------------


def close(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius == 0:
        return mask
    r = radius + 1
    return ndimage.binary_closing(np.pad(mask, r), ball(radius, 2))[r:-r, r:-r]


def classical_family(task: Task) -> dict[str, list[tuple[str, callable]]]:
    """Each classical method with its parameter grid: name -> [(setting, function)]."""
    sizes = [5, 10, 20, 30, 50, 80, 120, 200, 300]
    radii = [1, 2, 3, 4, 6]
    family = {
        "remove": [(f"k={k}", lambda m, k=k: remove_small(m, k)) for k in sizes],
        "close": [(f"r={r}", lambda m, r=r: close(m, r)) for r in radii],
        "close+remove": [(f"r={r},k={k}", lambda m, r=r, k=k: remove_small(close(m, r), k)) for r in radii for k in sizes],
    }
    if task.fill:
        family["fill"] = [(f"k={k}", lambda m, k=k: remove_small(ndimage.binary_fill_holes(m), k)) for k in [0, *sizes]]
    return family


# -- cases, writing and scoring ------------------------------------------------------------------


def case_files(images: Path, coarse: Path, labels: Path, ids: list[str] | None) -> list[tuple[str, Path, Path, Path]]:
    pairing = io.pair_folders(images, coarse)
    by_id = {c.case_id: c for c in pairing.cases}
    truth = {io.case_id(p): p for p in io.list_files(labels)}
    chosen = ids if ids is not None else sorted(set(by_id) & set(truth))
    return [(cid, by_id[cid].images[0], by_id[cid].mask, truth[cid]) for cid in chosen]


def link_folder(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())
    return folder


def write_masks(folder: Path, masks: dict[str, np.ndarray], like: dict[str, io.Loaded]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for cid, mask in masks.items():
        io.write_mask(folder / f"{cid}.png", mask, like[cid])
    return folder


def score(pred: Path, truth: Path, groups=("dice", "cldice", "betti", "hd95", "assd")) -> tuple[dict[str, float], list[dict]]:
    """Means over the cases (and the per-case rows) of ``rnca evaluate --metrics dice,cldice,betti,hd95,assd``."""
    report = evaluate_paths(pred, truth, EvalOptions(metrics=groups, jobs=0))
    rows = report.result.rows
    means = {m: float(np.nanmean([float(r[m]) for r in rows])) for m in METRICS if m in rows[0]}
    means["topology"] = float(np.mean([float(r["betti_err"]) == 0 for r in rows]))
    return means, rows


def headline(means: dict[str, float], metric: str) -> tuple:
    """Sort key, best first: the headline metric, then Dice."""
    value = means["betti0_err"] + means["betti1_err"] if metric == "betti_err" else -means[metric]
    return (round(value, 6), -means["dice"])


def changed_share(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """Pixels changed as a share of all pixels: over all cases, and per case."""
    changed = {c: int((before[c] != after[c]).sum()) for c in before}
    pooled = sum(changed.values()) / sum(m.size for m in before.values())
    return pooled, {c: n / before[c].size for c, n in changed.items()}


CASE_COLUMNS = ("method", "case", *METRICS, "topology_correct", "changed_on_correct", "kept_by_guard")


def case_rows(method: str, rows: list[dict], changed: dict[str, float], kept: dict[str, str] | None = None) -> list[dict]:
    """One method's per-case lines of ``<task>-cases.csv`` (:data:`CASE_COLUMNS`); ``kept``: the
    guard's reason per case ('' when refined), None for methods without a guard."""
    return [{"method": method, "case": r["case"], **{m: r[m] for m in METRICS},
             "topology_correct": int(float(r["betti_err"]) == 0), "changed_on_correct": f"{changed[r['case']]:.6f}",
             "kept_by_guard": "" if kept is None else kept[r["case"]]} for r in rows]


# -- one task ------------------------------------------------------------------------------------


def run_task(name: str, task: Task, work: Path, pictures_dir: Path | None, models: dict[str, str]) -> tuple[dict, list[dict]]:
    """One task's means per method (``quality.json``) and its per-case rows (:func:`case_rows`)."""
    cases = case_files(*task.test)
    tune = case_files(*task.tune)
    truth_dir = link_folder(work / "truth", [t for *_, t in cases])
    images_dir = link_folder(work / "images", [i for _, i, _, _ in cases])
    coarse_dir = link_folder(work / "coarse", [c for _, _, c, _ in cases])
    loaded = {cid: io.read_mask(c) for cid, _, c, _ in cases}
    coarse = {cid: m.data >= 0.5 for cid, m in loaded.items()}
    truth = {cid: io.read_mask(t).data >= 0.5 for cid, _, _, t in cases}
    results, settings, per_case = {}, {}, []

    results["coarse"], rows = score(coarse_dir, truth_dir)
    results["coarse"]["changed_on_correct"] = 0.0
    per_case += case_rows("coarse", rows, dict.fromkeys(truth, 0.0))

    # classical fixes: tuned on the training cases, applied to the held-out ones
    tune_coarse = {cid: io.read_mask(c).data >= 0.5 for cid, _, c, _ in tune}
    tune_loaded = {cid: io.read_mask(c) for cid, _, c, _ in tune}
    tune_truth = link_folder(work / "tune-truth", [t for *_, t in tune])
    for method, grid in classical_family(task).items():
        best = None
        for setting, fix in grid:
            folder = write_masks(work / "tune" / method / setting, {c: fix(m) for c, m in tune_coarse.items()}, tune_loaded)
            means, _ = score(folder, tune_truth, ("dice", "cldice", "betti"))
            if best is None or headline(means, task.select) < headline(best[1], task.select):
                best = (setting, means, fix)
            shutil.rmtree(folder)
        setting, _, fix = best
        settings[method] = setting
        label = f"{method} ({setting})"
        fixed = {c: fix(m) for c, m in coarse.items()}
        results[label], rows = score(write_masks(work / "classical" / method, fixed, loaded), truth_dir)
        results[label]["changed_on_correct"], changed = changed_share(truth, {c: fix(t) for c, t in truth.items()})
        per_case += case_rows(label, rows, changed)

    # rnca, as a user runs it, and its variants
    rnca_rows = {}  # per-case evaluate rows of each variant; draw() picks cases by the plain one's
    variants = [("rnca", RefineOptions()), ("rnca (no guard)", RefineOptions(guard=False))]
    if load_model(models[name]).refine_defaults.get("min_size", 0):
        variants.append(("rnca (no clean-up)", RefineOptions(min_size=0)))
    for label, options in variants:
        out = work / "rnca" / label.replace(" ", "_")
        start = time.perf_counter()
        run = refine_files(images_dir, coarse_dir, out, models[name], replace(options, report=work / f"{label}.csv"))
        seconds = time.perf_counter() - start
        results[label], rnca_rows[label] = score(out, truth_dir)
        kept = {r.case_id: r.verdict.kept for r in run.results}
        results[label]["kept_by_guard"] = float(np.mean([bool(reason) for reason in kept.values()]))
        results[label]["seconds_per_case"] = seconds / len(cases)
        correct = work / "rnca-correct" / label.replace(" ", "_")
        refine_files(images_dir, truth_dir, correct, models[name], replace(options, report=work / f"{label}-correct.csv"))
        results[label]["changed_on_correct"], changed = changed_share(
            truth, {c: io.read_mask(correct / f"{c}.png").data >= 0.5 for c in truth})
        per_case += case_rows(label, rnca_rows[label], changed, kept)
    if pictures_dir is not None:
        best_classical = min((k for k in results if "(" in k and not k.startswith("rnca")),
                             key=lambda k: headline(results[k], task.select))
        method = best_classical.split(" ")[0]
        draw(name, cases, coarse, truth, work / "classical" / method, work / "rnca" / "rnca", best_classical,
             rnca_rows["rnca"], task.select, pictures_dir)
    summary = {"cases": len(cases), "tuned_on": len(tune), "select": task.select, "settings": settings, "methods": results}
    return summary, per_case


def draw(name, cases, coarse, truth, classical_dir, rnca_dir, classical_label, rows, select, folder: Path) -> None:
    """Typical cases (the median of rnca's Dice gain and its neighbours) and the worst one."""
    gain = {r["case"]: float(r["dice"]) - dice(coarse[r["case"]], truth[r["case"]]) for r in rows}
    order = sorted(gain, key=gain.get)
    middle = len(order) // 2
    worst = min(rows, key=lambda r: (-float(r["betti_err"]), float(r["dice"])))["case"]
    chosen = list(dict.fromkeys([*order[max(0, middle - 1) : middle + 2], worst]))
    images = {cid: io.read_image(i).data for cid, i, _, _ in cases}
    sheet = []
    for cid in chosen:
        sheet.append({"image": images[cid], "truth": truth[cid], "title": f"{cid}{' (worst)' if cid == worst else ''}",
                      "masks": {"coarse": coarse[cid],
                                classical_label: io.read_mask(classical_dir / f"{cid}.png").data >= 0.5,
                                "rnca": io.read_mask(rnca_dir / f"{cid}.png").data >= 0.5}})
    scale = max(1, 192 // max(truth[chosen[0]].shape))
    pictures.comparison_sheet(sheet, folder / f"{name}.png", scale)


def guard_matrix(tasks: dict[str, Task], models: dict[str, str], work: Path) -> dict:
    """Each model on each task's first 16 held-out cases (off-diagonal: out of domain), guard on: the
    share of cases the guard keeps, and Dice and β0 + β1 error of the input and of what is written,
    so that harm the guard lets through shows too."""
    matrix = {model_task: {} for model_task in tasks}
    for data_task, task in tasks.items():
        cases = case_files(*task.test)[:16]
        folder = work / "guard" / data_task
        images = link_folder(folder / "images", [i for _, i, _, _ in cases])
        masks = link_folder(folder / "masks", [c for _, _, c, _ in cases])
        truth = link_folder(folder / "truth", [t for *_, t in cases])
        before, _ = score(masks, truth, ("dice", "betti"))
        for model_task in tasks:
            out = folder / "out" / model_task
            run = refine_files(images, masks, out, models[model_task],
                               RefineOptions(report=work / "guard" / f"{model_task}-{data_task}.csv"))
            after, _ = score(out, truth, ("dice", "betti"))
            matrix[model_task][data_task] = {
                "kept": float(np.mean([bool(r.verdict.kept) for r in run.results])),
                "dice_input": before["dice"], "dice": after["dice"],
                "betti_err_input": before["betti0_err"] + before["betti1_err"],
                "betti_err": after["betti0_err"] + after["betti1_err"]}
    return matrix


def table(name: str, result: dict) -> str:
    head = "| method | Dice | clDice | β0 err | β1 err | HD95 | ASSD | topology correct | changed on correct | kept by guard |"
    lines = [f"### {name} ({result['cases']} held-out cases; classical fixes tuned on {result['tuned_on']} training "
             f"cases by {result['select']})", "", head, "|" + " --- |" * 10]
    for method, m in result["methods"].items():
        kept = f"{m['kept_by_guard']:.0%}" if "kept_by_guard" in m else ""
        lines.append(f"| {method} | {m['dice']:.4f} | {m['cldice']:.4f} | {m['betti0_err']:.2f} | {m['betti1_err']:.2f} | "
                     f"{m['hd95']:.2f} | {m['assd']:.3f} | {m['topology']:.0%} | {m['changed_on_correct']:.2%} | {kept} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--model", action="append", default=[], metavar="TASK=PATH",
                        help="use this checkpoint for a task instead of the shipped model")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--pictures", type=Path, help="folder for <task>.png comparison sheets")
    parser.add_argument("--cases", type=Path, help="folder for <task>-cases.csv: every method's scores per held-out case")
    args = parser.parse_args()
    models = {t: t for t in TASKS} | dict(item.split("=", 1) for item in args.model)
    present = {}
    for name in args.tasks:
        missing = [p for p in (*TASKS[name].test[:3], *TASKS[name].tune[:3]) if not p.is_dir()]
        if missing:
            print(f"{name}: skipped, missing {missing[0]} (see the module docstring)")
        elif models[name] not in available_models() and not Path(models[name]).is_file():
            print(f"{name}: skipped, no model {models[name]!r} (shipped: {', '.join(available_models())}; or --model {name}=PATH)")
        else:
            present[name] = TASKS[name]
    for folder in (args.pictures, args.cases):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, task in present.items():
            start = time.perf_counter()
            out[name], rows = run_task(name, task, Path(tmp) / name, args.pictures, models)
            if args.cases:
                with open(args.cases / f"{name}-cases.csv", "w", newline="") as f:
                    writer = csv.DictWriter(f, CASE_COLUMNS, lineterminator="\n")
                    writer.writeheader()
                    writer.writerows(rows)
            print(table(name, out[name]), f"\n\n({time.perf_counter() - start:.0f} s)\n", flush=True)
        if len(present) > 1:
            out["guard"] = guard_matrix(present, models, Path(tmp))
            print("guard: each model (outer key) on each task's held-out cases (inner key)")
            print(json.dumps(out["guard"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v) + "\n")


if __name__ == "__main__":
    main()
