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


# --- Qwen2.5-VL: windows over the survivors, images of one grid batched, bounded caches -------------

def test_segment_attention_equals_its_static_slot_form_with_empty_and_partial_windows():
    from saint_export.adapters import qwen_vl

    g = torch.Generator().manual_seed(0)
    counts = [[16, 0, 4, 12, 16, 8], [4, 16, 16, 0, 8, 12]]  # tokens left per window (capacity 16), two images
    segment = torch.stack([torch.repeat_interleave(torch.arange(6), torch.tensor(c)) for c in counts])
    q, k, v = (torch.randn(2, 3, segment.shape[1], 8, generator=g) for _ in range(3))
    eager = qwen_vl.segment_attention(segment, 6, 16, q, k, v, 0.3)
    for row, c in enumerate(counts):  # each window alone
        start = 0
        for n in c:
            window = slice(start, start + n)
            want = torch.nn.functional.scaled_dot_product_attention(q[row:row + 1, :, window], k[row:row + 1, :, window],
                                                                    v[row:row + 1, :, window], scale=0.3)
            assert torch.allclose(eager[row:row + 1, :, window], want, atol=1e-6, rtol=0)
            start += n
    assert torch.allclose(qwen_vl.slot_attention(segment, 6, 16, q, k, v, 0.3), eager, atol=1e-6, rtol=0)


def test_qwen_images_of_one_grid_run_as_a_batch_and_equal_each_alone():
    from saint_export.adapters import qwen_vl

    model = se.apply(rg.build("qwen2.5-vl-3b"), "early50")  # 32 blocks, 112-px windows, full attention at 7/15/23/31
    x = rg.qwen_inputs(model, [(448, 448), (336, 672), (448, 448)])
    calls = []
    original = qwen_vl.pruned_tower
    qwen_vl.pruned_tower = lambda tower, patches, *a: calls.append(len(patches)) or original(tower, patches, *a)
    try:
        together = qwen_vl.image_features(model, x["pixel_values"], x["image_grid_thw"])
    finally:
        qwen_vl.pruned_tower = original
    assert sorted(calls) == [1, 2]  # the two 448-px images in one run
    sizes = x["image_grid_thw"].prod(-1).tolist()
    for image, patches in enumerate(x["pixel_values"].split(sizes)):
        alone = qwen_vl.image_features(model, patches, x["image_grid_thw"][image:image + 1])
        assert torch.allclose(together[0][image], alone[0][0], atol=1e-5, rtol=0)
        assert torch.equal(together[1][image], alone[1][0])
    assert [len(f) for f in together[0]] == [128, 144, 128]  # half of 256, 288, 256 merged tokens


