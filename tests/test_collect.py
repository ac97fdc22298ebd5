"""launch.collect on hand-written sweep folders with known numbers: leaderboard rows, their order
(validation AUC, or test AUC with --sort test), means and sample stds against numpy, the selected
row, CSV / markdown / PNG outputs, the pivot table (averaging over a third factor), the workdir
fallback, unfinished runs, NaN validation records and the command line's errors."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from launch import collect
from launch.spec import runs_of

NAN = math.nan
ROWS_KEY, COLS_KEY = "model.kwargs.attention", "model.kwargs.placement"

# configuration -> per seed: (validation AUC records in step order, test numbers) ; None = the run
# is not finished. "E" has only NaN validation records; A's first record is NaN.
#                     validation records         test AUC, CI low, CI high, acc, sens, spec
PLAN = {  # E first: NaN must sort last whatever the manifest order
    "E": ({"model.kwargs.attention": "dual", "model.kwargs.placement": "last",
           "model.kwargs.head": "triple"},
          [([NAN, NAN], (0.66, 0.50, 0.80, 0.62, 0.55, 0.69))]),
    "A": ({"model.kwargs.attention": "dual", "model.kwargs.placement": "last",
           "model.kwargs.head": "single"},
          [([NAN, 0.80, 0.75], (0.70, 0.60, 0.80, 0.70, 0.60, 0.75)),
           ([NAN, 0.79, 0.82], (0.74, 0.64, 0.84, 0.72, 0.62, 0.77)),
           ([NAN, 0.84, 0.80], (0.72, 0.61, 0.83, 0.68, 0.66, 0.70))]),
    "B": ({"model.kwargs.attention": "channel", "model.kwargs.placement": "last",
           "model.kwargs.head": "single"},
          [([0.75, 0.70], (0.78, 0.70, 0.86, 0.74, 0.70, 0.76)),
           ([0.72, 0.79], (0.80, 0.71, 0.89, 0.76, 0.71, 0.79)),
           ([0.77, 0.60], (0.85, 0.77, 0.93, 0.80, 0.75, 0.83))]),
    "C": ({"model.kwargs.attention": "dual", "model.kwargs.placement": "stages",
           "model.kwargs.head": "triple"},
          [([0.65, 0.70], (0.76, 0.64, 0.87, 0.71, 0.64, 0.79))]),
    "D": ({"model.kwargs.attention": "channel", "model.kwargs.placement": "stages",
           "model.kwargs.head": "triple"},
          [([0.79], (0.60, 0.45, 0.74, 0.58, 0.50, 0.65)),
           None]),
}
VAL_ORDER = ["A", "D", "B", "C", "E"]       # 0.82, 0.79, 0.77, 0.70, NaN
TEST_ORDER = ["B", "C", "A", "E", "D"]      # 0.81, 0.76, 0.72, 0.66, 0.60


def write_json(path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, allow_nan=True))


def write_run(workdir, validation: list[float], test: tuple[float, ...] | None,
              test_step: int | None = 300) -> None:
    """metrics.jsonl with training records (carrying an 'auc' that must be ignored) and the
    validation records; eval/test/metrics.json when the run is finished."""
    lines = []
    for index, auc in enumerate(validation):
        step = 100 * (index + 1)
        lines.append({"step": step, "split": "train", "loss": 0.5, "auc": 0.99})
        lines.append({"step": step, "split": "validation", "auc": auc, "auc_ci_low": auc - 0.1,
                      "auc_ci_high": auc + 0.1, "accuracy": 0.5, "patients": 91})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text(
        "".join(json.dumps(line, allow_nan=True) + "\n" for line in lines))
    if test is None:
        return
    auc, low, high, accuracy, sensitivity, specificity = test
    write_json(workdir / "eval" / "test" / "metrics.json", {
        "run": str(workdir), "step": test_step, "split": "test", "ci_level": 0.95,
        "patients": 90, "positives": 30, "negatives": 60,
        "patient": {"auc": auc, "auc_ci_low": low, "auc_ci_high": high,
                    "at_validation_threshold": {
                        "accuracy": accuracy, "sensitivity": sensitivity,
                        "specificity": specificity,
                        "balanced_accuracy": (sensitivity + specificity) / 2},
                    "at_0.5": {"accuracy": 0.0, "sensitivity": 0.0, "specificity": 0.0}},
        "slice": {"auc": 0.0, "auc_ci_low": 0.0, "auc_ci_high": 0.0}})


def make_sweep(root, *, workdirs: str = "absolute", pivot: bool = True):
    """A sweep folder root/sweep with PLAN's runs. workdirs: 'absolute' (manifest paths exist),
    'moved' (manifest paths point elsewhere, files in SWEEP_DIR/runs/NAME) or 'relative'
    (manifest paths relative to root, files in root/elsewhere/NAME, nothing under runs/).
    Returns (sweep_dir, {letter: group name}, {letter: [run names]})."""
    sweep_dir = root / "sweep"
    entries, groups, names = [], {}, {}
    for letter, (settings, seeds) in PLAN.items():
        runs = runs_of([{"config": "configs/resnet.py:plain18", "data": "q98", **settings,
                         "seed": seed} for seed in range(len(seeds))])
        groups[letter] = runs[0].group
        names[letter] = [run.name for run in runs]
        for run, spec in zip(runs, seeds):
            if workdirs == "relative":
                files, given = root / "elsewhere" / run.name, f"elsewhere/{run.name}"
            else:
                files = sweep_dir / "runs" / run.name
                given = str(files) if workdirs == "absolute" else \
                    f"old/sweeps/attention/runs/{run.name}"
            write_run(files, spec[0] if spec else [0.5], spec[1] if spec else None)
            entries.append({"name": run.name, "group": run.group, "config": run.config,
                            "overrides": dict(run.overrides), "seed": run.seed,
                            "data": run.data, "workdir": given,
                            "status": "finished" if spec else "failed", "seconds": 1.0})
    write_json(sweep_dir / "manifest.json", {
        "sweep": "attention", "description": "attention module x placement x head",
        "sweep_dir": str(sweep_dir), "pivot": [ROWS_KEY, COLS_KEY] if pivot else None,
        "runs": entries})
    return sweep_dir, groups, names


def expected(letter: str) -> dict[str, float]:
    """The row's numbers computed here with numpy from PLAN (finished seeds only)."""
    seeds = [s for s in PLAN[letter][1] if s is not None]
    val = np.array([np.nanmax(v) if np.isfinite(v).any() else np.nan for v, _ in seeds])
    test = np.array([t for _, t in seeds])
    finite = val[np.isfinite(val)]
    out = {"seeds": len(seeds),
           "val_auc_mean": finite.mean() if finite.size else NAN,
           "val_auc_std": finite.std(ddof=1) if finite.size > 1 else NAN,
           "test_auc_mean": test[:, 0].mean(),
           "test_auc_std": test[:, 0].std(ddof=1) if len(seeds) > 1 else NAN,
           "accuracy_mean": test[:, 3].mean(), "sensitivity_mean": test[:, 4].mean(),
           "specificity_mean": test[:, 5].mean()}
    if len(seeds) == 1:
        out["ci"] = (test[0, 1], test[0, 2])
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@pytest.fixture
def sweep(tmp_path):
    return make_sweep(tmp_path)


