#!/usr/bin/env bash
# ResNet-50 on one GPU: our bfloat16 train/eval step beside PyTorch (torch.compile, channels_last,
# AMP bfloat16) on the same card, in the same process, repeats interleaved; JSON + a summary.
#
#   experiments/gpu_benchmark.sh                  # batch 256, results in runs/gpu_benchmark/
#   BATCH=128 OUT=/tmp/gpu experiments/gpu_benchmark.sh
#
# Needs a CUDA build of jax/jaxlib 0.10.2 (pip install "jax[cuda12]==0.10.2") and of torch 2.13
# in the environment ($PYTHON, default .venv/bin/python). Not run in the session that wrote it
# (no GPU was lent to that task): no GPU numbers exist until someone runs this.
#
# What it records (docs/performance.md): images/s (median of repeats after warm-up),
# compile time, device peak memory, achieved train FLOP/s and its fraction of the card's dense
# bf16 peak (known cards are looked up by name; override with PEAK_TFLOPS=...), and the
# ours/PyTorch ratio. Then the training loop against the bare step (the device must not stall:
# loop/bare >= 0.95) and a second process that should hit the persistent compilation cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/gpu_benchmark}
BATCH=${BATCH:-256}
mkdir -p "$OUT"
# Both frameworks share the card: JAX must not grab 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
PEAK=()
if [ -n "${PEAK_TFLOPS:-}" ]; then PEAK=(--peak-tflops "$PEAK_TFLOPS"); fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

# 1. ResNet-50, bfloat16: ours vs torch.compile + channels_last + AMP, interleaved.
"$PY" -m flax_resnet.cli benchmark --model resnet50 --batch "$BATCH" --dtype bfloat16 \
  --steps 20 --repeats 7 --warmup 5 --compare-torch --torch-compile "${PEAK[@]}" \
  --output "$OUT/resnet50_bf16_b${BATCH}.json" > /dev/null 2> "$OUT/resnet50_bf16_b${BATCH}.log"
tail -n 12 "$OUT/resnet50_bf16_b${BATCH}.log"

# 2. The same in float32 (PyTorch eager, no AMP) for reference.
"$PY" -m flax_resnet.cli benchmark --model resnet50 --batch "$BATCH" --dtype float32 \
  --steps 10 --repeats 5 --warmup 3 --compare-torch \
  --output "$OUT/resnet50_fp32_b${BATCH}.json" > /dev/null 2> "$OUT/resnet50_fp32_b${BATCH}.log"
tail -n 12 "$OUT/resnet50_fp32_b${BATCH}.log"

# 3. The loop must not stall the device: real data pipeline + logging vs the bare step.
"$PY" -m flax_resnet.cli benchmark --loop --model resnet20 --batch 512 --steps 20 --repeats 10 --loop-train-images 51200 \
  --output "$OUT/loop_resnet20.json" > /dev/null 2> "$OUT/loop_resnet20.log"
tail -n 2 "$OUT/loop_resnet20.log"

# 4. Persistent compilation cache: a second process compiles the same ResNet-50 step from disk.
"$PY" -m flax_resnet.cli benchmark --model resnet50 --batch "$BATCH" --dtype bfloat16 --steps 2 \
  --repeats 1 --no-eval --output "$OUT/resnet50_bf16_cached.json" > /dev/null 2> "$OUT/resnet50_bf16_cached.log"
"$PY" - "$OUT" "$BATCH" <<'EOF'
import json, sys
out, batch = sys.argv[1], sys.argv[2]
first = json.load(open(f"{out}/resnet50_bf16_b{batch}.json"))
again = json.load(open(f"{out}/resnet50_bf16_cached.json"))
print(f"compile: {first['compile_s']:.1f} s cold, {again['compile_s']:.1f} s from the cache "
      f"({again['environment']['compilation_cache_dir']})")
f = first["flops"]
print(f"ResNet-50 bf16 batch {batch} on {first['device']}: ours {first['train']['images_per_sec']:.0f} img/s train, "
      f"PyTorch (torch.compile, channels_last, AMP) {first['torch']['train']['images_per_sec']:.0f} img/s, "
      f"ratio {first['ratio']['train']:.2f}x; {f['train_flops_per_sec'] / 1e12:.1f} TFLOP/s"
      + (f" = {100 * f['train_fraction_of_peak']:.1f}% of the {f['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak"
         if f.get("train_fraction_of_peak") else " (peak unknown: set PEAK_TFLOPS)"))
EOF
