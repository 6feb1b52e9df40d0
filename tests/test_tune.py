"""`saint-export tune` on the test ViT: the front, the families, determinism, resuming, objectives,
and that the chosen schedule exports through the gate."""
import json

import numpy as np
import pytest
from PIL import Image
from conftest import make_model, only_error_line, run

import saint_export as se
import saint_export.tune as tuning
from saint_export import spec
from saint_export.tune import latency, quality, search
from saint_export.adapters import find_adapter

QUICK = dict(backend="eager", probe=16, finalists=4, rounds=2, batch=8)


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
                         ("disagreement<=150%", r"must be within \(0, 100\)%")]:
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
    finalists, front = result.finalists, result.front
    assert len(front) >= 2 and finalists == sorted(finalists, key=lambda p: p.measured_ms)
    for p in finalists:  # the front: no finalist faster and better on the tune split
        assert p.pareto == (not any(q.measured_ms <= p.measured_ms and q.tune_loss <= p.tune_loss
                                    and (q.measured_ms < p.measured_ms or q.tune_loss < p.tune_loss)
                                    for q in finalists))
    saved = json.loads((output / "front.json").read_text())
    families = [p for p in saved["finalists"] if p["source"] in tuning.FAMILIES]
    assert sorted(p["source"] for p in families) == sorted(tuning.FAMILIES)
    for family in families:  # at its measured speed, the front has one at least as fast and no worse
        assert any(p.measured_ms <= family["measured_ms"] and p.tune_loss <= family["tune_loss"] for p in front)
    assert any(p["source"].startswith("path") for p in saved["finalists"])
    for p in finalists:
        assert 0 <= p.failures <= result.images["held_out"] and p.agreement == pytest.approx(
            1 - p.failures / result.images["held_out"])
        assert p.failures / result.images["held_out"] <= p.failure_bound <= 1 and 0 < p.flops_ratio <= 1
        assert p.images_per_s == pytest.approx(1000 * QUICK["batch"] / p.measured_ms)
        assert p.speedup_low <= p.speedup <= p.speedup_high  # the median's interval from 6 paired rounds
        assert se.KeepSchedule.parse(p.spec, 6, 100).drops == tuple(p.drops)  # export takes the r: form
    assert (output / "schedule.txt").read_text().strip() == result.closest.spec
    assert {path.name for path in result.files} >= {"front.json", "schedule.txt"}
    fit = result.latency_fit  # the model's error out of sample: leave-one-out and on points not fitted on
    assert fit["leave_one_out_max_error"] >= fit["leave_one_out_median_error"] >= 0
    assert fit["unfitted_points"] == len(finalists) - 3 and fit["unfitted_max_error"] >= 0


def test_the_chosen_schedule_is_the_fastest_certified_and_exports_through_the_gate(tuned, tmp_path):
    result, output = tuned
    assert result.met and result.chosen is result.closest and result.chosen.selected and result.chosen.certified
    assert result.chosen.failure_bound <= 0.6  # the disagreement's Clopper–Pearson bound
    order = sorted((p for p in result.finalists if p.test_order), key=lambda p: p.test_order)
    assert [p.test_order for p in order] == list(range(1, len(order) + 1))
    assert [p.tune_failure_rate for p in order] == sorted(p.tune_failure_rate for p in order)  # fixed on the tune split
    certified = [p.certified for p in order]
    assert certified == sorted(certified, reverse=True)  # a prefix: the test stops at its first failure
    assert all(p.failure_bound <= 0.6 for p in order if p.certified)
    assert result.chosen.measured_ms == min(p.measured_ms for p in order if p.certified)
    saved = json.loads((output / "front.json").read_text())
    assert saved["delta"] == 0.05 and "at least 95%" in saved["guarantee"] and result.chosen.spec in saved["guarantee"]
    exported = se.export(make_model(), tmp_path / "chosen", se.ExportConfig(
        keep_schedule=result.chosen.spec, tau=result.tau, gamma=result.gamma, target="onnx", batch=(1, 3, 4),
        parity_images=4))
    assert exported.parity.passed and exported.schedule.drops[:len(result.chosen.drops)] == tuple(result.chosen.drops)