def test_rows_order_numbers_and_best(sweep):
    sweep_dir, groups, names = sweep
    result = collect.collect(str(sweep_dir))
    rows = result["rows"]
    assert [row["configuration"] for row in rows] == [groups[k] for k in VAL_ORDER]
    assert result["missing"] == [names["D"][1]]
    assert result["settings"] == [ROWS_KEY, "model.kwargs.head", COLS_KEY]
    for letter, row in zip(VAL_ORDER, rows):
        want = expected(letter)
        for key in ("val_auc_mean", "val_auc_std", "test_auc_mean", "test_auc_std",
                    "accuracy_mean", "sensitivity_mean", "specificity_mean"):
            assert same(row[key], want[key]), (letter, key, row[key], want[key])
        assert row["seeds"] == want["seeds"]
        assert row["settings"][ROWS_KEY] == PLAN[letter][0][ROWS_KEY]
        if "ci" in want:
            assert row["test_auc_ci"] == f"[{want['ci'][0]:.3f}, {want['ci'][1]:.3f}]"
        else:
            assert row["test_auc_ci"] == ""
    assert [row["best"] for row in rows] == [True, False, False, False, False]
    # the NaN first records of A are ignored (max 0.80, 0.82, 0.84), not propagated
    assert rows[0]["val_auc_mean"] == pytest.approx(0.82)
    assert math.isnan(rows[-1]["val_auc_mean"])      # E: only NaN validation records -> last


