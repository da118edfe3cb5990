"""Progress that reads well both live and in a log.

On a terminal (or in Jupyter) :func:`make_progress` returns a rich bar. Off a terminal (CI, ``| tee``,
a log file) a bar is redrawn as one 80-column line whose columns rich cuts to ``0:0…``; there the
same interface prints plain lines instead, at most every ``interval`` seconds per task and once when
a task ends, e.g. ``clothes/resnet50 epoch 2/60: step 40/120 (33%)  loss 3.214  61.2 img/s  ETA 0:01:18``.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_INTERVAL_S = 10.0
_FIELD = re.compile(r"\{(\w+)")


def make_progress(
    fields: Mapping[str, str] | None = None,
    *,
    disable: bool = False,
    interval: float = PLAIN_INTERVAL_S,
    console: Console | None = None,
) -> ProgressLike:
    """A rich bar on a terminal, plain periodic lines elsewhere; ``fields`` maps a task field to its
    ``str.format`` template, e.g. ``{"loss": "loss {loss:.3f}", "rate": "{rate:.1f} img/s"}``."""
    templates = dict(fields or {})
    console = console or Console()
    if disable or console.is_terminal or console.is_jupyter:
        columns = [TextColumn(_FIELD.sub(r"{task.fields[\1]", t)) for t in templates.values()]
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            *columns,
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=disable,
        )
    return PlainProgress(templates, interval)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    start_completed: float
    last_printed: float
    finished: bool = False


@dataclass
class PlainProgress:
    """The part of rich's ``Progress`` interface this package uses, printing lines instead of a bar."""

    templates: Mapping[str, str]
    interval: float = PLAIN_INTERVAL_S
    stream: TextIO | None = None
    clock: Any = time.monotonic
    _tasks: dict[TaskID, _Task] = field(default_factory=dict)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        return None

    def add_task(
        self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any
    ) -> TaskID:
        now = self.clock()
        task_id = TaskID(len(self._tasks))
        self._tasks[task_id] = _Task(description, total, completed, dict(fields), now, completed, now)
        return task_id

    def update(
        self,
        task_id: TaskID,
        *,
        advance: float | None = None,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        task = self._tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        task.fields.update(fields)
        now = self.clock()
        done = task.total is not None and task.completed >= task.total
        if task.finished or not (done or now - task.last_printed >= self.interval):
            return
        task.finished, task.last_printed = done, now
        print(self.line(task, now), file=self.stream or sys.stdout, flush=True)

    def line(self, task: _Task, now: float) -> str:
        """``description: step n/N (p%)  field ...  ETA h:mm:ss`` (``elapsed`` once the task is done)."""
        step = f"step {task.completed:g}"
        if task.total:
            step += f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
        parts = [f"{task.description}: {step}"]
        parts += [t.format(**task.fields) for name, t in self.templates.items() if name in task.fields]
        elapsed = now - task.started
        done_here = task.completed - task.start_completed
        if task.total is not None and task.completed >= task.total:
            parts.append(f"elapsed {_clock_text(elapsed)}")
        elif task.total is not None and done_here > 0:
            parts.append(f"ETA {_clock_text(elapsed / done_here * (task.total - task.completed))}")
        return "  ".join(parts)


ProgressLike = Progress | PlainProgress


def _clock_text(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
