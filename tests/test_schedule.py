import json

import pytest

from saint_export import KeepSchedule, ScheduleError


def test_early50_vit_h14_is_8_per_block_over_16_blocks():
    s = KeepSchedule.parse("early50", depth=32, num_patches=256)
    assert s.drops == (8,) * 16 + (0,) * 16
    assert s.patch_counts()[-1] == 128


def test_early50_vit_b16_recursion():
    assert KeepSchedule.parse("early50", 12, 196).drops[:6] == (17, 17, 16, 16, 16, 16)
    assert KeepSchedule.parse("early50@3", 12, 196).drops == (33, 33, 32) + (0,) * 9


def test_none_r_and_table():
    assert KeepSchedule.parse("none", 12, 196).drops == (0,) * 12
    s = KeepSchedule.parse("r:48,23,12", 12, 196, embed_dim=768, mlp_ratio=4.0)
    assert s.drops[:4] == (48, 23, 12, 0) and s.pruning_blocks == [0, 1, 2]
    table = s.table()
    assert "  0        197       48         149" in table
    assert "FLOPs ratio" in table
    assert 0 < s.flops_ratio() < 1
    assert KeepSchedule.parse("none", 12, 196, embed_dim=768, mlp_ratio=4.0).flops_ratio() == 1.0


def test_dynamic_has_no_static_drops():
    s = KeepSchedule.parse("dynamic", 12, 196)
    assert not s.is_static and s.pruning_blocks == list(range(6))
    assert "dynamic" in s.table()


@pytest.mark.parametrize("spec,message", [
    ("early", "malformed keep schedule"),
    ("r:1,,2", "malformed keep schedule"),
    ("r:-1", "malformed keep schedule"),
    ("early0", "percentage must be in (0, 100]"),
    ("early101", "percentage must be in (0, 100]"),
    ("early50@0", "at least one block"),
    ("early50@13", "the stage has 13 blocks but the model has 12"),
    ("early1", "cannot reach 2 of 196 patches in 6 blocks"),
    ("r:99", "block 0 drops 99 but can drop at most ⌈196/2⌉ = 98"),
    ("r:98,49,25,12,6,3,2,1", "block 7 would drop all 1 remaining patches"),
    ("r:" + ",".join(["1"] * 13), "lists 13 blocks but the model has 12"),
])
def test_bad_schedules_name_the_problem(spec, message):
    with pytest.raises(ScheduleError, match=".*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("⌈", ".").replace("⌉", ".")):
        KeepSchedule.parse(spec, 12, 196)


def test_topk_limit():
    with pytest.raises(ScheduleError, match="TopK limit of 3840"):
        KeepSchedule.parse("r:10", 12, 8000)


def test_calibration_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"drops": [10, 5], "depth": 12, "num_patches": 196}))
    assert KeepSchedule.parse(f"calib:{path}", 12, 196).drops[:3] == (10, 5, 0)
    with pytest.raises(ScheduleError, match="measured with depth=12, but this model has depth=24"):
        KeepSchedule.parse(f"calib:{path}", 24, 196)
    with pytest.raises(ScheduleError, match="does not exist"):
        KeepSchedule.parse(f"calib:{tmp_path / 'missing.json'}", 12, 196)
    path.write_text("{not json")
    with pytest.raises(ScheduleError, match="not a saint-export calibration"):
        KeepSchedule.parse(f"calib:{path}", 12, 196)
