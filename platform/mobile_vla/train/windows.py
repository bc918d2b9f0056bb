"""Training windows: W consecutive frames of one episode, each with the next K actions as targets.

    dataset = WindowDataset("data/nav", "train", preprocessing, augment=True, seed=0)
    sample = dataset[0]   # dict of numpy arrays, shapes below (T = W)

Sample (the contract in docs/architecture.md):
    images                 uint8   [T, 224, 224, 3]
    state                  float32 [T, S]     normalised
    actions                float32 [T, K, 3]  normalised; actions[t, k] = action at frame start+t+k
    action_mask            float32 [T, K]     0 where start+t+k is past the episode end (or t is padding)
    frame_mask             float32 [T]        0 for padding frames
    clip_input_ids, kosmos_input_ids, kosmos_attention_mask, kosmos_image_embeds_position_mask  int64 [L]
    target_bearing, ...    float32 [T]        only the `frame_labels` asked for: per-frame episode arrays
                                              (the simulator labels the auxiliary heads learn), 0 on padding

Placement: windows start at frames 0, stride, 2*stride, ... (stride defaults to W // 2), plus one
window ending exactly at the last frame, so every frame is covered and no window runs past the end
of an episode longer than W. A window therefore never starts before frame 0: there is no start
padding, the policy's recurrent memory at a window's first frame is fresh, exactly as when a robot
starts an episode (serving begins with empty memory), and the state at frame 0 is the episode-start
state (zeros = no previous command). Episodes shorter than W are padded at the END (frame_mask 0,
zero images/state/targets): padding after the real frames cannot leak into a causal model's
outputs for them. Targets past the episode end are masked (action_mask 0), not invented.

State: what the preprocessing's `state_input` names (`episode_state`): the episode's `state`
array (the previous executed command), or for "measured_velocity" the velocity the base realised at
the previous step, from the episode's `measured_velocity` array (DataError naming it when missing).

Each instruction is tokenised once per split (offline), not per sample. Augmentation (rotation,
brightness, contrast; one draw per window, so a window's frames stay consistent) works on uint8
frames and is a pure function of (seed, epoch, window id): reruns reproduce exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mobile_vla.data.episodes import Episode, FrameReader, read_episode
from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import DataError
from mobile_vla.policy.config import MEASURED_VELOCITY
from mobile_vla.policy.preprocessing import Preprocessing

FEEDBACK_SOURCE = "feedback"  # assembled fleet feedback (online.assembly): `state` is what robots sent


@dataclass(frozen=True)
class AugmentConfig:
    """Small photometric and geometric changes a real camera sees between runs."""

    max_rotation_deg: float = 5.0
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # factor drawn from [1 - c, 1 + c], around each frame's mean grey

    def __post_init__(self) -> None:
        for name in ("max_rotation_deg", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0 <= value < (45 if name == "max_rotation_deg" else 1):
                raise DataError(f"AugmentConfig.{name} = {value!r}: out of range")


def augment_frames(
    frames: np.ndarray, rng: np.random.Generator, config: AugmentConfig, fill: tuple[int, int, int]
) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, H, W, 3]; one rotation/brightness/contrast draw for all T."""
    angle = rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)
    brightness = rng.uniform(1 - config.brightness, 1 + config.brightness)
    contrast = rng.uniform(1 - config.contrast, 1 + config.contrast)
    out = np.empty_like(frames)
    levels = np.arange(256, dtype=np.float32)
    for t, frame in enumerate(frames):
        image = Image.fromarray(frame)
        if config.max_rotation_deg > 0:
            image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
        # brightness then contrast around the frame's mean grey is one affine map of the 256 levels:
        # (x*b - m*b)*c + m*b = x*(b*c) + m*b*(1-c), applied as a lookup table (one pass per frame)
        grey = float(frame.mean()) * brightness
        table = np.clip(levels * (brightness * contrast) + grey * (1 - contrast) + 0.5, 0, 255).astype(np.uint8)
        out[t] = np.asarray(image.point(table.tolist() * 3))
    return out


