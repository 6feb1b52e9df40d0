"""`dynamic` against the independent re-statement; `r:` set to dynamic's r reproduces dynamic."""
import pytest
import torch
from conftest import make_model
from reference_saint import reference_forward

import saint_export as se

VARIANTS = [
    ("test_vit", {}),                                    # CLS token
    ("test_vit2", {}),                                   # registers only, layer scale, avg pool
    ("test_vit3", {}),                                   # map pooling
    ("test_vit", {"reg_tokens": 3, "qk_norm": True}),    # CLS + registers, q/k norm
    ("deit_tiny_distilled_patch16_224", {"img_size": 160, "depth": 4}),  # CLS + distillation token
]


def _dynamic_trace(model, x, **hp):
    with torch.no_grad(), se.record_kept(model) as trace:
        logits = model(x)
    return logits, [(kept.block, None if kept.keep_index is None else kept.keep_index.numpy()) for kept in trace]


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=[f"{n}{'+' + ','.join(k) if k else ''}" for n, k in VARIANTS])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("tau", [0.75, 0.3])
def test_dynamic_matches_independent_reference(name, kwargs, batch, tau, images160):
    model = se.apply(make_model(name, **kwargs), "dynamic", tau=tau)
    x = images160[:batch] if batch > 1 else images160[6:7]
    logits, trace = _dynamic_trace(model, x)
    ref_logits, ref_trace = reference_forward(model, x, tau=tau)
    assert [b for b, _ in trace] == [b for b, _ in ref_trace]
    dropped_any = False
    for (block, keep), (_, ref_keep) in zip(trace, ref_trace):
        assert (keep is None) == (ref_keep is None), f"block {block}: one side dropped nothing"
        if keep is not None:
            dropped_any = True
            assert (keep == ref_keep).all(), f"block {block}: kept tokens or their order differ"
    assert dropped_any, "the test inputs must make the dynamic method drop tokens"
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)


def test_exact_ties_follow_lower_index_first():
    """Without position embeddings a flat image gives identical patch tokens: every score ties."""
    model = make_model("test_vit")
    with torch.no_grad():
        model.pos_embed.zero_()
    se.apply(model, "dynamic", tau=0.5)
    x = torch.full((2, 3, 160, 160), 0.3)
    logits, trace = _dynamic_trace(model, x)
    ref_logits, ref_trace = reference_forward(model, x, tau=0.5)
    block, keep = trace[0]
    r = 101 - keep.shape[1]
    assert r > 0
    # all A tokens tie, so the lowest-index A tokens are dropped and the rest keep index order
    n_a = 50
    expected_a = 1 + 2 * torch.arange(r, n_a)
    assert (keep[:, 1:1 + n_a - r] == expected_a.numpy()).all()
    assert (keep == ref_trace[0][1]).all()
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])
def test_static_r_set_to_dynamic_choice_reproduces_dynamic(name, images160):
    base = make_model(name)
    dynamic = se.apply(make_model(name), "dynamic", tau=0.5)
    checked = 0
    for i in range(len(images160)):
        x = images160[i:i + 1]
        logits, trace = _dynamic_trace(dynamic, x)
        tokens, drops = 101, []
        for _, keep in trace:
            drops.append(0 if keep is None else tokens - keep.shape[1])
            tokens -= drops[-1]
        if not any(drops):
            continue
        static = make_model(name)
        static.load_state_dict(base.state_dict())
        se.apply(static, "r:" + ",".join(map(str, drops)), tau=0.5)
        static_logits, static_trace = _dynamic_trace(static, x)
        expected = [(b, keep) for b, keep in trace if keep is not None]
        assert [b for b, _ in static_trace] == [b for b, _ in expected]
        for (_, keep), (_, ref) in zip(static_trace, expected):
            assert (keep == ref).all()
        assert torch.equal(static_logits, logits)
        checked += 1
    assert checked >= 4
