import numpy as np
import pytest
import torch

import saint_export  # noqa: F401  (imports timm safely on CPU-only torch)
import timm
from saint_export.validate import synthetic_images

TEST_MODELS = ["test_vit", "test_vit2", "test_vit3"]


def make_model(name="test_vit", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).eval()


def photos(size=160):
    """Real photographs from scikit-image, resized to `size`, in [0, 1]."""
    from skimage import data

    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()[None] / 255 for im in images]
    return torch.cat([torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                                      align_corners=False) for t in tensors])


@pytest.fixture(scope="session")
def images160():
    """Photos plus synthetic images with flat regions (high similarity, near and exact ties)."""
    return (torch.cat([photos(160), synthetic_images(8, 160)]) - 0.5) / 0.5
