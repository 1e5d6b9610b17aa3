"""Plan YAML: validation messages, round trip, block references."""

import pytest

from memtune.blocks import resolve_block_refs, shared_block_refs
from memtune.errors import PlanError
from memtune.strategies import load_plan, plan_from_dict

REPEATED = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
ALL = ["tok", *REPEATED, "head"]


def test_unknown_section_names_it_and_lists_allowed():
    with pytest.raises(PlanError, match=r"unknown section 'chekpoint'; allowed: .*checkpoint"):
        plan_from_dict({"chekpoint": {"blocks": "all"}})


def test_wrong_version_refused():
    with pytest.raises(PlanError, match="version 2"):
        plan_from_dict({"memtune_plan": 2})


def test_yaml_round_trip(tmp_path):
    plan = plan_from_dict({"run": {"script": "train.py", "argv": ["--x", "1"]}, "checkpoint": {"blocks": [0, "2-3"]}})
    path = plan.save(tmp_path / "plan.yaml")
    again = load_plan(path)
    assert again.sections == plan.sections and again.run == plan.run


def test_malformed_yaml_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("checkpoint: {blocks: [0, 1\n")
    with pytest.raises(PlanError, match="not valid YAML") as e:
        load_plan(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("refs,expected", [
    ("all", REPEATED),
    ([0, -1], ["blocks.0", "blocks.3"]),
    (["1-2", "head"], ["blocks.1", "blocks.2", "head"]),
])
def test_resolve_block_refs(refs, expected):
    assert resolve_block_refs(refs, REPEATED, ALL, "x") == expected


@pytest.mark.parametrize("refs", [[4], ["2-9"], ["nope"]])
def test_resolve_block_refs_rejects(refs):
    with pytest.raises(PlanError, match="x: "):
        resolve_block_refs(refs, REPEATED, ALL, "x")


def test_shared_block_refs():
    assert shared_block_refs([0, "2-3"], ["3-5"]) == {3}
    assert shared_block_refs("all", [1, "head"]) == {1}
    assert shared_block_refs("all", "all") == {"all"}
    assert shared_block_refs([0, 1], ["head"]) == set()
