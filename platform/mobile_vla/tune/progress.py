"""One rich progress bar for a whole sweep: validated epochs done of epochs planned, with the running,
finished and stopped trials and the best value so far.
"""

from __future__ import annotations

import math

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mobile_vla.tune.trials import COMPLETED, FAILED, STOPPED


class SweepProgress(Callback):
    """A Tune callback drawing the sweep's progress bar (on stderr unless a console is given).

    Args:
        metric: the metric trials are compared on (tune.metric).
        mode: "min" or "max".
        trials: trials planned.
        planned_epochs: epochs each trial trains unless stopped.
        console: where to draw (None: a stderr console).
    """

    def __init__(self, metric: str, mode: str, trials: int, planned_epochs: int, console: Console | None = None):
        self.metric, self.mode = metric, mode
        self.trials, self.planned_epochs = trials, planned_epochs
        self.console = console
        self.progress = None  # made in setup(): Tune pickles its callbacks with the experiment state
        self.task = None
        self.epochs: dict[str, int] = {}
        self.finished: dict[str, str] = {}
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "console": None, "progress": None, "task": None}

    def setup(self, **info) -> None:
        self.progress = Progress(
            TextColumn("[bold]sweep[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console or Console(stderr=True),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("", total=self.trials * self.planned_epochs)

    def _describe(self) -> None:
        running = len([t for t in self.epochs if t not in self.finished])
        stopped = sum(1 for s in self.finished.values() if s == STOPPED)
        done = sum(1 for s in self.finished.values() if s == COMPLETED)
        failed = sum(1 for s in self.finished.values() if s == FAILED)
        best = f" · best {self.metric} {self.best[0]:.4g} ({self.best[1]})" if self.best else ""
        text = f"{running} running, {done} done, {stopped} stopped early" + (f", {failed} failed" if failed else "")
        self.progress.update(self.task, description=text + best)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.epochs[trial.trial_id] = self.epochs.get(trial.trial_id, 0) + 1
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
            if better:
                self.best = (float(value), trial.trial_id)
        self.progress.advance(self.task, 1)
        self._describe()

    def _finish(self, trial, status: str) -> None:
        done = self.epochs.get(trial.trial_id, 0)
        if status == COMPLETED and done < self.planned_epochs:
            status = STOPPED
        self.finished[trial.trial_id] = status
        # epochs a stopped or failed trial will never run leave the plan
        total = self.progress.tasks[0].total - max(0, self.planned_epochs - done)
        self.progress.update(self.task, total=total)
        self._describe()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, COMPLETED)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, FAILED)

    def on_experiment_end(self, trials, **info) -> None:
        if self.progress is not None:
            self.progress.stop()
