"""`saint-export tune` on the test ViT: the front, the families, determinism, resuming, objectives,
and that the chosen schedule exports through the gate."""
import json

import numpy as np
import pytest
from PIL import Image
from conftest import make_model, only_error_line, run

import saint_export as se
from saint_export import spec, tuning
from saint_export.adapters import find_adapter

QUICK = dict(backend="eager", probe=16, finalists=4, rounds=1, batch=8)


def flat_region_images(folder, count: int, size: int, seed: int):
    """`count` images of 4 × 4 flat regions plus noise (SAINT finds similar tokens in them)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = (np.kron(rng.random((4, 4, 3)), np.ones((size // 4, size // 4, 1)))
                 + 0.05 * rng.standard_normal((size, size, 3)))
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 images of 160 px (the test ViT's size)."""
    return flat_region_images(tmp_path_factory.mktemp("images"), 40, 160, seed=0)


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
    assert tuning.Objective.parse("cosine>=0.99") == tuning.Objective("cosine", 0.99, "cosine>=0.99")
    with pytest.raises(se.InputError, match=r"the cosine must be a number in \(0, 1\]"):
        tuning.Objective.parse("cosine>=1.5")
    with pytest.raises(se.InputError, match="tune does not time TensorRT engines yet"):
        tuning.tune(make_model(), images, "speedup>=2", backend="tensorrt")
    with pytest.raises(se.InputError, match="backend 'tflite': tune measures on onnxruntime-cpu, onnxruntime-cuda, eager"):
        tuning.tune(make_model(), images, "speedup>=2", backend="tflite")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(se.InputError, match="backend onnxruntime-cuda needs onnxruntime-gpu and a CUDA GPU"):
            tuning.tune(make_model(), images, "speedup>=2", backend="onnxruntime-cuda")
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
        assert p.images_per_s == pytest.approx(1000 * QUICK["batch"] / p.measured_ms)
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
        keep_schedule=result.chosen.spec, tau=result.tau, gamma=result.gamma, target="onnx", batch=(1, 3, 4),
        parity_images=4))
    assert exported.parity.passed and exported.schedule.drops[:len(result.chosen.drops)] == tuple(result.chosen.drops)


def test_the_same_seed_gives_the_same_front_and_an_interrupted_run_resumes_to_it(images, tuned, tmp_path):
    result, _ = tuned

    def searched(r):  # what does not depend on timings: every measured schedule's probe and held-out KL
        measured = json.loads((r.files[0]).read_text())["measured"]
        return sorted((p["spec"], p["source"], round(p["loss_tune"], 12), round(p["kl"], 12)) for p in measured)

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
    assert (tmp_path / "t" / "command.txt").read_text().startswith(
        f"saint-export test_vit --keep-schedule {saved['closest']} --weights random")


def test_tau_and_gamma_are_searched_at_early50_and_travel_with_the_schedule(tuned, images, tmp_path):
    result, output = tuned
    entries = [json.loads(line) for line in (output / "journal.jsonl").read_text().splitlines()[1:]]
    scored = {e["key"]: e["value"] for e in entries if e["key"].startswith("hp ")}
    grid = tuning.hyperparameter_grid()
    assert len(grid) == 9 and grid[0] == (spec.TAU, spec.GAMMA)
    assert sorted(scored) == sorted(f"hp {t:g},{g:g}" for t, g in grid)
    best = min(scored.values())
    assert scored[f"hp {result.tau:g},{result.gamma:g}"] == best  # the lowest proxy at early50 was kept
    assert (output / "command.txt").read_text().strip() == result.command("VisionTransformer")  # a module: its class
    command = result.command("test_vit")
    assert command.startswith(f"saint-export test_vit --keep-schedule {result.closest.spec}")
    assert (f"--tau {result.tau:g}" in command) == (result.tau != spec.TAU)
    assert (f"--gamma {result.gamma:g}" in command) == (result.gamma != spec.GAMMA)
    # Given values are kept: only γ is searched here, around the given τ.
    fixed = tuning.tune(make_model(), images, "disagreement<=60%", tau=0.7, output=tmp_path / "fixed",
                        **{**QUICK, "finalists": 2, "step": 32})
    keys = [json.loads(line)["key"] for line in (tmp_path / "fixed" / "journal.jsonl").read_text().splitlines()[1:]]
    assert sorted(k for k in keys if k.startswith("hp ")) == sorted(f"hp 0.7,{g:g}" for g in (10, 5, 20))
    assert fixed.tau == 0.7


