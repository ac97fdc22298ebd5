#!/usr/bin/env bash
# Packed sweeps on a GPU machine without TensorFlow (one device call of about 5 minutes; the
# time limits below stop it by 7).
# Runs from the repository root; writes to $OUT (or benchmarks/gpu_out) gpu_sweep.log and three
# JSON files. The resident split is a synthetic uint8 array put on the device, in place of the
# TFRecord read (benchmarks/pack_step.py says so in its first line).
#   1. a pack of 8 dual-attention ResNet-18 members at 224 px against one run at the same batch
#      per member (64), bfloat16, in both member layouts (vmap and map): aggregate training
#      images/s, compile time per member, MFU against the H200's dense bfloat16 peak
#      (989 TFLOP/s), the projected share of a run in training steps: pack_resnet18_dual.json;
#   2. packs of 4 and 16 in the platform's default layout (auto): pack_sizes.json;
#   3. the dual-attention ResNet-50 alone at batch 256 (bfloat16, 224 px) against PyTorch AMP
#      bfloat16 channels-last at the same batch: compare_resnet50_dual_b256.json.
# DRY=1 runs every step in tiny CPU shapes (a check of the script on a machine without GPU).
# Needs jax, flax, optax, orbax, ml_collections (and torch for step 3); not TensorFlow.
set -uo pipefail
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
log="$out/gpu_sweep.log"
: > "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, \
'devices', jax.devices())" 2>&1 | tee -a "$log"
if ! python3 -c "import ml_collections" 2>/dev/null; then
    echo "error: ml_collections is not installed (the configs need it): pip install" \
        "ml_collections, or put its wheel on PYTHONPATH" | tee -a "$log"
    exit 2
fi
if [ "${DRY:-0}" = 1 ]; then
    # a pack of 2 stands in for 8: the dry mode checks the commands, not the pack size
    pack="--dry_run" eight="1,2" sizes="1,2" compare="--dry_run --device cpu --batch 2"
    limit=240 climit=240
else
    pack="--image_size 224 --batch 64 --steps 20 --repeats 3 --peak_tflops 989 --val_rows 2048"
    eight="1,8" sizes="1,4,16"
    compare="--device gpu --image_size 224 --batch 256 --steps 10 --warmup 3 --repeats 3"
    limit=150 climit=110
fi
timeout "$limit" python3 benchmarks/pack_step.py --config configs/resnet.py:resnet18 \
    --packs "$eight" --layouts vmap,map $pack --json "$out/pack_resnet18_dual.json" 2>&1 \
    | grep -v "^W.*cuda_timer" | tee -a "$log"
timeout "$limit" python3 benchmarks/pack_step.py --config configs/resnet.py:resnet18 \
    --packs "$sizes" --layouts auto $pack --json "$out/pack_sizes.json" 2>&1 \
    | grep -v "^W.*cuda_timer" | tee -a "$log"
timeout "$climit" python3 benchmarks/torch_compare.py --models resnet50_dual --dtype bfloat16 \
    $compare --json "$out/compare_resnet50_dual_b256.json" 2>&1 | grep -v "^WARNING" \
    | tee -a "$log"
