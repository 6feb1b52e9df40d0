"""saint_export.vllm for LLaVA-NeXT (CLIP) and LLaVA-OneVision (SigLIP): SAINT in every anyres crop
inside vLLM's own tower, the per-crop budget and packing of saint_export.adapters.llava_anyres,
gives the greedy tokens `se.apply` gives in transformers for square, tall, wide and photo-like
images (prefill cut into 64-token chunks); an image its budget cannot serve is refused in one line
while the engine keeps serving; a tower that returns another count stops the engine at start-up.
Tiny random checkpoints, offline; the transformers reference runs in the main environment."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM's own environment: scripts/install_vllm.sh, then .venv-vllm/bin/python -m pytest "
                "tests/vllm_plugin", allow_module_level=True)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

from saint_export import vllm as plugin  # noqa: E402

import greedy  # noqa: E402
from main_env import exported_features, references  # noqa: E402,F401  (fixtures)
import tiny_anyres_checkpoints as tiny  # noqa: E402

# early50: P% of each image's unpruned count, K per crop; r:10,10,10: 34 per crop at every size
SCHEDULES = [("early50", 0.75), ("r:10,10,10", 0.5)]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family → its tiny checkpoint, built once."""
    from saint_export import compat

    compat.import_torchvision()
    return {family: tiny.build(tmp_path_factory.mktemp(family), family) for family in tiny.FAMILIES}


def vllm_greedy(checkpoint, **kwargs):
    return greedy.vllm_greedy(checkpoint, tiny, max_model_len=2048, max_num_batched_tokens=64, **kwargs)


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("schedule, tau", SCHEDULES)
def test_anyres_plugin_generations_equal_se_apply_in_transformers(checkpoints, references, family, schedule, tau):
    found = vllm_greedy(checkpoints[family], hf_overrides=plugin.overrides(schedule, tau=tau))
    assert found == references(checkpoints[family], schedule, tau)  # prompt lengths: text + K × crops; tokens
    unpruned = references(checkpoints[family], "none", 0.75)
    assert all(p < u for (p, _), (u, _) in zip(found, unpruned))  # every image was pruned
    assert len({tuple(tokens) for _, tokens in found}) == len(found)  # four images, four answers: not vacuous


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("schedule", [None, "none"])
def test_anyres_without_a_saint_entry_or_with_none_vllm_equals_transformers(checkpoints, references, family,
                                                                           schedule):
    """With `none` every image's budget drops nothing: vLLM's own packing (unpadding, newlines)."""
    overrides = None if schedule is None else plugin.overrides(schedule)
    assert vllm_greedy(checkpoints[family], hf_overrides=overrides) == references(checkpoints[family], "none", 0.75)


def test_anyres_prompt_lengths_are_text_plus_the_budget_rule_per_image(checkpoints, references):
    """The placeholders are llava_anyres.image_tokens of each image's crops and unpruned count."""
    from transformers import AutoConfig, AutoTokenizer

    from saint_export.adapters import llava_anyres

    checkpoint = checkpoints["llava-onevision"]
    config = AutoConfig.from_pretrained(checkpoint)
    text = len(AutoTokenizer.from_pretrained(checkpoint)(tiny.PROMPT).input_ids) - 1  # without <image>
    unpruned = references(checkpoint, "none", 0.75)
    assert [length - text for length, _ in unpruned] == [336, 280, 264, 631]  # the photo-like one shrunk
    for (height, width), crops, (pruned, _), (full, _) in zip(tiny.IMAGE_SIZES, (5, 4, 4, 17),
                                                              references(checkpoint, "early50", 0.75), unpruned):
        schedule = llava_anyres.budget_schedule(config, "early50", (height, width), crops, full - text)
        assert pruned - text == llava_anyres.image_tokens(config, schedule, crops, full - text) \
            == (round((full - text) / 2) // crops) * crops


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_anyres_tensor_parallel_ranks_keep_the_tokens_one_rank_keeps(checkpoints, references, monkeypatch, family):
    """Two ranks, one CLIP or SigLIP head each: their key sums are all-reduced, so both keep se.apply's tokens."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    checkpoint = checkpoints[family]
    found = vllm_greedy(checkpoint, hf_overrides=plugin.overrides("early50", tau=0.75), tensor_parallel_size=2)
    assert found == references(checkpoint, "early50", 0.75)


def test_anyres_tower_that_returns_another_count_stops_the_engine_at_start_up(checkpoints, monkeypatch):
    from saint_export.vllm import model

    real = model.llava_anyres.pack_crops
    monkeypatch.setattr(model.llava_anyres, "pack_crops", lambda *args: real(*args)[:-1])
    with pytest.raises(Exception, match=r"processor writes 66 image placeholders but the tower returns 65 features "
                                        r"for a 32×32 image"):
        vllm_greedy(checkpoints["llava-next"], hf_overrides=plugin.overrides("early50"))


def test_an_image_its_budget_cannot_serve_is_refused_and_the_engine_keeps_serving(checkpoints):
    """A 200 × 4 px strip: 17 crops but 64 unpruned tokens (unpadding leaves no high-resolution row),
    so early50 asks for 2 features per crop, fewer than four blocks can reach."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(checkpoints["llava-onevision"]), enforce_eager=True, dtype="float32", max_model_len=2048,
              limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=plugin.overrides("early50"))
    params = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"^SAINT: an image of 200×4 px \(17 crops, 64 tokens unpruned\): keep "
                                         r"schedule 'early50': cannot reach"):
        llm.generate([{"prompt": tiny.PROMPT, "multi_modal_data": {"image": Image.new("RGB", (200, 4))}}], params)
    out = llm.generate([{"prompt": tiny.PROMPT, "multi_modal_data": {"image": tiny.images()[0]}}], params)
    assert len(out[0].outputs[0].token_ids) == 2


