"""Collect a sweep's finished runs into a leaderboard: `python -m launch.collect SWEEP_DIR
[--out DIR] [--sort val|test]`.

Reads SWEEP_DIR/manifest.json (written by `launch.sweep`) and, for every run, its work folder:
`metrics.jsonl` (the periodic validation records of training) and `eval/test/metrics.json`
(`her2jax.evaluate` on the test split). A run without a test evaluation is not finished: it is
listed as missing and left out of every number.

The leaderboard has one row per configuration, a manifest `group` (runs that differ only by their
seed). For each run it takes
    val AUC   the best patient-level validation AUC of training (the maximum over the validation
              records of metrics.jsonl, NaN records ignored; the best checkpoint is chosen on it)
    test AUC  the patient-level test AUC of that checkpoint, with its bootstrap CI, and accuracy,
              sensitivity and specificity at the threshold fixed on the validation split
and the row gives their mean and sample standard deviation (ddof=1) over the seeds with a finite
value; a single-seed configuration shows its bootstrap CI instead of a standard deviation.

Selection rule: rows are sorted by mean validation AUC, the only number one may choose a
configuration on; the first row is marked as the selected one. The test AUC is reported beside
it, never used to choose (`--sort test` orders by it for inspection only; it is not a selection).

Written to --out (default SWEEP_DIR/collect/):
    leaderboard.csv   rank, ranked_by (validation AUC, or test AUC for inspection only), best
                      ("*" on the first row of a validation ranking only), configuration, the
                      settings that vary between configurations (config, data, override keys),
                      seeds, val_auc_mean, val_auc_std, test_auc_mean, test_auc_std,
                      test_auc_ci ("[low, high]", single seed only), test_auc_ci_low,
                      test_auc_ci_high, accuracy_mean, sensitivity_mean, specificity_mean, runs;
                      full precision, NaN left empty
    leaderboard.md    the same for a reader: 3 decimals, `mean ± std`, the selected row in bold
    leaderboard.png   test AUC mean ± std (and validation AUC) per configuration, in table order
    pivot.md, .csv    when the sweep declares a pivot (rows key, columns key): mean ± std of the
                      test AUC over all finished runs with each pair of values, averaging over
                      every other factor (depth, head, seed, ...)
The markdown tables and a line naming the missing runs are also printed.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from her2jax import files
from her2jax.analysis.evaluation import format_number
from her2jax.errors import BadInput, InvalidSetting, MissingInput, UserError
from her2jax.run_folder import RunFolder

VALIDATION_SPLIT = "validation"     # configs/common.py: config.eval_split
SORT_KEYS = {"val": "val_auc_mean", "test": "test_auc_mean"}
DEFAULT = "default"                 # the value of a setting a run leaves at its config's default
RUN_METRICS = ("val_auc", "test_auc", "accuracy", "sensitivity", "specificity")


# ---------------------------------------------------------------- one run

def _float(value: Any) -> float:
    """A JSON number as float; None, text and the like become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise BadInput(f"{path}: not valid JSON ({error})") from None


def validation_aucs(workdir: str | epath.Path, split: str = VALIDATION_SPLIT
                    ) -> list[tuple[int, float]]:
    """(step, AUC) of every `split` record of RUN/metrics.jsonl, in file order (lines that do not
    parse, e.g. one cut short by an interruption, are skipped)."""
    records = []
    for record in RunFolder(workdir).metrics_records():
        if record.get("split") == split and "auc" in record:
            step = record.get("step")
            records.append((int(step) if isinstance(step, int) else -1,
                            _float(record["auc"])))
    return records


