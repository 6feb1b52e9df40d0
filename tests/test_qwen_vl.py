"""SAINT in Qwen2.5-VL and Qwen3-VL (ViT-only, LLM-only, hybrid, export) on tiny random configs: batch
2 with two different image sizes, left-padded rows, M-RoPE positions, DeepStack (docs/vlm.md)."""
import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
import tiny_qwen as tq
from reference_saint import saint_drop_reference

import saint_export as se
from saint_export import compat
from saint_export.adapters import qwen_vl

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version(compat.VLM_FAMILIES_MIN),
                                reason=f"the Qwen-VL adapter needs transformers ≥ {compat.VLM_FAMILIES_MIN}")


@pytest.fixture(params=tq.FAMILIES)
def family(request):
    return request.param


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def generate(model, x, steps=4, **kwargs):
    return model.generate(**x, max_new_tokens=steps, return_dict_in_generate=True, **kwargs)


@torch.no_grad()
def masked_reference(family, ids, mask, x, features, kept_groups, drops, tau, steps=0, deepstack=None):
    """Qwen2.5-VL restated without removing anything: the unpatched language model at full length
    with transformers' own (unpruned) M-RoPE positions; every image placeholder gets its feature
    from `features` (per image, in raster order of `kept_groups`, or all of them when None); the
    dropped placeholders are masked out of attention instead of removed; after layer l with
    drops[l] > 0, SAINT (tests/reference_saint.py) picks among each row's alive image tokens on the
    layer's post-rotary keys. Then `steps` greedy tokens, each a fresh full forward, positions
    continuing after each row's largest. Qwen3-VL: `deepstack` (per layer, per image, like
    `features`) is added at every image placeholder after the first decoder layers. Returns (logits
    [B, T, V], alive [B, T], kept original columns per pruning layer, generated [B, steps])."""
    if family == "qwen3-vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    model = tq.build(family)
    lm = model.model.language_model
    grid = x["image_grid_thw"]
    positions, _ = model.model.get_rope_index(ids, x["mm_token_type_ids"], image_grid_thw=grid,
                                              attention_mask=mask)
    image = ids == tq.IMAGE
    alive0 = torch.ones_like(image)
    slot_features = torch.zeros(int(image.sum()), features[0].shape[-1])
    slot_deepstack = [torch.zeros_like(slot_features) for _ in deepstack or ()]
    offset = 0
    for i, (t, h, w) in enumerate(grid.tolist()):
        n = t * h * w // 4
        groups = torch.arange(n) if kept_groups is None else kept_groups[i]
        slot_features[offset + groups] = features[i]
        for layer, slots in zip(deepstack or (), slot_deepstack):
            slots[offset + groups] = layer[i]
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[groups] = False
        alive0.view(-1)[image.view(-1).nonzero()[offset:offset + n, 0][dropped]] = False
        offset += n
    generated = []
    for step in range(steps + 1):
        batch, length = ids.shape
        h = lm.embed_tokens(ids).masked_scatter(image[..., None], slot_features)
        cos, sin = lm.rotary_emb(h, positions)
        alive = alive0.clone()
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        kept = []
        for i, layer in enumerate(lm.layers):
            allowed = causal[None] & alive[:, None, :] & mask.bool()[:, None, :]
            allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding rows attend themselves (unused)
            normed = layer.input_layernorm(h)
            attn = layer.self_attn
            q = attn.q_proj(normed).view(batch, length, -1, attn.head_dim)
            k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim)
            if family == "qwen3-vl":  # per-head RMSNorm of queries and keys, before rotary
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            groups = q.shape[1] // k.shape[1]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=allowed[:, None])
            h = h + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if i < len(slot_deepstack):  # DeepStack: added at every placeholder (masked ones are never read)
                h = h.clone()
                h[image] = h[image] + slot_deepstack[i]
            if drops[i]:
                survivors_per_row = []
                for row in range(batch):
                    span = (image[row] & alive[row]).nonzero()[:, 0]
                    keys = k.mean(1)[row, span].numpy()[None]
                    _, keep = saint_drop_reference(keys, 0, tau, drop=drops[i])
                    survivors = span[torch.from_numpy(np.sort(keep[0]))]
                    alive[row, span] = False
                    alive[row, survivors] = True
                    survivors_per_row.append(survivors)
                kept.append(survivors_per_row)
        out = model.lm_head(lm.norm(h))
        if step == 0:
            first = (out, alive, kept)
        if step < steps:  # greedy: the next token at the position after the row's largest
            token = out[:, -1].argmax(-1)
            generated.append(token)
            ids = torch.cat([ids, token[:, None]], 1)
            image = torch.cat([image, torch.zeros(batch, 1, dtype=torch.bool)], 1)
            alive0 = torch.cat([alive0, torch.ones(batch, 1, dtype=torch.bool)], 1)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
            positions = torch.cat([positions, positions.amax(2, keepdim=True) + 1], 2)
    return (*first, torch.stack(generated, 1) if generated else None)


