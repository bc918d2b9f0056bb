"""`TrainJobConfig`: everything one training run needs, read from a YAML preset plus overrides.

    cfg = load_train_config("jobs/configs/small.yaml", ["optim.lr=3e-4", "scaling.num_workers=2"])

Sections mirror the stages of a run: data (which episodes, how windows are cut), model (policy preset +
overrides), loss (term weights), optim, train (loop settings, model selection), scaling (Ray Train
workers), run (name and storage, the key for resuming) and mlflow (where results go). Unknown keys are
errors; every message names field and value.
`batch_size` is per worker: the global batch is batch_size x num_workers x optim.accumulate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mobile_vla.config import StrictModel, load_config, platform_home
from mobile_vla.policy.config import AUX_LABELS
from mobile_vla.tracking.job_storage import Place, configured_place
from mobile_vla.tracking.registry import CHALLENGER, DEFAULT_MODEL_NAME


class DataConfig(StrictModel):
    """Which episodes a run trains and validates on, and how windows are cut from them."""

    path: str = "data/mini"  # dataset folder holding manifest.json and the episode files
    train_split: str = "train"
    val_split: str = "val"
    window: int = Field(8, ge=1)  # W history frames per sample
    chunk: int = Field(10, ge=1)  # K future actions predicted per frame
    stride: int | None = Field(None, ge=1)  # frames between training window starts; null = window // 2
    augment: bool = True  # train-time image augmentation (never on validation)
    augment_strength: float = Field(1.0, ge=0, le=4)  # scales the default rotation/brightness/contrast ranges (Tune)

    @model_validator(mode="after")
    def _stride_covers_every_frame(self) -> DataConfig:
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"data.stride = {self.stride}: must be at most data.window = {self.window}")
        return self


class ModelConfig(StrictModel):
    """The policy preset and the PolicyConfig fields it overrides."""

    preset: Literal["tiny", "small", "full"] = "small"
    overrides: dict[str, Any] = Field(default_factory=dict)  # PolicyConfig fields, checked before launch


class LossConfig(StrictModel):
    """Weights of the training loss terms (`policy.losses.policy_loss`); the validation loss uses them too."""

    nll_weight: float = Field(0.1, ge=0)  # Gaussian NLL (teaches the confidence) relative to the Huber term
    first_step_weight: float = Field(1.0, gt=0)  # k = 0 (executed now) vs each later chunk step; 1 = alike
    # auxiliary heads on the privileged simulator labels (target bearing, distance, in view); > 0 builds the
    # model with aux_heads and needs those labels in every episode (generated data has them); 0 = off
    aux_weight: float = Field(0.0, ge=0)

    def weights(self) -> dict[str, float]:
        """The keyword arguments of `policy_loss` this section sets."""
        return {
            "nll_weight": self.nll_weight,
            "first_step_weight": self.first_step_weight,
            "aux_weight": self.aux_weight,
        }

    @property
    def aux_labels(self) -> bool:
        """True when training needs the per-frame simulator labels in its windows."""
        return self.aux_weight > 0

    def frame_labels(self) -> tuple[str, ...]:
        """The per-frame episode arrays the training windows must carry for this loss (AUX_LABELS or none)."""
        return AUX_LABELS if self.aux_labels else ()


class OptimConfig(StrictModel):
    """AdamW with linear warm-up then cosine annealing, gradient clipping and accumulation."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up, then cosine annealing to min_lr_ratio x lr
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; null disables clipping
    accumulate: int = Field(1, ge=1)  # micro-batches per optimiser step

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class TrainingConfig(StrictModel):
    """The training loop: epochs, per-worker batch, precision, parallel strategy, checkpoints kept."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 0
    keep_best: int = Field(3, ge=1)  # checkpoints kept, ranked by select_by
    # what ranks checkpoints and picks the registered one: the validation loss, or the validation MAE of
    # the executed (k = 0) command in m/s and rad/s (what closed loop runs on); both are logged every epoch
    select_by: Literal["val_loss", "val_mae_now"] = "val_loss"
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for smoke runs and benchmarks
    log_every_n_steps: int = Field(10, ge=1)


class WorkersConfig(StrictModel):
    """The Ray Train workers: how many, and what each reserves."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # e.g. {CPU: 8, GPU: 1}

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, resources: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in resources.items() if v < 0}
        if bad:
            raise ValueError(f"resource amounts must be >= 0, got {bad}")
        return resources

    def worker_bundle(self) -> dict[str, float]:
        """What one Train worker reserves: Ray's rule (1 CPU, plus 1 GPU with use_gpu) unless overridden."""
        bundle = {"CPU": 1.0, **({"GPU": 1.0} if self.use_gpu else {})}
        bundle.update({k: float(v) for k, v in self.resources_per_worker.items()})
        return {k: v for k, v in bundle.items() if v > 0}


