#!/usr/bin/env bash
# One command from a fresh clone: set up a virtual environment, train DFM-SiT on the embedded digits,
# and write a sample grid with per-stage previews (scored by a classifier trained on the real digits).
# Extra arguments go to `dfm train` as key=value overrides, e.g. `bash quickstart.sh train.max_steps=500`.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0 triton==3.7.1  # pinned first: the project asks only for torch>=2.4
python -m pip install --quiet -e ".[dev]"
dfm train --config configs/dfm_digits.yaml "$@"
dfm sample --ckpt runs/dfm-digits --out runs/dfm-digits/samples/final.png --force --score  # this script's own grid
