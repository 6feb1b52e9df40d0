"""Image files → `pixel_values`, torch-free (PIL and numpy), as the model family's eval transform.

The numbers come from the manifest's `preprocess` record (or the adapter at export time), so a
serving process needs neither torch nor timm. For timm models this reproduces timm's eval
transform (resize the shorter side to ⌊size / crop_pct⌋, centre crop, scale to [0, 1],
normalise); tests/test_images.py checks it against timm's own transform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input [3, size, size] (RGB, float32)."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"  # "bilinear" | "bicubic" | "nearest" | "lanczos"

    def as_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(int(data["size"]), tuple(data["mean"]), tuple(data["std"]), float(data["crop_pct"]),
                   data["interpolation"])

    def __call__(self, image) -> np.ndarray:
        """A PIL image → float32 [3, size, size]."""
        from PIL import Image

        image = image.convert("RGB")
        width, height = image.size
        short = math.floor(self.size / self.crop_pct)
        # torchvision's Resize(int): the shorter side becomes `short`, the longer one is truncated.
        if width <= height:
            resized = (short, int(short * height / width))
        else:
            resized = (int(short * width / height), short)
        filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                   "lanczos": Image.LANCZOS}
        if (width, height) != resized:
            image = image.resize(resized, filters[self.interpolation])
        left = int(round((resized[0] - self.size) / 2.0))
        top = int(round((resized[1] - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return ((array - mean) / std).astype(np.float32)


@dataclass
class Images:
    pixel_values: np.ndarray  # float32 [N, 3, size, size]
    paths: list[Path]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    # Per image, the class folder it came from (ImageFolder layout: <source>/<class>/…/image), or None.
    classes: list[str | None] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and all(c is not None for c in self.classes)


def image_files(sources) -> list[tuple[Path, str | None]]:
    """Files and folders (searched recursively, image suffixes only) → sorted (image path, class
    folder) pairs; the class is the first folder below a source folder, None for loose files."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            files += [(p, p.relative_to(source).parts[0] if len(p.relative_to(source).parts) > 1 else None)
                      for p in found]
        elif source.is_file():
            files.append((source, None))
        else:
            raise InputError(f"image source {str(source)!r} does not exist")
    return files


def load_images(sources, preprocess: Preprocess) -> Images:
    """Read and preprocess every image in `sources` (files, flat folders or ImageFolder trees with
    class subfolders). Unreadable files are returned in `unreadable`, never silently skipped; no
    readable image at all is an error."""
    from PIL import Image, UnidentifiedImageError

    arrays, paths, classes, unreadable = [], [], [], []
    for path, class_name in image_files(sources):
        try:
            with Image.open(path) as image:
                arrays.append(preprocess(image))
            paths.append(path)
            classes.append(class_name)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            unreadable.append((path, str(err).splitlines()[0] if str(err) else type(err).__name__))
    if not arrays:
        names = ", ".join(str(p) for p in map(Path, sources))
        detail = f"; unreadable: {', '.join(p.name for p, _ in unreadable[:3])}" if unreadable else ""
        raise InputError(f"no readable images in {names}{detail}")
    return Images(np.stack(arrays), paths, unreadable, classes)