@pytest.mark.parametrize("kind", ["timm", "clip", "clip-projection", "siglip", "llava"])
def test_the_probe_runs_what_export_runs(kind):
    """The prober's cut model equals the exported module unpruned, and its proxy for a schedule
    equals the patched model's (what certification runs): the search scores what ships."""
    import torch
    from test_vlm import make_tower, pixels, tiny_llava

    model = {"timm": make_model, "llava": tiny_llava}.get(kind, lambda: make_tower(kind))()
    adapter = find_adapter(model)
    size = adapter.describe(model).img_size
    x = torch.from_numpy(np.random.default_rng(0).random((5, 3, size, size), np.float32)) if kind == "timm" \
        else pixels(5)
    parts = adapter.probe_parts(model)
    classifier = kind == "timm"
    with torch.no_grad():
        reference = adapter.export_module(model)(x)
        hidden = parts.stem(x)
        for block in parts.blocks:
            hidden = parts.block_forward(block, hidden, lambda keys: None)
        torch.testing.assert_close(parts.head(hidden), reference, rtol=0, atol=1e-5)
    info = adapter.describe(model)
    drops = list(se.KeepSchedule.for_model("early25" if kind == "timm" else "early50", info).drops)
    hp = (0.7, spec.VOTE_K, 5.0)
    prober = tuning.Prober(parts, x, reference, se.KeepSchedule.for_model("none", info), hp, 2, classifier)
    patched = se.apply(model, tuning._r(drops), tau=0.7, gamma=5.0)
    with torch.no_grad():
        outputs = adapter.export_module(patched)(x)
    expected = tuning.proxy_loss(outputs, reference, classifier)
    assert expected > 1e-6  # the schedule changes the outputs
    assert prober.loss(drops) == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """24 images of 64 px (the tiny towers resize them to 32)."""
    return flat_region_images(tmp_path_factory.mktemp("small"), 24, 64, seed=1)


def test_a_tower_is_tuned_on_feature_cosine_with_a_lower_bound(small_images, tmp_path):
    from test_vlm import make_tower

    result = tuning.tune(make_tower("clip"), small_images, "cosine>=0.9", output=tmp_path / "clip",
                         **{**QUICK, "backend": "onnxruntime-cpu", "step": 4})
    assert not result.classifier and result.backend == "onnxruntime-cpu"
    saved = json.loads((tmp_path / "clip" / "front.json").read_text())
    assert saved["proxy"] == "1 - feature cosine"
    # early25 cannot be reached in the 2 pruning blocks of a 4-layer tower: it is left out, not fatal
    assert sorted(p["source"] for p in saved["measured"] if p["source"] in tuning.FAMILIES) == ["early50", "early75"]
    for p in result.front:
        assert p.kl is None and p.agreement is None
        assert p.loss == pytest.approx(1 - p.cosine) and p.cosine_low <= p.cosine <= 1 + 1e-9
        assert not any(q.measured_ms <= p.measured_ms and q.loss <= p.loss
                       and (q.measured_ms < p.measured_ms or q.loss < p.loss) for q in result.front)
    if result.met:
        assert result.chosen.cosine_low >= 0.9
        assert all(p.cosine_low < 0.9 for p in result.front if p.measured_ms < result.chosen.measured_ms)
    else:
        assert all(p.cosine_low < 0.9 for p in result.front)
    assert "1-cos" in result.table().splitlines()[0]


def test_a_tower_refuses_label_objectives_and_llava_tunes_on_its_features(small_images, tmp_path):
    from test_vlm import make_tower, tiny_llava

    with pytest.raises(se.InputError, match="the disagreement objective needs a classifier's logits; "
                                            "SiglipVisionModel outputs features: use cosine>=X"):
        tuning.tune(make_tower("siglip"), small_images, "disagreement<=5%", **QUICK)
    result = tuning.tune(tiny_llava(), small_images, "cosine>=0.5", **{**QUICK, "step": 8})
    assert not result.classifier and result.front
    # LLaVA's tower: the schedule covers the layers before its feature layer (3 of 4 here).
    assert all(len(se.KeepSchedule.parse(p.spec, 3, 64).drops) == 3 for p in result.front)