def read_run(workdir: str | epath.Path) -> dict[str, Any] | None:
    """The numbers of one finished run, or None when RUN/eval/test/metrics.json is absent.

    {"workdir", "val_auc" (best validation AUC, NaN when there is no finite record), "val_step",
     "test_step", "test_auc", "test_auc_ci_low", "test_auc_ci_high", "ci_level", "accuracy",
     "sensitivity", "specificity", "balanced_accuracy" (at the validation threshold),
     "patients", "positives"}"""
    run = RunFolder(workdir)
    folder = epath.Path(workdir)
    test_file = run.eval_metrics("test")
    if not test_file.exists():
        return None
    test = _read_json(test_file)
    split = VALIDATION_SPLIT
    config_file = run.config_file
    if config_file.exists():
        try:
            split = json.loads(config_file.read_text(encoding="utf-8")).get("eval_split") or split
        except (ValueError, AttributeError):
            pass
    elif isinstance(test.get("threshold"), dict) and test["threshold"].get("split"):
        split = test["threshold"]["split"]
    finite = [(step, auc) for step, auc in validation_aucs(folder, split) if math.isfinite(auc)]
    val_step, val_auc = None, math.nan
    if finite:
        # the best checkpoint keeps the last of equal validation AUCs (each save replaces an
        # equal one): report that step, or the step the test evaluation names when it is one
        val_auc = max(auc for _, auc in finite)
        tied = [step for step, auc in finite if auc == val_auc]
        val_step = test.get("step") if test.get("step") in tied else tied[-1]
    patient = test.get("patient") or {}
    rates = patient.get("at_validation_threshold") or {}
    return {"workdir": str(folder), "val_auc": val_auc, "val_step": val_step,
            "test_step": test.get("step"), "test_auc": _float(patient.get("auc")),
            "test_auc_ci_low": _float(patient.get("auc_ci_low")),
            "test_auc_ci_high": _float(patient.get("auc_ci_high")),
            "ci_level": _float(test.get("ci_level", 0.95)),
            "accuracy": _float(rates.get("accuracy")),
            "sensitivity": _float(rates.get("sensitivity")),
            "specificity": _float(rates.get("specificity")),
            "balanced_accuracy": _float(rates.get("balanced_accuracy")),
            "patients": test.get("patients"), "positives": test.get("positives")}


def resolve_workdir(entry: dict[str, Any], sweep_dir: str | epath.Path) -> epath.Path:
    """The run's folder: the manifest's `workdir` (absolute, or relative to the current
    directory) when it exists, else SWEEP_DIR/runs/NAME (a sweep folder moved or copied, or
    collected from another directory)."""
    given = entry.get("workdir")
    # a bucket's runs collected from a local copy of the bucket: not probed remotely
    remote = "://" in str(given) and "://" not in str(sweep_dir)
    if given and not remote:
        path = epath.Path(given)
        if path.exists():
            return path
    return epath.Path(sweep_dir) / "runs" / entry["name"]


# ---------------------------------------------------------------- statistics

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of the finite values; NaN where undefined."""
    finite = np.array([v for v in values if math.isfinite(v)], np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), (float(finite.std(ddof=1)) if finite.size > 1 else math.nan)


def value_text(value: Any) -> str:
    """A setting as table text: floats compact (1e-3 -> 0.001), None -> 'default'."""
    if value is None:
        return DEFAULT
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(v) for v in value)
    return str(value)


def factor(entry: dict[str, Any], key: str) -> str:
    """A run's value of `key` as text: 'config', 'data' and 'seed' from the manifest entry, any
    other key from its overrides ('default' when the run does not set it)."""
    if key in ("config", "data", "seed"):
        return value_text(entry.get(key))
    return value_text((entry.get("overrides") or {}).get(key))


def group_of(entry: dict[str, Any]) -> str:
    if entry.get("group"):
        return entry["group"]
    name, seed = entry["name"], entry.get("seed")
    return name.removesuffix(f"-s{seed}") if seed is not None else name


def setting_keys(entries: Sequence[dict[str, Any]]) -> list[str]:
    """The keys (config, data, override keys, in that order) whose value differs between the
    sweep's configurations."""
    keys = ["config", "data"]
    for entry in entries:
        for key in entry.get("overrides") or {}:
            if key not in keys:
                keys.append(key)
    firsts: dict[str, dict[str, Any]] = {}
    for entry in entries:
        firsts.setdefault(group_of(entry), entry)
    return [key for key in keys if len({factor(e, key) for e in firsts.values()}) > 1]


# ---------------------------------------------------------------- the tables

