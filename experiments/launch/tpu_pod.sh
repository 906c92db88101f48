#!/bin/bash
# Training on a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips): the same command on every
# host at once, through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b
#   experiments/launch/tpu_pod.sh setup                      # copy this checkout to every host, install
#                                                            # it with its TPU extra: pip install -e '.[tpu]'
#   experiments/launch/tpu_pod.sh prepare imagenet2012 ...   # `flax-resnet prepare` on every host
#   experiments/launch/tpu_pod.sh train --config.num_epochs=90
#   experiments/launch/tpu_pod.sh stop                       # SIGTERM: every host saves, exits with 3
#
# What was tested: multi-process training with 2 processes on one machine over 127.0.0.1 on CPU
# (tests/test_multihost.py). What was NOT tested: this script, TPUs, gcloud, JAX's TPU cluster
# detection (FLAX_RESNET_DISTRIBUTED=on makes `flax-resnet train` call jax.distributed.initialize()
# without arguments, and JAX reads the slice's hosts from the TPU metadata server).
#
# Requirements: WORKDIR must be a directory every host sees (a Filestore/NFS mount, or a bucket
# mounted with gcsfuse): all hosts write the checkpoints together. gs:// URLs are not supported
# as workdirs. DATA_DIR must hold the prepared dataset on every host (shared, or one copy each).
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM name}"
ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
CONFIG="${CONFIG:-imagenet_resnet50}"
WORKDIR="${WORKDIR:-/mnt/shared/runs/$CONFIG}"
DATA_DIR="${DATA_DIR:-/mnt/shared/tensorflow_datasets}"
REMOTE_DIR="${REMOTE_DIR:-flax_resnet}"  # relative to the home directory on each host

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

quoted_args() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

cmd="${1:-}"
shift || true
case "$cmd" in
  setup)
    repo="$(cd "$(dirname "$0")/../.." && pwd)"
    gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse "$repo" "$TPU_NAME:~/$REMOTE_DIR"
    on_all_hosts "cd ~/$REMOTE_DIR && python3 -m pip install -e '.[tpu]'"
    ;;
  prepare)
    on_all_hosts "cd ~/$REMOTE_DIR && python3 -m flax_resnet.cli prepare$(quoted_args "$@") --data_dir $(printf '%q' "$DATA_DIR")"
    ;;
  train)
    on_all_hosts "cd ~/$REMOTE_DIR && FLAX_RESNET_DISTRIBUTED=on python3 -m flax_resnet.cli train \
      --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR") \
      --config.data_dir=$(printf '%q' "$DATA_DIR")$(quoted_args "$@") 2>&1 | tee -a ~/flax_resnet_train.log"
    ;;
  stop)
    on_all_hosts "pkill -TERM -f 'flax_resnet.cli train' || true"
    ;;
  *)
    echo "usage: $0 setup | prepare DATASET [ARGS...] | train [--config.FIELD=VALUE ...] | stop" >&2
    exit 2
    ;;
esac
