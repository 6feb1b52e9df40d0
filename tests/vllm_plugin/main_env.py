"""Fixtures shared by the vLLM plugin's tests (each test module imports them): the transformers
reference (`se.apply`, greedy, reference.py) and features exports (export_features.py), run in
the main environment, because the Qwen, LLaVA-NeXT and LLaVA-OneVision adapters need a newer
transformers than vLLM pins. (Not a conftest.py: a second module named conftest would shadow
tests/conftest.py for the main suite's `from conftest import …`.)"""
import json
import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
MAIN_PYTHON = Path(os.environ.get("SAINT_MAIN_PYTHON", HERE.parents[1] / ".venv" / "bin" / "python"))
MODULES = {"llava_next": "tiny_anyres_checkpoints", "llava_onevision": "tiny_anyres_checkpoints",
           "qwen2_5_vl": "tiny_qwen", "qwen3_vl": "tiny_qwen"}  # whose images and prompt the reference runs


@pytest.fixture(scope="session")
def references():
    """(checkpoint, schedule, τ) → [(prompt length the language model gets, greedy tokens), …] per
    image of the checkpoint's module, from se.apply in transformers; each run once per session."""
    if not MAIN_PYTHON.exists():
        pytest.skip(f"needs the main environment (the README's install) at {MAIN_PYTHON} for the transformers "
                    "reference, or SAINT_MAIN_PYTHON")
    from greedy import NEW_TOKENS

    cache = {}

    def run(checkpoint, schedule, tau):
        key = (str(checkpoint), schedule, tau)
        if key not in cache:
            module = MODULES[json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]]
            out = subprocess.run([str(MAIN_PYTHON), str(HERE / "reference.py"), module, str(checkpoint), schedule,
                                  str(tau), str(NEW_TOKENS)], capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
            cache[key] = [tuple(row) for row in json.loads(out.stdout.strip().splitlines()[-1])]
        return cache[key]
    return run


@pytest.fixture(scope="session")
def exported_features(tmp_path_factory):
    """(checkpoint, schedule, τ, image size) → a features folder exported from the checkpoint
    (ONNX, parity gate passed) by export_features.py in the main environment; each once."""
    if not MAIN_PYTHON.exists():
        pytest.skip(f"needs the main environment (the README's install) at {MAIN_PYTHON} for the export")
    cache = {}

    def export(checkpoint, schedule, tau, img_size):
        key = (str(checkpoint), schedule, tau, img_size)
        if key not in cache:
            folder = tmp_path_factory.mktemp("features") / "folder"
            out = subprocess.run([str(MAIN_PYTHON), str(HERE / "export_features.py"), str(checkpoint), str(folder),
                                  schedule, str(tau), str(img_size)], capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
            cache[key] = folder
        return cache[key]
    return export
