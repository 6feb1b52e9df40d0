"""tune's certification on its own: the exact bounds, the testing procedure's error rate in a
simulation, the order statistics of the speed bounds, and the decisions with their one lines."""
import math
from statistics import NormalDist

import numpy as np
import pytest
from PIL import Image
from conftest import make_model, only_error_line, run

import saint_export as se
from saint_export.tune import certify
from saint_export.tune.objective import Objective
from saint_export.tune.report import FrontPoint


def test_clopper_pearson_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats", reason="scipy (from the test extra) is the reference")
    for failures, n, delta in [(0, 12, 0.05), (5, 500, 0.05), (3, 77, 0.1), (10, 2000, 0.01), (76, 77, 0.05),
                               (1, 3, 0.2), (40, 100, 0.05)]:
        reference = stats.binomtest(failures, n, alternative="less").proportion_ci(1 - delta, method="exact").high
        assert certify.clopper_pearson_upper(failures, n, delta) == pytest.approx(reference, abs=1e-9)
    assert certify.clopper_pearson_upper(0, 500) == pytest.approx(1 - 0.05 ** (1 / 500), abs=1e-12)  # closed form
    assert certify.clopper_pearson_upper(5, 5) == 1.0 and certify.clopper_pearson_upper(0, 0) == 1.0


def test_images_needed_is_the_fewest_that_can_certify():
    for limit in (0.01, 0.05, 0.4):
        n = certify.images_needed(limit)
        assert certify.clopper_pearson_upper(0, n) <= limit < certify.clopper_pearson_upper(0, n - 1)
    assert certify.images_needed(0.01) == 299


def wilson_upper(failures: int, n: int) -> float:
    """The old rule's bound: the two-sided 95% Wilson interval's upper end."""
    z, p = NormalDist().inv_cdf(0.975), failures / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), \
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return min(1.0, centre + half)


def test_the_certificate_holds_over_2000_simulated_runs_and_the_old_rule_does_not():
    """Twelve finalists, fastest last: two safe, ten just over the 1% limit (the case a
    winner's-curse rule gets wrong). The tune split orders them; the held-out split tests them.
    A run errs when it certifies and chooses a finalist whose true rate exceeds the limit."""
    rates = np.array([0.002, 0.004] + [0.0101] * 10)
    limit, n_tune, n_held, delta, runs = 0.01, 400, 600, 0.05, 2000
    errors = old_errors = chosen = 0
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        tune, held = rng.binomial(n_tune, rates), rng.binomial(n_held, rates)
        order = sorted(range(len(rates)), key=lambda i: (tune[i], i))
        bounds = certify.fixed_sequence([int(held[i]) for i in order], n_held, limit, delta)
        passed = [i for i, ok in zip(order, certify.certified(bounds, limit)) if ok]
        if passed:
            chosen += 1
            errors += rates[max(passed)] > limit  # the fastest certified
        old = [i for i in range(len(rates)) if wilson_upper(int(held[i]), n_held) <= limit]
        old_errors += bool(old) and rates[max(old)] > limit
    assert errors / runs <= delta
    assert old_errors / runs > delta  # the old rule (best of many two-sided Wilson bounds) errs more often than δ
    assert chosen / runs > 0.4  # and the procedure still certifies a safe finalist in most runs


def test_the_sequence_stops_at_its_first_failure():
    bounds = certify.fixed_sequence([0, 1, 30, 0], 200, 0.05)
    assert bounds[:3] == [pytest.approx(certify.clopper_pearson_upper(k, 200)) for k in (0, 1, 30)]
    assert bounds[3] is None  # never tested, though 0 failures would pass
    assert certify.certified(bounds, 0.05) == [True, True, False, False]


def test_median_bounds_are_order_statistics_with_the_binomial_level():
    stats = pytest.importorskip("scipy.stats", reason="scipy (from the test extra) is the reference")
    samples = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0]
    bounds = certify.median_bounds(samples)
    assert (bounds.median, bounds.low, bounds.high) == (5.0, 2.0, 8.0)  # the 2nd smallest and 2nd largest
    assert stats.binom.cdf(1, 9, 0.5) <= 0.05 < stats.binom.cdf(2, 9, 0.5)
    assert certify.median_bounds([1.0, 2.0, 3.0]).low is None  # three timings cannot bound a median at 95%
    assert certify.paired_speedups([10.0, 20.0], [5.0, 10.0]) == [2.0, 2.0]  # a slow round slows both


