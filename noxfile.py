"""Test sessions. ``nox`` runs what CI runs: lint, tests, quickstart, the real-data smoke run.

Every session runs in the environment nox itself was installed in (``venv_backend="none"``): the torch
stack is ~6 GB and one install of it is enough. Set it up once with ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import nox

nox.options.sessions = ["lint", "tests", "quickstart", "realdata_smoke"]
PYTHON = sys.executable
QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    session.run(PYTHON, "-m", "ruff", "check", ".")
    session.run(PYTHON, "-m", "ruff", "format", "--check", ".")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    session.run(PYTHON, "-m", "pytest", *(session.posargs or ["-q"]), env=QUIET_ENV)


@nox.session(venv_backend="none")
def quickstart(session: nox.Session) -> None:
    scratch = tempfile.mkdtemp(prefix="jdfashion-quickstart-")  # ~1.4 GB of models and caches
    session.run(
        PYTHON, "-m", "jdfashion", "quickstart", "--out", os.path.join(scratch, "demo"), env=QUIET_ENV
    )
    shutil.rmtree(scratch)  # kept when the run fails, for a look at what it left


@nox.session(venv_backend="none")
def benchmarks(session: nox.Session) -> None:
    """Speed and memory against named baselines; writes benchmarks/results/*.json and *.md."""
    names = session.posargs or ["search", "scoring", "extraction", "training", "jd_scale"]
    for name in names:
        session.run(PYTHON, f"benchmarks/bench_{name}.py", env=QUIET_ENV)


@nox.session(venv_backend="none")
def realdata(session: nox.Session) -> None:
    """The Grocery Store protocol (docs/REALDATA.md); ``-- --smoke`` for the CI-sized version."""
    session.run(PYTHON, "-m", "jdfashion", "bench", "real", *session.posargs, env=QUIET_ENV)


@nox.session(venv_backend="none", name="realdata_smoke")
def realdata_smoke(session: nox.Session) -> None:
    """One seed, few rows and epochs on the real photos (skipped where ../shared is absent)."""
    dataset = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "grocery-store"
    )
    if not os.path.isdir(dataset):
        session.skip(f"Grocery Store dataset not found at {dataset}")
    scratch = tempfile.mkdtemp(prefix="jdfashion-realdata-")
    out = os.path.join(scratch, "smoke")
    session.run(
        PYTHON,
        "-m",
        "jdfashion",
        "bench",
        "real",
        "--dataset",
        os.path.join(dataset, "dataset"),
        "--out",
        out,
        "--smoke",
        env=QUIET_ENV,
    )
    shutil.rmtree(scratch)
