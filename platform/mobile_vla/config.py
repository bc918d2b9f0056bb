"""Config loading: strict pydantic models from YAML files with dotted `key.sub=value` overrides.

    cfg = load_config("jobs/configs/small.yaml", TrainJobConfig, ["train.lr=3e-4", "scaling.num_workers=2"])

Every error names the file, the field and the bad value, e.g.
    jobs/configs/small.yaml: train.lr = 'fast': Input should be a valid number
Also the platform home (`MOBILE_VLA_HOME`, default ./.mobile_vla) where embedded defaults keep state.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mobile_vla.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def platform_home() -> Path:
    """Folder for embedded state (MLflow SQLite store, artifacts, Ray results, feedback, data)."""
    return Path(os.environ.get("MOBILE_VLA_HOME", ".mobile_vla")).expanduser().resolve()


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return parts, value


def _field_types(annotation: Any) -> tuple[Any, ...]:
    """`X | None` -> (X, NoneType); `X` -> (X,)."""
    return (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )


def has_key(model: type[BaseModel], key: str) -> bool:
    """Whether the dotted `key` (the part of an override before `=`) names a field of `model`.

    A dict field (e.g. `model.overrides`) takes any key below it; a value field takes none.

    Args:
        model: the config class, e.g. TrainJobConfig.
        key: dotted key such as "data.path".
    """
    section: type[BaseModel] | None = model
    parts = key.strip().split(".")
    for index, part in enumerate(parts):
        field = section.model_fields.get(part) if section is not None else None
        if field is None:
            return False
        kinds = _field_types(field.annotation)
        if any(kind is dict or typing.get_origin(kind) is dict for kind in kinds):
            return True
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is None:
            return index == len(parts) - 1
    return True


def apply_overrides(data: dict, overrides: list[str] | None, source: str = "overrides") -> dict:
    """Applies dotted overrides to a nested dict (copying), creating sections as needed."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str, data: dict | None = None) -> str:
    """One line per problem: 'source: field.path = value: message'."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {loc!r}")
            continue
        value = err.get("input")
        shown = "" if err["type"] == "missing" else f" = {value!r}"
        lines.append(f"{source}: {loc}{shown}: {err['msg']}")
    return "\n".join(lines)


def validate_config(data: dict, model: type[ConfigT], source: str = "config") -> ConfigT:
    """`data` as a `model`; ConfigError lists every bad field of `source` with its value."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, data)) from None


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; ConfigError names the file (and line) when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, model: type[ConfigT], overrides: list[str] | None = None) -> ConfigT:
    """Reads YAML (or starts from the model's defaults when path is None), applies overrides, validates."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    data = apply_overrides(data, overrides, source)
    return validate_config(data, model, source)


def dump_config(cfg: BaseModel) -> dict:
    """The resolved config as plain data (for MLflow params, checkpoints and model versions)."""
    return cfg.model_dump(mode="json")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4} (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
