#!/usr/bin/env bash
# Launch `dfm train` on one node or many, with DeepSpeed's launcher (default) or torchrun.
#
#   launch/scripts/train.sh CONFIG [dfm train arguments ...]
#
# One node, all its GPUs:
#   DATA=/data/imagenet256-latents launch/scripts/train.sh configs/dfm_sit_xl_256.yaml
# Many nodes with the deepspeed launcher (run once, on the first node; it starts the others over ssh):
#   DATA=... HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 launch/scripts/train.sh CONFIG
# Many nodes with torchrun (run on every node, NODE_RANK = 0 .. NNODES-1):
#   DATA=... LAUNCHER=torchrun NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/scripts/train.sh CONFIG
# output_dir (runs/ by default) must be on a file system every node sees: each rank writes its shards into
# the checkpoint, which rank 0 then renames into place.
# Resume after a failure or a change of node count: add --resume (a different world size is fine; the
# ZeRO shards are converted to DeepSpeed's universal checkpoint on the fly). Other arguments go to
# `dfm train` as given: key=value overrides (train.zero_stage=2), --exp-name NAME, --ckpt DIR.
#
# Environment:
#   DATA          latent store written by `dfm prepare encode` (passed as --data-dir; needed by the ImageNet configs)
#   NUM_GPUS      processes per node (default: every visible GPU, or 1 without one)
#   LAUNCHER      deepspeed (default) | torchrun
#   HOSTFILE      deepspeed launcher, many nodes: "hostname slots=GPUS" per line (launch/hostfile.example).
#                 Needs passwordless ssh between the nodes and this checkout and environment at the same
#                 path on each; variables listed in a .deepspeed_env file (NAME=value per line) in the
#                 working directory or $HOME are exported on every node.
#   NNODES, NODE_RANK   torchrun, many nodes: node count and this node's index
#   MASTER_ADDR   address of the node that hosts rank 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT   a free TCP port on it (default 29500)
# Useful on clusters (exported here when set, and listed in .deepspeed_env for the deepspeed launcher):
#   NCCL_SOCKET_IFNAME (e.g. eth0, the interface between nodes), NCCL_IB_HCA / NCCL_IB_DISABLE (InfiniBand),
#   NCCL_DEBUG=INFO (first run on a new cluster), OMP_NUM_THREADS (per process; default 8 here).
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,30p' "$0"
  exit 2
fi
CONFIG=$1
shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1

ARGS=(--config "$CONFIG")
if [ -n "${DATA:-}" ]; then
  ARGS+=(--data-dir "$DATA")
fi

case "$LAUNCHER" in
  deepspeed)
    if [ -n "${HOSTFILE:-}" ]; then
      exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        launch/train.py "${ARGS[@]}" "$@"
    fi
    exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" launch/train.py "${ARGS[@]}" "$@"
    ;;
  torchrun)
    exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NUM_GPUS" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/train.py "${ARGS[@]}" "$@"
    ;;
  *)
    echo "LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac
