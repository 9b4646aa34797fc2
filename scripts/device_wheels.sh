#!/usr/bin/env bash
# The wheels the GPU device image lacks (issue 20), downloaded here into .device/wheels for
# the image's Python 3.12 on x86-64 Linux; .device/ is git-ignored and travels with `carry`.
# scripts/gpu_check.sh installs from it, there, only what the image does not have.
#   bash scripts/device_wheels.sh            # about 40 MB
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/wheels
download() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest .device/wheels "$@"
}
# mlip's own dependencies that the image has been seen without, and those it may lack.
download ase e3nn-jax==0.21.0 vesin pydantic pydantic-core annotated-types typing-inspection \
  typing-extensions pyyaml tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing \
  python-dateutil six packaging
# mace-torch (the image has torch) and what it imports.
download mace-torch==0.3.16 e3nn==0.4.4 opt-einsum-fx torch-ema torchmetrics lightning-utilities \
  prettytable wcwidth matscipy configargparse GitPython gitdb smmap lmdb orjson h5py
# python-hostlist has no wheel: its one module travels as a file.
python3 -m pip download --quiet --no-deps --dest .device/src python-hostlist
tar -xzf .device/src/python_hostlist-*.tar.gz -C .device/src
cp .device/src/python_hostlist-*/hostlist.py .device/wheels/
du -sh .device/wheels