def test_a_fixed_count_the_largest_images_cannot_take_is_refused_at_start_up(checkpoints):
    """r:4,4,4 keeps 52 per crop: 884 for a 17-crop image that OneVision feeds as 631 unpruned."""
    with pytest.raises(Exception, match=r"SAINT: an image of 1153×944 px \(17 crops, 631 tokens unpruned\): keep "
                                        r"schedule 'r:4,4,4' keeps 52 features per crop, 884 in all"):
        vllm_greedy(checkpoints["llava-onevision"], hf_overrides=plugin.overrides("r:4,4,4"))


def test_anyres_settings_summary_and_refusals(checkpoints):
    found = plugin.check(str(checkpoints["llava-next"]), plugin.overrides("early50"))
    assert found.summary() == ("SAINT early50: 32 of 64 image tokens per crop (each image's share of its unpruned "
                               "count follows its size and crops: docs/vlm.md)")
    with pytest.raises(plugin.InputError, match="keep schedule 'dynamic' decides per batch"):
        plugin.check(str(checkpoints["llava-onevision"]), plugin.overrides("dynamic"))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_features_from_our_engine_handed_to_vllm_give_the_plugins_tokens(checkpoints, references, exported_features,
                                                                         family):
    """A features folder (ONNX, run by saint_export.runtime) on each image's crops, packed by
    llava_anyres.pack_crops and handed to vLLM as image embeddings: the tokens se.apply gives,
    which the plugin's own tower gives (the tests above). r:10,10,10 keeps 34 per crop at every
    size, so one export serves all four images. With the plugin's `saint` entry the four images'
    embeddings (three lengths) share batches; stock vLLM takes one length per batch only."""
    import torch
    from transformers import AutoConfig, AutoProcessor
    from vllm import LLM, SamplingParams

    import saint_export.runtime as rt
    from saint_export import compat
    from saint_export.adapters import llava_anyres

    checkpoint = checkpoints[family]
    folder = exported_features(checkpoint, "r:10,10,10", 0.5, tiny.CROP)
    config = AutoConfig.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint).image_processor
    embeds = []
    with rt.open(folder) as runner:
        for image in tiny.images():
            processed = processor(image, return_tensors="pt")
            size = processed.image_sizes[0].tolist()
            grid = compat.anyres_grid(config, size)
            outputs = runner.infer_all(processed.pixel_values[0, :1 + grid[0] * grid[1]].numpy())
            embeds.append(llava_anyres.pack_crops(torch.from_numpy(outputs["image_features"]),
                                                  torch.from_numpy(outputs["image_positions"]), grid, config))
    llm = LLM(model=str(checkpoint), enforce_eager=True, dtype="float32", max_model_len=2048, enable_mm_embeds=True,
              limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=plugin.overrides("r:10,10,10", tau=0.5))
    params = SamplingParams(max_tokens=greedy.NEW_TOKENS, temperature=0)
    outputs = llm.generate([{"prompt": tiny.PROMPT, "multi_modal_data": {"image": e[None]}} for e in embeds], params)
    found = [(len(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]
    assert found == references(checkpoint, "r:10,10,10", 0.5)
    with pytest.raises(ValueError, match=r"hidden dimension mismatch: got 127, but model expects 128"):
        llm.generate([{"prompt": tiny.PROMPT, "multi_modal_data": {"image": embeds[0][None, :, :-1]}}], params)
    assert llm.generate([{"prompt": tiny.PROMPT, "multi_modal_data": {"image": embeds[0][None]}}],
                        params)[0].outputs[0].token_ids == found[0][1]  # and the engine serves on


def test_onevision_prompts_with_several_images_prune_each_image_by_its_own_budget(checkpoints, references):
    """Two or three images of different sizes in one prompt: vLLM runs anyres on each (transformers
    does not: with several images it keeps only the base crop, so vLLM is the reference here). With
    `none` the plugin equals stock vLLM; with early50 each image gets the placeholders it gets alone
    (its own crops and budget), the prompts are pruned, and the answers differ from unpruned."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    checkpoint = checkpoints["llava-onevision"]
    text = len(AutoTokenizer.from_pretrained(checkpoint)(tiny.PROMPT).input_ids) - 1  # without <image>
    alone = references(checkpoint, "early50", 0.75)  # each image alone: (prompt length, tokens)
    single = {size: length - text for size, (length, _) in zip(tiny.IMAGE_SIZES, alone)}
    images = dict(zip(tiny.IMAGE_SIZES, tiny.images()))
    groups = [[(60, 60), (400, 300)], [(90, 30), (30, 90), (60, 60)]]
    prompts = [{"prompt": tiny.PROMPT.replace("<image>", "<image>" * len(group)),
                "multi_modal_data": {"image": [images[size] for size in group]}} for group in groups]
    outputs = {}
    for name, overrides in (("stock", None), ("none", plugin.overrides("none")), ("early50", plugin.overrides("early50"))):
        llm = LLM(model=str(checkpoint), enforce_eager=True, dtype="float32", max_model_len=2048,
                  limit_mm_per_prompt={"image": 3, "video": 0}, enable_chunked_prefill=True,
                  max_num_batched_tokens=64, hf_overrides=overrides)
        found = llm.generate(prompts, SamplingParams(max_tokens=greedy.NEW_TOKENS, temperature=0))
        outputs[name] = [(len(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in found]
        del llm
    assert outputs["none"] == outputs["stock"]
    for group, (length, _), (unpruned, _) in zip(groups, outputs["early50"], outputs["stock"]):
        assert length == text + sum(single[size] for size in group) < unpruned
    assert [tokens for _, tokens in outputs["early50"]] != [tokens for _, tokens in outputs["stock"]]
