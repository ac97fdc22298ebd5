#!/usr/bin/env bash
# What augmenting on the device (input.augment_on='device') costs the train step on a GPU:
# her2jax alone, ResNet-18 with dual attention and ViT-B/16, each without and with the default
# augmentation in the step (benchmarks/jax_variants.py, one process per variant). Writes to $OUT
# (or benchmarks/gpu_out) gpu_augment.log and augment_<model>.json. About 2 minutes. The host
# pipeline cannot run there (no TensorFlow); its per-core rates are in benchmarks/RESULTS.md.
# SHAPE and MODELS only to check the script on a CPU (SHAPE="--dry_run --device cpu ...").
set -uo pipefail
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
log="$out/gpu_augment.log"
: > "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
shape=${SHAPE:-"--device gpu --dtype bfloat16 --image_size 224 --batch 64 --steps 10 --warmup 3 --repeats 3"}
for model in ${MODELS:-resnet18_dual vit_base16}; do
    # shellcheck disable=SC2086 (the shape splits on spaces)
    python3 benchmarks/jax_variants.py --model "$model" --timeout 60 \
        --json "$out/augment_${model}.json" \
        --variant "no augmentation in the step" \
        --variant "augmentation on the device=--her2jax_augment" \
        -- $shape 2>&1 | tee -a "$log"
done
