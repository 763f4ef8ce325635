#!/usr/bin/env bash
# GPU figures (issue 14): s/it and peak GPU memory (torch.cuda.max_memory_allocated) beside lorakit's memory
# prediction, on full-size SD1.5 and SDXL with random weights, for
#   1. SD1.5 512 px, LoRA dim 16, fp16 mixed precision
#   2. SDXL 1024 px, LoRA dim 16, bf16, gradient checkpointing, cached text-encoder outputs, --fp8_base
#      (seed 000's 8 GB recipe)
#   3. the same without --fp8_base
# Each run is `lorakit train` in its own process (benchmarks/bench_memory.py), 10 steps, s/it = median of steps 2-10.
#
# On a CUDA machine that has torch but not the rest (the device tool's machines): in the repository root here
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# and carry `.whl`; this script installs what it finds there into /tmp/site. Budget: under 8 minutes on an H100/H200
# (most of it writing the two random checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 - <<'EOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
EOF
WORK=${WORK:-/tmp/lorakit-gpu}
OUTDIR=${OUT:-$WORK}
mkdir -p "$WORK" "$OUTDIR"
bench() { python3 benchmarks/bench_memory.py --workdir "$WORK" --algos lora --steps 10 --dim 16 "$@"; }
{
  echo "== 1. SD1.5 512 px LoRA dim 16 fp16"
  bench --family sd1 --resolution 512 --precision fp16 --gc 0
  echo "== 2. SDXL 1024 px LoRA dim 16 bf16 + gradient checkpointing + cached TE outputs + fp8 base"
  bench --family sdxl --resolution 1024 --precision bf16 --gc 1 -- --cache_text_encoder_outputs --cache_latents --fp8_base
  echo "== 3. the same without fp8"
  bench --family sdxl --resolution 1024 --precision bf16 --gc 1 -- --cache_text_encoder_outputs --cache_latents
} 2>&1 | tee "$OUTDIR/gpu_check.log"
