"""What every benchmark script shares: isolated variant runs, machine facts and the result files.

Each variant runs in a fresh ``spawn`` child so that its peak RSS (the kernel's VmHWM, read inside
the child) is its own: one variant's freed memory, allocator caches or imported libraries never
count against the next. Results land in ``benchmarks/results/<name>.json`` (everything, machine
included) and ``<name>.md`` (the table); ``--quick`` runs write ``<name>.quick.*`` so that a smoke
check never overwrites full-size numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import platform
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from jdfashion.atomic import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
NOISE_NOTE = (
    "Timings are noisy where other work shares the machine; the load averages above say how busy it was."
)


@dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its header and how a value is formatted."""

    key: str
    header: str
    spec: str = ""

    def render(self, value: Any) -> str:
        if value is None:
            return "—"
        return format(value, self.spec) if self.spec else str(value)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def parse_args(description: str, repeats: int | None = None) -> argparse.Namespace:
    """``--quick`` and ``--threads``; the latter is applied here, to every variant process started later.
    Scripts that time every variant several times pass their default ``repeats`` (``--repeats``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: checks that the script works (< 1 min)"
    )
    if repeats is not None:
        parser.add_argument(
            "--repeats",
            type=int,
            default=repeats,
            help=f"rounds of every variant, interleaved, medians reported (default {repeats})",
        )
    parser.add_argument(
        "--threads",
        type=int,
        help="compute threads per variant (torch, OpenBLAS, faiss, numba); default: every core. On a "
        "machine shared with other work, 1 avoids the stalls of oversubscribed thread pools",
    )
    args = parser.parse_args()
    if repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        # Variant processes are spawned, so they read these at start-up, before any library sizes its pool.
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(args.threads)))
    return args


def _status_field(name: str) -> float:
    """A /proc/self/status memory field in MiB (Linux reports kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"/proc/self/status has no {name} field")


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) so far."""
    return _status_field("VmHWM")


def _measured(
    function: Callable[..., Any], args: tuple[Any, ...], start_method: str, flush_denormal: bool
) -> tuple[Any, float]:
    # A spawned child inherits "spawn" as its start method; its own DataLoader workers should start
    # the way they do in a normal process (re-importing everything per worker costs seconds).
    multiprocessing.set_start_method(start_method, force=True)
    if flush_denormal:
        import torch  # only the processes that asked for it load torch

        torch.set_flush_denormal(True)
    return function(*args), peak_rss_mib()


@contextlib.contextmanager
def _environment(overrides: Mapping[str, str]) -> Iterator[None]:
    """Set variables for a child about to be spawned (it copies os.environ at start), then restore them."""
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def isolated(
    function: Callable[..., Any],
    *args: Any,
    env: Mapping[str, str] | None = None,
    flush_denormal: bool = False,
) -> tuple[Any, float]:
    """Run ``function(*args)`` in a fresh spawned interpreter: its result and that child's peak RSS in MiB.

    ``function`` must be a module-level function of the calling script (spawn pickles it by name).
    ``flush_denormal``: randomly initialised networks produce denormal activations, which made CPU
    forwards here up to 30x slower depending on the input; benchmarks of such networks flush them.
    """
    with (
        _environment(env or {}),
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        return pool.submit(
            _measured, function, args, multiprocessing.get_start_method(), flush_denormal
        ).result()


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare numbers across machines, and the load that makes them noisy."""
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    import torch  # here, so that processes which never use torch (scoring) do not carry it in their RSS

    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kib / (1 << 20), 1),
        "torch": torch.__version__,
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0],
    }


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def markdown_table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(column.header for column in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += [
        "| " + " | ".join(column.render(row.get(column.key)) for column in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def write_results(
    name: str,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    *,
    quick: bool,
    machine: Mapping[str, Any],
    parameters: Mapping[str, Any],
    notes: Sequence[str] = (),
    details: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<name>[.quick].json`` and ``.md`` atomically, print the table, and return the markdown path."""
    stem = f"{name}.quick" if quick else name
    machine = {**machine, "load_average_1m_at_end": os.getloadavg()[0]}
    document = {
        "benchmark": name,
        "title": title,
        "quick": quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "parameters": dict(parameters),
        "rows": [dict(row) for row in rows],
        "notes": [*notes, NOISE_NOTE],
        "details": dict(details or {}),
    }
    atomic_write_text(RESULTS_DIR / f"{stem}.json", json.dumps(document, indent=1, default=_plain) + "\n")
    machine_line = (
        f"{machine['date']}, {machine['cpu_model']}, {machine['cpus_usable']} of {machine['cpu_count']} "
        f"CPUs, {machine['memory_gib']} GiB, torch {machine['torch']}, {machine['threads']} compute threads "
        f"per variant, load average {machine['load_average_1m']:.2f} at start / "
        f"{machine['load_average_1m_at_end']:.2f} at end"
    )
    settings = ", ".join(f"{key}={value}" for key, value in parameters.items())
    sections = [
        f"# {title}{' (--quick)' if quick else ''}",
        f"Machine: {machine_line}.",
        f"Parameters: {settings}.",
        markdown_table(columns, rows),
    ]
    sections.append("\n".join(f"- {note}" for note in [*notes, NOISE_NOTE]))
    markdown_path = RESULTS_DIR / f"{stem}.md"
    atomic_write_text(markdown_path, "\n\n".join(sections) + "\n")

    table = Table(title=title, caption=machine_line)
    for column in columns:
        table.add_column(column.header)
    for row in rows:
        table.add_row(*(column.render(row.get(column.key)) for column in columns))
    console = Console(width=160)
    console.print(table)
    for note in [*notes, NOISE_NOTE]:
        console.print(f"- {note}", highlight=False)
    console.print(f"wrote {markdown_path} and {markdown_path.with_suffix('.json')}")
    return markdown_path
