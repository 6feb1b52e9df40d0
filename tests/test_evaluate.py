"""saint_export.evaluate / evaluate_folder and `saint-export eval` on a small labelled ImageFolder tree."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import only_error_line, run

import saint_export as se
from saint_export import models
from saint_export.images import load_images
from saint_export.parity import cosine

SYNSETS = ["n01440764", "n01443537"]  # ImageNet-1k classes 0 (tench) and 1 (goldfish)
KEYS = ["schedule", "images", "top1_accuracy", "top1_agreement", "logit_cosine", "flops_ratio",
        "images_per_second", "backend", "precision"]


@pytest.fixture(scope="module")
def tree(photo_folder, tmp_path_factory):
    """An ImageFolder tree with synset class folders, two photographs each, and one unreadable file."""
    root = tmp_path_factory.mktemp("tree")
    photos = sorted(p for p in photo_folder.iterdir() if p.name != "notes.jpg")
    for i, photo in enumerate(photos):
        (root / SYNSETS[i % 2]).mkdir(exist_ok=True)
        shutil.copy(photo, root / SYNSETS[i % 2] / photo.name)
    (root / SYNSETS[0] / "broken.png").write_bytes(b"\x89PNG broken")
    return root


def _direct(tree, schedule):
    """The same numbers computed by hand: eager logits of the unpruned and the pruned model."""
    arch = models.architecture("test_vit")
    base = models.load(arch, "random")
    images = load_images([tree], arch.adapter.preprocess(base))
    labels = np.array([SYNSETS.index(c) for c in images.classes])
    x = torch.from_numpy(images.pixel_values)
    with torch.no_grad():
        reference = base(x).numpy()
        pruned = se.apply(models.load(arch, "random"), schedule)(x).numpy()
    return reference, pruned, labels


def test_eager_evaluation_matches_a_direct_computation(tree):
    evaluation = se.evaluate("test_vit", tree, ["none", "early50"], weights="random")
    assert [p.name for p, _ in evaluation.unreadable] == ["broken.png"]
    none, early50 = evaluation.records
    reference, pruned, labels = _direct(tree, "early50")
    assert none.images == early50.images == 4
    assert none.top1_accuracy == float((reference.argmax(-1) == labels).mean())
    assert none.top1_agreement == 1.0 and none.logit_cosine == pytest.approx(1.0) and none.flops_ratio == 1.0
    assert early50.top1_accuracy == float((pruned.argmax(-1) == labels).mean())
    assert early50.top1_agreement == float((pruned.argmax(-1) == reference.argmax(-1)).mean())
    assert early50.logit_cosine == pytest.approx(float(cosine(pruned, reference).mean()), abs=1e-6)
    assert early50.flops_ratio == pytest.approx(se.resolve_schedule("early50", "test_vit").flops_ratio())
    assert early50.images_per_second > 0 and early50.backend == "eager"


def test_runtime_paths_give_eager_accuracy(tree, exported):
    eager = se.evaluate("test_vit", tree, ["early50"], weights="random").records[0]
    onnx = se.evaluate("test_vit", tree, ["early50"], weights="random", backend="onnxruntime").records[0]
    folder = se.evaluate_folder(exported.folder, tree).records[0]
    assert onnx.backend == "onnxruntime" and folder.backend == "onnxruntime-cpu"
    for record in (onnx, folder):
        assert record.top1_accuracy == eager.top1_accuracy
        assert record.top1_agreement == eager.top1_agreement
        assert record.logit_cosine == pytest.approx(eager.logit_cosine, abs=1e-6)
        assert record.flops_ratio == pytest.approx(eager.flops_ratio)


def test_unlabelled_images_have_agreement_but_no_accuracy(photo_folder):
    record = se.evaluate("test_vit", photo_folder, "early25", weights="random").records[0]
    assert record.top1_accuracy is None and 0 <= record.top1_agreement <= 1


def test_eval_cli_writes_json_and_plot(tree, tmp_path, capsys):
    code, out, err = run(capsys, "eval", "test_vit", "--weights", "random", "--images", str(tree),
                         "-s", "none,early50,early25", "-o", str(tmp_path / "e"))
    assert code == 0, err
    records = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [r["schedule"] for r in records] == ["none", "early50", "early25"]
    assert all(list(r) == KEYS for r in records)
    assert all(r["top1_accuracy"] is not None for r in records)
    png = (tmp_path / "e" / "eval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "early25" in out and "skipped unreadable image" in err


def test_eval_refuses_bad_input(tree, tmp_path, capsys):
    code, _, err = run(capsys, "eval", "test_vit", "--weights", "random", "--images", str(tree), "-s", "dynamic",
                       "-o", str(tmp_path / "x"))
    assert code == 2 and "'dynamic' cannot be exported" in only_error_line(err)
    code, _, err = run(capsys, "eval", "test_vit", "--weights", "random", "--images", str(tree), "--backend", "tpu",
                       "-o", str(tmp_path / "x"))
    assert code == 2 and "backend 'tpu'" in only_error_line(err)
    assert not (tmp_path / "x").exists()


def test_calibrate_over_an_image_folder_tree(tree, tmp_path, capsys):
    calib = tmp_path / "calib.json"
    code, out, err = run(capsys, "calibrate", "test_vit", "--weights", "random", "--images", str(tree),
                         "-o", str(calib), "--tau", "0.5")
    assert code == 0, err
    assert "skipped unreadable image" in err and "broken.png" in err  # reported by name, not silently
    data = json.loads(calib.read_text())
    assert len(data["per_image_drops"]) == 4 and data["format"] == "saint-export-calibration/1"
    code, _, err = run(capsys, "test_vit", "-s", f"calib:{calib}", "--weights", "random", "--tau", "0.5",
                       "-o", str(tmp_path / "o"), "--parity-images", "2", "--batch", "2", "--target", "onnx",
                       "--images", str(tree))
    assert code == 0, err