def episode_state(episode: Episode, preprocessing: Preprocessing, path: str | Path) -> np.ndarray:
    """The raw (not normalised) state input of every frame, float32 [T, S], as the preprocessing's
    `state_input` says; [T, 0] when the model takes no state (S = 0).

    "previous_command" and "none": the episode's `state` array. "measured_velocity": the velocity the
    base realised at the previous step, `measured_velocity[t - 1]` (zeros at frame 0, as a robot
    starting an episode sends), from the episode's optional `measured_velocity` array; assembled
    feedback episodes (`source` = "feedback") already hold in `state` what the robots sent to the
    served model, whose signature names that state, so their `state` is used as it is.

    Raises:
        DataError: naming the file and the missing key (`state`, or `measured_velocity`).
    """
    if preprocessing.state_dim == 0:
        return np.zeros((episode.num_frames, 0), np.float32)
    measured = preprocessing.state_input == MEASURED_VELOCITY and episode.attrs.get("source") != FEEDBACK_SOURCE
    if not measured:
        if episode.state is None:
            raise DataError(f"{path}: state: missing, but the preprocessing expects S = {preprocessing.state_dim}")
        return episode.state
    realised = episode.extras.get(MEASURED_VELOCITY)
    if realised is None:
        raise DataError(
            f"{path}: {MEASURED_VELOCITY}: missing, but the model's state_input = {MEASURED_VELOCITY!r} builds its "
            "state from it (MiniWorld data generated by `mobile-vla data generate` records it; imported data does not)"
        )
    return np.concatenate([np.zeros((1, realised.shape[1]), np.float32), realised[:-1]])  # [T, 3]


def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """Start frames of the windows of one episode (see the module docstring)."""
    if num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] != num_frames - window:
        starts.append(num_frames - window)
    return starts


def assemble_window(
    frames: np.ndarray,
    actions: np.ndarray,
    state: np.ndarray,
    start: int,
    window: int,
    chunk: int,
) -> dict[str, np.ndarray]:
    """Frames uint8 [n, H, W, 3] (frames start..start+n-1, n <= W), actions [N, 3] and state [N, S]
    of the whole episode (already normalised) -> the window arrays without tokens.
    """
    num_frames = len(actions)
    n = len(frames)
    if n < 1 or n > window or start + n > num_frames:
        raise DataError(f"window at frame {start}: {n} frames for an episode of {num_frames} (W = {window})")
    images = np.zeros((window,) + frames.shape[1:], np.uint8)  # [T, H, W, 3]
    images[:n] = frames
    frame_mask = np.zeros(window, np.float32)  # [T]
    frame_mask[:n] = 1
    window_state = np.zeros((window, state.shape[1]), np.float32)  # [T, S]
    window_state[:n] = state[start : start + n]
    target = start + np.arange(window)[:, None] + np.arange(chunk)[None, :]  # [T, K] frame indices
    valid = (target < num_frames) & (frame_mask[:, None] > 0)  # [T, K]
    targets = actions[np.minimum(target, num_frames - 1)] * valid[..., None]  # [T, K, 3]
    return {
        "images": images,
        "state": window_state,
        "actions": targets.astype(np.float32),
        "action_mask": valid.astype(np.float32),
        "frame_mask": frame_mask,
    }


@dataclass
class SplitIndex:
    """Everything small about a split, held in memory: normalised actions/state per episode, the
    tokenised instructions and the window table. Frames stay on disk until a window is read.
    """

    paths: list[str]
    actions: list[np.ndarray]  # per episode, normalised [N, 3]
    state: list[np.ndarray]  # per episode, normalised [N, S]
    token_rows: np.ndarray  # [E] row of each episode's instruction in `tokens`
    tokens: dict[str, np.ndarray]  # int64 [U, L] per key, U unique instructions
    windows: np.ndarray  # int64 [M, 2]: (episode, start frame)
    preprocessing: dict = field(default_factory=dict)  # Preprocessing.to_dict() (no tokenizer needed)
    labels: list[dict[str, np.ndarray]] = field(default_factory=list)  # per episode, frame label -> [N]; or []

    def __len__(self) -> int:
        return len(self.windows)

    @functools.cached_property
    def pre(self) -> Preprocessing:
        return Preprocessing.from_dict(self.preprocessing)

    def sample(
        self,
        window_id: int,
        reader: FrameReader,
        rng: np.random.Generator | None = None,
        augment: AugmentConfig | None = None,
    ) -> dict[str, np.ndarray]:
        pre = self.pre
        episode, start = (int(v) for v in self.windows[window_id])
        actions, state = self.actions[episode], self.state[episode]
        stop = min(start + pre.window, len(actions))
        frames = reader.read(self.paths[episode], start, stop)  # uint8 [n, h, w, 3]
        if frames.shape[1:3] != (pre.image_size, pre.image_size):
            frames = np.stack([pre.prepare_image(frame) for frame in frames])
        if augment is not None and rng is not None:
            frames = augment_frames(frames, rng, augment, pre.pad_color)
        sample = assemble_window(frames, actions, state, start, pre.window, pre.chunk)
        for key, values in (self.labels[episode] if self.labels else {}).items():
            sample[key] = np.zeros(pre.window, np.float32)  # [T], 0 on padding frames
            sample[key][: stop - start] = values[start:stop]
        row = self.token_rows[episode]
        for key, table in self.tokens.items():
            sample[key] = table[row]  # [L]
        return sample