def point(spec, ms, speedup, low, tune_loss, failures, tune_rate, flops):
    return FrontPoint(spec=spec, source="path", drops=[], flops_ratio=flops, probe_loss=tune_loss,
                      tune_loss=tune_loss, tune_failure_rate=tune_rate, measured_ms=ms, speedup=speedup,
                      speedup_low=low, slow_ms=ms * 1.1, failures=failures)


def test_decide_chooses_the_fastest_certified_and_says_what_is_guaranteed():
    points = [point("r:0", 10, 1.0, 0.95, 0.0, 0, 0.0, 1.0), point("r:8", 8, 1.25, 1.2, 0.01, 2, 0.01, 0.8),
              point("r:16", 6, 1.6, 1.5, 0.05, 3, 0.04, 0.6), point("r:24", 5, 2.0, 1.9, 0.2, 40, 0.2, 0.5)]
    chosen, closest, reason, guarantee = certify.decide(points, Objective.parse("disagreement<=5%"), 200, 0.05, 0.02)
    assert chosen.spec == "r:16" and closest is chosen and reason is None
    assert [p.test_order for p in points] == [1, 2, 3, 4] and [p.certified for p in points] == [True, True, True, False]
    assert "at least 95%" in guarantee and "exchangeable" in guarantee and "r:16" in guarantee


def test_a_speed_objective_met_only_by_the_median_is_refused_as_noise():
    points = [point("r:0", 10, 1.0, 0.7, 0.0, 0, 0.0, 1.0), point("r:16", 6, 1.6, 1.2, 0.05, 9, 0.04, 0.6)]
    chosen, closest, reason, _ = certify.decide(points, Objective.parse("speedup>=1.5"), 200, 0.05, 0.31)
    assert chosen is None and closest.spec == "r:16"
    assert reason.startswith("the machine is too noisy to certify speedup>=1.5: r:16 has a median of 1.60x but a 95% "
                             "bound of 1.20x (the unpruned model's timings spread 31%")
    chosen, _, reason, _ = certify.decide(points, Objective.parse("speedup>=1.7"), 200, 0.05, 0.31)
    assert chosen is None and reason == "no schedule meets speedup>=1.7: the fastest finalist, r:16, measured 1.60x"
    chosen, *_ = certify.decide(points, Objective.parse("speedup>=1.2"), 200, 0.05, 0.31)
    assert chosen.spec == "r:16"


def test_the_grammar_requires_the_percent_sign_and_reads_the_cosine_share():
    assert Objective.parse("disagreement<=1%").limit == 0.01 and Objective.parse("accuracy-drop<=0.5%").limit == 0.005
    assert Objective.parse("cosine>=0.99").risk_limit == pytest.approx(0.1)
    assert Objective.parse("cosine>=0.99@95%").risk_limit == pytest.approx(0.05)
    for bad, message in [("disagreement<=1", "write the disagreement as a percentage, e.g. disagreement<=1%"),
                         ("accuracy-drop<=0.5", "write the accuracy-drop as a percentage"),
                         ("speedup>=2@50%", "only cosine takes @Q%"), ("cosine>=0.9@95", "a percentage in (0, 100)"),
                         ("disagreement<=100%", "within (0, 100)%"), ("speed>=2", "expected one of")]:
        with pytest.raises(se.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Objective.parse(bad)


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    """10 classes of one image each."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for i in range(10):
        (root / f"class{i}").mkdir()
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), np.uint8)).save(root / f"class{i}" / "0.png")
    return root


def test_one_image_per_class_refuses_in_one_line_with_the_count_needed(one_per_class, tmp_path, capsys):
    from saint_export.models import architecture  # noqa: F401  (the test model is registered by conftest)

    for objective, needed in (("disagreement<=5%", 59), ("speedup>=1.5", 1)):
        code, _, err = run(capsys, "tune", "test_vit", "--weights", "random", "--images", str(one_per_class),
                           "--objective", objective, "-o", str(tmp_path / objective[:5]))
        assert code == 2
        assert only_error_line(err) == (
            f"saint-export: error: {objective} at δ=0.05 needs at least {needed} held-out images (even with none failing); "
            "--holdout 0.3 of 10 images holds out 0; 10 classes have a single image, which stays in the tune split: "
            "add images or raise --holdout")
        assert not (tmp_path / objective[:5] / "front.json").exists()
    with pytest.raises(se.InputError, match="needs a confidence bound on the median speed, which 3 timings per "
                                            "schedule cannot give: use --rounds 2 or more"):
        se.tune(make_model(), one_per_class, "speedup>=1.5", rounds=1)
