"""SAINT in LLaVA-NeXT and LLaVA-OneVision (ViT-only, LLM-only, hybrid, export) on tiny random configs:
two images whose sizes pick 3 and 5 crops, left-padded rows (docs/vlm.md)."""
import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
import tiny_anyres as ta
from reference_saint import saint_drop_reference

import saint_export as se
from saint_export import compat
from saint_export.adapters import llava_anyres

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version(compat.VLM_FAMILIES_MIN),
                                reason=f"the LLaVA-NeXT/OneVision adapter needs transformers ≥ {compat.VLM_FAMILIES_MIN}")


@pytest.fixture(params=ta.FAMILIES)
def family(request):
    return request.param


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def generate(model, x, steps=4, **kwargs):
    return model.generate(**x, max_new_tokens=steps, return_dict_in_generate=True, **kwargs)


def crops_of(x):
    """The real crops of `inputs()`'s two images (3 and 5), concatenated."""
    return torch.cat([x["pixel_values"][0, :3], x["pixel_values"][1]])


def transformers_crop_features(model, crops):
    """Each crop's projected features by transformers' own modules (hidden_states[feature layer],
    the selection strategy, the projector): [crops, tokens, D_llm]."""
    config = model.config
    with torch.no_grad():
        hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        return model.model.multi_modal_projector(hidden[:, 1:] if config.vision_feature_select_strategy == "default"
                                                 else hidden)


# --- both schedules none, and the packing ------------------------------------------------------------

def test_none_equals_the_unpatched_model_in_forward_and_generate(family):
    x = ta.inputs(family)
    model = se.apply(ta.build(family), "none", llm_schedule="none")
    assert torch.equal(logits(model, x), logits(ta.build(family), x))
    assert torch.equal(generate(model, x, do_sample=False).sequences,
                       generate(ta.build(family), x, do_sample=False).sequences)


def test_unpruned_packing_is_transformers_stitched_grid_without_unpadding_or_newlines(family):
    model, x = ta.build(family), ta.inputs(family)
    got = llava_anyres.image_features(model, x["pixel_values"], x["image_sizes"])
    features = transformers_crop_features(model, crops_of(x))
    # transformers' own packing, told that each image is exactly its stitched grid (nothing to
    # unpad), without a newline embedding: the base crop, then the grid in raster order.
    grids = torch.tensor([[32, 64], [64, 64]])
    kwargs = {"image_newline": None}
    if family == "llava-next":
        kwargs["vision_feature_select_strategy"] = "default"
    want, _ = model.model.pack_image_features(list(torch.split(features, [3, 5])), grids, **kwargs)
    assert [len(g) for g in got] == [3 * 64, 5 * 64]
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(got, want))


@torch.no_grad()
def crop_reference(model, crops, drops, tau):
    """The tower restated from its unpatched layers up to the feature layer, SAINT
    (tests/reference_saint.py, static r) after each layer's attention, tracking every token's
    patch index. Returns (features [crops, K, D_llm], patch index of each [crops, K])."""
    config = model.config
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    protected = 1 if config.vision_config.model_type.startswith("clip") else 0
    h = tower.embeddings(crops)
    if hasattr(tower, "pre_layrnorm"):
        h = tower.pre_layrnorm(h)
    index = torch.arange(h.shape[1]).expand(len(h), -1)
    depth = config.vision_feature_layer % (len(tower.encoder.layers) + 1)
    for i, layer in enumerate(tower.encoder.layers[:depth]):
        normed = layer.layer_norm1(h)
        q, k, v = (proj(normed).view(len(h), h.shape[1], 2, -1).transpose(1, 2)
                   for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
        h = h + layer.self_attn.out_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
                                         .reshape(h.shape))
        if i < len(drops) and drops[i]:
            _, keep = saint_drop_reference(k.mean(1).numpy(), protected, tau, drop=drops[i])
            keep = torch.from_numpy(np.sort(keep, 1))
            h, index = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1])), index.gather(1, keep)
        h = h + layer.mlp(layer.layer_norm2(h))
    if config.vision_feature_select_strategy == "default":
        h, index = h[:, 1:], index[:, 1:]
    return model.model.multi_modal_projector(h), index - protected


