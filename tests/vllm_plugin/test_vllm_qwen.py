"""saint_export.vllm for Qwen2.5-VL: SAINT inside vLLM's own windowed tower gives the greedy tokens
`se.apply` gives in transformers (square, tall and wide images; prefill cut into 16-token chunks),
the survivors keep their unpruned M-RoPE positions, and a tower that returns another count stops
the engine at start-up. A tiny random Qwen2.5-VL, offline.

The transformers reference runs in the main environment (tests/vllm_plugin/reference.py):
the Qwen adapter needs a newer transformers than vLLM pins."""
import importlib.util
import json
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

from vllm import LLM, SamplingParams  # noqa: E402

from saint_export import vllm as plugin  # noqa: E402

import greedy  # noqa: E402
from main_env import exported_features, references  # noqa: E402,F401  (fixtures)
from greedy import NEW_TOKENS  # noqa: E402
import tiny_qwen  # noqa: E402

SCHEDULES = [("early50", 0.75), ("r:3,2", 0.5)]  # early50: all at block 1 (2 points); r: at blocks 1 and 3


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family → its tiny checkpoint, built once."""
    from saint_export import compat

    compat.import_torchvision()
    return {family: tiny_qwen.build(tmp_path_factory.mktemp(family), family) for family in tiny_qwen.FAMILIES}


@pytest.fixture(scope="session")
def checkpoint(checkpoints):
    return checkpoints["qwen2.5-vl"]


@pytest.fixture(scope="session")
def reference(checkpoint, references):
    return lambda schedule, tau: references(checkpoint, schedule, tau)


def vllm_greedy(checkpoint, **kwargs):
    return greedy.vllm_greedy(checkpoint, tiny_qwen, **kwargs)


@pytest.mark.parametrize("schedule, tau", SCHEDULES)
def test_qwen_plugin_generations_equal_se_apply_in_transformers(checkpoint, reference, schedule, tau):
    found = vllm_greedy(checkpoint, hf_overrides=plugin.overrides(schedule, tau=tau))
    assert found == reference(schedule, tau)  # prompt lengths: text + K(grid) per image; then the tokens
    unpruned = reference("none", 0.75)
    assert all(p < u for (p, _), (u, _) in zip(found, unpruned))  # images were pruned
    assert len({tuple(tokens) for _, tokens in found}) > 1  # three images, not one answer: not vacuous


@pytest.mark.parametrize("schedule, tau", SCHEDULES)
def test_qwen3_plugin_generations_equal_se_apply_in_transformers(checkpoints, references, schedule, tau):
    """Qwen3-VL: SAINT at any block, DeepStack rows pruned with their features, interleaved M-RoPE."""
    checkpoint = checkpoints["qwen3-vl"]
    found = vllm_greedy(checkpoint, hf_overrides=plugin.overrides(schedule, tau=tau))
    assert found == references(checkpoint, schedule, tau)
    assert all(p < u for (p, _), (u, _) in zip(found, references(checkpoint, "none", 0.75)))
    assert len({tuple(tokens) for _, tokens in found}) > 1


def test_qwen3_without_a_saint_entry_vllm_equals_transformers(checkpoints, references):
    assert vllm_greedy(checkpoints["qwen3-vl"]) == references(checkpoints["qwen3-vl"], "none", 0.75)


@pytest.mark.parametrize("family", tiny_qwen.FAMILIES)
def test_qwen_tensor_parallel_ranks_keep_the_tokens_one_rank_keeps(checkpoints, references, monkeypatch, family):
    """Two ranks, one vision head each: their key sums are all-reduced, so both keep se.apply's groups."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    checkpoint = checkpoints[family]
    found = vllm_greedy(checkpoint, hf_overrides=plugin.overrides("early50", tau=0.75), tensor_parallel_size=2)
    assert found == references(checkpoint, "early50", 0.75)


