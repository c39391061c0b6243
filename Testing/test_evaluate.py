"""brainlesionsam-evaluate: per-case CSVs and paper tables built on the library's metrics, the Wilcoxon
comparison between two runs, and a trained run's split evaluated end to end."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import wilcoxon

from BrainLesionSAMLib.metrics import evaluate_case_files, flatten_results, result_columns
from Training import evaluate
from Training.config import load_config
from Training.trainer import Trainer
from test_training import shared_cases, tiny_unet_overrides


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return shared_cases(tmp_path_factory)


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_prediction(seg_path, out_path, change):
    image = sitk.ReadImage(str(seg_path))
    labels = change(sitk.GetArrayFromImage(image).copy())
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    sitk.WriteImage(result, str(out_path))


def test_score_writes_per_case_csv_and_paper_table(cases, tmp_path, capsys):
    root, _ = cases
    predictions = tmp_path / "pred"
    predictions.mkdir()
    folders = sorted(p for p in root.iterdir() if p.is_dir())[:3]
    changes = [lambda a: a, lambda a: np.where(a == 2, 0, a), lambda a: np.roll(a, 3, axis=2)]
    for folder, change in zip(folders, changes):
        _write_prediction(folder / f"{folder.name}_seg.nii.gz", predictions / f"{folder.name}.nii.gz", change)
    out = tmp_path / "eval"
    assert evaluate.main(["score", "--pred", str(predictions), "--gt", str(root), "--out", str(out)]) == 0
    assert "| WT |" in capsys.readouterr().out

    rows = _read(out / "per_case.csv")
    assert [r["case"] for r in rows] == [f.name for f in folders] + ["mean", "sd"]
    for folder, row in zip(folders, rows):
        expected = flatten_results(evaluate_case_files(predictions / f"{folder.name}.nii.gz",
                                                       folder / f"{folder.name}_seg.nii.gz"))
        assert {k: float(row[k]) for k in expected} == pytest.approx(expected)
    assert float(rows[0]["WT_dice"]) == 1.0 and float(rows[1]["ED_dice"]) == 0.0 and float(rows[1]["ET_dice"]) == 1.0
    wt = np.array([float(r["WT_dice"]) for r in rows[:3]])
    assert float(rows[3]["WT_dice"]) == pytest.approx(wt.mean()) and float(rows[4]["WT_dice"]) == pytest.approx(wt.std(ddof=1))

    table = {r["structure"]: r for r in _read(out / "table.csv")}
    assert list(table) == ["WT", "TC", "ET", "NCR", "ED"]
    assert float(table["WT"]["dice_mean"]) == pytest.approx(100 * wt.mean())
    assert float(table["WT"]["dice_sd"]) == pytest.approx(100 * wt.std(ddof=1))
    hd95 = np.array([float(r["TC_hd95_mm"]) for r in rows[:3]])
    assert float(table["TC"]["hd95_mm_mean"]) == pytest.approx(hd95.mean())  # millimetres, not %
    markdown = (out / "table.md").read_text(encoding="utf-8")
    assert f"| WT | {100 * wt.mean():.2f} ± {100 * wt.std(ddof=1):.2f} |" in markdown
    assert "HD95 (mm)" in markdown and "n = 3 cases" in markdown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and summary["label_set"] == "brats"


def test_compare_gives_the_wilcoxon_p_value_over_common_cases(tmp_path, capsys):
    columns = result_columns("lesion")
    rng = np.random.default_rng(1)
    a = {f"case{i}": rng.random(len(columns)) for i in range(12)}
    b = {case: values - 0.05 + 0.1 * rng.random(len(columns)) for case, values in a.items()}
    b["extra"] = rng.random(len(columns))
    paths = []
    for name, rows in (("a", a), ("b", b)):
        path = tmp_path / name / "per_case.csv"
        path.parent.mkdir()
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case", *columns])
            for case, values in rows.items():
                writer.writerow([case, *values])
            writer.writerow(["mean", *np.mean(list(rows.values()), axis=0)])
        paths.append(path)
    with pytest.warns(UserWarning, match="only one of the two"):
        results = {r["column"]: r for r in evaluate.compare(*paths)}
    common = sorted(a)
    for index, column in enumerate(columns):
        x = [a[c][index] for c in common]
        y = [b[c][index] for c in common]
        assert results[column]["n"] == 12
        assert results[column]["wilcoxon_p"] == pytest.approx(wilcoxon(x, y).pvalue)
        assert results[column]["mean_difference"] == pytest.approx(np.mean(x) - np.mean(y))
    assert {r["column"]: r["wilcoxon_p"] for r in evaluate.compare(paths[0], paths[0])} == dict.fromkeys(columns, 1.0)

    out = tmp_path / "comparison"
    assert evaluate.main(["compare", str(paths[0]), str(paths[1]), "--names", "A", "B", "--out", str(out)]) == 0
    assert "lesion_dice" in capsys.readouterr().out
    written = {r["column"]: float(r["wilcoxon_p"]) for r in _read(out / "comparison.csv")}
    assert written["lesion_dice"] == pytest.approx(results["lesion_dice"]["wilcoxon_p"])
    other = tmp_path / "c" / "per_case.csv"
    other.parent.mkdir()
    other.write_text("case," + ",".join(columns) + "\nzzz," + ",".join("0.5" for _ in columns) + "\n")
    with pytest.raises(evaluate.EvaluationError, match="no case in common"):
        evaluate.compare(paths[0], other)
    assert evaluate.main(["compare", str(paths[0]), str(other), "--out", str(out)]) == 1


def test_a_trained_run_is_evaluated_like_its_written_predictions(cases, tmp_path):
    root, cache = cases
    run = tmp_path / "run"
    config = load_config("unet2d_smoke", tiny_unet_overrides(root, cache, run, "train.max_steps=2",
                                                             "validation.every_epochs=0"))
    Trainer(config, log=lambda message: None).run()
    out = tmp_path / "eval"
    assert evaluate.main(["run", "--run", str(run), "--split", "train", "--out", str(out), "--save-predictions"]) == 0
    train_cases = json.loads(open(config["data"]["splits"]).read())["train"]
    rows = _read(out / "per_case.csv")
    assert [r["case"] for r in rows] == train_cases + ["mean", "sd"]
    for case in train_cases:
        prediction = sitk.ReadImage(str(out / "predictions" / f"{case}.nii.gz"))
        truth = sitk.ReadImage(str(root / case / f"{case}_seg.nii.gz"))
        assert prediction.GetSize() == truth.GetSize() and prediction.GetOrigin() == truth.GetOrigin()
    rescored = tmp_path / "rescored"
    assert evaluate.main(["score", "--pred", str(out / "predictions"), "--gt", str(root), "--out", str(rescored)]) == 0
    again = _read(rescored / "per_case.csv")
    for first, second in zip(rows, again):
        assert first["case"] == second["case"]
        assert {k: float(v) for k, v in first.items() if k != "case"} == \
            pytest.approx({k: float(v) for k, v in second.items() if k != "case"})
    assert evaluate.main(["run", "--run", str(tmp_path / "nothing"), "--out", str(out)]) == 1
