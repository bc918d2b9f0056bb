"""Split spec: held-out splits stay held out (seeds, layouts, colour x shape pairs, templates).

Pure Python: scenes are sampled without MiniWorld or GL.
"""

from __future__ import annotations

import itertools

import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.sim import instructions
from mobile_vla.sim.scenes import SceneSpec, scene_from_seed
from mobile_vla.sim.split_spec import (
    SplitSpec,
    default_split_spec,
    load_split_spec,
    split_spec_yaml,
)

HELD_OUT_SPLITS = ["unseen_layout", "unseen_pair", "unseen_paraphrase", "visual_shift"]


def scenes(spec: SplitSpec, split: str, count: int) -> list[SceneSpec]:
    start = spec.splits[split].seeds.start
    return [scene_from_seed(split, seed, spec) for seed in range(start, start + count)]


def test_default_spec_has_train_val_and_every_held_out_split():
    spec = default_split_spec()
    assert set(spec.splits) == {"train", "val", *HELD_OUT_SPLITS}
    assert [name for name in spec.splits if spec.is_held_out(name)] == HELD_OUT_SPLITS
    assert not spec.is_held_out("val")


def test_episode_seed_ranges_never_overlap():
    spec = default_split_spec()
    for (a, sa), (b, sb) in itertools.combinations(spec.splits.items(), 2):
        assert sa.seeds.stop <= sb.seeds.start or sb.seeds.stop <= sa.seeds.start, (a, b)


def test_every_colour_and_shape_is_trained_but_held_out_pairs_never_are():
    spec = default_split_spec()
    train = set(spec.train_pairs())
    assert {c for c, _ in train} == set(spec.colours)
    assert {s for _, s in train} == set(spec.shapes)
    assert train.isdisjoint({tuple(p) for p in spec.held_out_pairs})
    assert len(train) + len(spec.held_out_pairs) == len(spec.colours) * len(spec.shapes)


def test_training_scenes_never_show_a_held_out_pair_or_template():
    spec = default_split_spec()
    held_pairs = {tuple(p) for p in spec.held_out_pairs}
    held_templates = set(spec.held_out_templates)
    for split in ("train", "val"):
        for scene in scenes(spec, split, 150):
            shown = [(scene.target.colour, scene.target.kind)] + [(d.colour, d.kind) for d in scene.distractors]
            assert held_pairs.isdisjoint(shown), (split, scene.seed, shown)
            assert held_templates.isdisjoint(scene.template_ids), (split, scene.seed)
            assert scene.layout_seed in spec.splits["train"].layouts
            assert not scene.domain_rand


def test_held_out_splits_differ_from_training_in_their_factor():
    spec = default_split_spec()
    held_pairs = {tuple(p) for p in spec.held_out_pairs}
    train_layouts = spec.splits["train"].layouts
    for scene in scenes(spec, "unseen_pair", 40):
        assert (scene.target.colour, scene.target.kind) in held_pairs
        assert all((d.colour, d.kind) not in held_pairs for d in scene.distractors)
    for scene in scenes(spec, "unseen_layout", 40):
        assert scene.layout_seed not in train_layouts
    paraphrased = scenes(spec, "unseen_paraphrase", 40)
    for scene in paraphrased:
        assert set(scene.template_ids) <= set(spec.held_out_templates)
    assert {s.template_ids[0] for s in paraphrased} == set(spec.template_ids("held_out", "goal"))
    assert all(scene.domain_rand for scene in scenes(spec, "visual_shift", 5))


def test_training_scenes_cover_every_colour_shape_and_obstacle_scenario():
    spec = default_split_spec()
    train = scenes(spec, "train", 300)
    assert {(s.target.colour, s.target.kind) for s in train} == set(spec.train_pairs())
    assert {len(s.obstacles) for s in train} == {0, 1, 2}
    assert {o.side for s in train for o in s.obstacles} == {"left", "right"}
    assert {o.kind for s in train for o in s.obstacles} == set(spec.obstacle_kinds)


def test_instruction_names_target_and_obstacle_sides():
    spec = default_split_spec()
    for scene in scenes(spec, "train", 60):
        assert f"{scene.target.colour} {scene.target.kind}" in scene.instruction
        for obstacle in scene.obstacles:
            assert f"the {obstacle.kind} on the {obstacle.side}" in scene.instruction
    sentence = instructions.compose("go_to", "avoiding", ("red", "box"), [("barrel", "left"), ("cone", "right")])
    assert sentence == "go to the red box avoiding the barrel on the left and the cone on the right"


def test_scene_sampling_is_a_pure_function_of_split_seed_and_spec():
    spec = default_split_spec()
    assert scene_from_seed("val", 1_000_123, spec) == scene_from_seed("val", 1_000_123, spec)
    assert scene_from_seed("val", 1_000_123, spec) != scene_from_seed("val", 1_000_124, spec)
    scene = scene_from_seed("unseen_layout", 2_000_005, spec)
    assert SceneSpec.from_json(scene.to_json()) == scene
    with pytest.raises(ValueError, match="outside splits.val.seeds"):
        scene_from_seed("val", 5, spec)


def test_allocation_adds_up_and_follows_fractions():
    spec = default_split_spec()
    counts = spec.allocate(200)
    assert sum(counts.values()) == 200
    assert counts["train"] == 120 and counts["val"] == 20
    assert sum(spec.allocate(7).values()) == 7


def test_yaml_round_trip_and_overrides(tmp_path):
    spec = default_split_spec()
    path = tmp_path / "splits.yaml"
    path.write_text(split_spec_yaml(spec))
    assert load_split_spec(path) == spec
    changed = load_split_spec(path, ["splits.val.fraction=0.2", "splits.train.fraction=0.5"])
    assert changed.splits["val"].fraction == 0.2
    partial = tmp_path / "partial.yaml"
    partial.write_text("held_out_templates: [approach, going_around]\n")
    assert load_split_spec(partial).held_out_templates == ["approach", "going_around"]
    assert load_split_spec(partial).splits == spec.splits  # absent keys keep their defaults


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["splits.val.seeds.start=999000"], "splits.train.seeds and splits.val.seeds overlap"),
        (["held_out_pairs=[[red, box], [red, ball], [red, key]]"], "colour 'red' would never be seen"),
        (
            ["held_out_pairs=[[red, key], [green, key], [blue, key], [yellow, key], [purple, key]]"],
            "shape 'key' would never be seen",
        ),
        (["held_out_pairs=[[pink, box]]"], "'pink', 'box'"),
        (["held_out_templates=[no_such_template]"], "'no_such_template' is not a template id"),
        (
            ["held_out_templates=[avoiding, steering_clear, going_around, keeping_away]"],
            "no avoid template left for training",
        ),
        (["splits.val.fraction=0.5"], "fractions add up to 1.4"),
        (["splits.unseen_layout.layouts.start=500"], "splits.unseen_layout.layouts = [500, 1100000) partly overlaps"),
        (["splits.val.fraction=lots"], "splits.val.fraction = 'lots'"),
        (["colours=[red, red, blue]"], "duplicate"),
        (["splits.train.domain_rand=true"], "splits.train: must use targets=train_pairs"),
        (["splits.unseen_pair.targets=held_out_pairs", "held_out_pairs=[]"], "held_out_pairs is empty"),
    ],
)
def test_leaky_or_broken_specs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        load_split_spec(None, overrides)
    assert message in str(excinfo.value)


def test_missing_split_spec_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_split_spec(tmp_path / "nope.yaml")
