"""The vLLM plugin's tests run in vLLM's own environment (scripts/install_vllm.sh), which pins its
own torch and transformers: `.venv-vllm/bin/python -m pytest tests/vllm`. Elsewhere they skip."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: seconds, not tens
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

import tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return tiny_llava.build(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def images():
    """Two images with flat regions (similar keys, so SAINT has something to drop), different sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for size in ((112, 112), (150, 200)):
        blocks = rng.integers(0, 255, (4, 4, 3))
        base = np.kron(blocks, np.ones((size[0] // 4 + 1, size[1] // 4 + 1, 1)))[:size[0], :size[1]]
        out.append(Image.fromarray((base + rng.integers(0, 10, (*size, 3))).clip(0, 255).astype("uint8")))
    return out
