"""Folder evaluation, comparison and thresholds, through the library and the CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rnca_cli import evaluate as ev
from rnca_cli.cli import app
from rnca_cli.errors import InputError

from conftest import ring, write_nifti, write_png

runner = CliRunner()


def rnca(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def folders(tmp_path):
    """gt/ with 4 rings; pred/ = the rings (2 of them broken); base/ = all broken; one extra pred."""
    for k in range(4):
        write_png(tmp_path / "gt" / f"c{k}.png", ring().astype(np.uint8) * 255)
        write_png(tmp_path / "pred" / f"c{k}.png", ring(gap=k < 2).astype(np.uint8) * 255)
        write_png(tmp_path / "base" / f"c{k}.png", ring(gap=True).astype(np.uint8) * 255)
    write_png(tmp_path / "pred" / "extra.png", ring().astype(np.uint8) * 255)
    return tmp_path / "pred", tmp_path / "gt", tmp_path / "base"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_folder_rows_summary_and_unmatched(folders):
    pred, gt, _ = folders
    pairs, lonely_pred, lonely_gt = ev.pair_files(pred, gt)
    assert [p.case_id for p in pairs] == ["c0", "c1", "c2", "c3"]
    assert [p.name for p in lonely_pred] == ["extra.png"] and lonely_gt == []
    result = ev.evaluate(pairs, ev.EvalOptions(jobs=2))
    assert [r["case"] for r in result.rows] == ["c0", "c1", "c2", "c3"]
    assert [r["betti1_err"] for r in result.rows] == [1, 1, 0, 0]
    assert result.summary["betti1_err"] == {"mean": 0.5, "std": 0.5, "median": 0.5, "count": 4, "nan": 0}
    assert "betti2_err" not in result.columns  # 2D
    assert result.status_counts == {"ok": 4}


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        ("pred", "nope", "nope: no such file or folder"),  # a missing folder is named as missing
        ("nope.png", "gt/c0.png", "nope.png: no such file or folder"),
        ("pred", "gt/c0.png", "c0.png: --pred and --gt must both be files or both folders"),
    ],
)
def test_pairing_errors_name_the_path(folders, pred, gt, message):
    root = folders[0].parent
    with pytest.raises(InputError, match=message):
        ev.pair_files(root / pred, root / gt)


def test_parallel_and_serial_agree(folders):
    pred, gt, _ = folders
    pairs = ev.pair_files(pred, gt)[0]
    assert ev.evaluate(pairs, ev.EvalOptions(jobs=1)).rows == ev.evaluate(pairs, ev.EvalOptions(jobs=3)).rows


def test_comparison_counts_improvements_and_repairs(folders):
    pred, gt, base = folders
    options = ev.EvalOptions(metrics=("dice", "betti"))
    now = ev.evaluate(ev.pair_files(pred, gt)[0], options)
    before = ev.evaluate(ev.pair_files(base, gt)[0], options)
    result = ev.compare(now, before)
    assert result["cases"] == 4
    assert result["metrics"]["dice"]["improved"] == 2 and result["metrics"]["dice"]["same"] == 2
    assert result["metrics"]["betti1_err"] == {**result["metrics"]["betti1_err"], "improved": 2, "worse": 0, "same": 2}
    assert result["metrics"]["betti1_err"]["mean_change"] == pytest.approx(-0.5)
    assert result["topology"] == {"correct_baseline": 0, "correct": 2, "repaired": 2, "broken": 0}


def test_summary_counts_nan_instead_of_averaging_it_away(tmp_path):
    write_png(tmp_path / "gt" / "a.png", ring().astype(np.uint8) * 255)
    write_png(tmp_path / "gt" / "b.png", ring().astype(np.uint8) * 255)
    write_png(tmp_path / "pred" / "a.png", ring().astype(np.uint8) * 255)
    write_png(tmp_path / "pred" / "b.png", np.zeros((32, 32), np.uint8))
    result = ev.evaluate(ev.pair_files(tmp_path / "pred", tmp_path / "gt")[0], ev.EvalOptions(jobs=1))
    assert result.rows[1]["status"] == "pred empty" and math.isnan(result.rows[1]["hd"])
    assert result.summary["hd"] == {"mean": 0.0, "std": 0.0, "median": 0.0, "count": 1, "nan": 1}
    assert result.summary["dice"]["mean"] == 0.5 and result.status_counts == {"ok": 1, "pred empty": 1}


def test_nifti_spacing_is_used_and_mismatches_are_refused(tmp_path):
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    pred = np.roll(gt, 1, axis=2)
    write_nifti(tmp_path / "gt.nii.gz", gt, zooms=(1.0, 1.0, 3.0))
    write_nifti(tmp_path / "pred.nii.gz", pred, zooms=(1.0, 1.0, 3.0))
    row = ev.evaluate_pair(ev.Pair("x", tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz"), ev.EvalOptions())
    assert row["hd"] == pytest.approx(3.0) and row["betti2_err"] == 0
    write_nifti(tmp_path / "other.nii.gz", pred, zooms=(0.8, 0.8, 2.0))  # float32 in the header
    with pytest.raises(InputError, match=r"other.nii.gz: spacing \(0.8, 0.8, 2\) differs from ground truth .* \(1, 1, 3\)"):
        ev.evaluate_pair(ev.Pair("x", tmp_path / "other.nii.gz", tmp_path / "gt.nii.gz"), ev.EvalOptions())


def test_soft_predictions_use_the_threshold_and_labels_select(tmp_path):
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    soft = np.zeros((8, 8), np.uint8)
    soft[2:6, 2:6] = 200
    soft[0, 0], soft[7, 7] = 100, 50  # below 0.5, above 0.15
    write_png(tmp_path / "gt.png", gt)
    write_png(tmp_path / "p.png", soft)
    pair = ev.Pair("p", tmp_path / "p.png", tmp_path / "gt.png")
    assert ev.evaluate_pair(pair, ev.EvalOptions(metrics=("dice",)))["dice"] == 1.0
    assert ev.evaluate_pair(pair, ev.EvalOptions(metrics=("dice",), threshold=0.15))["dice"] < 1.0
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 2
    labels[0:2, 0:2] = 1
    write_png(tmp_path / "lab.png", labels)
    write_png(tmp_path / "lab_gt.png", labels)
    pair = ev.Pair("l", tmp_path / "lab.png", tmp_path / "lab_gt.png")
    with pytest.raises(InputError, match="several labels"):
        ev.evaluate_pair(pair, ev.EvalOptions())
    assert ev.evaluate_pair(pair, ev.EvalOptions(label=2))["dice"] == 1.0


def test_thresholds():
    summary = {"dice": {"mean": 0.85}, "hd95": {"mean": 12.0}, "assd": {"mean": math.nan}}
    assert ev.check_thresholds(summary, {"dice": 0.8}, {"hd95": 20}) == []
    misses = ev.check_thresholds(summary, {"dice": 0.9, "cldice": 0.5}, {"hd95": 10, "assd": 1})
    assert misses == [
        "dice: mean 0.85 is below the limit 0.9", "cldice: not computed (check --metrics)",
        "hd95: mean 12 is above the limit 10", "assd: no valid values",
    ]
    assert ev.parse_thresholds("dice=0.8, hd95=10") == {"dice": 0.8, "hd95": 10.0}
    for bad in ("dice", "iou=0.3", "dice=high"):
        with pytest.raises(ValueError):
            ev.parse_thresholds(bad)
    assert ev.parse_metrics("hd95,dice") == ["dice", "hd95"] and len(ev.parse_metrics("all")) == 8


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_writes_csv_summary_comparison_and_json(tmp_path, folders):
    pred, gt, base = folders
    out = tmp_path / "m.csv"
    result = rnca("evaluate", "--pred", pred, "--gt", gt, "--baseline", base, "--out", out,
                  "--json", tmp_path / "s.json", "--jobs", 1)
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert len(rows) == 4
    assert list(rows[0]) == ["case", "status", "dice", "cldice", "precision", "recall", "betti0_err", "betti1_err",
                             "betti_err", "hd", "hd95", "assd"]
    summary = {r["metric"]: r for r in read_csv(tmp_path / "m_summary.csv")}
    assert float(summary["betti1_err"]["mean"]) == 0.5 and summary["dice"]["count"] == "4"
    comparison = {r["metric"]: r for r in read_csv(tmp_path / "m_comparison.csv")}
    assert comparison["betti1_err"]["improved"] == "2"
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["cases"] == 4 and payload["comparison"]["topology"]["repaired"] == 2
    assert payload["unmatched_pred"][0].endswith("extra.png")
    assert "unmatched prediction" in result.output and "repaired 2" in result.output


def test_cli_fail_under_and_over_exit_codes(tmp_path, folders):
    pred, gt, _ = folders
    ok = rnca("evaluate", "--pred", pred, "--gt", gt, "--fail-under", "dice=0.9", "--fail-over", "betti_err=1", "-q")
    assert ok.exit_code == 0, ok.output
    bad = rnca("evaluate", "--pred", pred, "--gt", gt, "--fail-under", "dice=0.999", "--fail-over", "betti1_err=0.1")
    assert bad.exit_code == 3  # a regression, told apart from a broken pipeline (1) and a bad option (2)
    assert "dice: mean" in bad.output and "betti1_err: mean 0.5 is above the limit 0.1" in bad.output
    usage = rnca("evaluate", "--pred", pred, "--gt", gt, "--fail-under", "iou=0.5")
    assert usage.exit_code == 2
    not_computed = rnca("evaluate", "--pred", pred, "--gt", gt, "--metrics", "dice", "--fail-over", "hd95=3",
                        "-o", tmp_path / "m.csv")
    assert not_computed.exit_code == 2 and "threshold on hd95: not computed" in not_computed.output
    assert not (tmp_path / "m.csv").exists()  # refused before any work
    broken = rnca("evaluate", "--pred", tmp_path / "missing", "--gt", gt, "--fail-under", "dice=0.5")
    assert broken.exit_code == 1


def test_cli_metrics_subset_and_strict(tmp_path, folders):
    pred, gt, _ = folders
    result = rnca("evaluate", "--pred", pred, "--gt", gt, "--metrics", "dice,hd95", "--out", tmp_path / "m.csv", "-q")
    assert result.exit_code == 0, result.output
    assert list(read_csv(tmp_path / "m.csv")[0]) == ["case", "status", "dice", "hd95"]
    strict = rnca("evaluate", "--pred", pred, "--gt", gt, "--strict", "--out", tmp_path / "s.csv")
    assert strict.exit_code == 1 and "extra.png: unmatched prediction" in strict.output
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("case", ["shape", "soft_gt", "nan", "empty", "exists"])
def test_cli_bad_input_leaves_no_csv(tmp_path, folders, case):
    pred, gt, _ = folders
    out = tmp_path / "m.csv"
    if case == "shape":
        write_png(pred / "c2.png", np.zeros((16, 16), np.uint8))
        expected = "c2.png: shape (16, 16) differs from ground truth"
    elif case == "soft_gt":
        write_png(gt / "c1.png", (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8))
        expected = "c1.png: ground truth is not binary"
    elif case == "nan":
        write_nifti(tmp_path / "n" / "v.nii.gz", np.full((4, 4, 4), np.nan, np.float32))
        write_nifti(tmp_path / "g" / "v.nii.gz", np.ones((4, 4, 4), np.uint8))
        pred, gt, expected = tmp_path / "n", tmp_path / "g", "v.nii.gz: mask contains NaN"
    elif case == "empty":
        (tmp_path / "none").mkdir()
        pred, expected = tmp_path / "none", "no prediction has a ground truth"
    else:
        out.write_text("old results")
        expected = "m.csv: already exists"
    result = rnca("evaluate", "--pred", pred, "--gt", gt, "--out", out, "--jobs", 2)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert (out.read_text() == "old results") if case == "exists" else not out.exists()
    assert not (tmp_path / "m_summary.csv").exists()


@pytest.mark.parametrize("where, message", [
    ("gt/x.png", "is an input or inside an input folder"),
    ("pred/m.csv", "is an input or inside an input folder"),
    ("same", "--out and --json would write the same file"),
])
def test_evaluate_never_writes_over_or_into_its_inputs(tmp_path, folders, where, message):
    pred, gt, _ = folders
    before = {p: p.read_bytes() for p in [*pred.iterdir(), *gt.iterdir()]}
    if where == "same":
        args = ["-o", tmp_path / "m.csv", "--json", tmp_path / "m.csv"]
    else:
        args = ["-o", tmp_path / where, "--overwrite"]
    result = rnca("evaluate", "--pred", pred, "--gt", gt, *args)
    assert result.exit_code in (1, 2) and message in result.output
    assert {p: p.read_bytes() for p in [*pred.iterdir(), *gt.iterdir()]} == before
    assert not (tmp_path / "m.csv").exists()


def test_a_non_finite_threshold_is_a_usage_error(folders):
    pred, gt, _ = folders
    result = rnca("evaluate", "--pred", pred, "--gt", gt, "--fail-under", "dice=nan")
    assert result.exit_code == 2 and "finite" in result.output


def test_two_files_of_one_case_id_are_refused_not_shadowed(tmp_path, folders):
    """An all-zero case.tif beside a perfect case.png used to shadow it and report Dice 0."""
    pred, gt, _ = folders
    first = sorted(pred.iterdir())[0]
    shadow = first.with_suffix(".tif")
    with Image.open(first) as im:
        shape = (im.height, im.width)
    write_png(shadow, np.zeros(shape, np.uint8))
    result = rnca("evaluate", "--pred", pred, "--gt", gt, "--strict")
    assert result.exit_code == 1 and f"case id '{first.stem}' is also" in result.output
    assert "Traceback" not in result.output