def valid_columns(got, mask_got, want, alive_want):
    """Each row's logits at its real tokens: the patched model's (left-padded, shorter) against the
    reference's alive columns."""
    for row in range(len(got)):
        yield got[row][mask_got[row].bool()], want[row][alive_want[row]]


# --- both schedules none -------------------------------------------------------------------------

def test_none_equals_the_unpatched_model_in_forward_and_generate(family):
    x = tq.inputs()
    model = se.apply(tq.build(family), "none", llm_schedule="none")
    assert torch.equal(logits(model, x), logits(tq.build(family), x))
    assert torch.equal(generate(model, x, do_sample=False).sequences,
                       generate(tq.build(family), x, do_sample=False).sequences)


def test_the_towers_forward_equals_transformers_when_nothing_is_dropped_and_patches_match_the_processor(family):
    from transformers import Qwen2VLImageProcessor

    model, x = tq.build(family), tq.inputs()
    with torch.no_grad():
        want = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
        start = 0
        for i, grid in enumerate(x["image_grid_thw"].tolist()):
            tokens = grid[0] * grid[1] * grid[2]
            got, raster, deepstack = qwen_vl.pruned_tower(model.model.visual, x["pixel_values"][None, start:start + tokens],
                                                          qwen_vl.Layout.of(model.model.visual, tuple(grid)), {})
            start += tokens
            assert torch.allclose(got[0], want.pooler_output[i], atol=1e-5, rtol=0)
            assert torch.equal(raster[0], torch.arange(len(got[0])))
            expected = [layer[i] for layer in getattr(want, "deepstack_features", None) or []]
            assert len(deepstack) == len(expected) == (2 if family == "qwen3-vl" else 0)
            assert all(torch.allclose(a[0], b, atol=1e-5, rtol=0) for a, b in zip(deepstack, expected))
    image = torch.randn(2, 3, 56, 84)
    processor = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    processed = processor(images=list(image.numpy()), return_tensors="pt", input_data_format="channels_first")
    assert processed["image_grid_thw"].tolist() == [[1, 4, 6]] * 2
    assert torch.equal(qwen_vl.patchify(image, model.config.vision_config).reshape(-1, 1176),
                       processed["pixel_values"])


# --- the tower (ViT-only) --------------------------------------------------------------------------