def build_split_index(
    folder: str | Path,
    split: str,
    preprocessing: Preprocessing,
    stride: int | None = None,
    frame_labels: tuple[str, ...] = (),
) -> SplitIndex:
    """Reads the split's actions/state (not images), normalises them and tokenises each instruction once;
    keeps each episode's `frame_labels` arrays (e.g. `policy.config.AUX_LABELS`; DataError naming a missing one).
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    if split not in manifest["splits"]:
        raise DataError(f"{folder}: split {split!r} not in manifest (has {sorted(manifest['splits'])})")
    names = manifest["splits"][split]
    if not names:
        raise DataError(f"{folder}: split {split!r} is empty")
    stride = stride or max(1, preprocessing.window // 2)
    if stride < 1:
        raise DataError(f"stride = {stride}: expected >= 1")

    paths, actions, states, instructions, windows, labels = [], [], [], [], [], []
    for e, name in enumerate(names):
        episode = read_episode(folder / name, load_images=False)
        state = episode_state(episode, preprocessing, folder / name)  # [N, S]
        if preprocessing.state_dim > 0:
            state = preprocessing.normalise_state(state)
        paths.append(str(folder / name))
        actions.append(preprocessing.normalise_actions(episode.actions))
        states.append(state)
        instructions.append(episode.instruction)
        if frame_labels:
            labels.append(_episode_labels(folder / name, episode, frame_labels))
        windows += [(e, s) for s in window_starts(episode.num_frames, preprocessing.window, stride)]

    unique = sorted(set(instructions))
    tokens = preprocessing.tokenize(unique)  # int64 [U, L] per key
    row_of = {text: i for i, text in enumerate(unique)}
    return SplitIndex(
        paths=paths,
        actions=actions,
        state=states,
        token_rows=np.asarray([row_of[text] for text in instructions], np.int64),
        tokens={k: np.asarray(v, np.int64) for k, v in tokens.items()},
        windows=np.asarray(windows, np.int64).reshape(-1, 2),
        preprocessing=preprocessing.to_dict(),
        labels=labels,
    )


def _episode_labels(path: Path, episode, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    missing = [key for key in keys if key not in episode.extras]
    if missing:
        raise DataError(
            f"{path}: {', '.join(missing)}: missing, but this run's windows need the per-frame label(s) (the "
            "auxiliary heads learn from them, loss.aux_weight > 0; episodes from `mobile-vla data generate` have them)"
        )
    return {key: np.asarray(episode.extras[key], np.float32) for key in keys}


def count_windows(folder: str | Path, split: str, window: int = 8, stride: int | None = None) -> int:
    """Windows per epoch from the manifest alone (no file is opened): for schedules and progress."""
    manifest = load_manifest(folder)
    stride = stride or max(1, window // 2)
    frames = [manifest["episodes"][name]["frames"] for name in manifest["splits"].get(split, [])]
    return sum(len(window_starts(n, window, stride)) for n in frames)


def window_rng(seed: int | None, epoch: int, window_id: int) -> np.random.Generator:
    """Per-window generator: a pure function of (seed, epoch, window id); fresh entropy if seed is None."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed, epoch, window_id])


class WindowDataset:
    """Map-style torch Dataset of windows (the `__len__`/`__getitem__` protocol DataLoader takes; torch
    itself is not imported, so Ray Data tasks that assemble windows start fast). Works with DataLoader
    workers: file handles reopen per process.
    """

    def __init__(
        self,
        folder: str | Path,
        split: str,
        preprocessing: Preprocessing,
        augment: bool = False,
        seed: int | None = 0,
        stride: int | None = None,
        augment_config: AugmentConfig | None = None,
        frame_labels: tuple[str, ...] = (),
    ):
        self.index = build_split_index(folder, split, preprocessing, stride, frame_labels)
        self.augment = (augment_config or AugmentConfig()) if augment else None
        self.seed = seed
        self.epoch = 0
        self.reader = FrameReader()

    def set_epoch(self, epoch: int) -> None:
        """New augmentation draws per epoch, still reproducible."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, window_id: int) -> dict[str, np.ndarray]:
        if not 0 <= window_id < len(self.index):
            raise IndexError(window_id)
        rng = window_rng(self.seed, self.epoch, window_id) if self.augment else None
        return self.index.sample(window_id, self.reader, rng, self.augment)