def test_sort_by_test(sweep, capsys):
    sweep_dir, groups, _ = sweep
    rows = collect.collect(str(sweep_dir), sort="test")["rows"]
    assert [row["configuration"] for row in rows] == [groups[k] for k in TEST_ORDER]
    assert not any(row["best"] for row in rows)         # a test ranking selects nothing
    out = sweep_dir / "by_test"
    assert collect.main([str(sweep_dir), "--sort", "test", "--out", str(out)]) == 0
    assert "No row is marked: a test ranking selects nothing." in capsys.readouterr().out
    with open(out / "leaderboard.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["configuration"] for row in table] == [groups[k] for k in TEST_ORDER]
    assert {row["best"] for row in table} == {""}
    assert {row["ranked_by"] for row in table} == {"test AUC (inspection only)"}
    assert "★" not in (out / "leaderboard.md").read_text(encoding="utf-8")


def test_read_run(sweep):
    sweep_dir, _, names = sweep
    run = collect.read_run(sweep_dir / "runs" / names["A"][2])
    assert run["val_auc"] == pytest.approx(0.84) and run["val_step"] == 200
    assert run["test_auc"] == pytest.approx(0.72)
    assert (run["test_auc_ci_low"], run["test_auc_ci_high"]) == pytest.approx((0.61, 0.83))
    assert run["sensitivity"] == pytest.approx(0.66)
    assert math.isnan(collect.read_run(sweep_dir / "runs" / names["E"][0])["val_auc"])
    assert collect.read_run(sweep_dir / "runs" / names["D"][1]) is None


def test_read_run_reports_the_step_the_best_checkpoint_kept_among_equal_aucs(tmp_path):
    """Steps 100 and 200 tie: the best checkpoint keeps the later one, and so does the row."""
    write_run(tmp_path / "run", [0.8, 0.8, 0.7], (0.7, 0.6, 0.8, 0.7, 0.6, 0.75), test_step=200)
    assert collect.read_run(tmp_path / "run")["val_step"] == 200
    write_run(tmp_path / "old", [0.8, 0.8, 0.7], (0.7, 0.6, 0.8, 0.7, 0.6, 0.75), test_step=None)
    assert collect.read_run(tmp_path / "old")["val_step"] == 200     # no step: the same rule


def test_csv_parses_back(sweep):
    sweep_dir, groups, _ = sweep
    collect.collect(str(sweep_dir))
    with open(sweep_dir / "collect" / "leaderboard.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header, table = reader.fieldnames, list(reader)
    for column in ("configuration", ROWS_KEY, COLS_KEY, "model.kwargs.head", "seeds",
                   "val_auc_mean", "val_auc_std", "test_auc_mean", "test_auc_std", "test_auc_ci",
                   "accuracy_mean", "sensitivity_mean", "specificity_mean", "best", "ranked_by"):
        assert column in header
    assert "config" not in header and "data" not in header     # the same in every run
    assert [row["configuration"] for row in table] == [groups[k] for k in VAL_ORDER]
    assert [row["best"] for row in table] == ["*", "", "", "", ""]
    assert {row["ranked_by"] for row in table} == {"validation AUC"}
    for letter, row in zip(VAL_ORDER, table):
        want = expected(letter)
        assert int(row["seeds"]) == want["seeds"]
        assert row[COLS_KEY] == PLAN[letter][0][COLS_KEY]
        for key in ("val_auc_mean", "val_auc_std", "test_auc_mean", "test_auc_std",
                    "accuracy_mean", "sensitivity_mean", "specificity_mean"):
            parsed = float(row[key]) if row[key] else NAN
            assert same(parsed, want[key]), (letter, key)
        assert row["test_auc_ci"] == (f"[{want['ci'][0]:.3f}, {want['ci'][1]:.3f}]"
                                      if "ci" in want else "")
    assert table[VAL_ORDER.index("C")]["test_auc_ci"] == "[0.640, 0.870]"


def test_markdown(sweep):
    sweep_dir, groups, _ = sweep
    result = collect.collect(str(sweep_dir))
    text = (sweep_dir / "collect" / "leaderboard.md").read_text(encoding="utf-8")
    assert text == result["markdown"]
    a, b = expected("A"), expected("B")
    assert f"{a['val_auc_mean']:.3f} ± {a['val_auc_std']:.3f}" in text
    assert f"{a['test_auc_mean']:.3f} ± {a['test_auc_std']:.3f}" in text
    assert f"{b['test_auc_mean']:.3f} ± {b['test_auc_std']:.3f}" in text
    assert f"{b['specificity_mean']:.3f}" in text
    assert "[0.640, 0.870]" in text and "[0.500, 0.800]" in text   # C's and E's CI
    table = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(table) == 5
    assert f"**{groups['A']}**" in table[0] and "★" in table[0]
    assert "★" not in "".join(table[1:]) and "**" not in "".join(table[1:])
    assert "n/a" in table[-1] and groups["E"] in table[-1]
    assert "validation AUC" in text


def test_png(sweep):
    sweep_dir, _, _ = sweep
    collect.collect(str(sweep_dir))
    with Image.open(sweep_dir / "collect" / "leaderboard.png") as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).astype(np.int32)
    assert pixels.shape[0] > 150 and pixels.shape[1] > 300
    assert (pixels.min(axis=2) < 200).mean() > 0.01          # not blank
    blue = (np.abs(pixels - [31, 119, 180]).sum(axis=2) < 40).sum()   # test AUC markers (C0)
    orange = (np.abs(pixels - [255, 127, 14]).sum(axis=2) < 40).sum()  # validation (C1)
    assert blue > 50 and orange > 50


def test_pivot(sweep):
    sweep_dir, _, _ = sweep
    pivot = collect.collect(str(sweep_dir))["pivot"]
    assert pivot["rows"] == ["dual", "channel"] and pivot["columns"] == ["last", "stages"]
    tests = {k: [t[0] for v, t in (s for s in PLAN[k][1] if s)] for k in PLAN}
    cells = {("dual", "last"): tests["A"] + tests["E"],      # head single and triple averaged
             ("channel", "last"): tests["B"], ("dual", "stages"): tests["C"],
             ("channel", "stages"): tests["D"]}              # D's unfinished seed left out
    for (r, c), values in cells.items():
        i, j = pivot["rows"].index(r), pivot["columns"].index(c)
        assert pivot["mean"][i][j] == pytest.approx(np.mean(values))
        assert pivot["count"][i][j] == len(values)
        assert same(pivot["std"][i][j], np.std(values, ddof=1) if len(values) > 1 else NAN)
    assert pivot["mean"][0][0] == pytest.approx((0.70 + 0.74 + 0.72 + 0.66) / 4)
    with open(sweep_dir / "collect" / "pivot.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == ["last", "stages"] and [row[0] for row in table[1:]] == \
        ["dual", "channel"]
    assert float(table[1][1]) == pytest.approx(np.mean(cells[("dual", "last")]))
    assert float(table[2][2]) == pytest.approx(0.60)
    text = (sweep_dir / "collect" / "pivot.md").read_text(encoding="utf-8")
    dual_last = cells[("dual", "last")]
    assert f"{np.mean(dual_last):.3f} ± {np.std(dual_last, ddof=1):.3f}" in text
    assert "| channel | " in text and "0.600" in text


def test_pivot_on_seed_and_unset_key(sweep):
    """'seed' comes from the manifest field, a key no run sets reads 'default'; a cell without
    a finished run is NaN with count 0."""
    sweep_dir, _, _ = sweep
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    manifest["pivot"] = ["model.kwargs.head", "seed"]
    write_json(sweep_dir / "manifest.json", manifest)
    pivot = collect.collect(str(sweep_dir))["pivot"]
    assert pivot["rows"] == ["triple", "single"] and pivot["columns"] == ["0", "1", "2"]
    test = {k: [t[0] if t else NAN for t in (s[1] if s else None for s in PLAN[k][1])]
            for k in PLAN}
    single_0 = [test["A"][0], test["B"][0]]
    triple_0 = [test["E"][0], test["C"][0], test["D"][0]]
    assert pivot["mean"][1][0] == pytest.approx(np.mean(single_0))
    assert pivot["std"][1][0] == pytest.approx(np.std(single_0, ddof=1))
    assert pivot["mean"][0][0] == pytest.approx(np.mean(triple_0))
    assert math.isnan(pivot["mean"][0][1]) and pivot["count"][0][1] == 0   # D's seed 1
    manifest["pivot"] = ["model.kwargs.dropout", "seed"]
    write_json(sweep_dir / "manifest.json", manifest)
    pivot = collect.collect(str(sweep_dir))["pivot"]
    # seed 0: E, A, B, C, D; seeds 1 and 2: A, B
    assert pivot["rows"] == ["default"] and pivot["count"] == [[5, 2, 2]]


def test_no_pivot(tmp_path):
    sweep_dir, _, _ = make_sweep(tmp_path, pivot=False)
    assert collect.collect(str(sweep_dir))["pivot"] is None
    assert not (sweep_dir / "collect" / "pivot.md").exists()


def test_moved_workdirs_fall_back_to_sweep_runs(tmp_path, monkeypatch):
    sweep_dir, groups, names = make_sweep(tmp_path, workdirs="moved")
    monkeypatch.chdir(tmp_path)       # 'old/sweeps/...' does not exist from here
    result = collect.collect(str(sweep_dir))
    assert [row["configuration"] for row in result["rows"]] == [groups[k] for k in VAL_ORDER]
    assert result["missing"] == [names["D"][1]]


def test_relative_workdirs_from_the_current_directory(tmp_path, monkeypatch):
    sweep_dir, groups, _ = make_sweep(tmp_path, workdirs="relative")
    assert not (sweep_dir / "runs").exists()
    monkeypatch.chdir(tmp_path)
    rows = collect.collect("sweep", out=str(tmp_path / "tables"))["rows"]
    assert [row["configuration"] for row in rows] == [groups[k] for k in VAL_ORDER]
    assert (tmp_path / "tables" / "leaderboard.csv").exists()


def test_main_prints_tables_and_missing(sweep, capsys):
    sweep_dir, groups, names = sweep
    assert collect.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert f"**{groups['A']}**" in out
    assert f"`{ROWS_KEY}` × `{COLS_KEY}`" in out       # the pivot table's heading
    missing = [line for line in out.splitlines() if line.startswith("missing:")]
    assert len(missing) == 1 and names["D"][1] in missing[0] and "failed" in missing[0]
    assert names["D"][0] not in missing[0]


def test_main_errors(tmp_path, capsys):
    assert collect.main([str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "manifest.json" in error and "\n" not in error
    sweep_dir, _, _ = make_sweep(tmp_path)
    for path in sweep_dir.glob("runs/*/eval/test/metrics.json"):
        path.unlink()
    assert collect.main([str(sweep_dir)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no finished run") and "\n" not in error
