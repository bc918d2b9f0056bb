"""The MiniWorld env that shows a `SceneSpec` and executes body-frame commands in it.

    env = NavigationEnv(scene, obs_size=224)               # one per worker process (one GL context)
    frame = env.load_scene(other_scene)                    # uint8 [H, W, 3]; reuse the env per episode
    moved = env.execute_action((0.5, 0.0, 0.2), control_hz=5.0)
    done = env.near(env.target)                            # MiniWorld's own success predicate

Importing this module sets pyglet headless (EGL) and loads MiniWorld and pyglet's GL: import it
only inside the process that renders (a Ray task body, after anything that must load before GL),
never from a module the CLI imports at start, nor in a process that later forks.
"""

from __future__ import annotations

import contextlib
import math
import os

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np  # noqa: E402
import pyglet  # noqa: E402

pyglet.options["headless"] = True

from miniworld.entity import Box, Entity, MeshEnt  # noqa: E402
from miniworld.miniworld import MiniWorldEnv  # noqa: E402
from miniworld.opengl import FrameBuffer, Texture  # noqa: E402
from miniworld.params import DEFAULT_PARAMS  # noqa: E402
from miniworld.utils import get_file_path  # noqa: E402
from PIL import Image  # noqa: E402
from pyglet.gl import (  # noqa: E402
    GL_GENERATE_MIPMAP_HINT,
    GL_LINEAR,
    GL_LINEAR_MIPMAP_LINEAR,
    GL_NICEST,
    GL_RGB,
    GL_RGBA,
    GL_TEXTURE_2D,
    GL_TEXTURE_MAG_FILTER,
    GL_TEXTURE_MIN_FILTER,
    GL_UNSIGNED_BYTE,
    glBindTexture,
    glEnable,
    glGenerateMipmap,
    glHint,
    glTexImage2D,
    glTexParameteri,
)

from mobile_vla.sim.scenes import CONTROL_HZ, Placed, SceneSpec, clip_command  # noqa: E402

# A small base's camera: MiniWorld's default eye height (1.5 m, level) loses a target under the
# lower edge of the image a metre before reaching it. Ranges are used by domain randomisation.
ROBOT_PARAMS = DEFAULT_PARAMS.copy()
ROBOT_PARAMS.set("cam_height", 0.6, 0.55, 0.65)
ROBOT_PARAMS.set("cam_pitch", -10, -14, -6)


def build_entity(placed: Placed) -> Entity:
    """A MiniWorld entity for a placed object; `.kind` and `.colour` are kept on it for evaluation."""
    if placed.kind == "box":
        entity = Box(color=placed.colour, size=placed.height)
    else:
        mesh = placed.kind if placed.colour is None else f"{placed.kind}_{placed.colour}"  # barrel | ball_red
        with _fast_texture_loading():  # a mesh loads its texture once per process, through Texture.load
            entity = MeshEnt(mesh_name=mesh, height=placed.height, static=True)
    entity.kind, entity.colour, entity.side = placed.kind, placed.colour, placed.side
    return entity


def load_texture(path: str):
    """What `miniworld.opengl.Texture.load` returns, with the pixels decoded by Pillow.

    MiniWorld's loader converts pixels through pyglet's pure-Python path: 1-4 s per texture on a
    small CPU, paid again in every worker process. Same GL upload and filtering, ~50x faster.
    """
    image = Image.open(path).convert("RGBA").transpose(Image.Transpose.FLIP_TOP_BOTTOM)  # GL rows go up
    width, height = image.size
    pixels = image.tobytes()
    texture = pyglet.image.ImageData(width, height, "RGBA", pixels, pitch=width * 4).get_texture()
    glEnable(texture.target)
    glBindTexture(texture.target, texture.id)
    glTexImage2D(GL_TEXTURE_2D, 0, GL_RGB, width, height, 0, GL_RGBA, GL_UNSIGNED_BYTE, pixels)
    glHint(GL_GENERATE_MIPMAP_HINT, GL_NICEST)
    glGenerateMipmap(GL_TEXTURE_2D)
    glTexParameteri(GL_TEXTURE_2D, GL_TEXTURE_MAG_FILTER, GL_LINEAR)
    glTexParameteri(GL_TEXTURE_2D, GL_TEXTURE_MIN_FILTER, GL_LINEAR_MIPMAP_LINEAR)
    glBindTexture(GL_TEXTURE_2D, 0)
    return texture


