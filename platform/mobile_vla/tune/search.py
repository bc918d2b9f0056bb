"""The sweep's trial scheduler (ASHA or FIFO) and search algorithm (Optuna or random/grid)."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from mobile_vla.errors import ConfigError
from mobile_vla.tune.sweep_config import TuneJobConfig


def build_scheduler(cfg: TuneJobConfig, planned_epochs: int) -> ASHAScheduler | None:
    """ASHA over training iterations (validated epochs), or None for FIFO (every trial runs to the end)."""
    if cfg.tune.scheduler == "fifo":
        return None
    # max_t one past the last epoch: a trial that trains all its epochs ends by returning (after its
    # MLflow run is finished), never by a STOP at the final report
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=planned_epochs + 1,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


def build_search_algorithm(cfg: TuneJobConfig, running: int) -> BasicVariantGenerator | OptunaSearch:
    """The search algorithm, limited to `running` trials at once.

    TuneConfig.max_concurrent_trials only wraps a `Searcher` (Optuna); a BasicVariantGenerator passed in
    ignores it silently (then every trial starts at once), so it gets the limit itself.

    Raises:
        ConfigError: tune.search is 'optuna' but optuna is not installed.
    """
    points = [dict(p) for p in cfg.tune.points_to_evaluate]
    if cfg.tune.search == "random":
        return BasicVariantGenerator(
            points_to_evaluate=points or None, random_state=cfg.tune.seed, max_concurrent=running
        )
    try:
        import optuna  # noqa: F401  (an optional dependency: only its absence is checked, here)
    except ImportError:
        raise ConfigError(
            "tune.search = 'optuna': optuna is not installed (pip install optuna, or use 'random')"
        ) from None
    return OptunaSearch(points_to_evaluate=points or None, seed=cfg.tune.seed)
