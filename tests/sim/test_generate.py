"""`mobile-vla data generate`: real MiniWorld renders, the scripted expert, Ray tasks, determinism.

Everything that opens a GL context runs inside Ray tasks (the `ray_cluster` fixture), never in the
pytest process: a GL context in the parent would make later fork-based workers hang.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.data.episodes import list_episode_files, read_episode
from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import DataError
from mobile_vla.sim.expert import ScriptedExpert
from mobile_vla.sim.generate import GeneratorConfig, _SplitRun, candidate_seeds, generate_dataset
from mobile_vla.sim.scenes import SceneSpec, realised_velocity, scene_from_seed
from mobile_vla.sim.split_spec import SplitSpec, default_split_spec, load_split_spec

# Pixels that read as each colour under MiniWorld's lighting (a coarse RGB box per colour).
COLOUR_BOXES = {
    "red": lambda r, g, b: (r > 110) & (g < 70) & (b < 70),
    "green": lambda r, g, b: (g > 110) & (r < 80) & (b < 80),
    "blue": lambda r, g, b: (b > 110) & (r < 80) & (g < 80),
    "yellow": lambda r, g, b: (r > 110) & (g > 110) & (b < 70),
    "purple": lambda r, g, b: (b > 90) & (r > 50) & (g < 60) & (r < b),
}


def colour_share(frame: np.ndarray, colour: str) -> float:
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    return float(COLOUR_BOXES[colour](r, g, b).mean())


def spec_with(fractions: dict[str, float]) -> SplitSpec:
    defaults = default_split_spec()
    splits = {name: defaults.splits[name].model_copy(update={"fraction": f}) for name, f in fractions.items()}
    return SplitSpec(**{**defaults.model_dump(exclude={"splits"}), "splits": splits})


def episodes_of(folder) -> dict[str, object]:
    return {name: read_episode(folder / name) for name in list_episode_files(folder)}


def run_in_worker(ray, fn, *args):
    """GL work happens in a Ray worker process, not in pytest's."""
    return ray.get(ray.remote(num_cpus=1)(fn).remote(*args))


# -- simulator semantics ----------------------------------------------------------------------------
def test_actions_move_the_robot_in_its_body_frame_and_walls_stop_it(ray_cluster):
    def probe():
        from mobile_vla.sim.navigation_env import NavigationEnv  # GL: in the worker only
        from mobile_vla.sim.scenes import HEIGHTS, RADIUS_PER_HEIGHT, Placed, Pose, RoomSpec, SceneSpec

        def thing(kind, x, z, colour=None):
            return Placed(kind=kind, colour=colour, x=x, z=z, dir=0.0, height=HEIGHTS[kind])

        scene = SceneSpec(
            split="train",
            seed=1,
            layout_seed=1,
            room=RoomSpec(width=8, depth=8, wall_tex="brick_wall", floor_tex="asphalt", ceil_tex="ceiling_tiles"),
            agent=Pose(x=4.0, z=4.0, dir=0.0),
            target=thing("box", 7.0, 7.0, "red"),
            distractors=[thing("ball", 7.0, 1.0, "blue"), thing("key", 1.0, 7.0, "green")],
            obstacles=[thing("barrel", 1.0, 1.0), thing("cone", 4.0, 7.0)],
            domain_rand=False,
            instruction="go to the red box",
            template_ids=["go_to"],
        )
        env = NavigationEnv(scene)
        out = {
            "radius": {
                e.kind: (e.radius, HEIGHTS[e.kind] * RADIUS_PER_HEIGHT[e.kind])
                for e in env.entities
                if hasattr(e, "kind")
            }
        }
        start = env.agent.pos.copy()
        out["forward"] = env.execute_action((0.5, 0.0, 0.0), 5.0), (env.agent.pos - start).tolist()
        start = env.agent.pos.copy()
        out["left"] = env.execute_action((0.0, 0.5, 0.0), 5.0), (env.agent.pos - start).tolist()
        start = env.agent.pos.copy()
        out["clipped"] = env.execute_action((10.0, 0.0, 0.0), 5.0), (env.agent.pos - start).tolist()
        out["turn"] = env.execute_action((0.0, 0.0, 1.0), 5.0), env.agent.dir
        env.agent.pos, env.agent.dir = np.array([7.45, 0.0, 4.0]), 0.0  # 0.15 m from the east wall
        out["blocked"] = env.execute_action((0.75, 0.0, 0.0), 5.0), env.agent.pos.tolist()
        out["near_far"] = bool(env.near(env.target))
        env.agent.pos = np.array([7.0, 0.0, 5.95])  # beside the red box, 1.05 m between centres
        out["near_close"] = bool(env.near(env.target))
        return out

    out = run_in_worker(ray_cluster, probe)
    for kind, (built, assumed) in out["radius"].items():
        assert built == pytest.approx(assumed, rel=1e-3), kind
    moved, delta = out["forward"]
    assert moved and delta == pytest.approx([0.1, 0.0, 0.0], abs=1e-9)  # dir 0 faces +x
    moved, delta = out["left"]
    assert moved and delta == pytest.approx([0.0, 0.0, -0.1], abs=1e-9)  # left of +x is -z (y up)
    assert out["clipped"][1] == pytest.approx([0.15, 0.0, 0.0], abs=1e-9)  # 0.75 m/s limit at 5 Hz
    assert out["turn"][1] == pytest.approx(0.2)  # positive yaw turns left
    moved, pos = out["blocked"]
    assert not moved and pos == pytest.approx([7.45, 0.0, 4.0])
    assert not out["near_far"] and out["near_close"]


