"""One table and one chart from several `torch_compare.py --json` files (gpu.sh writes one per
model), for RESULTS.md.

    python benchmarks/report_compare.py compare_resnet50_dual_bf16.json ... [--plot chart.png]

The files must come from runs with the same settings (image size, batch, steps, precision,
device, torch.compile or not; a setting a file predates counts as its default); their models are
put in the order given. The ViT attention kernel may differ between files: ViT rows are named
with the kernel their file ran, e.g. "vit_base16 (cudnn attention)". Prints the markdown
table of `torch_compare.py` over all of them, notes files that were cut off ("complete": false)
and runs that failed, and with --plot draws images/s per model and framework (grouped bars, the
her2jax / PyTorch ratios written beside them). Needs neither JAX nor PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_compare  # noqa: E402  (standard library only at import)

# Arguments that may differ between the files being merged.
PER_FILE = {"models", "json", "vit_attention", "cudnn_token_multiple"}
DEFAULTS = vars(torch_compare.parse([]))
FRAMEWORKS = (("her2jax", "her2jax"), ("torch_eager", "PyTorch eager"),
              ("torch_compile", "torch.compile"))


def load(paths: list[str]) -> dict[str, Any]:
    """The merged run: results of every file, checked to share their settings."""
    if not paths:
        raise SystemExit("report_compare: give at least one JSON file")
    runs = []
    for path in paths:
        try:
            with open(path) as handle:
                run = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"report_compare: cannot read {path}: {error}") from None
        if not isinstance(run, dict) or not {"arguments", "environment", "results"} <= set(run):
            raise SystemExit(f"report_compare: {path} is not a torch_compare.py --json file")
        runs.append((path, run))
    first_path, first = runs[0]
    keys = (set(DEFAULTS) | {k for _, run in runs for k in run["arguments"]}) - PER_FILE

    def settings(run: dict[str, Any]) -> dict[str, Any]:
        return {k: run["arguments"].get(k, DEFAULTS.get(k)) for k in keys}

    for path, run in runs[1:]:
        mine, other = settings(first), settings(run)
        differ = sorted(k for k in keys if mine[k] != other[k])
        if differ:
            detail = ", ".join(f"{k}: {mine[k]!r} in {first_path}, {other[k]!r}"
                               for k in differ)
            raise SystemExit(f"report_compare: {path} was run with other settings ({detail})")
    results = [named(result, run) for _, run in runs for result in run["results"]]
    incomplete = [path for path, run in runs if not run.get("complete", False)]
    environment = {k: v for k, v in first["environment"].items() if k != "vit_attention_kernel"}
    dates = list(dict.fromkeys(run["environment"].get("date_utc", "n/a") for _, run in runs))
    environment["date_utc"] = ", ".join(dates)
    return {"arguments": dict(first["arguments"], vit_attention="xla"),   # ViT rows say theirs
            "peak_flops": first.get("peak_flops"), "environment": environment,
            "results": results, "incomplete": incomplete}


def named(result: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """A ViT's result with the attention kernel its run used in the model name."""
    if torch_compare.MODELS.get(result.get("model"), {}).get("family") != "vit":
        return result
    kernel = (run["environment"].get("vit_attention_kernel")   # what ran; older files: asked for
              or run["arguments"].get("vit_attention", "xla"))
    return dict(result, model=f"{result['model']} ({kernel} attention)")


def report(merged: dict[str, Any]) -> str:
    args = SimpleNamespace(**merged["arguments"], peak_flops=merged["peak_flops"])
    text = torch_compare.table(merged["results"], args, merged["environment"])
    versions = merged["environment"].get("versions", {})
    lines = [text, "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
             f"date (UTC): {merged['environment'].get('date_utc', 'n/a')}"]
    if merged["environment"].get("torch_compile_backend"):
        lines.append(f"torch.compile backend: {merged['environment']['torch_compile_backend']}")
    lines += [f"INCOMPLETE {path}: cut off before its last framework finished"
              for path in merged["incomplete"]]
    return "\n".join(lines)


def plot(merged: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = merged["results"]
    present = [(key, label) for key, label in FRAMEWORKS
               if any("images_per_s" in r.get(key, {}) for r in results)]
    if not present:
        raise SystemExit("report_compare: no framework has a throughput to plot")
    arguments = merged["arguments"]
    height = 0.8 / len(present)
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.9 * len(results)))
    rows = np.arange(len(results))[::-1]
    for index, (key, label) in enumerate(present):
        values = [r.get(key, {}).get("images_per_s", 0.0) for r in results]
        errors = [[v - r.get(key, {}).get("min", v) for v, r in zip(values, results)],
                  [r.get(key, {}).get("max", v) - v for v, r in zip(values, results)]]
        offset = (len(present) - 1) / 2 - index
        axis.barh(rows + offset * height, values, height, xerr=errors, label=label,
                  capsize=2)
        for row, value, result in zip(rows, values, results):
            end = result.get(key, {}).get("max", value)   # right of the min-max bar
            if key != "her2jax" and result.get(f"ratio_vs_{key}"):
                axis.text(end, row + offset * height,
                          f"  her2jax = {result[f'ratio_vs_{key}']:.2f}x", va="center",
                          fontsize=8)
            elif "error" in result.get(key, {}):
                axis.text(0, row + offset * height, "  failed", va="center", fontsize=8)
    axis.set_yticks(rows, [r["model"] for r in results])
    axis.set_xlabel("training images / second (median, bars: min-max)")
    environment = merged["environment"]
    device = environment.get("torch_device") or (
        f"{environment.get('cpu', 'CPU')}, {environment.get('cpu_cores', '?')} cores")
    axis.set_title(f"{device}: {arguments['image_size']} px, batch {arguments['batch']}, "
                   f"{arguments['dtype']}", fontsize=10)
    axis.margins(x=0.25)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="torch_compare.py --json outputs")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    args = parser.parse_args(argv)
    merged = load(args.files)
    text = report(merged)
    print(text)
    if args.plot:
        plot(merged, args.plot)
        print(f"chart: {args.plot}")
    return text


if __name__ == "__main__":
    main()
