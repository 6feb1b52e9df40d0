"""SAINT in transformers vision towers (CLIP, SigLIP) and in LLaVA's tower (ViT-only mode), on tiny
random configs (no hub)."""
import numpy as np
import pytest
import torch
from reference_saint import degree_drop_reference, saint_drop_reference

import saint_export as se
from saint_export import compat

compat.import_torchvision()  # before transformers' image utilities (CPU torch, CUDA torchvision)

from transformers import (CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection,  # noqa: E402
                          LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig,
                          SiglipVisionModel)

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
             patch_size=4)  # 8 x 8 = 64 patches
TOWERS = {"clip": (CLIPVisionModel, CLIPVisionConfig), "clip-projection": (CLIPVisionModelWithProjection,
                                                                           CLIPVisionConfig),
          "siglip": (SiglipVisionModel, SiglipVisionConfig)}
IMAGE_TOKEN = 100


def make_tower(kind, seed=0):
    cls, config = TOWERS[kind]
    torch.manual_seed(seed)
    return cls(config(**TOWER)).eval()


def pixels(batch, seed=1):
    """Images with flat regions (similar keys, so SAINT has something to drop) plus noise."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(batch, 3, 4, 4, generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3)
    return blocks + 0.05 * torch.randn(batch, 3, 32, 32, generator=g)


def encoder_layers(model):
    return getattr(model, "vision_model", model).encoder.layers


def last_hidden(model, x):
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def reference_tower(model, x, tau, prune_layers, protected, degree_keep=None):
    """The tower run by hand from its unpatched layers with the released method's dynamic rule
    (tests/reference_saint.py), or its degree rule keeping `degree_keep` patches, survivors in
    ascending order. Returns (last hidden state, keeps)."""
    inner = getattr(model, "vision_model", model)
    h = inner.embeddings(x)
    if hasattr(inner, "pre_layrnorm"):
        h = inner.pre_layrnorm(h)
    keeps = []
    for index, layer in enumerate(encoder_layers(model)):
        normed = layer.layer_norm1(h)
        attended = torch.nn.functional.scaled_dot_product_attention(
            *(proj(normed).view(len(h), h.shape[1], 2, -1).transpose(1, 2)
              for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)))
        h = h + layer.self_attn.out_proj(attended.transpose(1, 2).reshape(h.shape))
        if index in prune_layers:
            keys = layer.self_attn.k_proj(normed).view(len(h), h.shape[1], 2, -1).mean(2)
            if degree_keep is None:
                keep = saint_drop_reference(keys.numpy(), protected, tau)[1]
            else:
                keep = degree_drop_reference(keys.numpy(), protected, degree_keep, r0=4)
            keeps.append(keep)
            if keep is not None:
                index_ = torch.from_numpy(np.sort(keep, axis=1))
                h = torch.gather(h, 1, index_[..., None].expand(-1, -1, h.shape[-1]))
        h = h + layer.mlp(layer.layer_norm2(h))
    return h, keeps


@pytest.mark.parametrize("kind", list(TOWERS))
def test_none_is_bit_identical_and_attention_stays_sdpa(kind):
    x = pixels(2)
    want = last_hidden(make_tower(kind), x)
    model = se.apply(make_tower(kind), "none")
    assert torch.equal(last_hidden(model, x), want)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", list(TOWERS))
@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_matches_the_independent_reference(kind, batch):
    x = pixels(batch)
    model = se.apply(make_tower(kind), "dynamic", tau=0.5)
    protected = 0 if kind == "siglip" else 1
    with se.record_kept(model) as trace:
        got = last_hidden(model, x)
    want, keeps = reference_tower(make_tower(kind), x, 0.5, prune_layers={0, 1}, protected=protected)
    dropped = [k.dropped for k in trace]
    assert sum(dropped) > 0, "the test images must make the dynamic rule drop tokens"
    for kept, keep in zip(trace, keeps):
        if keep is None:
            assert kept.dropped == 0
        else:
            assert (kept.keep_index.numpy() == keep).all()
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_static_budgets_set_to_the_dynamic_choice_reproduce_it(kind):
    x = pixels(3)
    dynamic = se.apply(make_tower(kind), "dynamic", tau=0.5)
    with se.record_kept(dynamic) as trace:
        want = last_hidden(dynamic, x)
    drops = [k.dropped for k in trace]
    static = se.apply(make_tower(kind), "r:" + ",".join(map(str, drops)), tau=0.5)
    assert torch.equal(last_hidden(static, x), want)


@pytest.mark.parametrize("kind", list(TOWERS))
@pytest.mark.parametrize("schedule", ["early50", "early75@1", "r:8,4,2"])
def test_static_schedules_prune_each_image_as_if_alone(kind, schedule):
    x = pixels(3)
    model = se.apply(make_tower(kind), schedule)
    together = last_hidden(model, x)
    protected = 0 if kind == "siglip" else 1
    expected = 64 - sum(model.saint.schedule.drops) + protected
    assert together.shape == (3, expected, 32)
    for i in range(3):
        assert torch.allclose(last_hidden(model, x[i:i + 1]), together[i:i + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(together, last_hidden(make_tower(kind), x)[:, :expected], atol=1e-3)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("batch", [1, 3])
def test_degree_rule_matches_the_released_codes_rule_per_image(kind, batch):
    protected = 0 if kind == "siglip" else 1
    model = se.apply(make_tower(kind), "degree40@2/4")
    # Flat regions: near-duplicate tokens and exact degree ties, on the keys the layer saw.
    with se.record_kept(model) as trace:
        last_hidden(model, pixels(batch))
    assert [k.block for k in trace] == [2] and trace[0].dropped == 24
    want = degree_drop_reference(trace[0].keys.numpy(), protected, 40, r0=4)
    assert np.array_equal(trace[0].keep_index.numpy(), want)
    assert len({tuple(k) for k in want}) == batch, "each image keeps its own tokens"
    # End to end against the tower run by hand (noise images: no near-ties for float noise to flip).
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with se.record_kept(model) as trace:
        got = last_hidden(model, x)
    want, keeps = reference_tower(make_tower(kind), x, None, prune_layers={2}, protected=protected, degree_keep=40)
    assert np.array_equal(trace[0].keep_index.numpy(), keeps[0])
    assert got.shape == (batch, 40 + protected, 32) and torch.allclose(got, want, atol=1e-5, rtol=0)


def test_degree_rule_steps_and_limits():
    from saint_export.schedule import degree_steps

    assert degree_steps(576, 375) == [36, 15, 35, 14, 34, 13, 33, 12, 9]  # LLaVA-1.5: CLS + 375 reach the LLM
    for bad, message in [("degree64@1", "keeps 64 of 64 patches; expected 1 … 63"),
                         ("degree8@4", "block 4 does not exist"), ("degree8@1/200", "stalls at 64 patches"),
                         ("degree@1", "malformed keep schedule")]:
        with pytest.raises(se.InputError, match=message):
            se.apply(make_tower("clip"), bad)


def test_calibrated_schedule_on_a_tower(tmp_path):
    path = se.Calibration(model="tiny-clip", depth=4, num_patches=64, tau=0.75, K=5, gamma=10.0, percentile=50.0,
                          per_image_drops=[[6, 3, 0, 0]], drops=[6, 3, 0, 0]).save(tmp_path / "calib.json")
    model = se.apply(make_tower("clip"), f"calib:{path}")
    assert last_hidden(model, pixels(2)).shape == (2, 65 - 9, 32)


def tiny_llava(strategy="default", seed=0):
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(config).eval()


def prompts(placeholders):
    """Two left-padded prompts with one image each."""
    p1 = [1, 5, 6] + [IMAGE_TOKEN] * placeholders + [7, 8, 9]
    p2 = [1, 5] + [IMAGE_TOKEN] * placeholders + [7]
    ids = torch.tensor([p1, [0] * (len(p1) - len(p2)) + p2])
    return ids, (ids != 0).long()


def test_llava_tower_schedule_covers_the_layers_before_the_feature_layer():
    model = se.apply(tiny_llava(), "r:4,4,4")  # the feature layer is -2: layers 0-2 feed the features
    assert model.saint.schedule.depth == 3
    features = model.model.get_image_features(pixel_values=pixels(2), vision_feature_layer=-2,
                                              vision_feature_select_strategy="default").pooler_output
    assert [tuple(f.shape) for f in features] == [(64 - 12, 64)] * 2
    with pytest.raises(se.InputError, match="lists 4 blocks but the model has 3"):
        se.apply(tiny_llava(), "r:4,4,4,4")


def test_llava_vit_only_usual_prompts_equal_kept_count_prompts_in_forward_and_generate():
    x = pixels(2)
    model = se.apply(tiny_llava(), "early50")  # 64 patches → 32 features per image
    kept = 64 - sum(model.saint.schedule.drops)
    usual_ids, usual_mask = prompts(64)
    kept_ids, kept_mask = prompts(kept)
    with torch.no_grad():
        usual = model(input_ids=usual_ids, attention_mask=usual_mask, pixel_values=x).logits
        short = model(input_ids=kept_ids, attention_mask=kept_mask, pixel_values=x).logits
    assert usual.shape == short.shape and torch.equal(usual, short)
    generated = model.generate(input_ids=usual_ids, attention_mask=usual_mask, pixel_values=x, max_new_tokens=5,
                               do_sample=False)
    reference = model.generate(input_ids=kept_ids, attention_mask=kept_mask, pixel_values=x, max_new_tokens=5,
                               do_sample=False)
    assert torch.equal(generated[:, :usual_ids.shape[1]], usual_ids)  # the caller's prompt, as given
    assert torch.equal(generated[:, usual_ids.shape[1]:], reference[:, kept_ids.shape[1]:])
    unpruned = tiny_llava().generate(input_ids=usual_ids, attention_mask=usual_mask, pixel_values=x,
                                     max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        base_logits = tiny_llava()(input_ids=usual_ids, attention_mask=usual_mask, pixel_values=x).logits
    assert unpruned.shape == generated.shape and not torch.allclose(base_logits[:, -1], usual[:, -1], atol=1e-4)


def test_llava_none_equals_the_unpatched_model():
    x = pixels(2)
    ids, mask = prompts(64)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=x)
    with torch.no_grad():
        assert torch.equal(se.apply(tiny_llava(), "none")(**kwargs).logits, tiny_llava()(**kwargs).logits)
    assert torch.equal(se.apply(tiny_llava(), "none").generate(**kwargs, max_new_tokens=4, do_sample=False),
                       tiny_llava().generate(**kwargs, max_new_tokens=4, do_sample=False))


def test_llava_prompt_with_a_wrong_placeholder_count_is_refused():
    model = se.apply(tiny_llava(), "early50")
    ids, mask = prompts(40)
    with pytest.raises(se.InputError, match="80 image placeholders for 2 images: expected 64 per image"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))


def test_unsupported_transformers_model_gets_one_line():
    from transformers import BertConfig, BertModel

    with pytest.raises(se.InputError, match="unsupported model BertModel"):
        se.apply(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64)), "early50")


# --- LLM-side pruning (LLM-only and hybrid) ----------------------------------------------------


def _logits(model, ids, mask, x):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=x).logits


def _generate(model, ids, mask, x, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, pixel_values=x, max_new_tokens=5,
                          return_dict_in_generate=True, **kwargs)


def test_llm_none_and_tower_none_equal_the_unpatched_model():
    x, (ids, mask) = pixels(2), prompts(64)
    model = se.apply(tiny_llava(), "none", llm_schedule="none")
    assert torch.equal(_logits(model, ids, mask, x), _logits(tiny_llava(), ids, mask, x))
    assert torch.equal(_generate(model, ids, mask, x, do_sample=False).sequences,
                       _generate(tiny_llava(), ids, mask, x, do_sample=False).sequences)


@torch.no_grad()
def masked_reference(model, ids, mask, x, drops, tau):
    """LLM-side SAINT restated without removing anything: the unpatched model at full length, each
    layer's attention masked to the tokens still alive, the selection recomputed here from the
    layer's own post-rotary keys (tests/reference_saint.py, static r). Returns (logits at the
    tokens alive at the end [B, T', V], kept original positions per pruning layer)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    image = ids == IMAGE_TOKEN
    batch, length = ids.shape
    alive = torch.ones(batch, length, dtype=torch.bool)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    positions = torch.arange(length)[None]
    features = model.model.get_image_features(pixel_values=x, vision_feature_layer=-2,
                                              vision_feature_select_strategy="default").pooler_output
    h = lm.embed_tokens(ids).masked_scatter(image[..., None], torch.cat(list(features)))
    cos_sin = lm.rotary_emb(h, positions)
    kept = []
    for i, layer in enumerate(lm.layers):
        allowed = causal[None] & alive[:, None, :] & mask.bool()[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding rows attend themselves (unused)
        normed = layer.input_layernorm(h)
        attn = layer.self_attn
        q = attn.q_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        groups = q.shape[1] // k.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=allowed[:, None])
        h = h + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if drops[i]:
            span = (image & alive).nonzero()[:, 1].view(batch, -1)  # alive image tokens, ascending
            keys = k.mean(1).gather(1, span[..., None].expand(-1, -1, k.shape[-1]))
            _, keep = saint_drop_reference(keys.numpy(), 0, tau, drop=drops[i])
            survivors = span.gather(1, torch.from_numpy(np.sort(keep, 1)))
            kept.append(survivors)
            alive &= ~image
            alive.scatter_(1, survivors, True)
            alive |= ~image  # text and padding stay
    logits = model.lm_head(lm.norm(h))
    index = alive.nonzero()[:, 1].view(batch, -1)
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1])), kept