def test_the_same_seed_gives_the_same_front_and_an_interrupted_run_resumes_to_it(images, tuned, tmp_path):
    result, _ = tuned

    def searched(r):  # what does not depend on timings: the finalists, their proxies, failures and test order
        finalists = json.loads((r.files[0]).read_text())["finalists"]
        return sorted((p["spec"], p["source"], round(p["probe_loss"], 12), round(p["tune_loss"], 12),
                       round(p["kl"], 12), p["failures"], p["test_order"], p["certified"]) for p in finalists)

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
    assert [p.spec for p in again.finalists] == [p.spec for p in resumed.finalists]
    with pytest.raises(se.InputError, match="belongs to another run"):
        tuning.tune(make_model(), images, "disagreement<=60%", output=output, **{**QUICK, "probe": 12})


def test_cli_an_impossible_objective_exits_4_in_one_line_and_still_writes_the_front(images, tmp_path, capsys):
    from saint_export.models import architecture  # noqa: F401  (the test model is registered by conftest)

    code, out, err = run(capsys, "tune", "test_vit", "--weights", "random", "--images", str(images),
                         "--objective", "speedup>=50", "--finalists", "2", "--probe", "12", "--step", "16",
                         "-o", str(tmp_path / "t"))
    assert code == tuning.EXIT_NOT_MET, err
    line = only_error_line(err)
    saved = json.loads((tmp_path / "t" / "front.json").read_text())
    fastest = max(saved["finalists"], key=lambda p: p["speedup"])
    assert line == (f"saint-export: no schedule meets speedup>=50: the fastest finalist, {fastest['spec']}, measured "
                    f"{fastest['speedup']:.2f}x; the closest is {fastest['spec']} (front.json has every finalist)")
    assert saved["met"] is False and saved["reason"] in line and saved["closest"] == fastest["spec"]
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
    prober = search.Prober(parts, x, reference, se.KeepSchedule.for_model("none", info), hp, 2, classifier)
    patched = se.apply(model, search.r_form(drops), tau=0.7, gamma=5.0)
    with torch.no_grad():
        outputs = adapter.export_module(patched)(x)
    expected = quality.proxy_loss(outputs, reference, classifier)
    assert expected > 1e-6  # the schedule changes the outputs
    assert prober.loss(drops) == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """24 images of 64 px (the tiny towers resize them to 32)."""
    return flat_region_images(tmp_path_factory.mktemp("small"), 24, 64, seed=1)


def test_a_tower_is_certified_on_the_share_of_images_keeping_its_cosine(small_images, tmp_path):
    from test_vlm import make_tower

    result = tuning.tune(make_tower("clip"), small_images, "cosine>=0.9@60%", output=tmp_path / "clip",
                         **{**QUICK, "backend": "onnxruntime-cpu", "step": 4})
    assert not result.classifier and result.backend == "onnxruntime-cpu"
    saved = json.loads((tmp_path / "clip" / "front.json").read_text())
    assert saved["proxy"] == "1 - feature cosine"
    # early25 cannot be reached in the 2 pruning blocks of a 4-layer tower: it is left out, not fatal
    assert sorted(p["source"] for p in saved["finalists"] if p["source"] in tuning.FAMILIES) == ["early50", "early75"]
    journal = {e["key"]: e["value"] for e in map(json.loads, (tmp_path / "clip" / "journal.jsonl").read_text()
                                                 .splitlines()[1:])}
    for p in result.finalists:
        assert p.kl is None and p.agreement is None
        cosines = journal["held-out " + p.spec]["cosine"]
        assert p.failures == sum(c < 0.9 for c in cosines) and p.cosine == pytest.approx(np.mean(cosines))
        assert p.loss == pytest.approx(1 - p.cosine)
    certified = [p for p in result.finalists if p.certified]
    assert all(p.failure_bound <= 0.4 for p in certified)
    assert result.met == bool(certified)
    if result.met:
        assert result.chosen.measured_ms == min(p.measured_ms for p in certified)
    assert "1-cos" in result.table().splitlines()[0]


