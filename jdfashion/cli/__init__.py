"""The ``jdfashion`` command line: each command parses options and calls the Python API, nothing more.

One module per stage (``data``, ``training``, ``retrieval``, ``scoring``, ``runs``); the commands are
added to :func:`main` here, in one list, so what the CLI offers is read in one place.
"""

from __future__ import annotations

from jdfashion.cli import data, retrieval, runs, scoring, training
from jdfashion.cli.common import main

for command in (
    data.data,
    training.train,
    training.export,
    retrieval.extract,
    retrieval.fuse,
    retrieval.submit,
    scoring.validate,
    scoring.score,
    scoring.show,
    runs.quickstart,
    runs.bench,
):
    main.add_command(command)

__all__ = ["main"]