def test_realised_velocity_is_the_executed_command_without_a_refused_translation():
    np.testing.assert_array_equal(realised_velocity((0.5, -0.2, 0.3), True), np.float32([0.5, -0.2, 0.3]))
    np.testing.assert_array_equal(realised_velocity((10.0, -10.0, 9.0), True), np.float32([0.75, -0.5, 1.5]))
    np.testing.assert_array_equal(realised_velocity((0.75, 0.1, -0.4), False), np.float32([0.0, 0.0, -0.4]))
    assert realised_velocity((0.75, 0.1, -9.0), False).dtype == np.float32


# -- the shared tiny dataset ------------------------------------------------------------------------
def test_tiny_dataset_manifest_records_splits_and_expert_success(tiny_dataset):
    manifest = load_manifest(tiny_dataset)
    counts = {name: len(files) for name, files in manifest["splits"].items()}
    assert counts == {"train": 6, "val": 2, "unseen_pair": 1, "visual_shift": 1}
    assert manifest["generator"]["held_out_splits"] == ["unseen_pair", "visual_shift"]
    assert sorted(f for files in manifest["splits"].values() for f in files) == list_episode_files(tiny_dataset)
    for name, rate in manifest["expert_success"].items():
        assert rate["kept"] == counts[name]
        assert rate["attempted"] >= rate["kept"]
        assert rate["success_rate"] == pytest.approx(rate["kept"] / rate["attempted"])
    assert manifest["state_dim"] == 3 and manifest["control_hz"] == 5.0
    assert manifest["frame_keys"] == [
        "executed",
        "measured_velocity",
        "target_bearing",
        "target_distance",
        "target_in_view",
    ]
    assert manifest["generator"]["settings"]["action_noise"] == 0.0


