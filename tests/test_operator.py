"""saint::SimilarityTopK: eager semantics, and the ONNX function against eager on the same keys."""
import numpy as np
import onnx
import pytest
import torch

from saint_export import core, ops, spec
from saint_export.runtime.runners import ort_session


def _operator_model(num_tokens, num_protected, drop, tau, vote_k, gamma, path):
    """A one-node ONNX model: keys → saint::SimilarityTopK, plus the model-local function."""
    node = onnx.helper.make_node(spec.OP_TYPE, ["keys"], ["keep_index", "vote_rows"], domain=spec.DOMAIN,
                                 num_protected=num_protected, drop=drop, tau=tau, vote_k=vote_k, gamma=gamma,
                                 **spec.PLUGIN_ATTRIBUTES)
    graph = onnx.helper.make_graph(
        [node], "op", [onnx.helper.make_tensor_value_info("keys", onnx.TensorProto.FLOAT, ["B", num_tokens, "d"])],
        [onnx.helper.make_tensor_value_info("keep_index", onnx.TensorProto.INT64, ["B", num_tokens - drop]),
         onnx.helper.make_tensor_value_info("vote_rows", onnx.TensorProto.INT64, ["B"])])
    model = onnx.helper.make_model(graph, functions=[ops.function_proto()], ir_version=10,
                                   opset_imports=[onnx.helper.make_opsetid("", 18),
                                                  onnx.helper.make_opsetid(spec.DOMAIN, spec.DOMAIN_VERSION)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return ort_session(path)


def _keys(rng, batch, n, d, ties):
    keys = rng.standard_normal((batch, n, d)).astype(np.float32)
    if ties:  # few distinct rows: many exactly identical tokens and exact score ties
        keys = rng.integers(-1, 2, (batch, n, d)).astype(np.float32)
        keys[:, 1::3] = keys[:, 1:2]
    return keys


@pytest.mark.parametrize("num_tokens,num_protected", [(7, 1), (12, 0), (31, 1), (101, 5), (197, 1), (258, 2)])
def test_onnx_function_matches_eager(tmp_path, num_tokens, num_protected):
    rng = np.random.default_rng(num_tokens)
    n_a = (num_tokens - num_protected + 1) // 2
    for drop, tau, vote_k in [(0, 0.75, 5), (n_a // 3, 0.5, 2), (n_a - 1, 0.2, 1)]:
        session = _operator_model(num_tokens, num_protected, drop, tau, vote_k, 10.0,
                                  str(tmp_path / f"op{drop}.onnx"))
        for trial in range(12):
            keys = _keys(rng, int(rng.integers(1, 6)), num_tokens, 16, ties=trial % 2 == 1)
            keep, votes = core.similarity_topk(torch.from_numpy(keys), num_protected, drop, tau, vote_k, 10.0)
            onnx_keep, onnx_votes = session.run(None, {"keys": keys})
            assert (onnx_keep == keep.numpy()).all(), f"drop={drop} trial={trial}"
            assert (onnx_votes == votes.numpy()).all()


def test_output_order_and_shapes():
    torch.manual_seed(0)
    keys = torch.randn(3, 21, 8)
    keep, votes = core.similarity_topk(keys, 1, 4, 0.0, 2, 10.0)
    assert keep.shape == (3, 17) and keep.dtype == torch.int64 and votes.shape == (3,)
    score, _ = core.redundancy_scores(keys, 1, 0.0, 2, 10.0)
    for b in range(3):
        assert keep[b, 0] == 0
        kept_a = (keep[b, 1:7] - 1) // 2
        assert (score[b, kept_a][:-1] >= score[b, kept_a][1:]).all()  # descending score
        dropped = sorted(set(range(10)) - set(kept_a.tolist()))
        assert score[b, dropped].min() >= score[b, kept_a].max()
        assert keep[b, 7:].tolist() == list(range(2, 21, 2))  # every B token, in order


def test_all_tied_drops_lowest_indices():
    keys = torch.ones(1, 11, 4)
    keep, votes = core.similarity_topk(keys, 1, 2, 0.75, 5, 10.0)
    assert keep[0].tolist() == [0, 5, 7, 9, 2, 4, 6, 8, 10]
    assert votes.tolist() == [5]


def test_score_formula_by_hand():
    # one protected token, A = rows 1 and 3, B = rows 2 and 4
    keys = torch.tensor([[[9.0, 9], [1, 0], [1, 0], [0, 1], [1, 0.1]]])
    score, votes = core.redundancy_scores(keys, 1, tau=0.9, vote_k=2, gamma=10.0)
    s_a0 = [1.0, 1 / np.hypot(1, 0.1)]
    expected_a0 = 2 * np.exp(10 * (np.mean(s_a0) - np.float32(0.9)))
    expected_a1 = np.mean([0.0, 0.1 / np.hypot(1, 0.1)])  # no edge: mean similarity
    assert score[0].tolist() == pytest.approx([expected_a0, expected_a1], rel=1e-6)
    assert votes.tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keys_score_in_fp32(dtype):
    torch.manual_seed(1)
    keys = torch.randn(2, 41, 16).to(dtype)
    keep, votes = core.similarity_topk(keys, 1, 7, 0.1, 3, 10.0)
    ref_keep, ref_votes = core.similarity_topk(keys.float(), 1, 7, 0.1, 3, 10.0)
    assert torch.equal(keep, ref_keep) and torch.equal(votes, ref_votes)


def test_custom_op_and_fake_shapes():
    keys = torch.randn(2, 9, 4)
    keep, votes = torch.ops.saint.similarity_topk(keys, 1, 3, 0.75, 5, 10.0)
    assert torch.equal(keep, core.similarity_topk(keys, 1, 3)[0])
    torch.library.opcheck(torch.ops.saint.similarity_topk.default, (keys, 1, 3, 0.75, 5, 10.0))


def test_function_tensor_names_survive_inlining():
    """TensorRT inlines the function once per block; a placeholder name such as '_' then collides
    ("duplicate tensor name" in the builder). Every value the body defines gets a real name."""
    names = [out for node in ops.function_proto().node for out in node.output]
    assert "_" not in names and "" not in names
    assert len(names) == len(set(names))


def test_every_backend_decides_alike_on_orthogonal_and_non_finite_keys(tmp_path):
    """The contract of docs/operator.md on the keys that broke the old one: exactly orthogonal keys
    (cosine 0, fp64 noise ~1e-17 before the grid), and NaN, ±Inf and denormal keys. Eager, ONNX
    Runtime and the ONNX reference evaluator give the same selection, and it is a valid one."""
    from onnx.reference import ReferenceEvaluator

    inf, nan = float("inf"), float("nan")
    cases = [  # (keys, num_protected, drop, tau, vote_k, expected keep_index or None, expected vote_rows)
        ([[2, -3, -3], [3, 2, 0]], 0, 0, 0.0, 1, [[0, 1]], [1]),  # cosine 0 ≥ τ = 0: a vote
        ([[2, -3, -3], [3, 2, 0], [0, 0, 1]], 0, 1, 0.75, 5, [[2, 1]], [0]),  # a tie at 0: the lower index drops
        ([[1, 0], [nan, 1], [1, 0], [1, 0], [inf, 0]], 0, 2, 0.5, 1, [[4, 1, 3]], [2]),  # NaN/Inf: similar to nothing
        ([[1e-40, 0], [1e-40, 0], [0, 1e-40], [1, 1]], 0, 1, 0.0, 1, None, None),  # denormals: norms under 1e-12
    ]
    for number, (rows, protected, drop, tau, vote_k, expected_keep, expected_votes) in enumerate(cases):
        keys = np.array([rows], dtype=np.float32)
        path = str(tmp_path / f"case{number}.onnx")
        session = _operator_model(keys.shape[1], protected, drop, tau, vote_k, 10.0, path)
        keep, votes = core.similarity_topk(torch.from_numpy(keys), protected, drop, tau, vote_k, 10.0)
        if expected_keep is not None:
            assert keep.tolist() == expected_keep and votes.tolist() == expected_votes, f"case {number}"
        assert sorted(keep[0].tolist()) == sorted(set(keep[0].tolist())) and int(keep.max()) < keys.shape[1]
        for name, outputs in (("onnxruntime", session.run(None, {"keys": keys})),
                              ("reference evaluator", ReferenceEvaluator(path).run(None, {"keys": keys}))):
            assert outputs[0].tolist() == keep.tolist() and outputs[1].tolist() == votes.tolist(), f"{name}, case {number}"
