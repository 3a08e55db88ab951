#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU image lacks for benchmarks/likelihood_gpu.py (diffusers and
# its one missing dependency) and benchmarks/overhead.py (k-diffusion, whose sampling.py it loads without the package's
# dependencies) into .whl/ (git-ignored), for the GPU machine (x86-64, CPython 3.12), where
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
# installs them. torch, torchdiffeq, scipy, numpy, huggingface_hub, safetensors, regex, requests, filelock, Pillow and
# zipp are on that image already; scoresolve itself runs from the checkout (PYTHONPATH=.).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "diffusers==0.42.1" "importlib_metadata" "torchsde==0.2.6" "trampoline" "lazy-importer" \
    "k-diffusion==0.1.1.post1"
ls -la .whl