def test_qwen_without_a_saint_entry_vllm_equals_transformers(checkpoint, reference):
    assert vllm_greedy(checkpoint) == reference("none", 0.75)


def test_qwen_survivors_need_their_unpruned_positions(checkpoint, reference, monkeypatch):
    """The control: with the tower's position columns ignored (every survivor at its image's start),
    the tokens differ, so the equality above rests on the positions."""
    from saint_export.vllm import model

    monkeypatch.setattr(model, "decode_positions", lambda columns: model.torch.zeros(
        len(columns), 3, dtype=model.torch.long))
    found = vllm_greedy(checkpoint, hf_overrides=plugin.overrides("early50", tau=0.75))
    expected = reference("early50", 0.75)
    assert [p for p, _ in found] == [p for p, _ in expected]
    assert [t for _, t in found] != [t for _, t in expected]


@pytest.mark.parametrize("family, tower", [("qwen2.5-vl", "saint_qwen_tower"), ("qwen3-vl", "saint_qwen3_tower")])
def test_qwen_tower_that_returns_another_count_stops_the_engine_at_start_up(checkpoints, monkeypatch, family, tower):
    from saint_export.vllm import model

    real = getattr(model, tower)
    monkeypatch.setattr(model, tower, lambda *args: tuple(t[:-1] for t in real(*args)))
    with pytest.raises(Exception, match=r"processor writes 32 image placeholders but the tower returns 31 features "
                                        r"for a 16×16-patch image"):
        vllm_greedy(checkpoints[family], hf_overrides=plugin.overrides("early50"))


def test_qwen_positions_that_do_not_continue_as_unpruned_stop_the_engine_at_start_up(checkpoint, monkeypatch):
    from saint_export.vllm import model

    cls = model.SaintQwen2_5_VLForConditionalGeneration
    real = cls.get_mrope_input_positions
    monkeypatch.setattr(cls, "get_mrope_input_positions",
                        lambda self, *args: (lambda out: (out[0], out[1] + 1))(real(self, *args)))  # off by one
    with pytest.raises(Exception, match=r"positions of a 16×16-patch image's prompt do not continue"):
        vllm_greedy(checkpoint, hf_overrides=plugin.overrides("early50"))


def test_an_image_too_small_for_a_fixed_count_is_refused_and_the_engine_keeps_serving(checkpoint):
    """r:9 fits the 18-group wide image (9 ≤ ⌈18/2⌉) but not the 16-group square one."""
    llm = LLM(model=str(checkpoint), enforce_eager=True, dtype="float32", max_model_len=512,
              limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=plugin.overrides("r:9,1"))
    square, _, wide = tiny_qwen.images()
    params = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"SAINT: an image of 1×8×8 patches \(16 merged tokens\): .*drops 9"):
        llm.generate([{"prompt": tiny_qwen.PROMPT, "multi_modal_data": {"image": square}}], params)
    out = llm.generate([{"prompt": tiny_qwen.PROMPT, "multi_modal_data": {"image": wide}}], params)
    assert len(out[0].outputs[0].token_ids) == 2


def test_the_wrapper_resolves_a_qwen_checkpoint(checkpoint):
    command, found = plugin.serve_command(str(checkpoint), plugin.overrides("early50"), ["--port", "8123"])
    assert found.summary() == ("SAINT early50: 128 of 256 image tokens for a 448 × 448 image (each image's count "
                               "follows its size)")
    assert command[-2:] == ["--hf-overrides", json.dumps(plugin.overrides("early50"))]


def test_qwen_refuses_evs_beside_saint(checkpoint):
    with pytest.raises(Exception, match="video_pruning_rate .* and a 'saint' entry"):
        vllm_greedy(checkpoint, hf_overrides=plugin.overrides("early50"), video_pruning_rate=0.5)


