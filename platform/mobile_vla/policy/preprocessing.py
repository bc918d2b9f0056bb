"""THE preprocessing: one object, saved with every model version, used by training, export and serving.

    pre = Preprocessing.from_manifest(load_manifest("data/nav"), build_tokenizer(presets.tiny()))
    frame = pre.prepare_image(camera_frame)            # uint8 [224, 224, 3], the resize rule below
    target = pre.normalise_actions(actions)            # [..., 3] in [-1, 1]
    pre.save("model/policy/preprocessing")             # preprocessing.json + tokenizer/
    pre = Preprocessing.load("model/policy/preprocessing")

Resize rule (`resize_rule`, one per object so training and serving cannot disagree):
- "letterbox" (default): scale the longer side to 224 keeping the aspect ratio (PIL bilinear, which
  low-pass filters when shrinking), centre it and fill the bars with the CLIP mean colour
  (123, 117, 104), which the model's mean/std normalisation maps to ~0. The original robot's 16:9
  720x1280 frames keep their full field of view - obstacles "on the left" stay in the picture -
  at 224x126 inside the square.
- "center_crop": scale the shorter side to 224 and cut the centre square (more pixels on the
  centre, loses the sides of wide frames).
Frames already 224x224 (generated data) pass through unchanged under both rules.

Actions: clipped per axis to the train split's q01..q99 and scaled to [-1, 1]; an axis that never
varies (q01 == q99) maps to 0. State: standardised with the train split's mean/std. Image
normalisation (uint8 -> float, CLIP mean/std) happens inside the model, so exported graphs take uint8.

`state_input` names what the state is (the policy config's `state_input`, copied here so that
training windows, closed loop, the signature and robots read it from the saved preprocessing):
"previous_command" (the command executed at the previous step), "measured_velocity" (the velocity
the base realised at the previous step) or "none" (the model ignores it; send zeros). Both kinds are
standardised with the dataset's `state` statistics (the previous command's: the measured velocity
differs from it only after refused moves).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mobile_vla.data.frames import RESIZE_RULES, resize_frame
from mobile_vla.errors import ConfigError, DataError, ModelError
from mobile_vla.policy.config import PREVIOUS_COMMAND, STATE_INPUTS

PREPROCESSING_FILE = "preprocessing.json"
TOKENIZER_DIR = "tokenizer"
PREPROCESSING_VERSION = 1
ACTION_DIM = 3
# OpenAI CLIP constants (open_clip.constants.OPENAI_DATASET_MEAN/STD); Kosmos-2 uses the same. The one
# copy: the model normalises pixels with them (policy.model) and letterbox bars are filled with the mean.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MIN_SCALE = 1e-6  # below this an axis is treated as constant
DEFAULT_RESIZE_RULE = "letterbox"


def manifest_resize_rule(manifest: dict) -> str:
    """The resize rule a dataset's frames were made with (`letterbox` when the manifest names none)."""
    return (manifest.get("generator") or {}).get("resize_rule") or DEFAULT_RESIZE_RULE


class Tokenizer(Protocol):
    """What `mobile_vla.policy.text` provides (build_tokenizer / load_tokenizer)."""

    def encode(self, instructions: list[str]) -> dict[str, np.ndarray]: ...  # int64 [B, L] each

    def save(self, folder: str | Path) -> None: ...


