"""Save/load a policy as one folder: everything needed to rebuild it, nothing that executes on load.

    policy/
      config.json          {"kind": "policy", "format_version": 1, "config": PolicyConfig.to_dict()}
      model.safetensors    the state dict (no pickle)
      preprocessing/       Preprocessing.save(): scaling constants + tokenizer files

Loading rebuilds the modules from the config with random init (no hub download, even for
pretrained presets: the weights are all in model.safetensors) and loads the tensors strictly.
`kind` is "policy" (MobileVLAPolicy) or "ensemble" (policy/ensemble.py: the members' configs in
"config", all their weights in one model.safetensors); loading dispatches on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.policy.config import PolicyConfig
from mobile_vla.policy.ensemble import EnsembleConfig, build_model
from mobile_vla.policy.preprocessing import Preprocessing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSING_DIR = "preprocessing"
POLICY_DIR = "policy"
FORMAT_VERSION = 1
KINDS = ("policy", "ensemble")


def save_policy(folder: str | Path, model, preprocessing=None) -> Path:
    """Writes `model` (a policy or an ensemble) and its preprocessing as one folder (layout above)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    partial = weights.with_suffix(".safetensors.partial")
    kind = getattr(model, "kind", "policy")
    save_model(model, str(partial), metadata={"format": "pt", "kind": kind})
    os.replace(partial, weights)  # an interrupted save never leaves a truncated model.safetensors
    if preprocessing is not None:
        preprocessing.save(folder / PREPROCESSING_DIR)
    document = {"kind": kind, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    _write_text(folder / CONFIG_FILE, json.dumps(document, indent=2) + "\n")
    return folder


def resolve_policy_dir(folder: str | Path) -> Path:
    """The folder itself if it holds config.json, else its `policy/` child."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return folder
    if (folder / POLICY_DIR / CONFIG_FILE).is_file():
        return folder / POLICY_DIR
    raise ModelError(f"{folder}: no {CONFIG_FILE} here or in {POLICY_DIR}/ (not a saved policy)")


def read_policy_config(folder: str | Path):
    """The PolicyConfig (or EnsembleConfig) a saved folder rebuilds its model from; ModelError when unreadable."""
    path = resolve_policy_dir(folder) / CONFIG_FILE
    document = _read_json(path)
    kind = document.get("kind")
    if kind not in KINDS:
        raise ModelError(f"{path}: kind = {kind!r}: this version loads {' and '.join(map(repr, KINDS))} checkpoints")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{path}: format_version = {version!r}: this code reads up to {FORMAT_VERSION}")
    try:
        if kind == "ensemble":
            return EnsembleConfig.from_dict(document.get("config"), source=f"{path}: kind = 'ensemble'")
        return PolicyConfig.from_dict(document.get("config"), source=str(path))
    except ConfigError as exc:
        raise ModelError(str(exc)) from None
    except TypeError as exc:
        raise ModelError(f"{path}: invalid config ({exc})") from None


def load_policy(folder: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """-> (model in eval mode, Preprocessing or None when the folder has none)."""
    folder = resolve_policy_dir(folder)
    config = read_policy_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{weights}: missing")
    model = build_model(config, load_pretrained=False)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: unreadable or corrupt ({exc})") from None
    except RuntimeError as exc:  # shape mismatch
        raise ModelError(f"{weights}: does not match config.json ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        raise ModelError(
            f"{weights}: does not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.to(device).eval()
    preprocessing = None
    if (folder / PREPROCESSING_DIR).is_dir():
        preprocessing = Preprocessing.load(folder / PREPROCESSING_DIR)
    return model, preprocessing


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return document


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