def unpatchify(patches, grid, config):
    """The processor's flattened patches of one image [t·h·w, C·T·P·P] (merge-group order) → the
    image it normalised [1, C, H, W] (the first temporal frame): what a features engine takes."""
    _, h, w = grid
    p, m = config["patch_size"], config["spatial_merge_size"]
    x = patches.reshape(h // m, w // m, m, m, 3, config["temporal_patch_size"], p, p)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, h * p, w * p).numpy()


@pytest.mark.parametrize("family", tiny_qwen.FAMILIES)
def test_features_from_our_engine_handed_to_the_plugin_give_its_tokens(checkpoints, references, exported_features,
                                                                       family):
    """A features folder (ONNX, run by saint_export.runtime) for the square image, handed to the
    plugin as image embeddings with their positions (qwen_image_embeddings; Qwen3-VL's DeepStack
    rows too): the tokens se.apply gives, which the plugin's own tower gives (the tests above)."""
    import torch
    from transformers import AutoProcessor

    import saint_export.runtime as rt

    checkpoint = checkpoints[family]
    folder = exported_features(checkpoint, "early50", 0.75, 112)
    square = tiny_qwen.images()[0]
    processed = AutoProcessor.from_pretrained(checkpoint).image_processor(square, return_tensors="pt")
    grid = processed.image_grid_thw[0].tolist()
    vision = json.loads((checkpoint / "config.json").read_text())["vision_config"]
    with rt.open(folder) as runner:
        outputs = runner.infer_all(unpatchify(processed.pixel_values, grid, vision))
    deepstack = outputs.get("deepstack_features")
    embeds = plugin.qwen_image_embeddings(outputs["image_features"][0], outputs["image_positions"][0],
                                          None if deepstack is None else deepstack[0])
    llm = LLM(model=str(checkpoint), enforce_eager=True, dtype="float32", max_model_len=512, enable_mm_embeds=True,
              limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=plugin.overrides("early50", tau=0.75))
    out = llm.generate([{"prompt": tiny_qwen.PROMPT, "multi_modal_data": {"image": {
        "image_embeds": embeds, "image_grid_thw": torch.tensor([grid])}}}], SamplingParams(max_tokens=NEW_TOKENS,
                                                                                            temperature=0))
    assert (len(out[0].prompt_token_ids), list(out[0].outputs[0].token_ids)) == references(checkpoint, "early50",
                                                                                           0.75)[0]
    with pytest.raises(ValueError, match=r"SAINT: image embeddings for grids \[\[1, 8, 8\]\] must be 8 × "):
        llm.generate([{"prompt": tiny_qwen.PROMPT, "multi_modal_data": {"image": {
            "image_embeds": embeds[:, :-1], "image_grid_thw": torch.tensor([grid])}}}], SamplingParams(max_tokens=1))


@pytest.mark.parametrize("family", tiny_qwen.FAMILIES)
def test_qwen_videos_run_unpruned_beside_a_saint_entry(checkpoints, family):
    """A video prompt gives stock vLLM's prompt length and tokens with `saint` on: videos are not
    pruned, and their positions are vLLM's own."""
    import numpy as np

    video = np.random.default_rng(0).integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    prompt = tiny_qwen.PROMPT.replace("<|image_pad|>", "<|video_pad|>")
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    found = []
    for overrides in (None, plugin.overrides("early50", tau=0.75)):
        llm = LLM(model=str(checkpoints[family]), enforce_eager=True, dtype="float32", max_model_len=512,
                  limit_mm_per_prompt={"image": 0, "video": 1}, hf_overrides=overrides)
        metadata = {"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3], "duration": 2.0,
                    "video_backend": "opencv"}
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": (video, metadata)}}], params)[0]
        found.append((len(out.prompt_token_ids), list(out.outputs[0].token_ids)))
        del llm
    from transformers import AutoTokenizer

    text = len(AutoTokenizer.from_pretrained(checkpoints[family])(prompt).input_ids) - 1  # without the video pad
    assert found[0] == found[1] and found[0][0] - text >= 12  # 4 frames of 4 × 6 patches: 2 × 2 × 3 merged tokens
