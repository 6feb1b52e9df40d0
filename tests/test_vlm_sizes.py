"""VLMs at the sizes users feed them (issue: anyres photos, Qwen's native resolution, mixed batches):
the shipped configs' real geometry with narrow widths (tests/real_geometry.py), photo sizes up to
4000 × 3000, rows of different sizes in one batch."""
import math

import pytest
import torch
import transformers
from packaging.version import Version

import real_geometry as rg
import saint_export as se
from saint_export import compat

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version(compat.VLM_FAMILIES_MIN),
                                reason=f"the Qwen and anyres adapters need transformers ≥ {compat.VLM_FAMILIES_MIN}")

# (height, width): the crashing cases and their portrait versions, one batch per model
ANYRES_PHOTOS = {
    "llava-onevision-qwen2-0.5b": [(3000, 4000), (4000, 3000), (1080, 1920), (1920, 1080)],
    "llava-v1.6-mistral-7b": [(1080, 1920), (1920, 1080), (336, 336), (3000, 4000)],
}


def language_model_inputs(model):
    """Record what the model's core gets after the input fit: input_ids per call."""
    seen = []
    compat.llava_core(model).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("input_ids", args[0] if args else None)),
        with_kwargs=True)
    return seen


@pytest.mark.parametrize("alias", list(ANYRES_PHOTOS))
@pytest.mark.parametrize("percent", [75, 50, 25])
def test_anyres_photos_run_in_forward_and_generate_and_keep_their_share(alias, percent):
    model = se.apply(rg.build(alias), f"early{percent}")
    x, unpruned = rg.anyres_inputs(model, ANYRES_PHOTOS[alias])
    crops = compat.anyres_crops(model, x["image_sizes"])
    seen = language_model_inputs(model)
    with torch.no_grad():
        logits = model(**x).logits
    fitted = seen[-1]
    kept = (fitted == model.config.image_token_id).sum(1).tolist()
    # BUDGET_RULE: ⌊round(P% · U) / crops⌋ per crop, so never more than the unpruned count and at
    # least the nominal share saved, less rounding
    assert kept == [c * (math.floor(percent / 100 * u + 0.5) // c) for c, u in zip(crops, unpruned)]
    for k, u in zip(kept, unpruned):
        assert k <= u and 1 - k / u >= (1 - percent / 100) - 0.05, (k, u)
    real = [int(m.sum()) - (u - k) for m, u, k in zip(x["attention_mask"], unpruned, kept)]
    assert fitted.shape[1] == max(real) == logits.shape[1]  # no column is padding in every row
    out = model.generate(**x, max_new_tokens=2, do_sample=False)
    assert out.shape == (len(kept), x["input_ids"].shape[1] + 2)
    assert torch.equal(out[:, :x["input_ids"].shape[1]], x["input_ids"])


def test_a_fixed_count_schedule_larger_than_an_images_unpruned_count_gets_one_line():
    schedule = "r:" + ",".join(["19"] * 9 + ["15"])  # 576 - 186 = 390 features per crop
    with pytest.raises(se.InputError, match=r"^an image of 336×336 px \(3 crops, 1176 tokens unpruned\): keep schedule "
                                            r"'r:10,10,10,10,10,10,10,10,10,10' keeps 476 features per crop, 1428 in "
                                            r"all, more than the unpruned model; use early<P>, which scales with the "
                                            r"image$"):
        se.apply(rg.build("llava-v1.6-mistral-7b"), "r:" + ",".join(["10"] * 10))  # the nominal image: one crop's size
    model = se.apply(rg.build("llava-v1.6-mistral-7b"), schedule)  # 3 × 390 ≤ 1176
    x, _ = rg.anyres_inputs(model, [(1080, 1920)])
    with pytest.raises(se.InputError, match=r"^an image of 1920×1080 px \(5 crops, 1948 tokens unpruned\): keep "
                                            r"schedule 'r:19,.*,15' keeps 390 features per crop, 1950 in all"):
        model(**x)


def test_anyres_budget_cache_stays_bounded_after_200_image_sizes():
    from saint_export.adapters import llava_anyres

    model = se.apply(rg.build("llava-v1.6-mistral-7b"), "early50")
    budgets = model.saint_crop_budgets
    for i in range(200):
        size = (300 + 7 * i, 500 + 3 * i)
        budgets.droppers(size, compat.anyres_crops(model, [size])[0])
    assert budgets.droppers.cache_info().currsize == llava_anyres.CropBudgets.CACHED_SIZES
