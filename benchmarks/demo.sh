#!/usr/bin/env bash
# Times `make demo` in a fresh clone of this repository and records its output in
# benchmarks/demo/: report.md with the pictures it shows, results.md, and timing.md
# (commit, machine, install time, demo time).
#   bash benchmarks/demo.sh [CLONE_DIR]        (default: a new temporary folder)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="${1:-$(mktemp -d)/her2jax}"
git clone --quiet "$repo" "$clone"
cd "$clone"
start=$(date +%s)
make setup > setup.log 2>&1
installed=$(date +%s)
make demo 2>&1 | tee demo.log
finished=$(date +%s)

out="$repo/benchmarks/demo"
mkdir -p "$out"
rm -rf "$out"/gradcam
mkdir -p "$out/gradcam"
cp demo_out/report.md demo_out/results.md demo_out/roc_all.png demo_out/qc_*.png "$out/"
pictures=$(grep -o '(gradcam/[^)]*\.png)' demo_out/report.md | tr -d '()')
for picture in $pictures; do
  cp "demo_out/$picture" "$out/$picture"
done
first=$(echo "$pictures" | head -1)
{
  echo "# Recorded demo run"
  echo
  echo "- commit: $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d)"
  echo "- machine: $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, Python $(python3 -c 'import platform; print(platform.python_version())')"
  echo "- fresh clone: make setup $((installed - start)) s, then make demo $((finished - installed)) s"
  echo "- command: bash benchmarks/demo.sh"
  echo
  echo "report.md and the pictures it shows are copied from that run's demo_out/ (run folders,"
  echo "checkpoints and the prepared data are left out); the README shows roc_all.png and $first."
} > "$out/timing.md"
echo "recorded in $out"