def leaderboard(entries: Sequence[dict[str, Any]], results: dict[str, dict[str, Any]],
                sort: str = "val") -> list[dict[str, Any]]:
    """One row per group with at least one finished run, sorted by `sort` ('val' or 'test')
    mean AUC, highest first, NaN last (ties keep the manifest order). Row 0 is marked best under
    the validation ranking only: a test ranking is for inspection and selects nothing."""
    if sort not in SORT_KEYS:
        raise InvalidSetting(f"sort by 'val' or 'test', not {sort!r}")
    keys = setting_keys(entries)
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(group_of(entry), []).append(entry)
    rows = []
    for group, members in groups.items():
        finished = [e for e in members if e["name"] in results]
        if not finished:
            continue
        runs = [results[e["name"]] for e in finished]
        row: dict[str, Any] = {"configuration": group,
                               "settings": {key: factor(members[0], key) for key in keys},
                               "seeds": len(runs), "runs": [e["name"] for e in finished]}
        for metric in RUN_METRICS:
            mean, std = mean_std([run[metric] for run in runs])
            row[f"{metric}_mean"] = mean
            if metric in ("val_auc", "test_auc"):
                row[f"{metric}_std"] = std
        single = runs[0] if len(runs) == 1 else None
        row["test_auc_ci_low"] = single["test_auc_ci_low"] if single else math.nan
        row["test_auc_ci_high"] = single["test_auc_ci_high"] if single else math.nan
        row["ci_level"] = single["ci_level"] if single else math.nan
        row["test_auc_ci"] = (f"[{format_number(row['test_auc_ci_low'])}, "
                              f"{format_number(row['test_auc_ci_high'])}]") if single else ""
        rows.append(row)
    column = SORT_KEYS[sort]
    rows.sort(key=lambda r: (not math.isfinite(r[column]),
                             -r[column] if math.isfinite(r[column]) else 0.0))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
        row["best"] = sort == "val" and rank == 1 and math.isfinite(row[column])
        row["ranked_by"] = "validation AUC" if sort == "val" else "test AUC (inspection only)"
    return rows


def pivot_table(entries: Sequence[dict[str, Any]], results: dict[str, dict[str, Any]],
                rows_key: str, cols_key: str) -> dict[str, Any]:
    """Mean ± std (ddof=1) of the test AUC over the finished runs with each (rows_key value,
    cols_key value), every other factor averaged over; values in order of first appearance in
    the manifest. {"rows_key", "cols_key", "rows", "columns", "mean", "std", "count"} with
    mean/std/count as lists of rows (NaN and 0 where no run finished)."""
    row_values: list[str] = []
    col_values: list[str] = []
    for entry in entries:
        for key, values in ((rows_key, row_values), (cols_key, col_values)):
            value = factor(entry, key)
            if value not in values:
                values.append(value)
    cells: dict[tuple[str, str], list[float]] = {}
    for entry in entries:
        if entry["name"] in results:
            cells.setdefault((factor(entry, rows_key), factor(entry, cols_key)), []).append(
                results[entry["name"]]["test_auc"])
    table: dict[str, Any] = {"rows_key": rows_key, "cols_key": cols_key, "rows": row_values,
                             "columns": col_values, "mean": [], "std": [], "count": []}
    for r in row_values:
        stats = [mean_std(cells.get((r, c), [])) for c in col_values]
        table["mean"].append([m for m, _ in stats])
        table["std"].append([s for _, s in stats])
        table["count"].append([sum(math.isfinite(v) for v in cells.get((r, c), []))
                               for c in col_values])
    return table


# ---------------------------------------------------------------- writing