def test_llm_pruning_equals_an_independent_masking_restatement_at_batch_2_left_padded():
    x, (ids, mask) = pixels(2), prompts(64)
    drops = (0, 6, 5, 0)
    model = se.apply(tiny_llava(), "none", llm_schedule="r:" + ",".join(map(str, drops)), llm_tau=0.5)
    model.saint_llm.trace = []
    got = _logits(model, ids, mask, x)
    want, kept = masked_reference(tiny_llava(), ids, mask, x, drops, 0.5)
    assert [t[0] for t in model.saint_llm.trace] == [1, 2]
    for (_, r, positions), survivors in zip(model.saint_llm.trace, kept):
        assert torch.equal(positions, survivors)
    assert got.shape == want.shape == (2, ids.shape[1] - 11, 128)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got[:, -1], _logits(tiny_llava(), ids, mask, x)[:, -1], atol=1e-4)


def test_llm_static_budgets_set_to_the_dynamic_choice_reproduce_it():
    x, (ids, mask) = pixels(2), prompts(64)
    dynamic = se.apply(tiny_llava(), "none", llm_schedule="dynamic@1-2", llm_tau=0.5)
    dynamic.saint_llm.trace = []
    want = _logits(dynamic, ids, mask, x)
    drops = {layer: r for layer, r, _ in dynamic.saint_llm.trace}
    assert sum(drops.values()) > 0, "the test prompt must make the dynamic rule drop tokens"
    static = se.apply(tiny_llava(), "none", llm_schedule=f"r:0,{drops[1]},{drops[2]}", llm_tau=0.5)
    assert torch.equal(_logits(static, ids, mask, x), want)


