"""Progress: a live bar on a terminal, plain periodic lines in logs (CI, ``| tee``)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from jdfashion.progress import PlainProgress, make_progress

FIELDS = {"loss": "loss {loss:.3f}", "rate": "{rate:.1f} img/s"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_a_bar_and_a_log_gets_lines() -> None:
    assert isinstance(make_progress(FIELDS, console=Console(force_terminal=True)), Progress)
    assert isinstance(make_progress(FIELDS, console=Console(file=io.StringIO())), PlainProgress)
    assert isinstance(make_progress(FIELDS, disable=True, console=Console(file=io.StringIO())), Progress)


def test_plain_lines_come_at_most_every_interval_and_at_the_end() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = PlainProgress(FIELDS, interval=10, stream=stream, clock=clock)
    with progress:
        task = progress.add_task("clothes/resnet50 epoch 2/60", total=100, loss=0.0, rate=0.0)
        for step in range(100):
            clock.now = (step + 1) * 0.5  # 0.5 s a step: a line every 20 steps
            progress.update(task, advance=1, loss=3.0 - step / 100, rate=64.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # at 10, 20, 30, 40 s, and the end (50 s)
    assert lines[0] == "clothes/resnet50 epoch 2/60: step 20/100 (20%)  loss 2.810  64.0 img/s  ETA 0:00:40"
    assert (
        lines[-1]
        == "clothes/resnet50 epoch 2/60: step 100/100 (100%)  loss 2.010  64.0 img/s  elapsed 0:00:50"
    )
    assert all(len(line) < 120 and "…" not in line for line in lines)


def test_a_resumed_task_estimates_from_its_own_pace() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = PlainProgress({}, interval=1, stream=stream, clock=clock)
    task = progress.add_task("epoch 3/3", total=100, completed=90)
    clock.now = 2.0
    progress.update(task, advance=2)
    assert stream.getvalue() == "epoch 3/3: step 92/100 (92%)  ETA 0:00:08\n"
    progress.update(task, completed=100)
    progress.update(task, advance=0)  # nothing more after the end line
    assert stream.getvalue().splitlines()[-1] == "epoch 3/3: step 100/100 (100%)  elapsed 0:00:02"
    assert len(stream.getvalue().splitlines()) == 2
