"""fp16 / bf16: written into the graph (block Linears low precision; LayerNorm, softmax, scoring fp32)."""
import collections

import onnx
import pytest
import torch
from conftest import make_model, only_error_line, run

import saint_export as se
from saint_export.onnx_export import export_onnx
from saint_export.onnx_graph import saint_nodes
from saint_export.precision import LowPrecisionLinear, apply_precision
from saint_export.validate import NEAR_TIE, check_onnx_parity


def _op_dtypes(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    return collections.Counter((n.op_type, onnx.TensorProto.DataType.Name(types.get(n.input[0], 0)))
                               for n in graph.node if n.op_type in ("MatMul", "LayerNormalization", "Softmax"))


@pytest.mark.parametrize("precision,onnx_type", [("fp16", "FLOAT16"), ("bf16", "BFLOAT16")])
def test_graph_states_the_precision(tmp_path, precision, onnx_type):
    model = apply_precision(se.apply(make_model("test_vit"), "early50"), precision)
    linears = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is LowPrecisionLinear for m in linears)
    assert model.norm.weight.dtype == torch.float32 and model.head.weight.dtype == torch.float32
    export_onnx(model, tmp_path / "m.onnx", (3, 160, 160))
    ops = _op_dtypes(tmp_path / "m.onnx")
    depth = len(model.blocks)
    assert ops[("MatMul", onnx_type)] == 4 * depth  # qkv, proj, fc1, fc2 per block
    assert ops[("MatMul", "FLOAT")] == 2 * depth  # attention QKᵀ and AV stay fp32
    assert ops[("Softmax", "FLOAT")] == depth and ops[("LayerNormalization", "FLOAT")] == 2 * depth + 1
    assert not [k for k in ops if k[0] in ("Softmax", "LayerNormalization") and k[1] != "FLOAT"]


def test_fp16_parity_gate(tmp_path, images160):
    model = apply_precision(se.apply(make_model("test_vit"), "early50", tau=0.5), "fp16")
    export_onnx(model, tmp_path / "m.onnx", (3, 160, 160))
    report = check_onnx_parity(model, tmp_path / "m.onnx", images160, (1, 3), precision="fp16")
    assert report.passed, report.table()
    assert report.logits.min_cosine >= 0.999 and report.logits.top1_agreement == 1.0
    # where a block's selection differs, eager scores the swapped tokens within fp16 noise
    assert all(gap <= NEAR_TIE["fp16"] for *_, gap in report.near_ties)
    compared = sum(s["compared"] for s in report.blocks.values())
    exact = sum(s["order_equal"] for s in report.blocks.values())
    assert exact + len(report.near_ties) == compared
    assert exact >= 0.6 * compared, report.table()  # teacher-forced, most block selections agree exactly


def test_fp16_gate_is_not_the_fp32_gate(tmp_path, images160):
    """The same fp16 graph judged by the fp32 gate fails: the gates are really different."""
    model = apply_precision(se.apply(make_model("test_vit"), "early50", tau=0.5), "fp16")
    export_onnx(model, tmp_path / "m.onnx", (3, 160, 160))
    assert not check_onnx_parity(model, tmp_path / "m.onnx", images160, (3,), precision="fp32").passed


def _onnxruntime_runs_bf16_matmul(tmp_path) -> bool:
    """Whether this ONNX Runtime has a bf16 MatMul kernel (CPU builds have had none so far)."""
    from onnx import TensorProto, helper

    from saint_export.errors import BackendError
    from saint_export.runtime.runners import ort_session

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, [2, 2])])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "bf16.onnx")
    try:
        ort_session(tmp_path / "bf16.onnx")
        return True
    except BackendError:
        return False


def test_bf16_gate_runs_where_onnxruntime_can(tmp_path, capsys):
    """Where ONNX Runtime lacks bf16 kernels, the gate says so in one line and writes nothing;
    where it has them, the gate runs. Either way --no-verify exports an unverified folder."""
    (tmp_path / "probe").mkdir()
    has_bf16 = _onnxruntime_runs_bf16_matmul(tmp_path / "probe")
    code, _, err = run(capsys, "test_vit", "--weights", "random", "--precision", "bf16", "--target", "onnx",
                       "-o", str(tmp_path / "o"), "--parity-images", "2")
    if has_bf16:
        assert code == 0, err  # the gate ran and passed
    else:
        assert code == 2
        assert "has no kernel for part of this bf16 graph" in only_error_line(err)
        assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "test_vit", "--weights", "random", "--precision", "bf16", "--target", "onnx",
                       "-o", str(tmp_path / "u"), "--no-verify")
    assert code == 0, err


def test_fp16_gate_still_catches_a_wrong_graph(tmp_path, images160):
    """The fp16 near-tie allowance is float noise, not a blanket excuse: another τ in one block fails."""
    model = apply_precision(se.apply(make_model("test_vit"), "early50", tau=0.5), "fp16")
    export_onnx(model, tmp_path / "m.onnx", (3, 160, 160))
    graph = onnx.load(str(tmp_path / "m.onnx"))
    for attr in saint_nodes(graph)[0].attribute:
        if attr.name == "tau":
            attr.f = 0.3
    onnx.save(graph, str(tmp_path / "m.onnx"))
    report = check_onnx_parity(model, tmp_path / "m.onnx", images160, (3,), precision="fp16")
    assert any(f.startswith("block 0: kept tokens") for f in report.failures), report.table()
