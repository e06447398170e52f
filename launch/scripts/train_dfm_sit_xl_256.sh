#!/usr/bin/env bash
# DFM-SiT-XL/2, ImageNet 256x256: 400k steps at global batch 256 in bf16 (configs/dfm_sit_xl_256.yaml).
#
#   DATA=/data/imagenet256-latents launch/scripts/train_dfm_sit_xl_256.sh                      # this node, all GPUs
#   DATA=... HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 launch/scripts/train_dfm_sit_xl_256.sh   # many nodes
#   DATA=... launch/scripts/train_dfm_sit_xl_256.sh --resume                                     # continue the run
#
# The latent store: dfm prepare convert ... --resolution 256x256 --transform center-crop-dhariwal, then
# dfm prepare encode --source ... --dest DATA (see launch/prepare.py).
# Everything else (launcher, nodes, ports, NCCL settings) is described in launch/scripts/train.sh.
set -euo pipefail
: "${DATA:?set DATA to the prepared latent store (dfm prepare encode --dest DATA)}"
exec "$(dirname "$0")/train.sh" configs/dfm_sit_xl_256.yaml "$@"