def test_the_latency_model_recovers_a_quadratic_block_cost():
    """Blocks that cost exactly c0 + c1·n + c2·n², and whole models a·Σ + b: the fit recovers a
    and b and predicts every schedule exactly (the curve is a quadratic, not an interpolation)."""
    info = find_adapter(make_model()).describe(make_model())
    unpruned = se.KeepSchedule.for_model("none", info)

    def block(n):
        return 0.5 + 0.02 * n + 0.0004 * n * n

    grid = [5, 20, 40, 60, 80, 101]
    model = tuning.LatencyModel(grid, [block(n) for n in grid], unpruned)
    schedules = [(0,) * 6, (10, 10, 10, 10, 10, 10), (0, 0, 40, 20, 0, 5), (50, 25, 12, 6, 3, 1)]
    measured = {d: 1.3 * model.blocks_ms(d) + 4.0 for d in schedules}
    fit = model.fit(measured)
    assert fit["a"] == pytest.approx(1.3) and fit["b"] == pytest.approx(4.0, abs=1e-6)
    assert model.predict((20, 0, 0, 0, 0, 30)) == pytest.approx(1.3 * model.blocks_ms((20, 0, 0, 0, 0, 30)) + 4.0)
    assert model._t(33) == pytest.approx(block(33))  # between the measured points: the quadratic, not a chord


def test_the_optuna_polish_starts_from_the_greedy_path_is_legal_and_deterministic():
    info = find_adapter(make_model()).describe(make_model())
    unpruned = se.KeepSchedule.for_model("none", info)
    weights = np.array([5.0, 3.0, 1.0, 0, 0, 0])  # early blocks cost more proxy per token

    def loss_of(drops):
        return float(weights @ np.array(drops) / 100)

    seeds = [[0] * 6, [0, 0, 8, 0, 0, 0], [0, 0, 16, 0, 0, 0], [0, 8, 16, 0, 0, 0], [0, 0, 50, 0, 0, 0]]
    runs = [tuning._polish(unpruned, seeds, 16, 8, 3, loss_of, None, se.Progress()) for _ in range(2)]
    assert runs[0] == runs[1]  # the same seed, the same trials
    # the seeds the space holds (multiples of 8; 50 is not) come first, in order
    assert [list(d) for d, _ in runs[0][:4]] == seeds[:4] and len(runs[0]) == 4 + 16
    for drops, loss in runs[0]:
        assert se.KeepSchedule.parse(tuning._r(drops), 6, 100).drops == tuple(drops)  # legal: export takes it
        assert loss == loss_of(list(drops))
    other = tuning._polish(unpruned, seeds, 16, 8, 4, loss_of, None, se.Progress())
    assert [d for d, _ in other[4:]] != [d for d, _ in runs[0][4:]]  # the seed matters


def test_tune_takes_the_polish_trials_into_its_front(images, tmp_path, monkeypatch):
    calls = []

    def fake_polish(unpruned, seeds, trials, step, seed, loss_of, deadline, progress):
        calls.append((trials, step, seed, [0] * 6 in seeds))
        return [((48, 26, 13, 0, 0, 0), 0.0)]  # the cheapest and, as faked, lossless: the probe front's best

    monkeypatch.setattr(tuning, "_polish", fake_polish)
    result = tuning.tune(make_model(), images, "disagreement<=60%", polish=5, seed=2, tau=spec.TAU,
                         gamma=spec.GAMMA, output=tmp_path, **{**QUICK, "finalists": 2, "step": 32})
    assert calls == [(5, 32, 2, True)]
    measured = json.loads((tmp_path / "front.json").read_text())["measured"]
    assert [p["spec"] for p in measured if p["source"] == "polish 1"] == ["r:48,26,13"]
    assert result.images["probe"] == 16
