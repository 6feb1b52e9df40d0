"""Every static schedule form: one exported file, ONNX Runtime vs eager at batch 1 and 3."""
import json

import onnx
import pytest
import torch
from conftest import make_model

import saint_export as se
from saint_export import spec
from saint_export.onnx_export import export_onnx
from saint_export.onnx_graph import saint_nodes
from saint_export.validate import check_onnx_parity

FORMS = ["none", "early50", "early40@2", "r:30,10,0,5", "calib"]


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])
@pytest.mark.parametrize("form", FORMS)
def test_onnx_runtime_matches_eager(tmp_path, images160, name, form):
    if form == "calib":
        (tmp_path / "c.json").write_text(json.dumps({"drops": [12, 9, 7], "depth": 6 if name == "test_vit" else 8,
                                                     "num_patches": 100}))
        form = f"calib:{tmp_path / 'c.json'}"
    model = se.apply(make_model(name), form, tau=0.5)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, (3, 160, 160))
    report = check_onnx_parity(model, path, images160, batch_sizes=(1, 3))
    assert report.passed, report.table()
    assert report.image_runs == 2 * len(images160)
    assert report.logits.top1_agreement == 1.0 and report.logits.images == report.image_runs
    assert report.logits.max_abs_diff <= report.logits.tolerance
    pruning = model.saint.schedule.pruning_blocks
    assert list(report.blocks) == pruning
    # these inputs give no numerical near-tie: every block agrees exactly, in order, on every run
    assert report.near_ties == [], report.table()
    for stats in report.blocks.values():
        assert stats["set_equal"] == stats["order_equal"] == stats["votes_equal"] == stats["compared"] == report.image_runs


def test_exported_graph_carries_the_operator(tmp_path):
    model = se.apply(make_model("test_vit"), "early50", tau=0.6, K=3, gamma=7.5)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, (3, 160, 160))
    graph = onnx.load(str(path))
    nodes = saint_nodes(graph)
    assert len(nodes) == 3
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["drop"] == 17 and attrs["num_protected"] == 1 and attrs["vote_k"] == 3
    assert attrs["tau"] == pytest.approx(0.6) and attrs["gamma"] == pytest.approx(7.5)
    assert attrs["plugin_namespace"] == b"saint" and attrs["plugin_version"] == b"2"
    assert set(attrs) == {a.name for a in spec.ATTRIBUTES} | set(spec.PLUGIN_ATTRIBUTES)
    assert [(f.domain, f.name) for f in graph.functions] == [(spec.DOMAIN, spec.OP_TYPE)]
    assert {o.domain: o.version for o in graph.opset_import}[""] >= 18
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param  # dynamic batch axis
    assert not any(n.op_type == "TopK" for n in graph.graph.node)  # selection only inside the operator


def test_dynamic_schedule_refuses_export(tmp_path):
    model = se.apply(make_model("test_vit"), "dynamic")
    with pytest.raises(se.SaintError, match="cannot be exported.*early"):
        export_onnx(model, tmp_path / "m.onnx", (3, 160, 160))
    assert not (tmp_path / "m.onnx").exists()


def test_gate_detects_a_wrong_graph(tmp_path, images160):
    """A graph whose operator drops different tokens must fail the gate."""
    model = se.apply(make_model("test_vit"), "early50", tau=0.5)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, (3, 160, 160))
    graph = onnx.load(str(path))
    for attr in saint_nodes(graph)[1].attribute:
        if attr.name == "tau":
            attr.f = 0.9  # the ONNX side now votes with another threshold
    onnx.save(graph, str(path))
    report = check_onnx_parity(model, path, images160, batch_sizes=(3,))
    assert not report.passed
    assert any(f.startswith("block 1: kept tokens (set or order) differ") for f in report.failures)


def test_patching_twice_and_unsupported_models_are_refused():
    model = se.apply(make_model("test_vit"), "none")
    with pytest.raises(se.SaintError, match="already has SAINT applied"):
        se.apply(model, "early50")
    with pytest.raises(se.SaintError, match="unsupported model Linear"):
        se.apply(torch.nn.Linear(2, 2), "early50")
    with pytest.raises(se.SaintError, match="tau must be"):
        se.apply(make_model("test_vit"), "early50", tau=3.0)


def test_none_is_identical_and_wrong_token_count_is_refused():
    base = make_model("test_vit")
    x = torch.randn(2, 3, 160, 160)
    reference = base(x)
    assert torch.equal(se.apply(base, "none")(x), reference)
    pruned = se.apply(make_model("test_vit"), "early50")
    with pytest.raises(se.SaintError, match="block 0 expected 101 tokens but got 145"):
        pruned(torch.randn(1, 3, 192, 192))


def test_near_tie_classifier():
    from saint_export.validate import near_tie_gap

    model = se.apply(make_model("test_vit"), "r:3")
    torch.manual_seed(0)
    keys = torch.randn(101, 8)
    keys[3] = keys[1]  # tokens 1 and 3 are A tokens 0 and 1, with identical keys: an exact tie
    keep, _ = torch.ops.saint.similarity_topk(keys[None], 1, 3, 0.75, 5, 10.0)
    keep = keep[0].numpy()
    i, j = list(keep).index(1), list(keep).index(3)  # both kept, tied, lower index first
    assert i == j - 1
    swapped = keep.copy()
    swapped[[i, j]] = swapped[[j, i]]
    assert near_tie_gap(model.saint, keys, keep, swapped) == 0.0
    far = keep.copy()
    far[[1, 2]] = far[[2, 1]]  # two differently scored kept tokens
    assert near_tie_gap(model.saint, keys, keep, far) > 1e-3
    b_swap = keep.copy()
    b_swap[[-1, -2]] = b_swap[[-2, -1]]  # B tokens never reorder: not a ranking question
    assert near_tie_gap(model.saint, keys, keep, b_swap) is None


@pytest.mark.parametrize("opset", [20, 23])
def test_newer_opsets(tmp_path, images160, opset):
    model = se.apply(make_model("test_vit"), "early50", tau=0.5)
    export_onnx(model, tmp_path / "m.onnx", (3, 160, 160), opset=opset)
    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert {o.domain: o.version for o in graph.opset_import}[""] == opset
    assert check_onnx_parity(model, tmp_path / "m.onnx", images160[:6], (3,)).passed


def test_preparsed_schedule_takes_the_models_protected_tokens():
    """A KeepSchedule parsed without model details (num_protected defaults to 1) applied to a model
    with CLS + distillation token must select with 2 protected tokens."""
    model = make_model("deit_tiny_distilled_patch16_224", img_size=160, depth=4)
    schedule = se.KeepSchedule.parse("r:10", depth=4, num_patches=100)
    se.apply(model, schedule)
    assert model.saint.schedule.num_protected == 2
    with torch.no_grad(), se.record_kept(model) as trace:
        model(torch.randn(1, 3, 160, 160))
    keep = trace[0].keep_index[0]
    assert keep[:2].tolist() == [0, 1] and (keep[2:42] % 2 == 0).all()  # A tokens of patches start at 2
