"""Training progress in the terminal: epoch, step, loss and ETA while `mobile-vla train` runs.

    queue = progress_queue()                         # on the driver; its handle goes to the workers
    publish(queue, update)                           # rank 0, every log_every_n_steps optimiser steps
    with TerminalProgress(queue): trainer.fit()      # the driver prints a line every `every_s` seconds

The workers' own stdout does not reach the terminal (the platform starts Ray with log_to_driver off, so
the many workers' logs do not bury the user's command), so rank 0 sends small updates through a Ray
queue (an actor holding no CPU) and the driver prints them. A full or vanished queue drops an update:
progress never slows or fails training.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from ray.util.queue import Empty, Full, Queue

log = logging.getLogger(__name__)

QUEUE_SIZE = 256


@dataclass
class StepUpdate:
    """What rank 0 sends after a logged optimiser step (`step` counts from the run's first launch)."""

    epoch: int  # 1-based, the epoch being trained
    epochs: int
    step: int
    total_steps: int  # steps_per_epoch x epochs
    loss: float


def format_duration(seconds: float) -> str:
    """75 -> '1:15', 3725 -> '1:02:05'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(update: StepUpdate, steps_done: int, elapsed_s: float) -> str:
    """One terminal line; the ETA extrapolates this launch's rate (`steps_done` in `elapsed_s`) to the end.

    Args:
        update: the latest update.
        steps_done: optimiser steps taken between this launch's first update and `update`.
        elapsed_s: seconds between them.
    """
    rate = steps_done / elapsed_s if steps_done > 0 and elapsed_s > 0 else None
    left = max(0, update.total_steps - update.step)
    eta = format_duration(left / rate) if rate else "?"
    speed = f"{rate:.2f} steps/s" if rate else "- steps/s"
    return (
        f"train: epoch {update.epoch}/{update.epochs} · step {update.step}/{update.total_steps} · "
        f"loss {update.loss:.4f} · {speed} · ETA {eta}"
    )


def progress_queue() -> Queue:
    """The driver's queue for rank 0's updates (an actor that reserves no CPU)."""
    return Queue(maxsize=QUEUE_SIZE, actor_options={"num_cpus": 0})


def publish(queue: Queue | None, update: StepUpdate) -> None:
    """Rank 0: sends an update; drops it when there is no queue or it is full or gone."""
    if queue is None:
        return
    try:
        queue.put_nowait(update)
    except Full:
        pass
    except Exception as exc:  # the driver went away: training goes on without progress
        log.debug("progress update dropped: %s", exc)


class QueueFollower:
    """A driver thread that hands each item of a Ray queue to `show` while a run goes on.

    `stop()` joins the thread, hands over what arrived after its last read (a run's last report) and
    shuts the queue's actor down. Ray going away under it ends the thread quietly: progress is never
    worth failing a run for.
    """

    def __init__(self, queue: Queue, show, name: str, poll_s: float) -> None:
        self.queue, self.show, self.poll_s = queue, show, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=self.poll_s)
            except Empty:
                continue
            except Exception:  # Ray shut down under us: nothing left to show
                return
            self.show(item)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            while True:  # items sent after the thread's last read
                self.show(self.queue.get_nowait())
        except Exception:  # Empty, or Ray already down
            pass
        try:
            self.queue.shutdown()
        except Exception as error:  # Ray already down
            log.debug("progress queue shutdown: %s", error)


class TerminalProgress:
    """Prints rank 0's updates from `queue` on the driver: the first, then one every `every_s` seconds,
    and the last of each epoch.

    Args:
        queue: the queue rank 0 publishes to.
        stream: where the lines go (default stderr).
        every_s: least seconds between two lines within an epoch.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(self, queue: Queue, stream: TextIO | None = None, every_s: float = 5.0, clock=time.monotonic):
        self.queue, self.stream, self.every_s, self.clock = queue, stream or sys.stderr, every_s, clock
        self.first: tuple[int, float] | None = None  # (step of the first update, when it arrived)
        self.last_shown: tuple[int, float] | None = None  # (epoch, when)
        self._follower = QueueFollower(queue, self.show, "train-progress", poll_s=0.5)

    def show(self, update: StepUpdate) -> str | None:
        """Prints the update's line when it is due; returns the line printed (None: skipped)."""
        now = self.clock()
        if self.first is None:
            self.first = (update.step, now)
        epoch_ends = update.step % max(1, update.total_steps // max(1, update.epochs)) == 0
        due = (
            self.last_shown is None
            or update.epoch != self.last_shown[0]
            or epoch_ends
            or now - self.last_shown[1] >= self.every_s
        )
        if not due:
            return None
        line = progress_line(update, update.step - self.first[0], now - self.first[1])
        print(line, file=self.stream, flush=True)
        self.last_shown = (update.epoch, now)
        return line

    def __enter__(self) -> TerminalProgress:
        self._follower.start()
        return self

    def __exit__(self, *exc) -> None:
        self._follower.stop()
