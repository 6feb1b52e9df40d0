"""Files and folders that are complete or absent, checksums and versions (docs/artifacts.md). No torch."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from .errors import InputError

MANIFEST = "manifest.json"  # read and written by manifest.py
REPORT = "report.json"


class OutputError(InputError):
    """An output folder that cannot be written."""


class StagedOutput:
    """Collect files in a hidden sibling folder; `commit()` swaps it into place in one rename.

    Leaving the `with` block without a commit (an error, Ctrl-C) deletes the staging folder, so
    an interrupted run never leaves a folder that looks finished.
    """

    def __init__(self, final: Path):
        self.final = Path(final).absolute()
        check_writable(self.final)
        self.created = [p for p in self.final.parents if not p.exists()]  # removed again on failure
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        self.committed = False

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if not self.committed:
            for folder in self.created:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def commit(self) -> Path:
        os.chmod(self.path, 0o755)  # mkdtemp makes it private
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            self.final.rename(old)
        self.path.rename(self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.final


def check_writable(final: Path) -> None:
    """Refuse, before any model work, a folder we could not (or should not) write."""
    final = Path(final).absolute()
    if final.exists() and not final.is_dir():
        raise OutputError(f"output {str(final)!r} exists and is not a folder")
    if final.is_dir() and any(final.iterdir()) and not (final / MANIFEST).is_file():
        raise OutputError(f"output folder {str(final)!r} is not empty and holds no saint-export manifest; "
                          "refusing to replace it (choose another output folder)")
    _check_can_create(final, "output folder")


def check_file_writable(path: Path) -> None:
    path = Path(path).absolute()
    if path.is_dir():
        raise OutputError(f"output {str(path)!r} is a folder, not a file")
    _check_can_create(path, "output file")


def _check_can_create(path: Path, what: str) -> None:
    """The nearest existing ancestor must be a folder we can write in (nothing is created)."""
    existing = next(p for p in path.parents if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {what} {str(path)!r}: {err}") from None


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `path` through a hidden sibling and one rename: readers see the old file or the new one."""
    path = Path(path)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("saint-export", "torch", "timm", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                    "tensorrt", "polygraphy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def checksums(folder: Path, names: list[str]) -> dict:
    return {name: {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in names}