def test_qwen_layouts_and_droppers_stay_bounded_after_200_image_sizes():
    from saint_export.adapters import qwen_vl

    model = se.apply(rg.build("qwen2.5-vl-3b"), "early50")
    pruner = model.saint_tower
    for i in range(200):
        grid = (1, 2 * (2 + i % 20), 2 * (2 + i // 20))
        pruner.layout(grid), pruner.droppers(grid)
    assert pruner.layout.cache_info().currsize == pruner.droppers.cache_info().currsize == \
        qwen_vl.TowerPruner.CACHED_GRIDS


# --- batched prefill: no column is padding in every row -----------------------------------------------

def expected_widths(x, image_token, reaching_llm, llm_schedule, depth):
    """Each decoder layer's width when padding goes: the longest real row, its image tokens
    `reaching_llm` then dropped as `llm_schedule` says."""
    from saint_export.llm import LlmSchedule

    real = x["attention_mask"].sum(1).tolist()
    placeholders = (x["input_ids"] == image_token).sum(1).tolist()
    widths = []
    for layer in range(depth):
        rows = []
        for length, written, n in zip(real, placeholders, reaching_llm):
            counts = LlmSchedule.parse(llm_schedule, depth, n).counts() if llm_schedule else [n] * (depth + 1)
            rows.append(length - (written - counts[layer]))
        widths.append(max(rows))
    return widths


@pytest.mark.parametrize("tower, llm", [("early50", None), ("none", "span50@1-2"), ("early50", "span50@1-2")],
                         ids=["vit-only", "llm-only", "hybrid"])
def test_qwen_batched_prefill_runs_every_layer_at_the_longest_real_row(tower, llm):
    model = se.apply(rg.build("qwen2.5-vl-3b", text_layers=4), tower, llm_schedule=llm, llm_tau=0.5)
    x = rg.qwen_inputs(model, [(448, 448), (56, 56)])  # 256 and 4 merged tokens: the second row is mostly padding
    widths = rg.decoder_widths(model)
    with torch.no_grad():
        model(**x)
    reaching = [256, 4] if tower == "none" else [128, 2]
    assert widths[-1] == expected_widths(x, model.config.image_token_id, reaching, llm, 4)
    assert widths[-1][0] == 3 + 1 + reaching[0] + 1 + 4  # the longer row: text, vision start, image, end, text


@pytest.mark.parametrize("tower, llm", [("early50", None), ("none", "span50@1-2"), ("early50", "span50@1-2")],
                         ids=["vit-only", "llm-only", "hybrid"])
def test_anyres_batched_prefill_runs_every_layer_at_the_longest_real_row(tower, llm):
    model = se.apply(rg.build("llava-v1.6-mistral-7b", text_layers=4), tower, llm_schedule=llm, llm_tau=0.5)
    x, unpruned = rg.anyres_inputs(model, [(1080, 1920), (336, 336)])  # 1948 and 1176 tokens unpruned
    widths = rg.decoder_widths(model)
    with torch.no_grad():
        model(**x)
    reaching = unpruned if tower == "none" else [5 * (974 // 5), 3 * (588 // 3)]
    assert widths[-1] == expected_widths(x, model.config.image_token_id, reaching, llm, 4)


@pytest.mark.parametrize("tower, llm", [("early50", None), ("none", "span50@1-2"), ("early50", "span50@1-2")],
                         ids=["vit-only", "llm-only", "hybrid"])
def test_llava_batched_prefill_runs_every_layer_at_the_longest_real_row(tower, llm):
    from test_vlm import IMAGE_TOKEN, pixels, prompts, tiny_llava

    model = se.apply(tiny_llava(), tower, llm_schedule=llm, llm_tau=0.5)
    ids, mask = prompts(64)
    widths = rg.decoder_widths(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    x = {"input_ids": ids, "attention_mask": mask}
    reaching = [64, 64] if tower == "none" else [32, 32]
    assert widths[-1] == expected_widths(x, IMAGE_TOKEN, reaching, llm, 4)


# --- equal-length, unpadded rows that lose different counts --------------------------------------------

def test_qwen_equal_length_rows_losing_different_counts_generate_as_each_row_alone():
    import tiny_qwen as tq

    model = se.apply(tq.build(), "early50")  # 16 merged tokens keep 8, 15 keep 8: the rows lose 8 and 7
    x = tq.inputs(texts=((3, 4), (4, 4)))  # both rows 25 tokens: no padding
    assert bool(x["attention_mask"].all())
    batch = model.generate(**x, max_new_tokens=4, do_sample=False)[:, -4:]
    for row in range(2):
        alone = {key: value[row:row + 1] for key, value in x.items() if key not in ("pixel_values", "image_grid_thw")}
        alone["image_grid_thw"] = x["image_grid_thw"][row:row + 1]
        alone["pixel_values"] = x["pixel_values"].split(x["image_grid_thw"].prod(-1).tolist())[row]
        assert torch.equal(model.generate(**alone, max_new_tokens=4, do_sample=False)[:, -4:], batch[row:row + 1])


def test_anyres_equal_length_rows_losing_different_counts_generate_as_each_row_alone():
    import tiny_anyres as ta

    model = se.apply(ta.build("llava-next"), "early50")  # 166 → 81 and 336 → 165 image tokens
    x = ta.inputs("llava-next", texts=((173, 4), (3, 4)))  # both rows 343 tokens: no padding
    assert bool(x["attention_mask"].all())
    batch = model.generate(**x, max_new_tokens=4, do_sample=False)[:, -4:]
    for row in range(2):
        alone = {key: value[row:row + 1] for key, value in x.items()}
        assert torch.equal(model.generate(**alone, max_new_tokens=4, do_sample=False)[:, -4:], batch[row:row + 1])
