#!/usr/bin/env bash
# Device checks for a GPU machine that has jax (CUDA), flax, torch, timm and safetensors but no
# TensorFlow. Runs from the repository root; writes its logs to $OUT (or benchmarks/gpu_out).
#   1. with TESTS=1: the model and weight-conversion tests on this machine's jax/flax versions
#      (JAX on its CPU platform, so float32 parity is not affected by TF32 matrix units);
#   2. the table of registered models on the GPU, float32 and bfloat16 compute;
#   (3 and 4 below)
set -uo pipefail
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import jax, flax, torch, timm
print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__,
      "timm", timm.__version__, "devices", jax.devices())
PY
if [ "${TESTS:-0}" = 1 ]; then   # step 1 only when asked: it takes minutes of device time
JAX_PLATFORMS=cpu timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 \
    tests/test_attention.py tests/test_resnet.py tests/test_vit.py tests/test_weights.py \
    tests/test_model_table.py 2>&1 | tail -n 25 | tee "$out/tests.txt"
fi
for dtype in float32 bfloat16; do
    [ "${DRY:-0}" = 1 ] && break
    timeout 90 python3 -m her2jax.models --batch 64 --repeats 10 --dtype "$dtype" 2>&1 \
        | grep -v "^WARNING" | tee "$out/models_$dtype.md"
done
#   3. her2jax against PyTorch (eager, AMP bfloat16, channels-last; and torch.compile) training
#      throughput, MFU, compile time and peak memory at 224x224 (JSON in $out);
#   4. the scaling benchmark on the devices present.
# DRY=1 runs steps 3-4 in their tiny CPU mode (a check of the script on a machine without GPU).
compile="--compile"
if [ "${DRY:-0}" = 1 ]; then
    compare="--dry_run --device cpu"
    compile=""   # torch.compile on CPU needs minutes; the GPU run times it
    scaling="--image_size 32 --batch 4 --steps 1 --repeats 1"
else
    compare="--device gpu --image_size 224 --batch 64 --steps 10 --warmup 3 --repeats 3"
    scaling="--image_size 224 --batch 64 --steps 10 --repeats 3"
fi
timeout 120 python3 benchmarks/torch_compare.py --models resnet18_dual,resnet50_dual \
    --dtype bfloat16 $compile $compare --json "$out/compare_resnet_bf16.json" 2>&1 \
    | grep -v "^WARNING" | tee "$out/compare_resnet_bf16.md"
timeout 120 python3 benchmarks/torch_compare.py --models vit_small16,vit_base16 \
    --dtype bfloat16 $compile $compare --json "$out/compare_vit_bf16.json" 2>&1 \
    | grep -v "^WARNING" | tee "$out/compare_vit_bf16.md"
devices=$(python3 -c "import jax; print(','.join(str(i + 1) for i in range(jax.device_count())))" 2>/dev/null || echo 1)
timeout 60 python3 benchmarks/scaling.py --devices "$devices" $scaling \
    --json "$out/scaling.json" 2>&1 | tee "$out/scaling.md"
