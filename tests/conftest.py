"""Shared helpers and fixtures: small timm models, real photographs, exported folders, CLI runs."""
import numpy as np
import pytest
import torch

from saint_export.compat import import_torchvision

import_torchvision()  # before timm, on CPU-only torch

import timm  # noqa: E402

import saint_export as se  # noqa: E402
from saint_export.validate import synthetic_images  # noqa: E402

TEST_MODELS = ["test_vit", "test_vit2", "test_vit3"]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


def make_model(name="test_vit", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).eval()


def photo_arrays():
    """Real photographs from scikit-image, uint8 [H, W, 3]."""
    from skimage import data

    return [getattr(data, name)() for name in PHOTOS]


def photos(size=160):
    """The photographs resized to `size`, in [0, 1]."""
    tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()[None] / 255
               for im in photo_arrays()]
    return torch.cat([torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                                      align_corners=False) for t in tensors])


@pytest.fixture(scope="session")
def images160():
    """Photos plus synthetic images with flat regions (high similarity, near and exact ties)."""
    return (torch.cat([photos(160), synthetic_images(8, 160)]) - 0.5) / 0.5


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """The photographs as JPEG and PNG files, plus one file that is not an image."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for i, (name, array) in enumerate(zip(PHOTOS, photo_arrays())):
        Image.fromarray(array).save(folder / f"{name}.{'jpg' if i % 2 else 'png'}")
    (folder / "notes.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """test_vit early50, exported to ONNX through the library with a batch profile of max 32."""
    folder = tmp_path_factory.mktemp("exported") / "test_vit-early50"
    result = se.export("test_vit", folder, weights="random",
                       config=se.ExportConfig(keep_schedule="early50", target="onnx", batch=(1, 4, 32),
                                              parity_images=4))
    return result


def run(capsys, *argv):
    """The CLI in-process: (exit code, stdout, stderr)."""
    from saint_export.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def only_error_line(err):
    """The single 'saint-export: …' line of a failure, asserting there is exactly one and no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("saint-export:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