def _plus_minus(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def _csv_number(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return "" if value is None else str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def csv_columns(keys: Sequence[str]) -> list[str]:
    return ["rank", "ranked_by", "best", "configuration", *keys, "seeds", "val_auc_mean",
            "val_auc_std", "test_auc_mean", "test_auc_std", "test_auc_ci", "test_auc_ci_low",
            "test_auc_ci_high", "accuracy_mean", "sensitivity_mean", "specificity_mean", "runs"]


def leaderboard_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = csv_columns(keys)
    writer.writerow(columns)
    for row in rows:
        values = {**row, **row["settings"], "best": "*" if row["best"] else "",
                  "runs": " ".join(row["runs"])}
        writer.writerow([_csv_number(values[c]) for c in columns])
    return buffer.getvalue()


def leaderboard_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str], *,
                         sweep: str, description: str = "", sort: str = "val",
                         finished: int = 0, planned: int = 0) -> str:
    levels = {row["ci_level"] for row in rows if math.isfinite(row["ci_level"])}
    level = f"{round(100 * levels.pop())}% " if len(levels) == 1 else ""
    order = ("sorted by mean validation AUC (each run's best validation AUC), the selection "
             "criterion; the test AUC is reported, not selected on"
             if sort == "val" else
             "sorted by mean test AUC for inspection: choosing a configuration on the test AUC "
             "biases it upward, select on the validation AUC")
    lines = [(f"## Sweep `{sweep}`: {len(rows)} configurations, {finished} of {planned} runs "
              "finished"), ""]
    if description:
        lines += [description, ""]
    mark = (" ★ = the selected configuration." if sort == "val" else
            " No row is marked: a test ranking selects nothing.")
    lines += [(f"Patient-level AUC, {order}.{mark} Mean ± sample std over seeds; CI = "
               f"{level}bootstrap interval of a single-seed configuration's test AUC; accuracy, "
               "sensitivity and specificity on test at the threshold fixed on validation."), ""]
    header = ["", "configuration", *keys, "seeds", "val AUC", "test AUC", "test AUC CI",
              "accuracy", "sensitivity", "specificity"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        name = _cell(row["configuration"])
        cells = ["★" if row["best"] else str(row["rank"]),
                 f"**{name}**" if row["best"] else name,
                 *(_cell(row["settings"][key]) for key in keys), str(row["seeds"]),
                 _plus_minus(row["val_auc_mean"], row["val_auc_std"]),
                 _plus_minus(row["test_auc_mean"], row["test_auc_std"]), row["test_auc_ci"],
                 format_number(row["accuracy_mean"]), format_number(row["sensitivity_mean"]),
                 format_number(row["specificity_mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pivot_csv(table: dict[str, Any]) -> str:
    """Wide table of mean test AUCs: first column the rows key's values, then one column per
    value of the columns key (empty where no run finished)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f"{table['rows_key']} \\ {table['cols_key']}", *table["columns"]])
    for value, means in zip(table["rows"], table["mean"]):
        writer.writerow([value, *(_csv_number(m) for m in means)])
    return buffer.getvalue()


def pivot_markdown(table: dict[str, Any], sweep: str = "") -> str:
    counts = [c for row in table["count"] for c in row if c]
    runs = (f"each cell averages {counts[0]} runs" if len(set(counts)) == 1 else
            f"cells average {min(counts)} to {max(counts)} runs") if counts else "no finished run"
    lines = [(f"## {'Sweep `' + sweep + '`: ' if sweep else ''}test AUC, "
              f"`{table['rows_key']}` × `{table['cols_key']}`"), "",
             (f"Mean ± sample std of the patient-level test AUC over all finished runs with both "
              f"values ({runs}: every other setting and the seeds averaged over). A report, not "
              f"a selection: choose on the validation AUC (leaderboard)."), ""]
    header = [f"{table['rows_key']} \\ {table['cols_key']}", *table["columns"]]
    lines.append("| " + " | ".join(_cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for value, means, stds in zip(table["rows"], table["mean"], table["std"]):
        cells = [_cell(value), *(_plus_minus(m, s) for m, s in zip(means, stds))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_leaderboard(rows: Sequence[dict[str, Any]], path: str | epath.Path,
                     title: str = "") -> None:
    """Test AUC mean ± std (dots) and validation AUC mean ± std (diamonds) per configuration,
    the first row at the top; written as PNG through epath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(rows)
    y = np.arange(count, dtype=np.float64)[::-1]
    figure, axes = plt.subplots(figsize=(8.0, max(2.4, 0.45 * count + 1.3)))
    series = (("test_auc", "test AUC (mean ± std)", "o", "C0", 0.12),
              ("val_auc", "validation AUC (mean ± std)", "D", "C1", -0.12))
    for metric, label, marker, color, offset in series:
        means = np.array([row[f"{metric}_mean"] for row in rows], np.float64)
        stds = np.nan_to_num(np.array([row[f"{metric}_std"] for row in rows], np.float64))
        axes.errorbar(means, y + offset, xerr=stds, fmt=marker, color=color, ecolor=color,
                      capsize=3, markersize=6, label=label,
                      markerfacecolor=color if metric == "test_auc" else "white")
    axes.axvline(0.5, color="0.6", linestyle="--", linewidth=1, label="chance")
    values = [row[f"{m}_mean"] + sign * np.nan_to_num(row[f"{m}_std"])
              for row in rows for m in ("test_auc", "val_auc") for sign in (-1, 1)
              if math.isfinite(row[f"{m}_mean"])]
    low = min([0.45, *values]) - 0.03
    high = min(1.02, max([0.55, *values]) + 0.03)
    axes.set_xlim(low, high)
    axes.set_ylim(-0.7, count - 0.3)
    axes.set_yticks(y)
    axes.set_yticklabels([f"{row['configuration']} (n={row['seeds']})" for row in rows],
                         fontsize=8 if count > 12 else 9)
    for label, row in zip(axes.get_yticklabels(), rows):
        if row["best"]:
            label.set_fontweight("bold")
    axes.set_xlabel("patient-level AUC")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8,
                frameon=False)
    if title:
        axes.set_title(title, fontsize=10, pad=22)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(target, buffer.getvalue())


# ---------------------------------------------------------------- the whole sweep

def read_manifest(sweep_dir: str | epath.Path) -> dict[str, Any]:
    path = epath.Path(sweep_dir) / "manifest.json"
    if not path.exists():
        raise MissingInput(f"no manifest.json in {sweep_dir} (launch the sweep with "
                           f"python -m launch.sweep first)")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise BadInput(f"{path}: no list of runs")  # noqa: TRY004 (main reports it)
    return manifest


def collect(sweep_dir: str | epath.Path, out: str | epath.Path | None = None,
            sort: str = "val", echo: bool = False) -> dict[str, Any]:
    """Reads the sweep, writes the files listed in the module docstring into `out` (default
    SWEEP_DIR/collect) and returns {"rows", "pivot" (None without a pivot), "missing" (names of
    the runs without a test evaluation), "settings" (the varying keys), "sweep", "out",
    "markdown"}. Raises FileNotFoundError without a manifest, ValueError without a finished run.
    `echo` prints the markdown and the missing runs."""
    if sort not in SORT_KEYS:
        raise InvalidSetting(f"sort by 'val' or 'test', not {sort!r}")
    manifest = read_manifest(sweep_dir)
    entries = manifest["runs"]
    results: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    statuses: dict[str, str] = {}
    for entry in entries:
        result = read_run(resolve_workdir(entry, sweep_dir))
        if result is None:
            missing.append(entry["name"])
            statuses[entry["name"]] = entry.get("status") or "unknown"
        else:
            results[entry["name"]] = result
    if not results:
        raise BadInput(f"no finished run in {sweep_dir}: none of its {len(entries)} runs has "
                       f"eval/test/metrics.json")
    sweep = manifest.get("sweep") or epath.Path(sweep_dir).name
    keys = setting_keys(entries)
    rows = leaderboard(entries, results, sort)
    folder = epath.Path(out) if out else epath.Path(sweep_dir) / "collect"
    folder.mkdir(parents=True, exist_ok=True)
    markdown = leaderboard_markdown(rows, keys, sweep=sweep,
                                    description=manifest.get("description") or "", sort=sort,
                                    finished=len(results), planned=len(entries))
    files.write_text(folder / "leaderboard.csv", leaderboard_csv(rows, keys))
    files.write_text(folder / "leaderboard.md", markdown)
    plot_leaderboard(rows, folder / "leaderboard.png",
                     title=f"{sweep}: {'validation' if sort == 'val' else 'test'}-AUC order")
    pivot = None
    pivot_text = ""
    if manifest.get("pivot"):
        rows_key, cols_key = manifest["pivot"][:2]
        pivot = pivot_table(entries, results, rows_key, cols_key)
        pivot_text = pivot_markdown(pivot, sweep)
        files.write_text(folder / "pivot.md", pivot_text)
        files.write_text(folder / "pivot.csv", pivot_csv(pivot))
    missing_line = (f"missing: {len(missing)} of {len(entries)} runs not finished: "
                    + ", ".join(f"{name} ({statuses[name]})" for name in missing)
                    if missing else f"missing: none (all {len(entries)} runs finished)")
    if echo:
        print(markdown)
        if pivot_text:
            print(pivot_text)
        print(missing_line)
        print(f"written: {folder}")
    return {"rows": rows, "pivot": pivot, "missing": missing, "settings": keys, "sweep": sweep,
            "out": str(folder), "markdown": markdown}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="the sweep's folder (holds manifest.json)")
    parser.add_argument("--out", help="output folder (default SWEEP_DIR/collect)")
    parser.add_argument("--sort", choices=sorted(SORT_KEYS), default="val",
                        help="order by mean validation AUC (default, the selection rule) or "
                             "test AUC (inspection only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        collect(args.sweep_dir, out=args.out, sort=args.sort, echo=True)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