@pytest.mark.parametrize("tower", ["none", "early50"], ids=["llm-only", "hybrid"])
@pytest.mark.parametrize("batch", [1, 2])
def test_generation_is_deterministic_and_caches_have_the_scheduled_lengths(tower, batch):
    x = pixels(batch)
    model = se.apply(tiny_llava(), tower, llm_schedule="span50@1-2", llm_tau=0.5)
    schedule = model.saint_llm.schedule
    n = schedule.image_tokens
    assert n == (64 if tower == "none" else 32)
    ids, mask = prompts(64)  # the processor's count, also for the pruned tower
    ids, mask = ids[:batch], mask[:batch]
    first = _generate(model, ids, mask, x, do_sample=False)
    second = _generate(model, ids, mask, x, do_sample=False)
    assert torch.equal(first.sequences, second.sequences)
    prompt = ids.shape[1] - (64 - n)  # after the tower's cut
    steps = first.sequences.shape[1] - ids.shape[1] - 1  # the last token is not cached
    counts = schedule.counts()
    expected = [prompt - (n - counts[min(i, 3)]) + steps for i in range(4)]
    assert compat.cached_key_lengths(compat.output_cache(first)) == expected
    assert expected[0] - expected[3] == n - n // 2  # the span was brought to 50%
    torch.manual_seed(3)
    sampled = _generate(model, ids, mask, x, do_sample=True, top_k=5)
    torch.manual_seed(3)
    assert torch.equal(_generate(model, ids, mask, x, do_sample=True, top_k=5).sequences, sampled.sequences)


