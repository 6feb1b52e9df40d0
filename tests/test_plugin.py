"""The SimilarityTopK TensorRT plugin library: built here with nvcc/g++ against TensorRT headers
(never committed), loaded like TensorRT loads it, and checked against what the exporter writes."""
import json
import shutil
import subprocess

import onnx
import pytest
from conftest import make_model

import saint_export as se
from saint_export import spec
from saint_export.onnx_export import export_onnx
from saint_export.onnx_graph import saint_nodes

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                                reason="building the plugin needs the CUDA toolkit (nvcc) and CMake")


@pytest.fixture(scope="module")
def library():
    from saint_export.trt import plugin

    return plugin.build()


def test_exports_only_the_dynamic_loading_entry_points(library):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert {"getCreators", "setLoggerFinder"} <= set(symbols)
    assert not [s for s in symbols if "SimilarityTopK" in s]  # everything else stays hidden
    static = library.with_name("libsaint_similarity_topk_static.so")
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(static)], capture_output=True, text=True,
                               check=True).stdout
    assert "getPluginRegistry" in undefined  # the static registrar, resolved by libnvinfer at load time


def test_creator_matches_the_exported_node(library, tmp_path):
    probe = library.with_name("plugin_probe")
    report = json.loads(subprocess.run([str(probe), str(library)], capture_output=True, text=True,
                                       check=True).stdout)
    assert report["creators"] == 1 and report["interface"] == "PLUGIN CREATOR_V3ONE"
    assert (report["name"], report["version"], report["namespace"]) == (spec.OP_TYPE, spec.PLUGIN_VERSION,
                                                                         spec.DOMAIN)
    # the creator's fields are the contract's attributes, with the contract's types, all required
    plugin_types = {"int": "int32", "float": "float32"}
    assert report["fields"] == {a.name: plugin_types[a.type] for a in spec.ATTRIBUTES}
    assert report["rejects_missing"] == {a.name: True for a in spec.ATTRIBUTES}
    assert report["topk_limit"] == spec.TOPK_LIMIT

    model = se.apply(make_model("test_vit"), "early50")
    export_onnx(model, tmp_path / "m.onnx", (3, 160, 160))
    node = saint_nodes(onnx.load(str(tmp_path / "m.onnx")))[0]
    attrs = {a.name: a.type for a in node.attribute}
    onnx_types = {onnx.AttributeProto.INT: "int32", onnx.AttributeProto.FLOAT: "float32"}  # parser narrows INT
    assert report["fields"] == {name: onnx_types[attrs[name]] for name in report["fields"]}
    assert set(attrs) - set(report["fields"]) == set(spec.PLUGIN_ATTRIBUTES)
    assert (node.op_type, node.domain) == (report["name"], report["namespace"])

    assert report["created"] and report["rejects_vote_k_0"]
    assert report["serialized"] == {"num_protected": 1, "drop": 17, "tau": pytest.approx(0.6), "vote_k": 3,
                                    "gamma": pytest.approx(7.5)}
    assert report["output_types_int64"] and report["outputs"] == 2
    assert report["formats"] == {"float32": True, "float16": True, "bfloat16": True, "int8": False, "int32": False}
    assert report["int32_keep_index_rejected"]
    assert report["configure_ok"] and report["configure_rejects_impossible_drop"]
    # a dynamic N: the profile's largest N against the TopK limit at build time, each N at run time
    assert report["configure_dynamic_ok"] and report["configure_rejects_dynamic_past_limit"]
    assert report["shape_change_ok"] and report["shape_change_rejects_impossible_drop"]
    assert report["enqueue_rejects_impossible_drop"] and report["rejects_nan_tau"]
    assert report["workspace_bytes"] == 2 * 197 * 8


def test_build_is_cached(library):
    from saint_export.trt import plugin

    before = library.stat().st_mtime_ns
    assert plugin.build() == library and library.stat().st_mtime_ns == before

