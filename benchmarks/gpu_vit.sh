#!/usr/bin/env bash
# ViT-B/16 on a GPU machine: what makes her2jax's training step faster, then the best variant
# against PyTorch eager and torch.compile. Writes to $OUT (or benchmarks/gpu_out): gpu_vit.log,
# vit_variants.json (benchmarks/jax_variants.py) and compare_vit_base16_best_bf16.json. About
# 5 minutes; every step has its own time limit.
#   1. the cuDNN attention parity test on the GPU (tests/test_vit.py, not JAX on the CPU);
#   2. her2jax alone under each variant (attention kernel, token padding, XLA GEMM flags);
#   3. the fastest variant in benchmarks/torch_compare.py with --compile.
set -uo pipefail
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
log="$out/gpu_vit.log"
: > "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# SHAPE, COMPILE, MODEL and FIRST_VARIANTS only to check the script on a CPU
# (SHAPE="--dry_run --device cpu ...")
model=${MODEL:-vit_base16}
shape=${SHAPE:-"--device gpu --dtype bfloat16 --image_size 224 --batch 64 --steps 10 --warmup 3 --repeats 3"}
compile=${COMPILE---compile}
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_vit.py -k "on_the_gpu" -rs 2>&1 \
    | tail -n 5 | tee -a "$log"
notriton="--xla_gpu_enable_triton_gemm=false"
variants=(
    "xla=--vit_attention xla"
    "cudnn=--vit_attention cudnn"
    "cudnn, no Triton GEMM=--vit_attention cudnn|$notriton"
    "xla, no Triton GEMM=--vit_attention xla|$notriton"
    "cudnn, tokens to 208=--vit_attention cudnn --cudnn_token_multiple 16"
    "cudnn, cuBLASLt=--vit_attention cudnn|--xla_gpu_enable_cublaslt=true"
)
arguments=()
for variant in "${variants[@]:0:${FIRST_VARIANTS:-${#variants[@]}}}"; do   # tests: the first 2
    arguments+=(--variant "$variant")
done
# shellcheck disable=SC2086 (the shape splits on spaces)
python3 benchmarks/jax_variants.py --model "$model" --timeout 60 \
    --json "$out/vit_variants.json" "${arguments[@]}" -- $shape 2>&1 | tee -a "$log"
# the fastest variant: its XLA flags on the first line, its arguments on the second
{ read -r flags; read -r best_arguments; } < <(python3 - "$out/vit_variants.json" <<'PY'
import json, sys
done = [v for v in json.load(open(sys.argv[1]))["variants"] if "result" in v]
best = max(done, key=lambda v: v["result"]["images_per_s"]) if done else None
print(best["xla_flags"] if best else "")
print(" ".join(best["arguments"]) if best else "")
PY
)
echo "fastest: XLA_FLAGS='$flags' $best_arguments" | tee -a "$log"
# shellcheck disable=SC2086
XLA_FLAGS="$flags" timeout 120 python3 benchmarks/torch_compare.py --models "$model" $shape \
    $compile $best_arguments --json "$out/compare_${model}_best_bf16.json" 2>&1 \
    | grep -v "^WARNING" | tee -a "$log"