def test_llm_schedule_grammar_and_table():
    from saint_export.llm import LlmSchedule

    schedule = LlmSchedule.parse("span25@7-16", 32, 576)
    assert schedule.counts()[7] == 576 and schedule.counts()[17] == 144 and sum(schedule.drops) == 432
    assert schedule.pruning_layers == list(range(7, 17))
    table = schedule.table()
    assert "prefill FLOPs ratio" in table and f"{schedule.prefill_flops_ratio():.3f}" in table
    assert LlmSchedule.parse("dynamic", 32, 576).dynamic_layers == (7, 16)
    assert LlmSchedule.parse("r:0,0,10", 32, 576).drops[:4] == (0, 0, 10, 0)
    for bad, message in [("span50@7-40", "layers 7-40 are not within 0-31"), ("r:0,300", "can drop at most"),
                         ("keep half", "expected none, dynamic"), ("span0@1-2", "P must be in")]:
        with pytest.raises(se.InputError, match=message):
            LlmSchedule.parse(bad, 32, 576)


def test_llm_bad_inputs_get_one_clear_error():
    from transformers import CLIPVisionModel

    with pytest.raises(se.InputError, match=r"LLM schedule 'r:40': layer 0 drops 40 but can drop at most ⌈32/2⌉ = 16 \(the A half of its 32 image"):
        se.apply(tiny_llava(), "early50", llm_schedule="r:40")  # 32 image tokens reach the LLM
    with pytest.raises(se.InputError, match=r"an LLM schedule needs a VLM \(LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or "
                                            r"Qwen3-VL\), not CLIPVisionModel"):
        se.apply(make_tower("clip"), "none", llm_schedule="r:1")
    model = se.apply(tiny_llava(), "none", llm_schedule="r:0,4")
    text_only = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(se.InputError, match="this prompt has no image span"):
        with torch.no_grad():
            model(input_ids=text_only)
