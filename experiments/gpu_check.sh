#!/usr/bin/env bash
# The prepared GPU check (stages in experiments/gpu_check.py): environment, GPU-relevant tests,
# ResNet-50 bf16 beside torch.compile + AMP, a CIFAR ResNet-20 training-loop run, the JPEG
# pipeline. About 6 minutes on one H100/H200 from a bare start; each stage is time-boxed and
# writes $OUT/<stage>.json as it ends, then $OUT/summary.json and $OUT/gpu_check.log.
#
# 1. Here (a machine with pip and the network), once: the wheels the device image lacks
#    (experiments/gpu_wheels.txt, Python 3.12 x86_64) into experiments/gpu_wheels/ (git-ignored):
#        experiments/gpu_check.sh --fetch-wheels
# 2. On the device machine, the device tool's run, with the repository copied there:
#        run(command="bash experiments/gpu_check.sh", carry=["experiments/gpu_wheels"], timeout_s=480)
#    It uses the image's python3 (CUDA JAX, flax, optax, orbax, chex, torch), installs the
#    carried wheels with --no-deps into /tmp/gpu_check_site and puts that and the repository on
#    PYTHONPATH: the image's site-packages stay as they are (the fallbacks, newer protobuf and
#    etils, shadow the image's only if needed, in this check's processes). Results: $OUT/*.json.
# 3. On CPU, no wheels, tiny sizes (2-3 minutes):
#        experiments/gpu_check.sh --dry-run --out /tmp/gpu_check
#
# Other options go to gpu_check.py: --stages tests,resnet50  --budget 350  --peak-tflops 989.
# A fresh machine takes a minute or two to start and the check about 6 minutes: within 15 minutes
# of device time that leaves one rerun of a stage, e.g. command="bash experiments/gpu_check.sh
# --stages resnet50" (same carry); the machine keeps nothing between calls once given back.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=experiments/gpu_wheels
SITE=/tmp/gpu_check_site
PLATFORMS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

if [ "${1:-}" = --fetch-wheels ]; then
  PY=${PYTHON:-python3}
  [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
  rm -rf "$WHEELS" && mkdir -p "$WHEELS/fallback"
  lines() { grep -v '^\s*#' experiments/gpu_wheels.txt | grep "$@" | sed 's/#.*//; s/\s//g'; }
  set -e
  # Binary wheels for Python 3.12; promise has no wheel (sdist only): built here, pure Python.
  "$PY" -m pip download -q --no-deps "${PLATFORMS[@]}" -d "$WHEELS" $(lines -v -e 'sdist only' -e fallback)
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" $(lines 'sdist only')
  "$PY" -m pip download -q --no-deps "${PLATFORMS[@]}" -d "$WHEELS/fallback" $(lines fallback)
  # The device's install, tried here for Python 3.12 (one version of each, every wheel installable).
  tmp=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile "${PLATFORMS[@]}" --target "$tmp" "$WHEELS"/*.whl \
    "$WHEELS"/fallback/*.whl
  rm -rf "$tmp"
  ls -l "$WHEELS" "$WHEELS/fallback"
  du -sb "$WHEELS" | awk '{printf "wheels: %.1f MiB (the device tool carries 64 MiB with the repository)\n", $1 / 2^20}'
  exit 0
fi

if [ "${1:-}" = --dry-run ]; then
  PY=${PYTHON:-.venv/bin/python}
else
  PY=${PYTHON:-python3}
  if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    echo "no wheels in $WHEELS: run 'experiments/gpu_check.sh --fetch-wheels' first and carry $WHEELS" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # The carried packages beside the image's own; if they fail (tensorflow-metadata's protos need
  # protobuf >= 6.31.1, tfds etils >= 1.9.1), add the carried fallbacks (newer protobuf, etils).
  probe="import tensorflow_metadata.proto.v0.schema_pb2, tensorflow_datasets, grain.python, ml_collections, tensorboardX"
  if ! err=$("$PY" -c "$probe" 2>&1); then
    echo "carried wheels fail beside the image's packages ($(echo "$err" | tail -n 1)): adding $WHEELS/fallback"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/fallback/*.whl || exit 2
  fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" experiments/gpu_check.py "$@"