def test_tiny_dataset_episodes_follow_the_format_and_their_scene(tiny_dataset):
    manifest = load_manifest(tiny_dataset)
    spec = SplitSpec.model_validate(manifest["generator"]["split_spec"])
    for split, files in manifest["splits"].items():
        for name in files:
            episode = read_episode(tiny_dataset / name)
            attrs = episode.attrs
            assert attrs["success"] is True and attrs["source"] == "miniworld" and attrs["split"] == split
            assert episode.images.dtype == np.uint8 and episode.images.shape[1:] == (224, 224, 3)
            scene = SceneSpec.from_json(attrs["scene"])
            assert scene == scene_from_seed(split, attrs["seed"], spec)  # rebuildable from the seed
            assert attrs["instruction"] == scene.instruction
            # state = the command executed at the previous step; the last frame says "stop here"
            np.testing.assert_array_equal(episode.state[0], np.zeros(3, np.float32))
            np.testing.assert_array_equal(episode.state[1:], episode.actions[:-1])
            np.testing.assert_array_equal(episode.actions[-1], np.zeros(3, np.float32))
            assert 3 <= episode.num_frames <= scene.max_steps + 1
            # no DART noise: the executed command is the expert's; privileged labels for every frame
            assert attrs["action_noise"] == 0.0
            np.testing.assert_array_equal(episode.extras["executed"], episode.actions)
            # the velocity realised: the executed command, or no translation where a move was refused
            measured, executed = episode.extras["measured_velocity"], episode.extras["executed"]
            np.testing.assert_array_equal(measured[:, 2], executed[:, 2])  # the turn always happens
            for t in range(episode.num_frames):
                assert measured[t, :2].tolist() in (executed[t, :2].tolist(), [0.0, 0.0]), (name, t)
            distance = episode.extras["target_distance"]
            assert distance[-1] < distance[0] and np.abs(episode.extras["target_bearing"]).max() <= np.pi
            assert set(np.unique(episode.extras["target_in_view"])) <= {0.0, 1.0}
            assert np.abs(episode.actions[:, 0]).max() <= 0.75 + 1e-6


def test_frames_are_real_renders_that_change_and_show_the_target(tiny_dataset):
    episodes = episodes_of(tiny_dataset)
    first_frames = []
    for name, episode in episodes.items():
        images = episode.images.astype(np.int16)  # [T, H, W, 3]
        assert images.std() > 20, f"{name}: flat frames"
        step_change = np.abs(np.diff(images, axis=0)).mean(axis=(1, 2, 3))  # [T-1]
        assert (step_change > 0.5).mean() > 0.8, f"{name}: the view does not change as the robot moves"
        scene = SceneSpec.from_json(episode.attrs["scene"])
        colour = scene.target.colour
        end, start = colour_share(episode.images[-1], colour), colour_share(episode.images[0], colour)
        assert end > 0.03 and end > start, f"{name}: {colour} target fills {start:.3f} -> {end:.3f} of the view"
        first_frames.append(images[0])
    for i in range(len(first_frames)):
        for j in range(i + 1, len(first_frames)):
            assert np.abs(first_frames[i] - first_frames[j]).mean() > 5, "two episodes start on the same view"


def test_recorded_commands_replay_to_success_in_a_rebuilt_scene(ray_cluster, tiny_dataset):
    """Closed-loop evaluation's contract: the scene JSON alone rebuilds the exact episode."""
    manifest = load_manifest(tiny_dataset)
    names = [manifest["splits"]["train"][0], manifest["splits"]["visual_shift"][0]]
    recorded = {name: read_episode(tiny_dataset / name) for name in names}

    def replay(episodes):
        from mobile_vla.sim.navigation_env import NavigationEnv  # GL: in the worker only

        out = {}
        env = None
        for name, (scene_json, actions) in episodes.items():
            scene = SceneSpec.from_json(scene_json)
            env = env or NavigationEnv(scene)
            frames = [env.load_scene(scene)]
            reached, realised = [], []
            for action in actions[:-1]:
                moved = env.execute_action(action, 5.0)
                realised.append(realised_velocity(action, moved))
                frames.append(env.render_obs())
                reached.append(bool(env.near(env.target)))
            out[name] = (np.stack(frames), reached, np.stack(realised))
        return out

    replayed = run_in_worker(ray_cluster, replay, {n: (e.attrs["scene"], e.actions) for n, e in recorded.items()})
    for name, (frames, reached, realised) in replayed.items():
        assert reached[-1] and not any(reached[:-1]), f"{name}: success only at the recorded end"
        np.testing.assert_array_equal(frames, recorded[name].images)  # same pixels in another process
        np.testing.assert_array_equal(realised, recorded[name].extras["measured_velocity"][:-1])