def tower_reference(family, model, patches, grid, drops, tau):
    """The tower restated without removing anything: transformers' own blocks' parts at full
    length, dropped merge groups masked out of attention (Qwen2.5-VL's windows and frames as
    cu_seqlens says), SAINT (tests/reference_saint.py) on the alive groups' keys averaged over
    heads and patches after each pruning point's attention (Qwen2.5-VL: its full-attention blocks,
    Qwen3-VL: every block). Returns (features, raster indices, DeepStack features) of the alive
    groups in raster order."""
    from transformers.vision_utils import (get_vision_interpolation_indices_and_weights, get_vision_position_ids,
                                           get_vision_window_index)
    if family == "qwen3-vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = model.model.visual
    grid_t = torch.tensor([grid])
    x = visual.patch_embed(patches)
    tokens = len(x)
    if family == "qwen3-vl":
        index, weight = get_vision_interpolation_indices_and_weights(grid_t, visual.num_grid_per_side, "bilinear",
                                                                     True, 2)
        x = x + (visual.pos_embed(index) * weight[:, :, None]).sum(1)
        window_index, window = torch.arange(tokens // 4), torch.zeros(tokens, dtype=torch.long)
        points, deepstack_at = list(range(len(visual.blocks))), list(visual.deepstack_visual_indexes)
    else:
        window_index, cu_windows = get_vision_window_index(grid_t, 2, visual.window_size, visual.patch_size)
        window = torch.zeros(tokens, dtype=torch.long)
        for i, (a, b) in enumerate(zip(cu_windows[:-1].tolist(), cu_windows[1:].tolist())):
            window[a:b] = i
        points, deepstack_at = list(visual.fullatt_block_indexes), []
    x = x.view(-1, 4, x.shape[-1])[window_index].reshape(tokens, -1)
    cos, sin = (f.view(-1, 4, f.shape[-1])[window_index].reshape(tokens, -1)
                for f in visual.rotary_pos_emb(x, get_vision_position_ids(grid_t, 2)))
    alive = torch.ones(tokens // 4, dtype=torch.bool)
    deepstack = []
    for index, block in enumerate(visual.blocks):
        full = index in points
        same = torch.ones(tokens, tokens, dtype=torch.bool) if full else window[:, None] == window[None]
        allowed = same & alive.repeat_interleave(4)[None] | torch.eye(tokens, dtype=torch.bool)
        attn = block.attn
        q, k, v = attn.qkv(block.norm1(x)).reshape(tokens, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        group_keys = k.mean(1).view(-1, 4, k.shape[-1]).mean(1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=allowed)
        x = x + attn.proj(out[0].transpose(0, 1).reshape(tokens, -1))
        if full:
            drop = drops[points.index(index)] if points.index(index) < len(drops) else 0
            if drop:
                span = alive.nonzero()[:, 0]
                _, keep = saint_drop_reference(group_keys[span].detach().numpy()[None], 0, tau, drop=drop)
                alive[:] = False
                alive[span[torch.from_numpy(keep[0])]] = True
        x = x + block.mlp(block.norm2(x))
        if index in deepstack_at:
            deepstack.append(visual.deepstack_merger_list[deepstack_at.index(index)](x))
    raster = window_index[alive]
    order = raster.argsort()
    return visual.merger(x)[alive][order], raster[order], [d[alive][order] for d in deepstack]


@pytest.mark.parametrize("schedule, drops", [("r:6", (6,)), ("r:4,3", (4, 3)), ("r:0,0,4,3", (0, 0, 4, 3))])
def test_the_pruned_tower_equals_a_masking_restatement(family, schedule, drops):
    if len(drops) > 2 and family == "qwen2.5-vl":
        pytest.skip("the tiny Qwen2.5-VL tower has two pruning points (its full-attention blocks 1 and 3)")
    # Qwen3-VL with r:0,0,4,3: groups go after DeepStack took block 1's, which must lose them too.
    x = tq.inputs()
    model = se.apply(tq.build(family), schedule, tau=0.5)
    features, kept, deepstack = qwen_vl.image_features(model, x["pixel_values"], x["image_grid_thw"])
    start = 0
    for i, grid in enumerate(x["image_grid_thw"].tolist()):
        tokens = grid[0] * grid[1] * grid[2]
        with torch.no_grad():
            want, want_kept, want_deepstack = tower_reference(family, tq.build(family),
                                                              x["pixel_values"][start:start + tokens], tuple(grid),
                                                              drops, 0.5)
        start += tokens
        assert torch.equal(kept[i], want_kept)
        assert len(kept[i]) == tokens // 4 - sum(drops)
        assert torch.allclose(features[i], want, atol=1e-5, rtol=0)
        assert len(deepstack) == len(want_deepstack) == (2 if family == "qwen3-vl" else 0)
        assert all(torch.allclose(layer[i], w, atol=1e-5, rtol=0) for layer, w in zip(deepstack, want_deepstack))


def test_tower_static_budgets_set_to_the_dynamic_choice_reproduce_it_per_image(family):
    x = tq.inputs()
    tau = {"qwen2.5-vl": 0.85, "qwen3-vl": 0.92}[family]  # where the tiny towers' dynamic rule drops some groups
    dynamic = se.apply(tq.build(family), "dynamic", tau=tau)
    with se.record_kept(dynamic) as trace:
        features, kept, deepstack = qwen_vl.image_features(dynamic, x["pixel_values"], x["image_grid_thw"])
    points = qwen_vl.describe(dynamic).depth // 2  # dynamic prunes at the first half of the points
    drops = [[k.dropped for k in trace[i * points:(i + 1) * points]] for i in range(2)]
    assert all(0 < sum(d) < 8 for d in drops), drops  # data-dependent: neither nothing nor everything
    start = 0
    for i, (grid, r) in enumerate(zip(x["image_grid_thw"].tolist(), drops)):
        tokens = grid[0] * grid[1] * grid[2]
        alone = (x["pixel_values"][start:start + tokens], torch.tensor([grid]))
        start += tokens
        static = se.apply(tq.build(family), "r:" + ",".join(map(str, r)), tau=tau)
        got, got_kept, got_deepstack = qwen_vl.image_features(static, *alone)
        assert torch.equal(got_kept[0], kept[i]) and torch.equal(got[0], features[i])
        assert all(torch.equal(a[0], b[i]) for a, b in zip(got_deepstack, deepstack))


def test_vit_only_prompts_keep_unpruned_positions_and_equal_a_masking_restatement_in_forward_and_generate(family):
    x = tq.inputs()
    model = se.apply(tq.build(family), "early50")
    features, kept, deepstack = qwen_vl.image_features(model, x["pixel_values"], x["image_grid_thw"])
    assert [len(k) for k in kept] == [8, 8]  # 16 and 15 merged tokens, each brought to round(50%)
    # The positions the language model sees at the survivors are transformers' unpruned ones.
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(positions=kwargs["position_ids"], mask=kwargs["attention_mask"]),
        with_kwargs=True)
    got = logits(model, x)
    unpruned, _ = compat.qwen_rope_index(tq.build(family), x["input_ids"], x["mm_token_type_ids"],
                                         x["image_grid_thw"], x["attention_mask"])
    want, alive, _, _ = masked_reference(family, x["input_ids"], x["attention_mask"], x, features, kept, [0] * 4, 0.5,
                                         deepstack=deepstack)
    for row in range(2):
        valid = seen["mask"][row].bool()
        columns = (alive[row] & x["attention_mask"][row].bool())
        assert torch.equal(seen["positions"][1:, row][:, valid], unpruned[:, row][:, columns])
    pairs = list(valid_columns(got, seen["mask"], want, alive & x["attention_mask"].bool()))
    assert all(a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in pairs)
    # Decoding continues right after each row's unpruned positions.
    *_, want_tokens = masked_reference(family, x["input_ids"], x["attention_mask"], x, features, kept, [0] * 4, 0.5,
                                       steps=4, deepstack=deepstack)
    sequences = generate(model, x, do_sample=False).sequences
    assert torch.equal(sequences[:, :x["input_ids"].shape[1]], x["input_ids"])  # the caller's prompt comes back
    assert torch.equal(sequences[:, x["input_ids"].shape[1]:], want_tokens)


# --- the language model (LLM-only, hybrid) ----------------------------------------------------------

def unpruned_features(family, x):
    with torch.no_grad():
        out = tq.build(family).model.get_image_features(x["pixel_values"], x["image_grid_thw"])
    return out.pooler_output, getattr(out, "deepstack_features", None)


def test_llm_only_equals_a_masking_restatement_with_mrope_positions_and_decodes_after_the_drop(family):
    x = tq.inputs()
    drops = (0, 3, 2, 0)  # Qwen3-VL: after layer 1, DeepStack still adds at layer 1's survivors
    model = se.apply(tq.build(family), "none", llm_schedule="r:" + ",".join(map(str, drops)), llm_tau=0.5)
    model.saint_llm.trace = []
    got = logits(model, x)
    features, deepstack = unpruned_features(family, x)
    want, alive, kept, tokens = masked_reference(family, x["input_ids"], x["attention_mask"], x, features, None, drops,
                                                 0.5, steps=4, deepstack=deepstack)
    # 16 and 15 image tokens: the rows keep different counts, so the trace lists them per row.
    assert [(t[0], t[1]) for t in model.saint_llm.trace] == [(1, [3, 3]), (2, [2, 2])]
    for (_, r, positions), survivors in zip(model.saint_llm.trace, kept):
        assert [len(p) for p in positions] == [len(s) for s in survivors]
        assert all(torch.equal(a, b) for a, b in zip(positions, survivors))  # the kept tokens' original columns
    # Rows keep their padding on the left: each row's last columns are its real tokens.
    for row in range(2):
        real = alive[row] & x["attention_mask"][row].bool()
        assert torch.allclose(got[row, -int(real.sum()):], want[row][real], atol=1e-5, rtol=0)
    assert torch.equal(generate(model, x, do_sample=False).sequences[:, x["input_ids"].shape[1]:], tokens)


def test_hybrid_decodes_like_the_restatement(family):
    x = tq.inputs()
    model = se.apply(tq.build(family), "early50", llm_schedule="r:2", llm_tau=0.5)  # DeepStack after the drop
    features, kept, deepstack = qwen_vl.image_features(model, x["pixel_values"], x["image_grid_thw"])
    *_, tokens = masked_reference(family, x["input_ids"], x["attention_mask"], x, features, kept, (2, 0, 0, 0), 0.5,
                                  steps=4, deepstack=deepstack)
    assert torch.equal(generate(model, x, do_sample=False).sequences[:, x["input_ids"].shape[1]:], tokens)


def test_llm_static_budgets_set_to_the_dynamic_choice_reproduce_it(family):
    x = tq.inputs()
    dynamic = se.apply(tq.build(family), "none", llm_schedule="dynamic@1-2", llm_tau=0.3)
    dynamic.saint_llm.trace = []
    want = logits(dynamic, x)
    chosen = {layer: r[0] for layer, r, _ in dynamic.saint_llm.trace}
    assert 0 < sum(chosen.values()) < 8 + 4, chosen  # data-dependent: neither nothing nor everything
    static = se.apply(tq.build(family), "none", llm_schedule=f"r:0,{chosen[1]},{chosen[2]}", llm_tau=0.3)
    assert torch.equal(logits(static, x), want)


@pytest.mark.parametrize("tower", ["none", "early50"], ids=["llm-only", "hybrid"])
@pytest.mark.parametrize("rows", [1, 2])
def test_generation_is_deterministic_and_caches_have_the_scheduled_lengths(family, tower, rows):
    from saint_export.llm import LlmSchedule

    x = tq.first(tq.inputs(), rows)
    model = se.apply(tq.build(family), tower, llm_schedule="span50@1-2", llm_tau=0.5)
    first = generate(model, x, do_sample=False)
    assert torch.equal(first.sequences, generate(model, x, do_sample=False).sequences)
    full = [16, 15][:rows]
    per_row = full if tower == "none" else [8, 8][:rows]  # image tokens reaching the LLM
    # each row's real tokens (padding columns go): every layer's width is the longest real row
    prompt = [int(m.sum()) - (n - k) for m, n, k in zip(x["attention_mask"], full, per_row)]
    counts = [LlmSchedule.parse("span50@1-2", 4, n).counts() for n in per_row]
    steps = first.sequences.shape[1] - x["input_ids"].shape[1] - 1  # the last token is not cached
    expected = [max(p - (n - c[i]) for p, n, c in zip(prompt, per_row, counts)) + steps for i in range(4)]
    assert compat.cached_key_lengths(compat.output_cache(first)) == expected
    assert [c[3] for c in counts] == [round(n / 2) for n in per_row]
    torch.manual_seed(3)
    sampled = generate(model, x, do_sample=True, top_k=5)
    torch.manual_seed(3)
    assert torch.equal(generate(model, x, do_sample=True, top_k=5).sequences, sampled.sequences)


# --- bad inputs -------------------------------------------------------------------------------------

def test_bad_inputs_get_one_clear_error(family):
    x = tq.inputs()
    model = se.apply(tq.build(family), "r:9")  # fits the nominal 448² image (256 merged tokens), not 8 × 8 patches
    with pytest.raises(se.InputError, match=r"^an image of 1×8×8 patches \(16 merged tokens\): keep schedule 'r:9': "
                                            r"block 0 drops 9 but can drop at most ⌈16/2⌉ = 8"):
        logits(model, x)
    llm = se.apply(tq.build(family), "none", llm_schedule="r:8,4,2,1")  # 16 → 1 image token, but 15 → 0
    with pytest.raises(se.InputError, match=r"^prompt row 1 \(15 image tokens\): LLM schedule 'r:8,4,2,1': layer 3 "
                                            r"would drop all 1 remaining"):
        logits(llm, x)
    text_only = {"input_ids": torch.tensor([[5, 6, 7]])}
    with pytest.raises(se.InputError, match="this prompt has no image span"):
        logits(llm, text_only)
    pruned = se.apply(tq.build(family), "early50")
    short = dict(x, input_ids=x["input_ids"][:, 1:], attention_mask=x["attention_mask"][:, 1:],
                 mm_token_type_ids=x["mm_token_type_ids"][:, 1:])
    short["input_ids"][0, short["input_ids"][0] == tq.IMAGE] = 5
    with pytest.raises(se.InputError, match=r"the prompts hold 15 image placeholders for 2 images: expected 31"):
        logits(pruned, short)
    with pytest.raises(se.InputError, match="do not pass position_ids"):
        logits(pruned, dict(x, position_ids=torch.zeros(3, 2, x["input_ids"].shape[1], dtype=torch.long)))


# --- export ---------------------------------------------------------------------------------------

ONNX_ONLY = dict(target="onnx", batch=(1, 3, 4), parity_images=4)


def test_export_passes_the_gate_at_batch_1_and_3_with_positions_and_the_runtime_refuses_another_grid(family, tmp_path):
    import onnxruntime as ort

    from saint_export import runtime

    model = tq.build(family)
    result = se.export(model, tmp_path / "f", se.ExportConfig(keep_schedule="early50", img_size=112, **ONNX_ONLY))
    parity = result.parity
    assert parity.passed and parity.batch_sizes == [1, 3]
    extra = {"image_positions": {"compared": 8, "equal": 8}}
    if family == "qwen3-vl":
        extra["deepstack_features"] = {"compared": 8, "equal": 8}
    assert parity.extra_outputs == extra
    manifest = se.Manifest.read(tmp_path / "f")
    assert manifest.input.shape == ["batch", 3, 112, 112] and manifest.output.shape == ["batch", 8, 48]
    features = manifest.features
    assert features["image_grid_thw"] == [1, 8, 8] and features["tokens_per_image"] == 8
    records = [{"name": "image_positions", "shape": ["batch", 8, 3], "dtype": "int64"}]
    if family == "qwen3-vl":
        records.append({"name": "deepstack_features", "shape": ["batch", 2, 8, 48], "dtype": "float32"})
    assert features["extra_outputs"] == records
    # The graph equals the eager pruned tower on the processor's patches of the same images.
    images = torch.stack(tq.images([(112, 112)] * 3, seed=4))
    session = ort.InferenceSession(str(tmp_path / "f" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": images.numpy()})
    for b in range(3):
        patches = qwen_vl.patchify(images[b:b + 1], model.config.vision_config)[0]
        want, kept, deepstack = qwen_vl.image_features(model, patches, torch.tensor([[1, 8, 8]]))
        assert np.abs(got[0][b] - want[0].numpy()).max() < 1e-5
        assert torch.equal(torch.from_numpy(got[1][b]), qwen_vl.grid_positions(kept[0], (1, 8, 8)))
        for layer, stack in enumerate(deepstack):
            assert np.abs(got[2][b, layer] - stack[0].numpy()).max() < 1e-5
    with runtime.open(tmp_path / "f", "onnxruntime") as runner:
        assert runner.infer(images.numpy()).shape == (3, 8, 48)
        runner.max_batch = 2  # every output of a split batch comes back whole, in order
        outputs = runner.infer_all(images.numpy())
        assert list(outputs) == ["image_features", *(r["name"] for r in records)]
        for name, want in zip(outputs, got):
            assert np.array_equal(outputs[name], want) if want.dtype == np.int64 else \
                np.abs(outputs[name] - want).max() < 1e-5
        with pytest.raises(se.InputError, match=r"pixel_values must be \[batch, 3, 112, 112\] with batch ≥ 1, got "
                                                r"\[1, 3, 140, 112\]"):
            runner.infer(np.zeros((1, 3, 140, 112), np.float32))


def test_aliases_resolve_offline_and_bad_export_sizes_get_one_line():
    from saint_export.models import architecture

    for alias, repo, width in [("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", 2048),
                               ("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 3584)]:
        arch = architecture(alias)
        assert arch.source_name == repo and arch.adapter is qwen_vl
        assert (arch.info.depth, arch.info.num_patches, arch.info.spans) == (4, 256, (8, 8, 8, 8))
        assert 660e6 < arch.num_params < 680e6  # the tower and its merger (the language model stays on meta)
        schedule = se.resolve_schedule("early50", alias)
        assert schedule.drops == (64, 64, 0, 0) and 0.6 < schedule.flops_ratio() < 0.7
    arch = architecture("qwen3-vl-8b")  # 16-px patches, every one of its 27 blocks a pruning point
    assert arch.source_name == "Qwen/Qwen3-VL-8B-Instruct" and arch.info.num_patches == 14 * 14
    assert arch.info.depth == 27 and arch.info.spans == (1,) * 27 and 570e6 < arch.num_params < 580e6
    assert sum(se.resolve_schedule("early50", "qwen3-vl-8b").drops) == 196 - 98
    with pytest.raises(se.InputError, match=r"^image size 100: Qwen-VL images are multiples of 28 px \(a 2 × 2 group of "
                                            r"14-px patches\)$"):
        architecture("qwen2.5-vl-3b", 100)
    with pytest.raises(se.InputError, match="image size 100: Qwen-VL images are multiples of 28 px"):
        se.export(tq.build(), "/nonexistent/never-written", se.ExportConfig(img_size=100, **ONNX_ONLY))


def test_an_older_transformers_gets_one_line(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.16.0")
    with pytest.raises(se.InputError, match=r"^Qwen2.5-VL needs transformers ≥ 5.24.0, this environment has 5.16.0$"):
        qwen_vl.create("Qwen/Qwen2.5-VL-3B-Instruct", pretrained=False, img_size=None)


def test_cli_exports_a_local_checkpoint_folder_in_hybrid_mode(family, tmp_path, capsys):
    import json

    from conftest import only_error_line, run

    folder = tmp_path / "tiny"
    tq.build(family).save_pretrained(folder)
    code, out, err = run(capsys, str(folder), "--mode", "hybrid", "-s", "early50", "--llm-schedule", "span50@1-2",
                         "--img-size", "112", "-o", str(tmp_path / "out"), "--batch", "1,3,4", "--parity-images", "4",
                         "--target", "onnx")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["weights"]["source"] == "checkpoint folder"
    record = manifest["features"]["llm_schedule"]
    assert record["spec"] == "span50@1-2" and record["image_tokens"] is None  # resolved per prompt row
    assert "image_positions" in out
    code, out, err = run(capsys, str(folder), "-s", "early50", "--img-size", "100", "-o", str(tmp_path / "bad"),
                         "--target", "onnx")
    assert code == 2 and only_error_line(err) == ("saint-export: error: image size 100: Qwen-VL images are multiples "
                                                  "of 28 px (a 2 × 2 group of 14-px patches)")
    assert not (tmp_path / "bad").exists()


# --- several images per row, videos ------------------------------------------------------------------

def images_only(x, rows):
    """`mixed_inputs()` without its video: row 0 (two images) alone."""
    out = {key: x[key][:rows] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    keep = out["attention_mask"].bool().any(0)
    out = {key: value[:, keep] for key, value in out.items()}
    return dict(out, pixel_values=x["pixel_values"][:64 + 60], image_grid_thw=x["image_grid_thw"][:2])


@pytest.mark.parametrize("tower, llm", [("early50", None), ("none", "r:0,4,3"), ("early50", "r:0,4,3")],
                         ids=["vit-only", "llm-only", "hybrid"])
def test_a_row_with_two_images_equals_the_masking_restatement_in_every_mode(family, tower, llm):
    x = images_only(tq.mixed_inputs(family), 1)
    model = se.apply(tq.build(family), tower, llm_schedule=llm, llm_tau=0.5)
    got = logits(model, x)
    if tower == "none":
        features, deepstack = unpruned_features(family, x)
        kept = None
    else:
        features, kept, deepstack = qwen_vl.image_features(model, x["pixel_values"], x["image_grid_thw"])
        assert [len(k) for k in kept] == [8, 8]
    drops = [0, 4, 3, 0] if llm else [0] * 4
    want, alive, _, tokens = masked_reference(family, x["input_ids"], x["attention_mask"], x, features, kept, drops,
                                              0.5, steps=3, deepstack=deepstack)
    real = alive[0] & x["attention_mask"][0].bool()
    assert got.shape[1] == int(real.sum()) and torch.allclose(got[0], want[0][real], atol=1e-5, rtol=0)
    assert torch.equal(generate(model, x, steps=3, do_sample=False).sequences[:, x["input_ids"].shape[1]:], tokens)


def test_videos_run_unpruned_beside_pruned_images_with_their_positions_in_vit_only_mode(family):
    x = tq.mixed_inputs(family)
    model = se.apply(tq.build(family), "early50")
    seen = {}
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    logits(model, x)
    base = tq.build(family)
    unpruned, _ = compat.qwen_rope_index(base, x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"],
                                         x["attention_mask"], video_grid_thw=x["video_grid_thw"])
    with torch.no_grad():
        video_features = torch.cat(base.model.get_video_features(x["pixel_values_videos"], x["video_grid_thw"])
                                   .pooler_output)
    for row, images in enumerate([2, 1]):
        original = x["input_ids"][row][x["attention_mask"][row].bool()]
        fitted = seen["input_ids"][row][seen["attention_mask"][row].bool()]
        assert int((fitted == tq.IMAGE).sum()) == 8 * images  # each image keeps round(50%)
        for kind in ([tq.VIDEO] if row else []) + [5, 6, 7]:  # video placeholders and text all stay, in place
            want = unpruned[:, row][:, x["attention_mask"][row].bool()][:, original == kind]
            got = seen["position_ids"][1:, row][:, seen["attention_mask"][row].bool()][:, fitted == kind]
            assert torch.equal(got, want), kind
    video_columns = (seen["input_ids"] == tq.VIDEO)
    assert torch.allclose(seen["embeds"][video_columns], video_features, atol=1e-6, rtol=0)  # unpruned video
    sequences = generate(model, x, do_sample=False).sequences
    assert torch.equal(sequences, generate(model, x, do_sample=False).sequences)
    assert torch.equal(sequences[:, :x["input_ids"].shape[1]], x["input_ids"])


def test_videos_are_refused_in_one_line_on_the_llm_side(family):
    x = tq.mixed_inputs(family)
    for tower in ("none", "early50"):
        model = se.apply(tq.build(family), tower, llm_schedule="r:0,2", llm_tau=0.5)
        with pytest.raises(se.InputError, match=r"^LLM-side SAINT prunes image tokens only: prompts with videos are "
                                                r"not supported in LLM-only or hybrid mode"):
            logits(model, x)
