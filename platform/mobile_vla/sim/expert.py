"""The scripted expert: a potential field in the robot's body frame.

Attracted to the target, repelled by every other object and by the walls within `influence` metres
of clearance, with a sideways (tangential) push past an obstacle so that one straight ahead is no
local minimum; it turns towards the target to keep it in view. It reads the simulator's true state,
which the learned policy never sees; that is what makes it the teacher.

    expert = ScriptedExpert()
    vx, vy, wz = expert.act(env)            # m/s, m/s, rad/s; body frame (x forward, y left)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mobile_vla.sim.scenes import SPEED_LIMITS


def _xz(vec) -> np.ndarray:
    return np.array([float(vec[0]), float(vec[2])])


def body_axes(agent) -> tuple[np.ndarray, np.ndarray]:
    """(forward, left) unit vectors of the robot in the floor plane (x, z)."""
    forward = np.array([math.cos(agent.dir), -math.sin(agent.dir)])
    return forward, np.array([forward[1], -forward[0]])


def target_bearing(env) -> float:
    """Bearing of the target's centre in the robot's body frame, rad (0 ahead, left positive)."""
    forward, left = body_axes(env.agent)
    to_target = _xz(env.target.pos) - _xz(env.agent.pos)
    return math.atan2(float(np.dot(to_target, left)), float(np.dot(to_target, forward)))


def target_distance(env) -> float:
    """Floor-plane distance between the robot's and the target's centres, m."""
    return float(np.linalg.norm(_xz(env.target.pos) - _xz(env.agent.pos)))


def target_in_view(env) -> bool:
    """True when the target's centre, at half its height, projects inside the camera frame.

    The pinhole camera MiniWorld renders with (its pose, pitch, vertical field of view and the
    frame's aspect ratio); occlusion by other objects is not considered.
    """
    agent = env.agent
    ahead = np.asarray(agent.cam_dir, dtype=np.float64)  # unit look direction, world (x, y, z)
    right = np.cross(ahead, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, ahead)
    centre = np.asarray(env.target.pos, dtype=np.float64) + [0.0, env.target.height / 2, 0.0]
    offset = centre - np.asarray(agent.cam_pos, dtype=np.float64)
    depth = float(np.dot(offset, ahead))
    if depth <= 0.04:  # behind the camera or inside its near plane
        return False
    half_height = math.tan(math.radians(agent.cam_fov_y) / 2)
    half_width = half_height * env.obs_fb.width / env.obs_fb.height
    across, above = float(np.dot(offset, right)), float(np.dot(offset, up))
    return abs(across) / depth <= half_width and abs(above) / depth <= half_height


@dataclass(frozen=True)
class ScriptedExpert:
    """The teacher: a body-frame potential field over the simulator's true state (see module doc)."""

    max_forward: float = SPEED_LIMITS[0]  # m/s
    max_lateral: float = SPEED_LIMITS[1]  # m/s
    max_turn: float = 1.2  # rad/s
    attraction_gain: float = 1.2  # 1/s: speed per metre of gap to the target, before clipping
    repulsion_gain: float = 0.35
    tangential_gain: float = 0.6
    max_push: float = 0.9  # m/s: cap of one object's repulsion
    influence: float = 1.0  # m of clearance within which objects and walls push back
    turn_gain: float = 2.0  # 1/s: yaw rate per radian of bearing error

    def act(self, env) -> tuple[float, float, float]:
        agent = env.agent
        here = _xz(agent.pos)
        forward, left = body_axes(agent)

        to_target = _xz(env.target.pos) - here
        distance = float(np.linalg.norm(to_target))
        goal_dir = to_target / max(distance, 1e-6)
        gap = distance - env.target.radius - agent.radius
        velocity = goal_dir * min(self.max_forward, self.attraction_gain * max(gap, 0.05))

        for entity in env.entities:
            if entity is agent or entity is env.target:
                continue
            away = here - _xz(entity.pos)
            centre_distance = float(np.linalg.norm(away))
            clearance = centre_distance - entity.radius - agent.radius
            velocity += self._push(
                away / max(centre_distance, 1e-6), clearance, goal_dir, getattr(entity, "side", None)
            )
        for a, b in env.wall_segs:
            a, b = _xz(a), _xz(b)
            ab = b - a
            t = float(np.clip(np.dot(here - a, ab) / np.dot(ab, ab), 0.0, 1.0))
            away = here - (a + t * ab)
            wall_distance = float(np.linalg.norm(away))
            velocity += self._push(away / max(wall_distance, 1e-6), wall_distance - agent.radius)

        speed = float(np.linalg.norm(velocity))
        if speed > self.max_forward:
            velocity *= self.max_forward / speed
        vx = float(np.clip(np.dot(velocity, forward), -self.max_forward, self.max_forward))
        vy = float(np.clip(np.dot(velocity, left), -self.max_lateral, self.max_lateral))

        wz = float(np.clip(self.turn_gain * target_bearing(env), -self.max_turn, self.max_turn))
        return vx, vy, wz

    def _push(
        self, away: np.ndarray, clearance: float, goal_dir: np.ndarray | None = None, side: str | None = None
    ) -> np.ndarray:
        """Repulsion grows as 1/clearance inside `influence` (capped, so one 0.2 s step cannot
        overshoot into the next object); an object ahead also pushes sideways, round the side the
        robot is already on or, when it is dead ahead, away from the side the instruction names
        (an obstacle "on the left" is passed on its right).
        """
        if clearance >= self.influence:
            return np.zeros(2)
        clearance = max(clearance, 0.05)
        magnitude = min(self.repulsion_gain * (1.0 / clearance - 1.0 / self.influence), self.max_push)
        push = magnitude * away
        if goal_dir is not None and float(np.dot(away, goal_dir)) < 0.0:  # object between us and goal
            tangent = np.array([away[1], -away[0]])  # slide past on the side we are already on
            if float(np.dot(tangent, goal_dir)) < 0.0:
                tangent = -tangent
            if side is not None and abs(float(np.dot(tangent, goal_dir))) < 0.2:  # dead ahead: named side
                goal_left = np.array([goal_dir[1], -goal_dir[0]])
                tangent = goal_left if side == "right" else -goal_left
            push += self.tangential_gain * (1.0 - clearance / self.influence) * tangent
        return push