# -- generation -------------------------------------------------------------------------------------
@pytest.mark.slow  # two datasets generated in MiniWorld on Ray: ~15 s on a loaded 2-core box
def test_same_seed_same_episodes_whatever_the_task_size(ray_cluster, tmp_path):
    spec = spec_with({"train": 0.5, "unseen_layout": 0.5})
    a = generate_dataset(tmp_path / "a", 2, spec, seed=11, settings=GeneratorConfig(seeds_per_task=1), progress=False)
    b = generate_dataset(tmp_path / "b", 2, spec, seed=11, settings=GeneratorConfig(seeds_per_task=3), progress=False)
    assert a["splits"] == b["splits"] and a["expert_success"] == b["expert_success"]
    for name in list_episode_files(tmp_path / "a"):
        ea, eb = read_episode(tmp_path / "a" / name), read_episode(tmp_path / "b" / name)
        np.testing.assert_array_equal(ea.images, eb.images)
        np.testing.assert_array_equal(ea.actions, eb.actions)
        assert ea.attrs == eb.attrs
    assert candidate_seeds(spec, "train", 11, 20) == candidate_seeds(spec, "train", 11, 20)
    assert candidate_seeds(spec, "train", 11, 20) != candidate_seeds(spec, "train", 12, 20)


def replay_labels(episodes: dict[str, tuple[str, np.ndarray]]) -> dict:
    """Ray task body: each episode's `executed` commands replayed in its rebuilt scene; per frame, what
    the expert commands there, the privileged labels, and whether the target was reached.
    """
    from mobile_vla.sim.generate import privileged_labels
    from mobile_vla.sim.navigation_env import NavigationEnv  # GL: in the worker only

    expert, env, out = ScriptedExpert(), None, {}
    for name, (scene_json, executed) in episodes.items():
        scene = SceneSpec.from_json(scene_json)
        env = env or NavigationEnv(scene)
        env.load_scene(scene)
        expert_actions, labels, reached = [], [], []
        for command in executed:
            expert_actions.append(expert.act(env))
            labels.append(privileged_labels(env))
            if len(reached) < len(executed) - 1:  # the last frame is at the target: nothing executed
                env.execute_action(tuple(float(v) for v in command), 5.0)
                reached.append(bool(env.near(env.target)))
        out[name] = (np.asarray(expert_actions, np.float32), np.asarray(labels, np.float32), reached)
    return out


def test_dart_noise_is_reproducible_and_labels_stay_the_clean_expert_command(ray_cluster, tmp_path):
    spec = spec_with({"train": 1.0})
    noisy = GeneratorConfig(action_noise=0.3, seeds_per_task=1)
    a = generate_dataset(tmp_path / "a", 2, spec, seed=5, settings=noisy, progress=False)
    b = generate_dataset(
        tmp_path / "b", 2, spec, seed=5, settings=GeneratorConfig(action_noise=0.3, seeds_per_task=2), progress=False
    )
    assert a["splits"] == b["splits"] and a["generator"]["settings"]["action_noise"] == 0.3
    episodes = episodes_of(tmp_path / "a")
    for name, episode in episodes.items():
        again = read_episode(tmp_path / "b" / name)
        np.testing.assert_array_equal(episode.images, again.images)
        for key in episode.extras:
            np.testing.assert_array_equal(episode.extras[key], again.extras[key])
        executed = episode.extras["executed"]
        assert episode.attrs["action_noise"] == 0.3
        # the noise is there: executed commands differ from the labels by about 0.3 x the limits
        spread = np.std(executed[:-1] - episode.actions[:-1], axis=0)
        assert spread == pytest.approx([0.3 * 0.75, 0.3 * 0.5, 0.3 * 1.2], rel=0.6), spread
        np.testing.assert_array_equal(episode.state[0], np.zeros(3, np.float32))
        np.testing.assert_array_equal(episode.state[1:], executed[:-1])  # the previous EXECUTED command
        assert np.all(np.abs(executed) <= np.array([0.75, 0.5, 1.5], np.float32))

    replayed = run_in_worker(
        ray_cluster, replay_labels, {n: (e.attrs["scene"], e.extras["executed"]) for n, e in episodes.items()}
    )
    for name, (expert_actions, labels, reached) in replayed.items():
        episode = episodes[name]
        # the label at every visited (noisy) state is what the expert commands there
        np.testing.assert_array_equal(episode.actions[:-1], expert_actions[:-1])
        for column, key in enumerate(("target_bearing", "target_distance", "target_in_view")):
            np.testing.assert_array_equal(episode.extras[key], labels[:, column], err_msg=f"{name}: {key}")
        assert reached[-1] and not any(reached[:-1]), f"{name}: the noisy run reached the target at its end"


