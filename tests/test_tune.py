"""`saint-export tune` on the test ViT: the front, the families, determinism, resuming, objectives,
and that the chosen schedule exports through the gate."""
import json

import numpy as np
import pytest
from PIL import Image
from conftest import make_model, only_error_line, run

import saint_export as se
from saint_export import tuning

QUICK = dict(backend="eager", probe=16, finalists=4, rounds=1, batch=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 images of flat 16-px regions plus noise (SAINT finds similar tokens in them)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        image = np.kron(rng.random((4, 4, 3)), np.ones((40, 40, 1))) + 0.05 * rng.standard_normal((160, 160, 3))
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def tuned(images, tmp_path_factory):
    output = tmp_path_factory.mktemp("tune")
    return tuning.tune(make_model(), images, "disagreement<=60%", output=output, **QUICK), output


def test_objectives_parse_and_bad_inputs_get_one_line(images, tmp_path):
    assert tuning.Objective.parse("speedup>=2") == tuning.Objective("speedup", 2.0, "speedup>=2")
    assert tuning.Objective.parse("disagreement<=1%").limit == 0.01
    assert tuning.Objective.parse("accuracy-drop<=0.5%").limit == 0.005
    assert tuning.Objective.parse("latency-ms<=4.5").limit == 4.5
    for bad, message in [("fast", "expected one of speedup>=X"), ("speedup>=0", "must be a positive number"),
                         ("disagreement<=150%", r"must be within \[0, 100\)%")]:
        with pytest.raises(se.InputError, match=message):
            tuning.Objective.parse(bad)
    with pytest.raises(se.InputError, match="TensorRT and ONNX Runtime CUDA need a GPU"):
        tuning.tune(make_model(), images, "speedup>=2", backend="tensorrt")
    with pytest.raises(se.InputError, match="the accuracy-drop objective needs labelled images"):
        tuning.tune(make_model(), images, "accuracy-drop<=1%", **QUICK)
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((160, 160, 3), np.uint8)).save(few / f"{i}.png")
    with pytest.raises(se.InputError, match="tune needs at least 10 readable images, got 3"):
        tuning.tune(make_model(), few, "speedup>=2", **QUICK)


def test_the_front_is_non_dominated_and_holds_a_point_as_good_as_every_family(tuned):
    result, output = tuned
    front = result.front
    assert len(front) >= 2 and front == sorted(front, key=lambda p: p.measured_ms)
    for p in front:
        assert not any(q.measured_ms <= p.measured_ms and q.kl <= p.kl and (q.measured_ms < p.measured_ms or q.kl < p.kl)
                       for q in front)
    saved = json.loads((output / "front.json").read_text())
    families = [p for p in saved["measured"] if p["source"] in tuning.FAMILIES]
    assert sorted(p["source"] for p in families) == sorted(tuning.FAMILIES)
    for family in families:  # at its measured speed, the front has one at least as fast and no worse
        assert any(p.measured_ms <= family["measured_ms"] and p.kl <= family["kl"] for p in front), family["spec"]
    assert any(p["source"].startswith("path") for p in saved["measured"])
    for p in front:
        low, high = p.agreement_interval
        assert low <= p.agreement <= high and 0 < p.flops_ratio <= 1
        assert se.KeepSchedule.parse(p.spec, 6, 100).drops == tuple(p.drops)  # export takes the r: form
    assert (output / "schedule.txt").read_text().strip() == result.closest.spec
    assert {path.name for path in result.files} >= {"front.json", "schedule.txt"}


def test_the_chosen_schedule_meets_its_bound_and_exports_through_the_gate(tuned, tmp_path):
    result, _ = tuned
    assert result.met and result.chosen is result.closest and result.chosen.selected
    assert 1 - result.chosen.agreement_interval[0] <= 0.6  # the disagreement's upper bound
    faster = [p for p in result.front if p.measured_ms < result.chosen.measured_ms]
    assert all(1 - p.agreement_interval[0] > 0.6 for p in faster)  # it is the fastest that meets it
    exported = se.export(make_model(), tmp_path / "chosen", se.ExportConfig(
        keep_schedule=result.chosen.spec, target="onnx", batch=(1, 3, 4), parity_images=4))
    assert exported.parity.passed and exported.schedule.drops[:len(result.chosen.drops)] == tuple(result.chosen.drops)


def test_the_same_seed_gives_the_same_front_and_an_interrupted_run_resumes_to_it(images, tuned, tmp_path):
    result, _ = tuned

    def searched(r):  # what does not depend on timings: every measured schedule's probe and held-out KL
        measured = json.loads((r.files[0]).read_text())["measured"]
        return sorted((p["spec"], p["source"], round(p["kl_tune"], 12), round(p["kl"], 12)) for p in measured)

    class StopDuringSearch(se.Progress):
        def step(self, key, label, total=None):
            import contextlib

            @contextlib.contextmanager
            def stepping():
                def advance(done):
                    if key == "search" and done == 3:
                        raise KeyboardInterrupt
                yield advance
            return stepping()

    output = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(make_model(), images, "disagreement<=60%", output=output, progress=StopDuringSearch(), **QUICK)
    lines = (output / "journal.jsonl").read_text().splitlines()
    assert len(lines) > 3 and not (output / "front.json").exists()
    resumed = tuning.tune(make_model(), images, "disagreement<=60%", output=output, **QUICK)
    assert searched(resumed) == searched(result)
    rerun_lines = len((output / "journal.jsonl").read_text().splitlines())
    again = tuning.tune(make_model(), images, "disagreement<=60%", output=output, **QUICK)
    assert len((output / "journal.jsonl").read_text().splitlines()) == rerun_lines  # nothing recomputed
    assert [p.spec for p in again.front] == [p.spec for p in resumed.front]
    with pytest.raises(se.InputError, match="belongs to another run"):
        tuning.tune(make_model(), images, "disagreement<=60%", output=output, **{**QUICK, "probe": 12})


def test_cli_an_impossible_objective_exits_4_in_one_line_and_still_writes_the_front(images, tmp_path, capsys):
    from saint_export.models import architecture  # noqa: F401  (the test model is registered by conftest)

    code, out, err = run(capsys, "tune", "test_vit", "--weights", "random", "--images", str(images),
                         "--objective", "speedup>=50", "--finalists", "2", "--probe", "12", "--step", "16",
                         "-o", str(tmp_path / "t"))
    assert code == tuning.EXIT_NOT_MET, err
    line = only_error_line(err)
    assert line.startswith("saint-export: no schedule meets speedup>=50 on the held-out images; the closest is r:")
    saved = json.loads((tmp_path / "t" / "front.json").read_text())
    assert saved["met"] is False and saved["front"] and saved["closest"].startswith("r:")
    assert saved["backend"] == "onnxruntime-cpu" and "latency model: measured =" in out
