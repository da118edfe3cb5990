"""A ``bench real`` run, declared once (:class:`RealRun`): the command's options, the API's
arguments and the results file's record come from its fields. Light to import (no torch): the CLI
builds its options from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from jdfashion.options import RetrievalOptions, RotationSide
from jdfashion.settings import command_words, flag

MIN_IMAGE_SIZE = 128  # 8x8 maps at stride 16: the 3-way parts and rings are regions
DEFAULT_DATASET = Path("../shared/data/grocery-store/dataset")
# The settings that change a row's numbers: an earlier results file with others is not reused.
RESULT_SETTINGS = (
    "smoke",
    "epochs",
    "image_size",
    "max_queries",
    "max_train_photos",
    "rotation",
    "rotation_side",
)


def _seeds(text: str) -> tuple[int, ...]:
    return tuple(int(seed) for seed in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True, kw_only=True)
class RealRun:
    """One ``jdfashion bench real`` run, declared once: the command's options, the API's arguments
    and the results file's record (``settings``) all come from these fields."""

    dataset: Path = field(
        default=DEFAULT_DATASET,
        metadata=flag(
            "The Grocery Store dataset folder (read in place).", type=click.Path(exists=True, path_type=Path)
        ),
    )
    out: Path = field(
        default=Path("runs/real"), metadata=flag("Where the run writes.", type=click.Path(path_type=Path))
    )
    smoke: bool = field(
        default=False,
        metadata=flag("One seed, SMOKE_ROWS, one epoch, 128 px and fewer training photos (the CI check)."),
    )
    seeds: tuple[int, ...] = field(
        default=(0, 1, 2), metadata=flag("Seeds for the repeated rows.", parse=_seeds, show="0,1,2")
    )
    epochs: int | None = field(default=None, metadata=flag("Override every row's epochs (>= 1).", type=int))
    image_size: int | None = field(default=None, metadata=flag("Override every row's image size.", type=int))
    rows: tuple[str, ...] | None = field(
        default=None,
        metadata=flag("Comma list of row names to (re)run; see docs/REALDATA.md.", parse=_names),
    )
    rotation: bool = field(
        default=True,
        metadata=flag("Also score rotated test queries, and both query sets with rotation TTA."),
    )
    rotation_side: RotationSide = field(
        default="query", metadata=flag("Whose images rotation TTA turns (docs/REALDATA.md measures both).")
    )
    # Tests and the smoke run: thinner test and validation queries, fewer training photos per identity.
    max_queries: int | None = None
    max_train_photos: int | None = None
    time_steps: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        from jdfashion.realdata.rows import ROWS  # torch and timm: imported when a run is made

        unknown = [name for name in self.rows or () if name not in ROWS]
        if unknown:
            raise ValueError(f"unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.image_size is not None and self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be >= {MIN_IMAGE_SIZE} (8x8 maps: 3-way parts and rings are regions), "
                f"got {self.image_size}"
            )
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (frozen rows train 0 epochs anyway), got {self.epochs}")

    def record(self, options: RetrievalOptions) -> dict[str, Any]:
        """The results file's ``settings``: every field, the command that repeats the run, and the
        retrieval options the rows start from."""
        fields = {
            key: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }
        command = " ".join(["jdfashion bench real", *command_words(self)])
        return {**fields, "command": command, "retrieval": dataclasses.asdict(options)}