@dataclass
class Preprocessing:
    """How raw frames, commands, state and instructions become model inputs and back (see the module doc)."""

    action_low: list[float]  # q01 per axis (linear_x, linear_y, angular_z)
    action_high: list[float]  # q99 per axis
    state_mean: list[float]  # [S]
    state_std: list[float]  # [S]
    state_dim: int = 3
    window: int = 8  # W history frames per training window
    chunk: int = 10  # K future actions predicted per frame
    control_hz: float = 5.0
    image_size: int = 224
    resize_rule: str = DEFAULT_RESIZE_RULE
    state_input: str = PREVIOUS_COMMAND  # what the state is (STATE_INPUTS; see the module doc)
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.action_low = [float(v) for v in self.action_low]
        self.action_high = [float(v) for v in self.action_high]
        self.state_mean = [float(v) for v in self.state_mean]
        self.state_std = [float(v) for v in self.state_std]
        self.image_mean = [float(v) for v in self.image_mean]
        self.image_std = [float(v) for v in self.image_std]
        for name in ("state_dim", "window", "chunk", "image_size"):
            value = getattr(self, name)
            minimum = 0 if name == "state_dim" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"Preprocessing.{name} = {value!r}: expected an integer >= {minimum}")
        if self.resize_rule not in RESIZE_RULES:
            raise ConfigError(f"Preprocessing.resize_rule = {self.resize_rule!r}: expected one of {RESIZE_RULES}")
        if self.state_input not in STATE_INPUTS:
            expected = ", ".join(map(repr, STATE_INPUTS))
            raise ConfigError(f"Preprocessing.state_input = {self.state_input!r}: expected one of {expected}")
        if not self.control_hz > 0:
            raise ConfigError(f"Preprocessing.control_hz = {self.control_hz!r}: expected a positive number")
        for name, width in (
            ("action_low", ACTION_DIM),
            ("action_high", ACTION_DIM),
            ("state_mean", self.state_dim),
            ("state_std", self.state_dim),
            ("image_mean", 3),
            ("image_std", 3),
        ):
            values = getattr(self, name)
            if len(values) != width or not all(np.isfinite(values)):
                raise ConfigError(f"Preprocessing.{name} = {values!r}: expected {width} finite numbers")
        bad = [i for i in range(ACTION_DIM) if self.action_high[i] < self.action_low[i]]
        if bad:
            raise ConfigError(
                f"Preprocessing.action_high = {self.action_high!r}: "
                f"below action_low {self.action_low!r} on axis {bad[0]}"
            )

    @classmethod
    def from_manifest(
        cls,
        manifest: dict,
        tokenizer: Tokenizer | None,
        window: int = 8,
        chunk: int = 10,
        state_input: str = PREVIOUS_COMMAND,
    ) -> Preprocessing:
        """The preprocessing of a dataset: its train statistics, control rate and resize rule.

        The resize rule is the one the dataset's frames were made with (`data import --resize-rule`
        records it under `generator.resize_rule`; generated data, already 224x224, records none and
        gets the default), so a model serves camera frames exactly as it was trained on them.
        """
        stats = manifest["stats"]
        state = stats.get("state")
        return cls(
            action_low=stats["actions"]["q01"],
            action_high=stats["actions"]["q99"],
            state_mean=state["mean"] if state else [],
            state_std=state["std"] if state else [],
            state_dim=int(manifest.get("state_dim", len(state["mean"]) if state else 0)),
            window=window,
            chunk=chunk,
            control_hz=float(manifest["control_hz"]),
            resize_rule=manifest_resize_rule(manifest),
            state_input=state_input,
            tokenizer=tokenizer,
        )

    # --- images -------------------------------------------------------------------------------

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(round(m * 255)) for m in self.image_mean)

    def prepare_image(self, image: Any) -> np.ndarray:
        """PIL image or uint8 array [H, W, 3] of any size -> uint8 [S, S, 3] by `resize_rule`."""
        return resize_frame(image, self.image_size, self.resize_rule, self.pad_color)

    # --- actions and state --------------------------------------------------------------------

    def _action_centre_half(self) -> tuple[np.ndarray, np.ndarray]:
        low = np.asarray(self.action_low, np.float32)
        high = np.asarray(self.action_high, np.float32)
        return (low + high) / 2, np.maximum((high - low) / 2, _MIN_SCALE)

    def normalise_actions(self, actions: np.ndarray) -> np.ndarray:
        """Float [..., 3] in m/s, rad/s -> float32 [..., 3] in [-1, 1] (clipped to q01..q99 first)."""
        actions = np.asarray(actions, np.float32)
        centre, half = self._action_centre_half()
        clipped = np.clip(actions, self.action_low, self.action_high)
        return ((clipped - centre) / half).astype(np.float32)

    def denormalise_actions(self, normalised: np.ndarray) -> np.ndarray:
        """[..., 3] model output -> m/s, rad/s; clipped to [-1, 1] first so commands stay in the
        range the robot was recorded with.
        """
        normalised = np.clip(np.asarray(normalised, np.float32), -1.0, 1.0)
        centre, half = self._action_centre_half()
        return (centre + normalised * np.where(half > _MIN_SCALE, half, 0)).astype(np.float32)

    def normalise_state(self, state: np.ndarray) -> np.ndarray:
        """Float [..., S] -> float32 [..., S] standardised with the train split's mean/std."""
        state = np.asarray(state, np.float32)
        if state.shape[-1:] != (self.state_dim,):
            raise DataError(f"state: shape {list(state.shape)}: expected [..., {self.state_dim}]")
        std = np.asarray(self.state_std, np.float32)
        std = np.where(std > _MIN_SCALE, std, 1.0)
        return ((state - np.asarray(self.state_mean, np.float32)) / std).astype(np.float32)

    # --- text ---------------------------------------------------------------------------------

    def tokenize(self, instructions: list[str]) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            raise ModelError("Preprocessing.tokenizer is None: build it with a tokenizer (policy.text)")
        return self.tokenizer.encode(list(instructions))

    # --- persistence --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tokenizer"}
        data["version"] = PREPROCESSING_VERSION
        data["tokenizer"] = TOKENIZER_DIR if self.tokenizer is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict, tokenizer: Tokenizer | None = None) -> Preprocessing:
        known = {f.name for f in fields(cls)} - {"tokenizer"}
        unknown = set(data) - known - {"version", "tokenizer"}
        if unknown:
            raise ConfigError(f"Preprocessing: unknown keys {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known}, tokenizer=tokenizer)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is not None:
            self.tokenizer.save(folder / TOKENIZER_DIR)
        (folder / PREPROCESSING_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, with_tokenizer: bool = True) -> Preprocessing:
        """Reads a saved preprocessing folder; ModelError names the file at fault.

        `with_tokenizer=False` leaves the tokenizer out (`tokenize` then raises): for readers that
        need only the numbers and the resize rule, such as the serving ingress.
        """
        folder = Path(folder)
        path = folder / PREPROCESSING_FILE
        if not path.is_file():
            raise ModelError(f"{path}: missing (not a saved preprocessing folder)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object")
        if data.get("version", 0) > PREPROCESSING_VERSION:
            raise ModelError(f"{path}: version {data.get('version')}: this code reads up to {PREPROCESSING_VERSION}")
        tokenizer = None
        if data.get("tokenizer") and with_tokenizer:
            # policy.text loads open_clip (torch) and transformers: only a preprocessing with a tokenizer
            # pays for them, not the serving and data modules that import this one for the numbers
            from mobile_vla.policy.text import load_tokenizer

            tokenizer = load_tokenizer(folder / data["tokenizer"])
        try:
            return cls.from_dict(data, tokenizer)
        except (ConfigError, TypeError) as exc:
            raise ModelError(f"{path}: {exc}") from None

    # Pickled into Ray tasks and Train workers: the tokenizer travels as its saved files.
    def __getstate__(self) -> dict:
        files = None
        if self.tokenizer is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer.save(tmp)
                files = {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
        return {"fields": self.to_dict(), "tokenizer_files": files}

    def __setstate__(self, state: dict) -> None:
        tokenizer = None
        if state["tokenizer_files"] is not None:
            from mobile_vla.policy.text import load_tokenizer  # heavy: see load()

            with tempfile.TemporaryDirectory() as tmp:
                for rel, blob in state["tokenizer_files"].items():
                    (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                    (Path(tmp) / rel).write_bytes(blob)
                tokenizer = load_tokenizer(tmp)
        rebuilt = Preprocessing.from_dict(state["fields"], tokenizer)
        self.__dict__.update(rebuilt.__dict__)
