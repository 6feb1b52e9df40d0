"""The TensorRT plugin's CUDA kernel, run on the CPU (docs/operator.md, "The kernel, proven without a GPU").

`build(variant)` compiles plugins/similarity_topk/similarityTopKKernel.cu as it is, against
include/ (CUDA's execution model and headers on the host), with two mechanical rewrites the host
compiler needs and nothing else: the `kernel<<<grid, block, shared, stream>>>(args)` launch
becomes `cuda_emulation::launch(Config{grid, block, shared, stream}, kernel, args)`, and
`extern __shared__ T name[];` points `name` at the emulated dynamic shared memory. `run(binary,
cases)` runs the kernel through the plugin's own launcher, `launchSimilarityTopK`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNEL = ROOT / "plugins" / "similarity_topk" / "similarityTopKKernel.cu"
BUILD = ROOT / "build" / "kernel_emulation"

VARIANTS = {
    "plain": ["-O2"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}
KEY_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
UNWRITTEN = -7777  # driver.cpp's fill of the outputs before the kernel runs

_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(\s*(\)?)", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+((?:\w+\s+)*?\w+)\s+(\w+)\s*\[\s*\]\s*;")


def rewrite(source: str, path: Path) -> str:
    """The two mechanical rewrites; `#line` keeps compiler and sanitizer reports on the real file."""
    def launch(match):
        kernel, config, no_args = match.groups()
        return f"cuda_emulation::launch(cuda_emulation::Config{{{config}}}, {kernel}" + (")" if no_args else ", ")

    text, launches = _LAUNCH.subn(launch, source)
    if not launches:
        raise ValueError(f"no <<<...>>> launch found in {path}")
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(cuda_emulation::dynamicShared);", text)
    return f'#line 1 "{path}"\n{text}'


def compiler() -> str | None:
    return shutil.which("g++")


@functools.cache
def build(variant: str = "plain", source: Path = KERNEL, main: Path = HERE / "driver.cpp") -> Path:
    """The emulated program of `main` including the rewritten `source`, built once per content."""
    flags = ["-std=c++20", "-pthread", "-Wall", "-Wno-unknown-pragmas", *VARIANTS[variant]]
    rewritten = rewrite(source.read_text(), source)
    digest = hashlib.sha256("\0".join([rewritten, main.read_text(), *flags, *(
        p.read_text() for p in sorted((HERE / "include").iterdir()))]).encode()).hexdigest()[:16]
    folder = BUILD / f"{main.stem}-{variant}-{digest}"
    binary = folder / main.stem
    if binary.exists():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    kernel = folder / f"{source.stem}.emulated.cpp"
    kernel.write_text(rewritten)
    if main.suffix == ".cu":  # a self-contained program (the racy control): the rewritten file is it
        sources, defines = [str(kernel)], []
    else:
        sources, defines = [str(main)], [f'-DSAINT_KERNEL_SOURCE="{kernel}"']
    includes = ["-I", str(HERE / "include"), "-I", str(source.parent), "-I", str(KERNEL.parent)]
    command = [compiler(), *flags, *includes, *defines, *sources,
               "-o", str(binary) + ".part"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    Path(str(binary) + ".part").rename(binary)
    return binary


@dataclasses.dataclass(frozen=True)
class Case:
    keys: torch.Tensor  # [B, N, d] fp32 / fp16 / bf16
    num_protected: int = 1
    drop: int = 0
    tau: float = 0.75
    vote_k: int = 5
    gamma: float = 10.0

    def encode(self) -> bytes:
        batch, tokens, dim = self.keys.shape
        bits = self.keys.contiguous()
        raw = bits.numpy() if bits.dtype == torch.float32 else bits.view(torch.int16).numpy()
        return (struct.pack("<7i2f", KEY_TYPES[self.keys.dtype], batch, tokens, dim, self.num_protected,
                            self.drop, self.vote_k, self.tau, self.gamma) + raw.tobytes())


@dataclasses.dataclass(frozen=True)
class Result:
    status: int  # cudaError_t of the launch: 0 success
    keep_index: torch.Tensor  # [B, N - drop] int64, UNWRITTEN where the kernel wrote nothing
    vote_rows: torch.Tensor  # [B] int64


def run(binary: Path, cases: list[Case], timeout: float = 600) -> list[Result]:
    """Every case through launchSimilarityTopK in one run of `binary`."""
    done = subprocess.run([str(binary)], input=b"".join(c.encode() for c in cases), capture_output=True,
                          timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{binary.name} exited {done.returncode}:\n{done.stderr.decode()[-4000:]}")
    out, offset, results = done.stdout, 0, []
    for case in cases:
        batch, tokens, _ = case.keys.shape
        (status,) = struct.unpack_from("<i", out, offset)
        offset += 4
        width = batch * max(tokens - case.drop, 0)
        keep = np.frombuffer(out, dtype="<i8", count=width, offset=offset).reshape(batch, -1)
        offset += 8 * width
        votes = np.frombuffer(out, dtype="<i8", count=batch, offset=offset)
        offset += 8 * batch
        results.append(Result(status, torch.from_numpy(keep.copy()), torch.from_numpy(votes.copy())))
    if offset != len(out):
        raise RuntimeError(f"{binary.name} wrote {len(out)} bytes, expected {offset}")
    return results