class NamedRunConfig(StrictModel):
    """A job's name (the same name again resumes it) and where it stores results; the `run` section of
    training and of sweeps (`tune.sweep_config.SweepRunConfig`), which differ only in what they add.
    """

    kind: ClassVar[str] = "run"  # what the name names, in error messages
    default_storage: ClassVar[str] = "ray_results"  # under $MOBILE_VLA_HOME, when storage_path is not set
    name: str | None = None  # the same name again resumes that run from its last checkpoint
    storage_path: str | None = None  # default $MOBILE_VLA_HOME/ray_results; shared (S3/NFS) on clusters

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or "/" in name or name.startswith(".")):
            raise ValueError(f"{cls.kind} name must be a plain folder name, got {name!r}")
        return name

    def storage_uri(self) -> str:
        """Where results go: a storage URI as given, a local path made absolute (workers run elsewhere)."""
        raw = self.storage_path or str(platform_home() / self.default_storage)
        if "://" in raw:
            return raw
        return str(Path(raw).expanduser().resolve())

    def storage_place(self) -> Place:
        """Where results go, for `check_job_storage` (a Ray job must not keep them in its temporary copy)."""
        return configured_place("run.storage_path", self.storage_path, self.storage_uri())


class RunStorageConfig(NamedRunConfig):
    """A training run's name and storage, plus how it survives worker failures."""

    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    pid_dir: str | None = None  # each worker writes <rank>.pid here (fault-injection tests, operations)


class MlflowTargetConfig(StrictModel):
    """The MLflow experiment a job logs to, and the registered model and alias its result becomes; the
    `mlflow` section of training and of sweeps (`tune.sweep_config.SweepMlflowConfig`).
    """

    experiment: str = "mobile-vla"
    registered_model: str | None = DEFAULT_MODEL_NAME  # null: log the run, register nothing
    alias: str | None = CHALLENGER


class MlflowConfig(MlflowTargetConfig):
    """Training's MLflow section: the target, and whether the run is tracked at all."""

    enabled: bool = True


class TrainJobConfig(StrictModel):
    """Everything one training run needs (see the module docstring for the sections)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    scaling: WorkersConfig = Field(default_factory=WorkersConfig)
    run: RunStorageConfig = Field(default_factory=RunStorageConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TrainJobConfig:
        gpus = self.scaling.worker_bundle().get("GPU", 0.0)
        if self.scaling.use_gpu and gpus == 0:
            raise ValueError("scaling.use_gpu = true but scaling.resources_per_worker.GPU = 0")
        if self.data.train_split == self.data.val_split:
            raise ValueError(
                f"data.val_split = {self.data.val_split!r}: must differ from data.train_split (held-out validation)"
            )
        return self

    def storage_path(self) -> str:
        """Where Ray Train keeps checkpoints; local paths are made absolute (workers run elsewhere)."""
        return self.run.storage_uri()

    def data_path(self) -> Path:
        """The dataset folder, absolute."""
        return Path(self.data.path).expanduser().resolve()


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainJobConfig:
    """A TrainJobConfig from a YAML preset (None: the defaults) plus dotted overrides.

    Raises:
        ConfigError: a bad file, key or value (the message names it).
    """
    return load_config(path, TrainJobConfig, overrides)
