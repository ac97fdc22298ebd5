"""The preparation report written inside the dataset folder.

`preparation_report.md` (for people), `preparation_report.json` (for programs), `skipped.csv`
(every skipped case with file and reason) and `qc_montage.png` (a few fused slices per class with
the tumour outline: exactly the arrays written to the TFRecords, i.e. what the model will see).
"""
from __future__ import annotations

import collections
import csv
import io
import json
import os
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend chosen first: no display here)
import numpy as np  # noqa: E402

from her2jax import files  # noqa: E402

REPORT_MD = "preparation_report.md"
REPORT_JSON = "preparation_report.json"
SKIPPED_CSV = "skipped.csv"
QC_PNG = "qc_montage.png"


def write(folder: str, metadata: Mapping[str, Any],
          qc_samples: Mapping[int, list[dict[str, Any]]]) -> None:
    metadata = json.loads(json.dumps(dict(metadata), default=str))
    files.write_json(os.path.join(folder, REPORT_JSON), metadata, indent=2)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["patient_id", "file", "reason"])
    writer.writeheader()
    writer.writerows(metadata.get("skipped", []))
    files.write_text(os.path.join(folder, SKIPPED_CSV), table.getvalue())
    files.write_text(os.path.join(folder, REPORT_MD), markdown(metadata))
    qc_montage(qc_samples, os.path.join(folder, QC_PNG))


def count_table(counts: list[list]) -> str:
    """Markdown table: one row per split x label x cohort, with patients and slices."""
    rows: dict[tuple, dict[str, int]] = collections.defaultdict(dict)
    for split, label, cohort, what, n in counts:
        rows[(split, label, cohort)][what] = n
    lines = ["| split | label | cohort | patients | slices |", "|---|---|---|---|---|"]
    for (split, label, cohort), value in sorted(rows.items()):
        lines.append(f"| {split} | {label} | {cohort} | {value.get('patients', 0)} "
                     f"| {value.get('slices', 0)} |")
    return "\n".join(lines)


def markdown(metadata: Mapping[str, Any]) -> str:
    skipped = metadata.get("skipped", [])
    source = metadata["source"]
    kind = source["kind"] + (", MinCrop version" if source.get("release") == "mincrop" else
                             ", full version" if source.get("release") == "full" else "")
    excluded = metadata.get("excluded_counts") or {}
    parts = [
        "# her2_dce preparation report", "",
        f"Source: `{source['path']}` ({kind}); code version {metadata['code_version']}.", "",
        f"Cohorts: {', '.join(metadata.get('cohorts') or []) or '-'}.", "",
        f"Split rule: {metadata['split_rule']}.", "",
        "## Counts", "", count_table(metadata.get("counts", [])), "",
        f"## Excluded rows ({sum(excluded.values())})", "",
        "Left out by rule, not errors (the patients are listed in metadata.json, `excluded`).", "",
    ]
    parts += ([f"- {reason}: {n}" for reason, n in excluded.items()] or ["none"])
    parts += ["", f"## Skipped cases ({len(skipped)})", ""]
    parts += [f"- `{s['patient_id']}`: `{s['file']}`: {s['reason']}" for s in skipped] or ["none"]
    case_notes = metadata.get("case_notes") or {}
    if case_notes:
        parts += ["", f"## Patient notes ({len(case_notes)})", ""]
        parts += [f"- `{pid}`: {'; '.join(notes)}" for pid, notes in case_notes.items()]
    parts += ["", "## Notes", ""] + [f"- {n}" for n in metadata.get("notes") or ["none"]]
    parts += ["", "## Parameters", "", "```json",
              json.dumps(metadata["preparation"], indent=2), "```", "",
              f"QC montage: `{QC_PNG}`.", ""]
    return "\n".join(parts)


def qc_montage(samples: Mapping[int, list[dict[str, Any]]], path: str) -> None:
    """Rows: HER2- then HER2+; columns: one slice per patient, tumour outline in white."""
    columns = max(1, max(len(v) for v in samples.values()))
    figure, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 5.4), squeeze=False,
                                gridspec_kw={"hspace": 0.35})
    for row, label in enumerate((0, 1)):
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column >= len(samples[label]):
                continue
            example = samples[label][column]
            axis.imshow(example["image"])
            mask = np.asarray(example["mask"])[..., 0]
            if mask.any():
                axis.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
            axis.set_title(f"{example['patient_id']}\nz={example['slice_index']} "
                           f"{example['cohort']}", fontsize=6)
        axes[row][0].text(-0.08, 0.5, ("HER2-", "HER2+")[label], transform=axes[row][0].transAxes,
                          rotation=90, va="center", ha="right", fontsize=10)
    figure.suptitle("QC: fused slices (R=pre, G=early, B=late) as written", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    files.write_bytes(path, buffer.getvalue())
