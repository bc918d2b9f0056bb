"""Epoch progress of a Ray Train run, shown by the driver while `fit()` blocks.

Train V2 calls `UserCallback.after_report` in its controller actor, not in the driver, so the
callback forwards each report through a Ray queue and a driver thread moves a rich progress bar.
"""

from __future__ import annotations

import threading

from ray.train import UserCallback
from ray.util.queue import Empty, Queue
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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
        self._stop = threading.Event()
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
        self._thread = threading.Thread(target=self._follow, name="demo-epoch-progress", daemon=True)
        self._thread.start()
        return ReportForwarder(self.queue)

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.queue.get(timeout=2.0)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (Ctrl-C, cluster shutting down)
                return
            self._show(report)

    def _show(self, report: dict) -> None:
        self.reports.append(report)
        if self._bar is not None:
            mae, loss = report.get("val_mae", float("nan")), report.get("val_loss", float("nan"))
            line = f"val_mae {mae:.4f}  val_loss {loss:.4f}"
            self._bar.update(self._task, completed=int(report.get("epoch", len(self.reports))), line=line)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:  # reports that arrived after the thread's last look
            while True:
                self._show(self.queue.get_nowait())
        except Exception:
            pass
        if self._bar is not None:
            self._bar.stop()
        try:
            self.queue.shutdown()
        except Exception:
            pass