def test_target_in_view_follows_the_camera_field_of_view(ray_cluster):
    def probe():
        from mobile_vla.sim.expert import target_bearing, target_in_view
        from mobile_vla.sim.navigation_env import NavigationEnv  # GL: in the worker only

        scene = scene_from_seed("train", default_split_spec().splits["train"].seeds.start, default_split_spec())
        env = NavigationEnv(scene, obs_size=64)
        out = []
        for _ in range(36):  # a full turn on the spot in 10 degree steps
            out.append((target_bearing(env), target_in_view(env), env.agent.cam_fov_y))
            env.turn_agent(10)
        return out

    seen = run_in_worker(ray_cluster, probe)
    for bearing, in_view, fov in seen:
        half = np.radians(fov) / 2  # square frames: the horizontal half-angle is the vertical one
        if abs(bearing) < half - 0.05:
            assert in_view, (bearing, fov)
        if abs(bearing) > half + 0.05:
            assert not in_view, (bearing, fov)
    assert 0 < sum(v for _, v, _ in seen) < len(seen)


def test_action_noise_must_be_a_fraction():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match="action_noise"):
            GeneratorConfig(action_noise=bad)


def test_only_successful_episodes_are_kept(ray_cluster, tmp_path):
    # 22 steps (4.4 s) is too short for the far targets: many tries fail and must leave no trace.
    spec = spec_with({"train": 1.0})
    out = tmp_path / "short"
    manifest = generate_dataset(
        out, 2, spec, seed=3, settings=GeneratorConfig(max_steps=22, seeds_per_task=2), progress=False
    )
    rate = manifest["expert_success"]["train"]
    assert rate["kept"] == 2 and rate["attempted"] > 2
    assert list_episode_files(out) == sorted(manifest["splits"]["train"])  # failures and extras removed
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["splits"]["train"] + ["manifest.json"])
    for name in manifest["splits"]["train"]:
        assert read_episode(out / name, load_images=False).attrs["success"] is True


def test_kept_episodes_are_the_first_successes_in_candidate_order():
    run = _SplitRun("train", needed=2, candidates=[10, 11, 12, 13, 14], submitted=5)
    run.outcomes = {0: False, 1: True, 3: True, 4: True}
    assert run.kept_indices() is None  # candidate 2 still running: it might be the second success
    run.outcomes[2] = False
    assert run.kept_indices() == [1, 3]
    run.outcomes[2] = True
    assert run.kept_indices() == [1, 2]


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_prints_the_resolved_split_spec(tmp_path, capsys):
    assert main(["data", "generate", "--show-split-spec", "--set", "held_out_templates=[approach, avoiding]"]) == 0
    path = tmp_path / "spec.yaml"
    path.write_text(capsys.readouterr().out)
    assert path.read_text().startswith("# Split spec. Use: mobile-vla data generate")
    assert load_split_spec(path).held_out_templates == ["approach", "avoiding"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--episodes", "0"], "--episodes 0: expected at least 1"),
        (["--split-spec", "missing.yaml"], "missing.yaml: config file not found"),
        (["splits.val.seeds.start=10"], "splits.train.seeds and splits.val.seeds overlap"),
        (["--control-hz", "0"], "--control-hz 0.0: expected a positive number"),
        (["--action-noise", "1.5"], "--action-noise 1.5: expected a number in [0, 1]"),
        (["--action-noise", "-0.1"], "--action-noise -0.1: expected a number in [0, 1]"),
    ],
)
def test_cli_refuses_bad_input_with_one_line(tmp_path, capsys, args, message):
    assert main(["data", "generate", "--out", str(tmp_path / "new"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_generate_never_writes_into_a_dataset_folder(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"keep": "me"}))
    with pytest.raises(DataError, match="already holds 1 dataset file"):
        generate_dataset(tmp_path, 1, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"keep": "me"}
