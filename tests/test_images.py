"""Torch-free preprocessing reproduces the model family's own eval transform (timm)."""
import numpy as np
import pytest
from conftest import make_model
from PIL import Image

from saint_export.adapters import timm_vit
from saint_export.images import Preprocess


@pytest.mark.parametrize("name,kwargs", [("test_vit", {}), ("vit_base_patch16_224.augreg2_in21k_ft_in1k", {}),
                                         ("deit3_base_patch16_384.fb_in22k_ft_in1k", {})])
def test_matches_timm_eval_transform(photo_folder, name, kwargs):
    from timm.data import create_transform, resolve_data_config

    import timm

    model = timm.create_model(name, pretrained=False, **kwargs) if "." in name else make_model(name)
    ours = timm_vit.preprocess(model)
    theirs = create_transform(**resolve_data_config({}, model=model))
    for path in sorted(photo_folder.glob("*.[jp][pn]g")):
        if path.name == "notes.jpg":
            continue
        with Image.open(path) as image:
            expected = theirs(image.convert("RGB")).numpy()
            got = ours(image)
        assert got.shape == expected.shape == (3, ours.size, ours.size)
        assert np.abs(got - expected).max() <= 1e-6


def test_round_trip_and_portrait_images():
    p = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.875, interpolation="bilinear")
    assert Preprocess.from_dict(p.as_dict()) == p
    portrait = Image.fromarray(np.full((90, 40, 3), 255, np.uint8))
    out = p(portrait)
    assert out.shape == (3, 32, 32) and np.allclose(out, 2.0)  # white: (1 − 0.5) / 0.25
