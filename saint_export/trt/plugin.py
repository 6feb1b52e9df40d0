"""Build and locate the saint::SimilarityTopK TensorRT plugin library (plugins/similarity_topk).

    python -m saint_export.trt.plugin build      # prints the library path

TensorRT headers come from a TensorRT install (TensorRT_INCLUDE_DIR, TENSORRT_ROOT) or else from
the kernel-lens wheel (Apache-2.0 TensorRT 10.14 headers), fetched from PyPI without its
dependencies at build time and never committed. Builds are cached by the hash of the sources and
headers, so a changed source rebuilds and an unchanged one is instant.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import BackendError, InputError, SaintError

# plugins/similarity_topk in the repository, installed as package data of saint_export.plugins.
SOURCE_DIR = Path(str(importlib.resources.files("saint_export.plugins") / "similarity_topk"))
SOURCE_SUFFIXES = (".cu", ".cpp", ".h", ".txt", ".map")  # what the build reads (CMakeLists.txt included)
LIBRARY = "libsaint_similarity_topk.so"
STATIC_LIBRARY = "libsaint_similarity_topk_static.so"
PROBE = "plugin_probe"
KERNEL_LENS = "kernel-lens==2.0.1"


def cache_dir() -> Path:
    return Path(os.environ.get("SAINT_EXPORT_CACHE", Path.home() / ".cache" / "saint-export"))


def tensorrt_headers() -> Path:
    """A folder with NvInferRuntime.h: a TensorRT install, else the kernel-lens wheel."""
    for candidate in (os.environ.get("TensorRT_INCLUDE_DIR"),
                      os.environ.get("TENSORRT_ROOT") and Path(os.environ["TENSORRT_ROOT"]) / "include"):
        if candidate and (Path(candidate) / "NvInferRuntime.h").is_file():
            return Path(candidate)
    try:
        import kernel_lens

        installed = Path(kernel_lens.__file__).parent / "include" / "tensorrt"
        if (installed / "NvInferRuntime.h").is_file():
            return installed
    except ImportError:
        pass
    fetched = cache_dir() / "kernel-lens" / "kernel_lens" / "include" / "tensorrt"
    if not (fetched / "NvInferRuntime.h").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                                     KERNEL_LENS], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if result.returncode or not wheels:
                raise BackendError("TensorRT headers not found: set TensorRT_INCLUDE_DIR (or TENSORRT_ROOT), or allow "
                                 f"pip to fetch {KERNEL_LENS} ({result.stderr.strip().splitlines()[-1:] or ''})")
            with zipfile.ZipFile(wheels[0]) as wheel:
                members = [m for m in wheel.namelist() if m.startswith("kernel_lens/include/tensorrt/")]
                wheel.extractall(cache_dir() / "kernel-lens", members)
    return fetched


def build(headers: Path | None = None, verbose: bool = False) -> Path:
    """Build (or reuse) the plugin libraries; returns the path of the dynamic-loading library."""
    if not SOURCE_DIR.is_dir():
        raise InputError(f"plugin sources not found at {SOURCE_DIR}: reinstall saint-export, or give a built "
                         "plugin library")
    for tool in ("cmake", "nvcc"):
        if shutil.which(tool) is None:
            raise BackendError(f"building the TensorRT plugin needs {tool} on PATH (CUDA toolkit and CMake)")
    headers = headers or tensorrt_headers()
    digest = hashlib.sha256()
    sources = [p for p in sorted(SOURCE_DIR.iterdir()) if p.suffix in SOURCE_SUFFIXES]
    for path in sources + sorted(headers.glob("NvInfer*.h")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    out = cache_dir() / "plugins" / f"similarity_topk-{digest.hexdigest()[:16]}"
    if (out / LIBRARY).is_file() and (out / PROBE).is_file():
        return out / LIBRARY
    build_dir = out.with_name(out.name + ".build")
    steps = [["cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              f"-DTensorRT_INCLUDE_DIR={headers}"],
             ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]]
    for step in steps:
        result = subprocess.run(step, capture_output=not verbose, text=True)
        if result.returncode:
            raise BackendError(f"plugin build failed in {' '.join(step[:2])}: "
                             f"{(result.stderr or result.stdout or '').strip().splitlines()[-1:]}")
    staging = Path(tempfile.mkdtemp(prefix=out.name, dir=out.parent))
    for name in (LIBRARY, STATIC_LIBRARY, PROBE):
        shutil.copy2(build_dir / name, staging / name)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)  # the cache entry appears complete or not at all
    shutil.rmtree(build_dir, ignore_errors=True)
    return out / LIBRARY


def torch_kernel():
    """The plugin's CUDA kernel as a torch extension (needs a GPU build of torch and nvcc):
    `torch_kernel().similarity_topk(keys, num_protected, drop, tau, vote_k, gamma)`."""
    from torch.utils.cpp_extension import load

    return load(name="saint_similarity_topk_kernel", sources=[str(SOURCE_DIR / "torchBinding.cpp"),
                                                              str(SOURCE_DIR / "similarityTopKKernel.cu")],
                extra_include_paths=[str(SOURCE_DIR)], extra_cuda_cflags=["-std=c++17"], verbose=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m saint_export.trt.plugin build", file=sys.stderr)
        return 2
    try:
        print(build())
    except SaintError as err:
        print(f"saint-export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
