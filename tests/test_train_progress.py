"""`mobile-vla train` shows rank 0's progress (epoch, step, loss, ETA) in the terminal while it runs:
the line format and when a line is printed (a fake clock, no waiting). The executed command's lines are
checked by tests/test_docs_commands.py::test_documented_train_trains_and_registers_a_tiny_run."""

from __future__ import annotations

import io

from mobile_vla.train.progress import StepUpdate, TerminalProgress, format_duration, progress_line


def test_durations_read_as_a_clock():
    assert [format_duration(s) for s in (0, 9.6, 75, 3725, -3)] == ["0:00", "0:10", "1:15", "1:02:05", "0:00"]


def test_line_names_epoch_step_loss_rate_and_eta():
    update = StepUpdate(epoch=2, epochs=3, step=50, total_steps=120, loss=0.123456)
    # 40 steps in 20 s: 2 steps/s, 70 steps left -> 35 s
    assert progress_line(update, steps_done=40, elapsed_s=20.0) == (
        "train: epoch 2/3 · step 50/120 · loss 0.1235 · 2.00 steps/s · ETA 0:35"
    )
    assert progress_line(update, steps_done=0, elapsed_s=0.0).endswith("· - steps/s · ETA ?")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_printer_shows_the_first_update_then_one_per_interval_and_each_epochs_last():
    clock, stream = FakeClock(), io.StringIO()
    printer = TerminalProgress(queue=None, stream=stream, every_s=5.0, clock=clock)
    shown = []
    for step in range(1, 21):  # 2 epochs of 10 steps, one step a second
        epoch = 1 + (step - 1) // 10
        shown.append(printer.show(StepUpdate(epoch, 2, step, 20, 1.0 / step)) is not None)
        clock.now += 1.0
    printed = [i + 1 for i, s in enumerate(shown) if s]
    # step 1 (first), 6 (5 s later), 10 (epoch ends), 11 (new epoch), 16 (5 s later), 20 (last)
    assert printed == [1, 6, 10, 11, 16, 20]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 and lines[0].endswith("ETA ?")
    assert lines[-1] == "train: epoch 2/2 · step 20/20 · loss 0.0500 · 1.00 steps/s · ETA 0:00"
