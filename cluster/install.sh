#!/usr/bin/env bash
# Installs bootfinetune from this checkout, with the extras the tests use: what CI runs (.ci/run) and what
# the cluster image holds (cluster/Dockerfile), so a cluster runs what was tested. Run it in the Python
# environment to install into.
#
#   bash cluster/install.sh                                                   # torch from PyPI
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash cluster/install.sh  # torch's CPU build
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
# torch first, pinned: the CPU image takes the CPU build from TORCH_INDEX; a plain `torch` would pull CUDA.
python -m pip install --quiet torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
python -m pip install --quiet -e ".[test]"
