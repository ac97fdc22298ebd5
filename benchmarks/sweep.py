"""One sweep, end to end, three ways side by side: from a prepared dataset to every run's test
evaluation, through `python -m launch.sweep --backend local`.

    python benchmarks/sweep.py [--runs 4] [--ways off,1,4] [--steps 600] [--batch 8]
                               [--image_size 32] [--patients 24] [--out bench_out/sweep]

The sweep is the study's learning-rate search (`configs/sweeps/lr_search.py:RUNS`, dual-attention
ResNet-18) on a synthetic cohort (`data_prep.synthetic`) prepared once at --image_size; every
way starts from that dataset in a fresh sweep folder. Ways (`--pack` of launch.sweep):
  off   one process per run, batches from the TFRecords (the sweep as it ran before packs)
  1     one process per run, the splits resident on the device (input.source=device)
  K     packs of at most K runs, one process and one compiled step per pack
For each: wall time, runs per hour, aggregate training images per second over the whole wall
time, and the share of the wall time spent in training steps (from each process's
metrics.jsonl: the logged intervals after the first, i.e. compilation excluded). Writes
OUT/sweep.json and OUT/sweep.md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
SWEEP = '''
from configs.sweeps import lr_search
def get_sweep(arg=None):
    sweep = lr_search.get_sweep(arg)
    sweep.data["q98"]["image_size"] = {image_size}
    return sweep
'''


def run(command: list[str], log: str) -> float:
    """Runs `command` in the repository, its output to `log`; returns the wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, env=ENV, stdout=handle,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n"
                 f"{open(log).read()[-3000:]}")
    return time.perf_counter() - start


def training_seconds(workdir: str, batch: int) -> float:
    """Seconds in training steps by the run's log: each logged interval's steps x batch /
    its images per second (the first interval of a launch has no rate: compilation)."""
    seconds, previous = 0.0, 0
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("split") != "train":
                continue
            if record.get("images_per_second"):
                seconds += (record["step"] - previous) * batch / record["images_per_second"]
            previous = record["step"]
    return seconds


def measure_way(way: str, args: argparse.Namespace, sweep_file: str, dataset_root: str
                ) -> dict:
    folder = os.path.join(args.out, f"pack_{way}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    os.symlink(dataset_root, os.path.join(folder, "data"))     # prepared once, shared
    settings = [f"total_steps={args.steps}", f"batch_size={args.batch}", "warmup_steps=1",
                f"eval.every_steps={args.steps}", f"checkpoint.every_steps={args.steps}",
                f"log_every_steps={max(1, args.steps // 10)}", "eval.batch_size=32",
                "init.pretrained="]      # from scratch: the measured sweep needs no weight files
    command = [sys.executable, "-m", "launch.sweep", "--sweep", f"{sweep_file}:{args.runs}",
               "--backend", "local", "--source", args.cohort, "--sweep_dir", folder,
               "--pack", way, *[item for s in settings for item in ("--set", s)]]
    wall = run(command, os.path.join(args.out, f"pack_{way}.log"))
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    entries = manifest["runs"]
    if {entry["status"] for entry in entries} != {"finished"}:
        sys.exit(f"way {way}: not every run finished: {[e['status'] for e in entries]}")
    # one process per pack: count its training time once
    processes: dict[str, float] = {}
    for entry in entries:
        processes.setdefault(entry.get("pack", entry["name"]),
                             training_seconds(entry["workdir"], args.batch))
    images = len(entries) * args.steps * args.batch
    return {"way": way, "runs": len(entries), "processes": len(processes),
            "wall_seconds": round(wall, 1), "runs_per_hour": round(len(entries) * 3600 / wall, 1),
            "images_per_second": round(images / wall, 1),
            "training_seconds": round(sum(processes.values()), 1),
            "step_share": round(sum(processes.values()) / wall, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="points of lr_search")
    parser.add_argument("--ways", default="off,1,4", help="--pack values, side by side")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--out", default="bench_out/sweep")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    args.cohort = os.path.join(args.out, "cohort")
    if not os.path.exists(os.path.join(args.cohort, "metadata.csv")):
        run([sys.executable, "-m", "data_prep.synthetic", "--out", args.cohort, "--patients",
             str(args.patients), "--size", "64", "--slices", "12"],
            os.path.join(args.out, "synthetic.log"))
    sweep_file = os.path.join(args.out, "lr_search_small.py")
    with open(sweep_file, "w") as handle:
        handle.write(SWEEP.format(image_size=args.image_size))
    dataset_root = os.path.join(args.out, "data")
    if not os.path.isdir(dataset_root):
        run([sys.executable, "-m", "data_prep.prepare", "--source", args.cohort, "--data_dir",
             dataset_root, "--quiet", "--image_size", str(args.image_size), "--normalization",
             "per_channel_clip_q98"], os.path.join(args.out, "prepare.log"))
    rows = []
    for way in args.ways.split(","):
        rows.append(measure_way(way.strip(), args, sweep_file, dataset_root))
        print(json.dumps(rows[-1]), flush=True)
    baseline = rows[0]["wall_seconds"]
    lines = [f"lr_search:{args.runs} (dual-attention ResNet-18, {args.image_size} px, batch "
             f"{args.batch}, {args.steps} steps a run), {os.cpu_count()} CPUs",
             "", "| --pack | processes | wall s | runs/h | img/s (whole sweep) | in steps | "
             f"speed-up vs {rows[0]['way']} |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['way']} | {row['processes']} | {row['wall_seconds']} | "
                     f"{row['runs_per_hour']} | {row['images_per_second']} | "
                     f"{row['step_share']:.0%} | {baseline / row['wall_seconds']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "sweep.json"), "w") as handle:
        json.dump({"settings": vars(args), "rows": rows}, handle,
                  indent=2)
    with open(os.path.join(args.out, "sweep.md"), "w") as handle:
        handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
