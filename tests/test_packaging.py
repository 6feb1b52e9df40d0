"""Packaging: a built wheel carries the plugin sources (so installs that are not editable can build it) and
the shipped checkpoint configs."""
import subprocess
import sys
import zipfile
from pathlib import Path

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