def test_pruned_crops_equal_a_restatement_and_pack_in_stitched_grid_order(family):
    x = ta.inputs(family)
    model = se.apply(ta.build(family), "r:12,8", tau=0.5)
    got = llava_anyres.image_features(model, x["pixel_values"], x["image_sizes"])
    features, index = crop_reference(ta.build(family), crops_of(x), (12, 8), 0.5)
    assert features.shape[1] == 64 - 20 and [len(g) for g in got] == [3 * 44, 5 * 44]  # r: is fixed per crop
    for image, (first, n, cols) in enumerate([(0, 3, 2), (3, 5, 2)]):
        base, high = features[first], features[first + 1:first + n]
        where = index[first + 1:first + n]
        stitched = [((c // cols) * 8 + p // 8, (c % cols) * 8 + p % 8, c, k)
                    for c in range(n - 1) for k, p in enumerate(where[c].tolist())]
        order = [(c, k) for _, _, c, k in sorted(stitched)]  # raster order of the stitched grid
        want = torch.cat([base, torch.stack([high[c, k] for c, k in order])])
        assert got[image].shape == (n * 44, 48) and torch.allclose(got[image], want, atol=1e-5, rtol=0)


def row_alone(x, row):
    """Row `row` of `inputs()` on its own, without padding."""
    real = x["attention_mask"][row].bool()
    return dict(input_ids=x["input_ids"][row:row + 1, real], attention_mask=x["attention_mask"][row:row + 1, real],
                pixel_values=x["pixel_values"][row:row + 1], image_sizes=x["image_sizes"][row:row + 1])


def kept_count_prompt(x, kept):
    """`inputs()`'s prompts written with `kept[i]` placeholders for image i, left-padded."""
    rows = []
    for row, n in enumerate(kept):
        ids = x["input_ids"][row][x["attention_mask"][row].bool()]
        image = (ids == ta.IMAGE).nonzero()[:, 0]
        rows.append(torch.cat([ids[:image[0]], ids.new_full((n,), ta.IMAGE), ids[image[-1] + 1:]]))
    width = max(map(len, rows))
    ids = torch.stack([torch.cat([r.new_full((width - len(r),), ta.PAD), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    return ids, mask


def test_vit_only_usual_prompts_equal_kept_count_prompts_in_forward_and_generate(family):
    x = ta.inputs(family)
    model = se.apply(ta.build(family), "early50")
    packed = llava_anyres.image_features(model, x["pixel_values"], x["image_sizes"])
    # round(50% of the 166 and 336 tokens the unpruned model feeds the LLM), over 3 and 5 crops
    assert [len(p) for p in packed] == [3 * (83 // 3), 5 * (168 // 5)]
    # The same prompts written with K × crops placeholders per image, the features passed in, to
    # the unpatched model: transformers' own path, nothing cut.
    base = ta.build(family)
    for row in range(2):
        alone = row_alone(x, row)
        ids, mask = kept_count_prompt(alone, [len(packed[row])])
        explicit = dict(input_ids=ids, attention_mask=mask, **compat.image_features_output(packed[row:row + 1]))
        assert torch.allclose(logits(model, alone), logits(base, explicit), atol=1e-5, rtol=0)
    ids, mask = kept_count_prompt(x, [len(p) for p in packed])
    explicit = dict(input_ids=ids, attention_mask=mask, **compat.image_features_output(packed))
    sequences = generate(model, x, do_sample=False).sequences
    assert torch.equal(sequences[:, :x["input_ids"].shape[1]], x["input_ids"])  # the caller's prompt comes back
    assert torch.equal(sequences[:, x["input_ids"].shape[1]:], generate(base, explicit, do_sample=False).sequences[
        :, ids.shape[1]:])


# --- the language model (LLM-only, hybrid) ----------------------------------------------------------

@torch.no_grad()
def masked_reference(family, ids, mask, features, drops, tau, steps=0):
    """The unpatched language model at full length, the image features at every placeholder,
    dropped image tokens masked out of attention instead of removed, SAINT (reference_saint.py,
    static r) per row on each pruning layer's post-rotary keys of its alive image tokens; positions
    as generate gives them (the mask's running count). Then `steps` greedy tokens, each a fresh
    full forward. Returns (logits, alive, kept original columns per layer and row, generated)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = ta.build(family)
    lm = model.model.language_model
    image = ids == ta.IMAGE
    slot_features = torch.cat(list(features))
    generated = []
    for step in range(steps + 1):
        batch, length = ids.shape
        h = lm.embed_tokens(ids).masked_scatter(image[..., None], slot_features)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cos, sin = lm.rotary_emb(h, positions)
        alive = torch.ones_like(image)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        kept = []
        for i, layer in enumerate(lm.layers):
            allowed = causal[None] & alive[:, None, :] & mask.bool()[:, None, :]
            allowed |= torch.eye(length, dtype=torch.bool)[None]
            normed = layer.input_layernorm(h)
            attn = layer.self_attn
            q, k, v = (proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            groups = q.shape[1] // k.shape[1]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=allowed[:, None])
            h = h + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if drops[i]:
                per_row = []
                for row in range(batch):
                    span = (image[row] & alive[row]).nonzero()[:, 0]
                    _, keep = saint_drop_reference(k.mean(1)[row, span].numpy()[None], 0, tau, drop=drops[i])
                    survivors = span[torch.from_numpy(np.sort(keep[0]))]
                    alive[row, span] = False
                    alive[row, survivors] = True
                    per_row.append(survivors)
                kept.append(per_row)
        out = model.lm_head(lm.norm(h))
        if step == 0:
            first = (out, alive, kept)
        if step < steps:
            token = out[:, -1].argmax(-1)
            generated.append(token)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            image = torch.cat([image, torch.zeros_like(image[:, :1])], 1)
    return (*first, torch.stack(generated, 1) if generated else None)


def test_llm_only_equals_a_masking_restatement_and_decodes_after_the_drop(family):
    x = ta.inputs(family)
    drops = (0, 30, 20, 0)
    model = se.apply(ta.build(family), "none", llm_schedule="r:" + ",".join(map(str, drops)), llm_tau=0.5)
    model.saint_llm.trace = []
    got = logits(model, x)
    with torch.no_grad():
        features = ta.build(family).model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
    want, alive, kept, tokens = masked_reference(family, x["input_ids"], x["attention_mask"], features, drops, 0.5,
                                                 steps=4)
    assert [(t[0], t[1]) for t in model.saint_llm.trace] == [(1, [30, 30]), (2, [20, 20])]
    for (_, _, positions), survivors in zip(model.saint_llm.trace, kept):
        assert all(torch.equal(a, b) for a, b in zip(positions, survivors))  # the kept tokens' original columns
    # forward() without position_ids numbers columns 0, 1, …; the restatement numbers real tokens,
    # so compare the row that has no padding, and the other through generate below.
    unpadded = int(x["attention_mask"].all(1).nonzero()[0])
    real = alive[unpadded]
    assert torch.allclose(got[unpadded, -int(real.sum()):], want[unpadded][real], atol=1e-5, rtol=0)
    assert torch.equal(generate(model, x, do_sample=False).sequences[:, x["input_ids"].shape[1]:], tokens)


def test_llm_static_budgets_set_to_the_dynamic_choice_reproduce_it(family):
    # One row: with rows of different image-token counts the batch's one r is capped per row, which
    # no single static schedule restates.
    x = row_alone(ta.inputs(family), 1)
    dynamic = se.apply(ta.build(family), "none", llm_schedule="dynamic@1-2", llm_tau=0.8)
    dynamic.saint_llm.trace = []
    want = logits(dynamic, x)
    chosen = {layer: r for layer, r, _ in dynamic.saint_llm.trace}
    assert 0 < chosen[1] < 168 and chosen[2] < (336 - chosen[1] + 1) // 2, chosen  # neither nothing nor all
    static = se.apply(ta.build(family), "none", llm_schedule=f"r:0,{chosen[1]},{chosen[2]}", llm_tau=0.8)
    assert torch.equal(logits(static, x), want)


def test_dynamic_llm_drops_are_capped_for_rows_with_fewer_image_tokens(family):
    x = ta.inputs(family)
    dynamic = se.apply(ta.build(family), "none", llm_schedule="dynamic@1-1", llm_tau=0.5)
    dynamic.saint_llm.trace = []
    logits(dynamic, x)
    (layer, dropped, kept), = dynamic.saint_llm.trace
    assert dropped[0] == 83 < dropped[1]  # 166 image tokens can lose at most their A half
    assert [len(k) for k in kept] == [166 - 83, 336 - dropped[1]]


@pytest.mark.parametrize("tower", ["none", "early50"], ids=["llm-only", "hybrid"])
@pytest.mark.parametrize("rows", [1, 2])
def test_generation_is_deterministic_and_caches_have_the_scheduled_lengths(family, tower, rows):
    from saint_export.llm import LlmSchedule

    x = ta.inputs(family) if rows == 2 else row_alone(ta.inputs(family), 1)
    model = se.apply(ta.build(family), tower, llm_schedule="span50@1-2", llm_tau=0.5)
    first = generate(model, x, do_sample=False)
    assert torch.equal(first.sequences, generate(model, x, do_sample=False).sequences)
    full = [int(n) for n in (x["input_ids"] == ta.IMAGE).sum(1)]
    per_row = full if tower == "none" else [3 * 27, 5 * 33][2 - rows:]  # image tokens reaching the LLM
    # each row's real tokens (padding columns go): every layer's width is the longest real row
    prompt = [int(m.sum()) - (n - k) for m, n, k in zip(x["attention_mask"], full, per_row)]
    counts = [LlmSchedule.parse("span50@1-2", 4, n).counts() for n in per_row]
    steps = first.sequences.shape[1] - x["input_ids"].shape[1] - 1  # the last token is not cached
    expected = [max(p - (n - c[i]) for p, n, c in zip(prompt, per_row, counts)) + steps for i in range(4)]
    assert compat.cached_key_lengths(compat.output_cache(first)) == expected
    torch.manual_seed(3)
    sampled = generate(model, x, do_sample=True, top_k=5)
    torch.manual_seed(3)
    assert torch.equal(generate(model, x, do_sample=True, top_k=5).sequences, sampled.sequences)


# --- bad inputs -------------------------------------------------------------------------------------

def test_bad_inputs_get_one_clear_error(family):
    x = ta.inputs(family)
    name = {"llava-next": "LLaVA-NeXT", "llava-onevision": "LLaVA-OneVision"}[family]
    with pytest.raises(se.InputError, match=rf"^{name} packs K features per crop: the dynamic keep schedule has no "
                                            "fixed K; use early<P>"):
        se.apply(ta.build(family), "dynamic")
    with pytest.raises(se.InputError, match="keep schedule 'r:40': block 0 drops 40 but can drop at most"):
        se.apply(ta.build(family), "r:40")
    pruned = se.apply(ta.build(family), "early50")
    counts = [int(n) for n in (x["input_ids"] == ta.IMAGE).sum(1)]
    short = dict(x, input_ids=x["input_ids"].clone())
    short["input_ids"][0, (short["input_ids"][0] == ta.IMAGE).nonzero()[0, 0]] = 5  # one placeholder too few
    with pytest.raises(se.InputError, match=rf"the prompts hold {sum(counts) - 1} image placeholders for 2 images: "
                                            rf"expected {sum(counts)}"):
        logits(pruned, short)
    llm = se.apply(ta.build(family), "none", llm_schedule="r:200")  # more than the A half of either row
    with pytest.raises(se.InputError, match=r"^prompt row 0 \(\d+ image tokens\): LLM schedule 'r:200': layer 0 drops"):
        logits(llm, x)
    with pytest.raises(se.InputError, match="this prompt has no image span"):
        logits(llm, {"input_ids": torch.tensor([[5, 6, 7]])})
    with pytest.raises(se.InputError, match="with a pruned tower \\(pass the ForConditionalGeneration model\\)"):
        se.apply(ta.build(family).model, "early50")


# --- export: one crop per batch item ----------------------------------------------------------------

def test_export_passes_the_gate_at_batch_1_and_3_with_patch_positions(family, tmp_path):
    import onnxruntime as ort

    model = ta.build(family)
    # Resolved for a 60 × 60 image (5 crops, 336 tokens unpruned): round(50% · 336) // 5 = 33 per crop.
    config = se.ExportConfig(keep_schedule="early50", target="onnx", batch=(1, 3, 5), parity_images=4, img_size=60)
    result = se.export(model, tmp_path / "f", config)
    assert result.parity.passed and result.parity.batch_sizes == [1, 3]
    assert result.parity.extra_outputs == {"image_positions": {"compared": 8, "equal": 8}}
    features = se.Manifest.read(tmp_path / "f").features
    assert features["tokens_per_crop"] == 33 and features["unpruned_tokens_per_crop"] == 64
    assert features["resolved_for"] == {"image_size": [60, 60], "crops": 5, "unpruned_tokens": 336, "tokens": 165}
    assert features["budget_rule"] == llava_anyres.BUDGET_RULE
    assert features["packing"]["newline"] == "none" and features["packing"]["unpad"] == "not applied"
    assert features["extra_outputs"] == [{"name": "image_positions", "shape": ["batch", 33], "dtype": "int64"}]
    x = ta.inputs(family)
    session = ort.InferenceSession(str(tmp_path / "f" / "model.onnx"), providers=["CPUExecutionProvider"])
    got, positions = session.run(None, {"pixel_values": x["pixel_values"][1].numpy()})  # the 60 × 60 image
    assert positions.shape == (5, 33) and (np.diff(positions, axis=1) > 0).all() and positions.max() < 64
    # The graph's crops packed as the manifest says are what the eager model feeds its LLM.
    packed = llava_anyres.image_features(model, x["pixel_values"], x["image_sizes"])[1]
    handed_off = llava_anyres._pack(model, torch.from_numpy(got), torch.from_numpy(positions), [60, 60], 0)
    assert packed.shape == (165, 48) and torch.allclose(handed_off, packed, atol=1e-5, rtol=0)
    # Triton's production repository serves every output of the folder, the positions too.
    from saint_export import serving
    from saint_export.serving import configs

    repo = serving.write_repository(tmp_path / "f", tmp_path / "repo", check=False).path
    outputs = configs.parse((repo / "saint_onnx" / "config.pbtxt").read_text()).output
    assert [(t.name, list(t.dims), configs._pb().DataType.Name(t.data_type)) for t in outputs] == \
        [("image_features", [33, 48], "TYPE_FP32"), ("image_positions", [33], "TYPE_INT64")]


def test_aliases_resolve_offline():
    from saint_export.models import architecture

    for alias, repo, tokens, params in [
            ("llava-v1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf", 576, (300e6, 330e6)),
            ("llava-v1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", 576, (300e6, 330e6)),
            ("llava-onevision-qwen2-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 729, (395e6, 405e6)),
            ("llava-onevision-qwen2-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", 729, (410e6, 420e6))]:
        arch = architecture(alias)
        assert arch.source_name == repo and arch.adapter is llava_anyres
        assert arch.info.num_patches == tokens  # features per crop
        assert params[0] < arch.num_params < params[1], arch.num_params
    # early50 of a square image of one crop's size, and of a 1920 × 1920 photo (crops, unpruned count):
    # NeXT 336 px: 3 crops, 1176 → 588 // 3 = 196 per crop; 1920 px: 5 crops, 2928 → 1464 // 5 = 292.
    # OneVision 384 px: 2 crops, 1485 → 742 // 2 = 371; 1920 px: 26 crops, 7209 → 3604 // 26 = 138.
    for alias, size, kept in [("llava-v1.6-mistral-7b", None, 196), ("llava-v1.6-mistral-7b", 1920, 292),
                              ("llava-onevision-qwen2-0.5b", None, 371), ("llava-onevision-qwen2-0.5b", 1920, 138)]:
        schedule = se.resolve_schedule("early50", alias, size)
        assert schedule.num_patches - sum(schedule.drops) == kept, (alias, size)
