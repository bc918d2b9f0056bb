"""`TuneJobConfig`: a Ray Tune sweep over a training preset, read from YAML plus dotted overrides.

    tune_keys, train_keys = split_overrides(["tune.num_samples=8", "data.path=DIR"])  # as `mobile-vla tune` does
    cfg = load_tune_config("jobs/configs/tune_tiny.yaml", tune_keys, train_keys)

`train` names the training preset every trial starts from (jobs/configs/*.yaml, plus its own dotted
overrides); `search_space` maps dotted TrainJobConfig keys to one sampling rule each
(`loguniform: [lo, hi]`, `uniform: [lo, hi]`, `randint: [lo, hi]` (hi excluded), `choice: [...]`,
`grid: [...]`); `tune` sets the trial count, the ASHA scheduler and the search algorithm; `ensemble`
optionally combines the top M trials into one registered ensemble policy after the sweep.
Keys the sweep owns itself (run.*, mlflow.*) cannot be searched; every error names field and value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from ray import tune

from mobile_vla.config import StrictModel, dump_config, format_validation_error, has_key, load_config, parse_override
from mobile_vla.errors import ConfigError
from mobile_vla.tracking.registry import CHALLENGER
from mobile_vla.train.job_config import (
    MlflowTargetConfig,
    NamedRunConfig,
    TrainJobConfig,
    load_train_config,
)
from mobile_vla.train.preflight import resolve_policy_config

RULES = ("loguniform", "uniform", "randint", "choice", "grid")
SWEEP_OWNED = ("run", "mlflow")  # set per trial by the sweep, never sampled


class SearchDimension(StrictModel):
    """Exactly one sampling rule for one dotted TrainJobConfig key."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # [lo, hi): hi excluded, as numpy and Tune
    choice: list[Any] | None = None
    grid: list[Any] | None = None  # every value, in order (random search only)

    @model_validator(mode="after")
    def _one_rule(self) -> SearchDimension:
        given = [rule for rule in RULES if getattr(self, rule) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(RULES)} (got {given or 'none'})")
        rule = given[0]
        value = getattr(self, rule)
        if rule in ("loguniform", "uniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{rule} = {list(value)}: expected [low, high] with low < high")
        if rule == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform = {list(value)}: bounds must be > 0")
        if rule in ("choice", "grid") and not value:
            raise ValueError(f"{rule}: expected a non-empty list")
        return self

    @property
    def rule(self) -> str:
        return next(rule for rule in RULES if getattr(self, rule) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.rule)

    def examples(self) -> list[Any]:
        """Values at the edges of the range (used to check the key and the values before any trial runs)."""
        if self.rule in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.rule == "randint" else [low, high]

    def to_tune(self):
        rule, value = self.rule, self.values
        if rule == "loguniform":
            return tune.loguniform(*value)
        if rule == "uniform":
            return tune.uniform(*value)
        if rule == "randint":
            return tune.randint(*value)
        if rule == "choice":
            return tune.choice(list(value))
        return tune.grid_search(list(value))


class TrainPresetConfig(StrictModel):
    """The training preset every trial starts from, with its own dotted overrides."""

    config: str = "jobs/configs/tiny.yaml"  # the TrainJobConfig preset every trial starts from
    overrides: list[str] = Field(default_factory=list)  # dotted, applied before the sampled values


class SearchConfig(StrictModel):
    """The `tune` section: trial count, the compared metric, the ASHA scheduler and the search algorithm."""

    num_samples: int = Field(4, ge=1)  # trials (x the grid size when a dimension is a grid)
    metric: str = "val_loss"  # reported by every epoch of train_loop_per_worker
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # ASHA: 1/reduction_factor of the trials go on at each rung
    search: Literal["optuna", "random"] = "optuna"
    seed: int | None = 0  # the search algorithm's seed (null: a fresh draw per launch)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)  # configurations tried first
    max_concurrent_trials: int | None = Field(None, ge=1)  # null: as many as the cluster holds at once
    driver_cpus: float = Field(0.0, ge=0)  # per trial driver (it only waits on fit(); Train workers bring their own)


class SweepRunConfig(NamedRunConfig):
    """The sweep's name (the same name again resumes it: unfinished trials go on) and storage
    (default $MOBILE_VLA_HOME/tune_results; shared (S3/NFS) on clusters).
    """

    kind: ClassVar[str] = "sweep"
    default_storage: ClassVar[str] = "tune_results"


class SweepMlflowConfig(MlflowTargetConfig):
    """The sweep's experiment; `registered_model: null` tracks the sweep and registers nothing."""

    experiment: str = "mobile-vla-sweeps"


class SweepEnsembleConfig(StrictModel):
    """Optionally, the sweep's top trials combined into one registered ensemble policy."""

    members: int = Field(0, ge=0)  # > 1: combine the top M trials (sharing the best one's chunk) after the sweep
    alias: str | None = CHALLENGER  # the ensemble, registered after the best trial, takes this alias

    @field_validator("members")
    @classmethod
    def _not_one(cls, members: int) -> int:
        if members == 1:
            raise ValueError("an ensemble needs at least 2 members (0 = no ensemble)")
        return members