@contextlib.contextmanager
def _fast_texture_loading():
    """Routes `Texture.load` (used by mesh loading) through `load_texture` for the block only."""
    original = Texture.__dict__["load"]
    Texture.load = classmethod(lambda cls, path: load_texture(path))
    try:
        yield
    finally:
        Texture.load = original


def preload_textures(tex_name: str) -> None:
    """Puts every variant of a room texture into MiniWorld's texture cache (same cache keys)."""
    for variant in range(1, 10):
        path = get_file_path("textures", f"{tex_name}_{variant}", "png")
        if not os.path.exists(path):
            break
        if path not in Texture.tex_cache:
            Texture.tex_cache[path] = Texture(load_texture(path), tex_name)


class NavigationEnv(MiniWorldEnv):
    """One rectangular room with a target, distractors and obstacles at the spec's exact positions.

    Rendering happens in the GL context this object creates: build one per process and call
    `load_scene` per episode (a context per episode costs ~1 s and leaks driver memory).
    """

    def __init__(self, scene: SceneSpec, obs_size: int = 224):
        self.scene = scene
        self.obs_size = obs_size
        super().__init__(
            max_episode_steps=scene.max_steps,
            obs_width=obs_size,
            obs_height=obs_size,
            window_width=obs_size,  # the human-view buffer is never shown: keep it small
            window_height=obs_size,
            params=ROBOT_PARAMS,
            domain_rand=scene.domain_rand,
        )
        # No multisampling: on a software GL (llvmpipe) 4x MSAA doubles the cost of a frame, and at
        # 224x224 the edges it smooths are a pixel wide.
        self.obs_fb = FrameBuffer(obs_size, obs_size, 1)
        self.load_scene(scene)

    def load_scene(self, scene: SceneSpec) -> np.ndarray:
        """Rebuilds the world for `scene` and returns the first frame, uint8 [H, W, 3]."""
        self.scene = scene
        self.domain_rand = scene.domain_rand
        self.max_episode_steps = scene.max_steps
        obs, _ = self.reset(seed=scene.seed)
        return obs

    def execute_action(self, action, control_hz: float = CONTROL_HZ) -> bool:
        """Applies one body-frame velocity command for 1/control_hz seconds: translate, then turn.

        Args:
            action: (vx, vy, wz) in m/s, m/s, rad/s (x forward, y left); clipped to `SPEED_LIMITS`.
            control_hz: the control rate the command is held for.

        Returns:
            False when the translation would collide: MiniWorld refuses such a move whole (the robot
            stays put), as a bumper-stopped base would. The turn is always applied.
            `scenes.realised_velocity(action, moved)` is the velocity the step realised.
        """
        dt = 1.0 / control_hz
        vx, vy, wz = (float(v) for v in clip_command(action))
        # MiniWorld's drift axis points right; body +y is left.
        moved = bool(self.move_agent(vx * dt, -vy * dt))
        self.turn_agent(math.degrees(wz * dt))
        self.step_count += 1
        return moved

    def _gen_world(self) -> None:
        room = self.scene.room
        for tex_name in (room.wall_tex, room.floor_tex, room.ceil_tex):
            preload_textures(tex_name)
        self.add_rect_room(
            min_x=0,
            max_x=room.width,
            min_z=0,
            max_z=room.depth,
            wall_tex=room.wall_tex,
            floor_tex=room.floor_tex,
            ceil_tex=room.ceil_tex,
        )

        def place(placed: Placed) -> Entity:
            return self.place_entity(build_entity(placed), pos=np.array([placed.x, 0.0, placed.z]), dir=placed.dir)

        self.target = place(self.scene.target)
        self.distractors = [place(p) for p in self.scene.distractors]
        self.obstacles = [place(p) for p in self.scene.obstacles]
        agent = self.scene.agent
        self.place_agent(pos=np.array([agent.x, 0.0, agent.z]), dir=agent.dir)