def test_a_tower_refuses_label_objectives_and_llava_tunes_on_its_features(small_images, tmp_path):
    from test_vlm import make_tower, tiny_llava

    with pytest.raises(se.InputError, match="the disagreement objective needs a classifier's logits; "
                                            "SiglipVisionModel outputs features: use cosine>=X"):
        tuning.tune(make_tower("siglip"), small_images, "disagreement<=5%", **QUICK)
    result = tuning.tune(tiny_llava(), small_images, "cosine>=0.5@60%", **{**QUICK, "step": 8})
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
    model = latency.LatencyModel(grid, [block(n) for n in grid], unpruned)
    schedules = [(0,) * 6, (10, 10, 10, 10, 10, 10), (0, 0, 40, 20, 0, 5), (50, 25, 12, 6, 3, 1)]
    measured = {d: 1.3 * model.blocks_ms(d) + 4.0 for d in schedules}
    fit = model.fit(measured)
    assert fit["a"] == pytest.approx(1.3) and fit["b"] == pytest.approx(4.0, abs=1e-6)
    assert fit["leave_one_out_max_error"] < 1e-9 and fit["unfitted_max_error"] < 1e-9 and fit["unfitted_points"] == 1
    assert model.predict((20, 0, 0, 0, 0, 30)) == pytest.approx(1.3 * model.blocks_ms((20, 0, 0, 0, 0, 30)) + 4.0)
    assert model._t(33) == pytest.approx(block(33))  # between the measured points: the quadratic, not a chord


class LinearProber:
    """A stand-in prober whose proxy is linear in the drops (early blocks cost more per token)."""
    weights = np.array([5.0, 3.0, 1.0, 0, 0, 0])
    reference = [0] * 16

    def loss(self, drops):
        return float(self.weights @ np.array(drops) / 100)


def polished(seed: int, seeds: list) -> list:
    from saint_export.tune.run import Journal

    unpruned = se.KeepSchedule.for_model("none", find_adapter(make_model()).describe(make_model()))
    found = search.Search(LinearProber(), unpruned, Journal(None, {}))
    for i, drops in enumerate(seeds[1:]):
        found.add(f"path {i + 1}", drops)
    found.polish(16, 8, seed, None, se.Progress())
    return [c for c in found.candidates.values() if c.source.startswith("polish")]


def test_the_optuna_polish_starts_from_the_candidates_is_legal_and_deterministic():
    seeds = [[0] * 6, [0, 0, 8, 0, 0, 0], [0, 0, 16, 0, 0, 0], [0, 8, 16, 0, 0, 0], [0, 0, 50, 0, 0, 0]]
    runs = [polished(3, seeds) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]  # the same seed, the same trials
    for c in runs[0]:
        assert se.KeepSchedule.parse(c.spec, 6, 100).drops == c.drops  # legal: export takes it
        assert c.probe_loss == LinearProber().loss(list(c.drops))
    assert [c.drops for c in polished(4, seeds)] != [c.drops for c in runs[0]]  # the seed matters


def test_tune_takes_the_polish_trials_into_its_finalists(images, tmp_path, monkeypatch):
    calls = []

    def fake_polish(self, trials, step, seed, deadline, progress):
        calls.append((trials, step, seed, "r:0" in self.candidates))
        self.add("polish 1", (48, 26, 13, 0, 0, 0), 0.0)  # the cheapest and, as faked, lossless

    monkeypatch.setattr(search.Search, "polish", fake_polish)
    tuning.tune(make_model(), images, "disagreement<=60%", polish=5, seed=2, tau=spec.TAU,
                gamma=spec.GAMMA, output=tmp_path, **{**QUICK, "finalists": 2, "step": 32})
    assert calls == [(5, 32, 2, True)]
    finalists = json.loads((tmp_path / "front.json").read_text())["finalists"]
    assert [p["spec"] for p in finalists if p["source"] == "polish 1"] == ["r:48,26,13"]