class TuneJobConfig(StrictModel):
    """A Ray Tune sweep over a training preset (see the module docstring for the sections)."""

    train: TrainPresetConfig = Field(default_factory=TrainPresetConfig)
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)
    tune: SearchConfig = Field(default_factory=SearchConfig)
    run: SweepRunConfig = Field(default_factory=SweepRunConfig)
    mlflow: SweepMlflowConfig = Field(default_factory=SweepMlflowConfig)
    ensemble: SweepEnsembleConfig = Field(default_factory=SweepEnsembleConfig)

    @field_validator("search_space")
    @classmethod
    def _searchable_keys(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        for key in space:
            parts = key.split(".")
            if not all(parts) or len(parts) < 2:
                raise ValueError(f"{key!r}: expected a dotted TrainJobConfig key such as optim.lr")
            if parts[0] in SWEEP_OWNED:
                raise ValueError(f"{key!r}: {parts[0]}.* is set by the sweep for each trial and cannot be searched")
        return space

    @model_validator(mode="after")
    def _consistent(self) -> TuneJobConfig:
        grids = [k for k, d in self.search_space.items() if d.rule == "grid"]
        if grids and self.tune.search == "optuna":
            raise ValueError(
                f"search_space.{grids[0]}: grid needs tune.search = 'random' (Optuna samples, it does not enumerate)"
            )
        for index, point in enumerate(self.tune.points_to_evaluate):
            unknown = sorted(set(point) - set(self.search_space))
            if unknown:
                raise ValueError(f"tune.points_to_evaluate[{index}]: {unknown} are not search_space keys")
        return self

    def storage_path(self) -> str:
        """Where Tune keeps the sweep's experiment state and trial results (absolute when local)."""
        return self.run.storage_uri()


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Sorts `key=value` overrides into the tune config's and the base training preset's, by key.

    A key the tune config has (tune.*, run.*, mlflow.*, train.config, ...) goes to the tune config; any
    other key the training preset has (data.path, train.epochs, scaling.*, ...) to `train.overrides`.
    So `mobile-vla tune` takes the same `key=value` words as `mobile-vla train`.

    Raises:
        ConfigError: a malformed override, or a key neither config has.
    """
    sweep, training = [], []
    for text in overrides:
        parts, _ = parse_override(text)
        key = ".".join(parts)
        if has_key(TuneJobConfig, key):
            sweep.append(text)
        elif has_key(TrainJobConfig, key):
            training.append(text)
        else:
            raise ConfigError(f"override {text!r}: {key!r} is a key of neither the tune config nor the training preset")
    return sweep, training


def load_tune_config(
    path: str | Path | None, overrides: list[str] | None = None, train_overrides: list[str] | None = None
) -> TuneJobConfig:
    """A TuneJobConfig from YAML (None: the defaults) plus dotted overrides.

    Args:
        path: the tune config file.
        overrides: dotted overrides of the tune config.
        train_overrides: dotted overrides of the base training preset, applied after its train.overrides.

    Raises:
        ConfigError: a bad file, key or value (the message names it).
    """
    cfg = load_config(path, TuneJobConfig, overrides)
    if train_overrides:
        cfg.train.overrides = [*cfg.train.overrides, *train_overrides]
    return cfg


def load_base_train_config(cfg: TuneJobConfig, base_dir: Path | None = None):
    """The trials' starting TrainJobConfig: train.config (relative to the working directory, else to the
    tune config's folder or the nearest folder above it that holds it, e.g. the repository root for
    `jobs/configs/tiny.yaml`, so the sweep runs from any working directory) with train.overrides.
    """
    path = Path(cfg.train.config).expanduser()
    if not path.is_absolute() and not path.is_file() and base_dir is not None:
        base_dir = base_dir.resolve()
        path = next((folder / path for folder in (base_dir, *base_dir.parents) if (folder / path).is_file()), path)
    if not path.is_file():
        raise ConfigError(f"train.config = {cfg.train.config!r}: no such file")
    return load_train_config(path, cfg.train.overrides)


def apply_params(base, params: dict[str, Any], source: str = "search_space"):
    """A TrainJobConfig with the sampled dotted values applied (validated: bad values name the key)."""
    data = dump_config(base)
    for key, value in params.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None and parts[:2] == ["model", "overrides"]:  # a nested PolicyConfig field
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}.{key}: {part!r} is not a section of the training config")
            node = child
        if parts[-1] not in node and parts[0] != "model":  # model.overrides.* may add PolicyConfig fields
            raise ConfigError(f"{source}.{key}: unknown training config key (see {cfg_keys_hint(data, parts[:-1])})")
        node[parts[-1]] = value
    try:
        return TrainJobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{source} {params}")) from None


def cfg_keys_hint(data: dict, parents: list[str]) -> str:
    """The keys that exist under `parents` in a dumped training config (for an unknown-key message)."""
    node = data
    for part in parents:
        node = node.get(part, {})
    prefix = ".".join(parents)
    return ", ".join(f"{prefix}.{k}" for k in sorted(node)) if isinstance(node, dict) else prefix


def check_search_space(cfg: TuneJobConfig, base) -> None:
    """Every key exists and every edge value validates, so a typo fails before the first trial starts."""
    for key, dimension in cfg.search_space.items():
        for value in dimension.examples():
            trial = apply_params(base, {key: value}, source="search_space")
            if key.startswith("model."):
                resolve_policy_config(trial)  # PolicyConfig field names and values
