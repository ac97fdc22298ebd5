#!/usr/bin/env bash
# Device checks for a GPU machine that has jax (CUDA), flax, torch, timm and safetensors but no
# TensorFlow. Runs from the repository root; writes its logs to $OUT (or benchmarks/gpu_out).
#   1. the model and weight-conversion tests on this machine's jax/flax versions (JAX on its CPU
#      platform, so float32 parity is not affected by TF32 matrix units);
#   2. the table of registered models on the GPU, float32 and bfloat16 compute.
set -uo pipefail
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import jax, flax, torch, timm
print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__,
      "timm", timm.__version__, "devices", jax.devices())
PY
JAX_PLATFORMS=cpu timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 \
    tests/test_attention.py tests/test_resnet.py tests/test_vit.py tests/test_weights.py \
    tests/test_model_table.py 2>&1 | tail -n 25 | tee "$out/tests.txt"
for dtype in float32 bfloat16; do
    timeout 200 python3 -m her2jax.models --batch 64 --repeats 10 --dtype "$dtype" 2>&1 \
        | grep -v "^WARNING" | tee "$out/models_$dtype.md"
done
