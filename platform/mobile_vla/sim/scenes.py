"""MiniWorld navigation scenes as data: the JSON scene spec and its sampling from seeds.

    scene = scene_from_seed("train", 123, split_spec)     # pure numpy: no GL, no MiniWorld import
    SceneSpec.from_json(scene.to_json()) == scene

Pure and light at import: the MiniWorld env that shows a scene and executes commands in it is
`mobile_vla.sim.navigation_env` (GL; Ray workers only). The spec holds everything needed to
rebuild a scene (positions, textures, colours, instruction), so closed-loop evaluation rebuilds
the recorded scene from an episode's `scene` attribute alone.
World frame is MiniWorld's: floor plane (x, z), y up, heading `dir` in radians with forward =
(cos dir, -sin dir). Actions are in the body frame of REP-103: x forward, y left, yaw left-positive;
`SPEED_LIMITS` and `CONTROL_HZ` are the simulated base's.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from mobile_vla.config import StrictModel
from mobile_vla.sim import instructions
from mobile_vla.sim.split_spec import SplitSpec

ENV_ID = "mobile-vla/NavRoom-v1"
CONTROL_HZ = 5.0
MAX_STEPS = 100
AGENT_RADIUS = 0.4  # miniworld.entity.Agent.radius
# Limits of the simulated base, m/s and rad/s; commands beyond them are clipped when executed.
SPEED_LIMITS = (0.75, 0.5, 1.5)


def clip_command(command) -> np.ndarray:
    """A body-frame command (vx, vy, wz) clipped to what the base executes (`SPEED_LIMITS`), float64 [3]."""
    limits = np.asarray(SPEED_LIMITS, np.float64)  # [3]
    return np.clip(np.asarray(command, np.float64), -limits, limits)


def realised_velocity(command, moved: bool) -> np.ndarray:
    """The velocity the base realised over one step of `command`, float32 [3] (m/s, m/s, rad/s).

    The command as executed (clipped to `SPEED_LIMITS`); a refused (colliding) move realises no
    translation, only its turn (MiniWorld refuses the move whole and always turns): what wheel
    odometry of a bumper-stopped base reads.
    """
    realised = clip_command(command).astype(np.float32)  # [3]
    if not moved:
        realised[:2] = 0.0
    return realised


# Entity heights (m) and bounding radius per metre of height, as MiniWorld computes them from the
# meshes (tests/sim/test_generate.py checks these against the built entities).
HEIGHTS = {"box": 0.7, "ball": 0.65, "key": 0.45, "barrel": 0.9, "cone": 0.8}
RADIUS_PER_HEIGHT = {"box": math.sqrt(2) / 2, "ball": 0.70854, "key": 1.22591, "barrel": 0.48951, "cone": 0.44863}
MAX_TARGET_RADIUS = max(HEIGHTS[k] * RADIUS_PER_HEIGHT[k] for k in ("box", "ball", "key"))
MAX_OBSTACLE_RADIUS = max(HEIGHTS[k] * RADIUS_PER_HEIGHT[k] for k in ("barrel", "cone"))

WALL_TEXTURES = ("brick_wall", "concrete", "drywall", "stucco", "cinder_blocks", "wood_planks")
FLOOR_TEXTURES = ("floor_tiles_bw", "asphalt", "wood", "marble", "concrete_tiles", "cardboard")
CEILING_TEXTURES = ("ceiling_tiles", "ceiling_tile_noborder", "concrete_tiles")

LAYOUT_SALT = 0x1A7  # seeds the layout stream apart from the episode stream
EPISODE_SALT = 0xE91


class Pose(StrictModel):
    """A position on the floor plane (x, z) and a heading `dir` in radians (forward = (cos, -sin))."""

    x: float
    z: float
    dir: float


class Placed(StrictModel):
    """A target, distractor (box/ball/key with a colour) or obstacle (barrel/cone with a side)."""

    kind: str
    colour: str | None = None
    x: float
    z: float
    dir: float
    height: float
    side: Literal["left", "right"] | None = Field(None, description="obstacles: side of the straight path")

    @property
    def radius(self) -> float:
        return self.height * RADIUS_PER_HEIGHT[self.kind]


class RoomSpec(StrictModel):
    """One rectangular room: its size in metres and its wall, floor and ceiling textures."""

    width: float  # along x
    depth: float  # along z
    wall_tex: str
    floor_tex: str
    ceil_tex: str


class SceneSpec(StrictModel):
    """Everything needed to rebuild one episode's scene: room, start pose, objects, instruction.

    Travels as JSON (`to_json` / `from_json`) in every episode file's `scene` attribute.
    """

    env_id: str = ENV_ID
    split: str
    seed: int
    layout_seed: int
    room: RoomSpec
    agent: Pose
    target: Placed
    distractors: list[Placed]
    obstacles: list[Placed]
    domain_rand: bool
    instruction: str
    template_ids: list[str]
    max_steps: int = MAX_STEPS

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> SceneSpec:
        return cls.model_validate_json(text)


# -- sampling ---------------------------------------------------------------------------------------
class _Layout(StrictModel):
    room: RoomSpec
    agent: Pose
    target_xz: tuple[float, float]
    obstacles: list[tuple[float, float, str]]  # x, z, side
    distractors_xz: list[tuple[float, float]]


def _wall_clearance(room: RoomSpec, x: float, z: float) -> float:
    return min(x, room.width - x, z, room.depth - z)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _left_of(direction: np.ndarray) -> np.ndarray:
    """Unit vector to the left of a travel direction in the (x, z) plane (y up)."""
    return np.array([direction[1], -direction[0]])


def sample_layout(layout_seed: int) -> _Layout:
    """Room, start pose, target spot and obstacles beside the straight path. Retries until valid."""
    rng = np.random.default_rng([LAYOUT_SALT, layout_seed])
    count = int(rng.choice(3, p=[0.2, 0.4, 0.4]))  # fixed first, so retries cannot skew the mix
    low, high = (9.0, 11.0) if count == 2 else (7.0, 10.0)  # a slalom needs a longer run
    room = RoomSpec(
        width=float(rng.uniform(low, high)),
        depth=float(rng.uniform(low, high)),
        wall_tex=str(rng.choice(WALL_TEXTURES)),
        floor_tex=str(rng.choice(FLOOR_TEXTURES)),
        ceil_tex=str(rng.choice(CEILING_TEXTURES)),
    )
    for attempt in range(3000):
        if attempt and attempt % 1000 == 0:  # this room cannot hold that many: one obstacle fewer
            count -= 1
        # Obstacles stand at distances along the straight path; two leave room to pass between.
        if count == 2:
            first = rng.uniform(1.4, 2.0)
            along = [first, first + rng.uniform(2.1, 2.7)]
            distance = along[1] + rng.uniform(2.0, 2.5)
        else:
            distance = rng.uniform(3.5, 6.0)
            along = [rng.uniform(0.4, 0.6) * distance] * count
        agent = np.array([rng.uniform(1.0, room.width - 1.0), rng.uniform(1.0, room.depth - 1.0)])
        heading, bearing = float(rng.uniform(-math.pi, math.pi)), rng.uniform(-0.45, 0.45)
        target = agent + distance * np.array([math.cos(heading + bearing), -math.sin(heading + bearing)])
        if _wall_clearance(room, *target) < 1.2:
            continue
        obstacles = _sample_obstacles(rng, room, agent, target, along)
        if obstacles is None:
            continue
        distractors = _sample_distractors(rng, room, agent, target, obstacles)
        return _Layout(
            room=room,
            agent=Pose(x=float(agent[0]), z=float(agent[1]), dir=heading),
            target_xz=(float(target[0]), float(target[1])),
            obstacles=[(float(x), float(z), side) for x, z, side in obstacles],
            distractors_xz=[(float(x), float(z)) for x, z in distractors],
        )
    raise RuntimeError(f"layout seed {layout_seed}: no valid layout in 3000 tries")  # pragma: no cover


def _sample_obstacles(rng, room, agent, target, along: list[float]) -> list[tuple[float, float, str]] | None:
    """Obstacles just beside the straight path (`along` metres from the start), as in the original
    1box_left / 2box_right runs; None when the layout leaves no way round.
    """
    path = target - agent
    direction = path / np.linalg.norm(path)
    left = _left_of(direction)
    out = []
    for distance in along:
        side = str(rng.choice(["left", "right"]))
        sign = 1.0 if side == "left" else -1.0
        pos = agent + distance * direction + sign * rng.uniform(0.2, 0.45) * left
        # The way round is on the other side: it must leave room for the robot before the wall.
        way_round = pos - sign * (MAX_OBSTACLE_RADIUS + AGENT_RADIUS + 0.2) * left
        if _wall_clearance(room, *pos) < MAX_OBSTACLE_RADIUS + 0.1:
            return None
        if _wall_clearance(room, *way_round) < AGENT_RADIUS + 0.25:
            return None
        if np.linalg.norm(pos - agent) < MAX_OBSTACLE_RADIUS + AGENT_RADIUS + 0.4:
            return None
        if np.linalg.norm(pos - target) < MAX_OBSTACLE_RADIUS + MAX_TARGET_RADIUS + 1.0:
            return None
        # Room to pass between two obstacles, whichever sides they stand on (a slalom).
        if any(np.hypot(pos[0] - x, pos[1] - z) < 2 * (MAX_OBSTACLE_RADIUS + AGENT_RADIUS) + 0.3 for x, z, _ in out):
            return None
        out.append((pos[0], pos[1], side))
    return out


def _sample_distractors(rng, room, agent, target, obstacles) -> list[np.ndarray]:
    """1 or 2 other objects in view but off the path, so the instruction must pick the target."""
    out: list[np.ndarray] = []
    wanted = int(rng.integers(1, 3))
    heading = math.atan2(-(target - agent)[1], (target - agent)[0])
    for _ in range(60):
        if len(out) == wanted:
            break
        distance, bearing = rng.uniform(2.5, 7.0), rng.uniform(-0.9, 0.9)
        pos = agent + distance * np.array([math.cos(heading + bearing), -math.sin(heading + bearing)])
        clear = (
            _wall_clearance(room, *pos) >= MAX_TARGET_RADIUS + 0.2
            and np.linalg.norm(pos - target) >= 2 * MAX_TARGET_RADIUS + 1.2
            and _segment_distance(pos, agent, target) >= MAX_TARGET_RADIUS + AGENT_RADIUS + 1.0
            and all(
                np.linalg.norm(pos - np.array(o[:2])) >= MAX_TARGET_RADIUS + MAX_OBSTACLE_RADIUS + 0.5
                for o in obstacles
            )
            and all(np.linalg.norm(pos - d) >= 2 * MAX_TARGET_RADIUS + 0.5 for d in out)
        )
        if clear:
            out.append(pos)
    return out


def scene_from_seed(split: str, seed: int, spec: SplitSpec) -> SceneSpec:
    """The scene of one episode seed in one split: a pure function of (split, seed, spec)."""
    if split not in spec.splits:
        raise KeyError(f"split {split!r} is not in the split spec ({sorted(spec.splits)})")
    config = spec.splits[split]
    if seed not in config.seeds:
        raise ValueError(f"seed {seed} is outside splits.{split}.seeds [{config.seeds.start}, {config.seeds.stop})")
    rng = np.random.default_rng([EPISODE_SALT, seed])
    layout_seed = config.layouts.start + int(rng.integers(config.layouts.size))
    layout = sample_layout(layout_seed)

    target_pairs = spec.target_pairs(split)
    colour, shape = target_pairs[int(rng.integers(len(target_pairs)))]
    others = [p for p in spec.distractor_pairs(split) if p != (colour, shape)]
    picks = rng.permutation(len(others))[: len(layout.distractors_xz)]
    kinds = [str(rng.choice(spec.obstacle_kinds)) for _ in layout.obstacles]

    def placed(kind, colour_, x, z, side=None) -> Placed:
        return Placed(
            kind=kind,
            colour=colour_,
            x=x,
            z=z,
            dir=float(rng.uniform(-math.pi, math.pi)),
            height=HEIGHTS[kind],
            side=side,
        )

    target = placed(shape, colour, *layout.target_xz)
    distractors = [
        placed(others[i][1], others[i][0], x, z) for i, (x, z) in zip(picks, layout.distractors_xz, strict=False)
    ]
    obstacles = [placed(kind, None, x, z, side) for kind, (x, z, side) in zip(kinds, layout.obstacles, strict=True)]

    goal_ids = spec.template_ids(config.templates, "goal")
    avoid_ids = spec.template_ids(config.templates, "avoid")
    goal_id, avoid_id = str(rng.choice(goal_ids)), str(rng.choice(avoid_ids))
    named_obstacles = [(o.kind, o.side) for o in obstacles]
    instruction = instructions.compose(goal_id, avoid_id, (colour, shape), named_obstacles)

    agent = layout.agent.model_copy(update={"dir": layout.agent.dir + float(rng.uniform(-0.2, 0.2))})
    return SceneSpec(
        split=split,
        seed=seed,
        layout_seed=layout_seed,
        room=layout.room,
        agent=agent,
        target=target,
        distractors=distractors,
        obstacles=obstacles,
        domain_rand=config.domain_rand,
        instruction=instruction,
        template_ids=[goal_id, avoid_id] if obstacles else [goal_id],
    )
