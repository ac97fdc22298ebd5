#!/usr/bin/env bash
# Device checks for a GPU machine that has jax (CUDA), flax, torch, timm and safetensors but no
# TensorFlow. Runs from the repository root; writes to $OUT (or benchmarks/gpu_out) one log,
# gpu.log (versions, test summary, tables), and the JSON of each measurement: seven files at most,
# since a lent machine returns no more than eight. Every step has its own time limit and writes
# what it measured as it goes, so one slow or failing step costs only itself.
#   1. with TESTS=1: the model and weight-conversion tests on this machine's jax/flax versions
#      (JAX on its CPU platform, so float32 parity is not affected by TF32 matrix units;
#      TEST_FILES=... picks others; pytest-xdist and transformers are used when installed);
#   2. with TABLES=1: the table of registered models on the GPU, float32 and bfloat16 compute
#      (recorded for an H100 in RESULTS.md already);
#   3. her2jax against PyTorch (eager, AMP bfloat16, channels-last; and torch.compile) training
#      throughput, MFU, compile time and peak memory at 224x224, one process per model, the
#      issue's two target models (ResNet-50 with dual attention, ViT-B/16) first, her2jax's ViTs
#      with their default attention_kernel='auto' (cuDNN's fused attention on the GPU):
#      compare_<model>_bf16.json, and all of them in one table (benchmarks/report_compare.py);
#   4. her2jax's ViT-B/16 with attention written out (attention_kernel='xla') against PyTorch
#      eager: attention_xla_vit_base16_bf16.json;
#   5. the scaling benchmark on the devices present: scaling.json.
# Worst case (every limit reached) about 8.5 minutes; TESTS=1 and TABLES=1 add up to 4 and 3.
# DRY=1 runs steps 3-5 in their tiny CPU mode (a check of the script on a machine without GPU).
set -uo pipefail
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
log="$out/gpu.log"
: > "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee -a "$log"
import jax, flax, torch, timm
print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__,
      "timm", timm.__version__, "devices", jax.devices())
PY
if [ "${TESTS:-0}" = 1 ]; then   # minutes of device time: only when asked
    tests=${TEST_FILES:-tests/test_attention.py tests/test_resnet.py tests/test_vit.py \
tests/test_weights.py tests/test_model_table.py}
    extra=()   # the device machine may lack pytest-xdist and transformers: say so, go on
    workers=$(nproc 2>/dev/null || echo 1); [ "$workers" -gt 8 ] && workers=8
    if python3 -c "import xdist" 2>/dev/null && [ "$workers" -gt 1 ]; then
        extra+=(-n "$workers")
    fi
    if ! python3 -c "import transformers" 2>/dev/null; then
        echo "tests: transformers not installed, its ViT conversion test is left out" \
            | tee -a "$log"
        extra+=(--deselect
                tests/test_weights.py::test_transformers_vit_converts_to_the_same_function)
    fi
    echo "tests: $tests" | tee -a "$log"
    # shellcheck disable=SC2086 (the file list splits on spaces)
    JAX_PLATFORMS=cpu timeout 240 python3 -m pytest -q -p no:cacheprovider \
        ${extra[@]+"${extra[@]}"} $tests 2>&1 | tail -n 25 | tee -a "$log"
fi
if [ "${TABLES:-0}" = 1 ] && [ "${DRY:-0}" != 1 ]; then
    for dtype in float32 bfloat16; do
        timeout 90 python3 -m her2jax.models --batch 64 --repeats 10 --dtype "$dtype" 2>&1 \
            | grep -v "^WARNING" | tee -a "$log"
    done
fi
if [ "${DRY:-0}" = 1 ]; then
    # torch.compile on this CPU needs minutes; the GPU run times it. The limits only stop a step
    # that hangs: a busy CPU runs these tiny steps in a minute or two
    shape="--dry_run --device cpu" compile=""
    models="resnet18_dual:240 vit_small16:240" written="vit_small16:240"
    scaling="--image_size 32 --batch 4 --steps 1 --repeats 1" scaling_limit=240
else
    shape="--device gpu --image_size 224 --batch 64 --steps 10 --warmup 3 --repeats 3"
    compile="--compile"
    models="resnet50_dual:110 vit_base16:110 resnet18_dual:70 vit_small16:70"
    written="vit_base16:80"
    scaling="--image_size 224 --batch 64 --steps 10 --repeats 3" scaling_limit=60
fi
for entry in $models; do
    model=${entry%%:*} limit=${entry##*:}
    timeout "$limit" python3 benchmarks/torch_compare.py --models "$model" --dtype bfloat16 \
        $shape $compile --json "$out/compare_${model}_bf16.json" 2>&1 \
        | grep -v "^WARNING" | tee -a "$log"
done
# every model in one table (also when some were cut off or failed)
python3 benchmarks/report_compare.py "$out"/compare_*_bf16.json 2>&1 | tee -a "$log"
# the ViT with attention written out (attention_kernel='xla') against PyTorch eager
model=${written%%:*} limit=${written##*:}
timeout "$limit" python3 benchmarks/torch_compare.py --models "$model" --dtype bfloat16 $shape \
    --vit_attention xla --json "$out/attention_xla_${model}_bf16.json" 2>&1 \
    | grep -v "^WARNING" | tee -a "$log"
devices=$(python3 -c "import jax; print(','.join(str(i + 1) for i in range(jax.device_count())))" 2>/dev/null || echo 1)
timeout "$scaling_limit" python3 benchmarks/scaling.py --devices "$devices" $scaling \
    --json "$out/scaling.json" 2>&1 | tee -a "$log"
