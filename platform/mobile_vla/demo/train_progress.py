"""Epoch progress of a Ray Train run, shown by the driver while `fit()` blocks.

Train V2 calls `UserCallback.after_report` in its controller actor, not in the driver, so the
callback forwards each report through a Ray queue and a driver thread (train.progress.QueueFollower)
moves a rich progress bar.
"""

from __future__ import annotations

from ray.train import UserCallback
from ray.util.queue import Queue
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mobile_vla.train.progress import QueueFollower


class ReportForwarder(UserCallback):
    """Sends rank 0's metrics of every `ray.train.report` to the driver's queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            shown = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}
            self.queue.put_nowait(shown)


class EpochProgress:
    """`with EpochProgress(epochs, enabled) as callback: run_training(cfg, callbacks=[callback])`."""

    def __init__(self, epochs: int, enabled: bool = True) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.reports: list[dict] = []

    def __enter__(self) -> ReportForwarder:
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._bar = None
        if self.enabled:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[line]}"),
                TimeElapsedColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("epochs", total=self.epochs, line="starting workers")
        self._follower = QueueFollower(self.queue, self._show, "demo-epoch-progress", poll_s=2.0)
        self._follower.start()
        return ReportForwarder(self.queue)

    def _show(self, report: dict) -> None:
        self.reports.append(report)
        if self._bar is not None:
            mae, loss = report.get("val_mae", float("nan")), report.get("val_loss", float("nan"))
            line = f"val_mae {mae:.4f}  val_loss {loss:.4f}"
            self._bar.update(self._task, completed=int(report.get("epoch", len(self.reports))), line=line)

    def __exit__(self, *exc) -> None:
        self._follower.stop()  # shows the reports that arrived after its last look
        if self._bar is not None:
            self._bar.stop()
