"""The results table of the Grocery Store protocol: one row per pipeline, mean ± sd over seeds."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from scipy.stats import spearmanr

from jdfashion.realdata.protocol import Protocol


@dataclass(frozen=True)
class RowResult:
    name: str
    backbone: str
    branches: str
    recipe: str  # "frozen" / "finetune", plus "+ whitening"; "-" for rows without a model
    seeds: tuple[int, ...]
    epochs: int | str  # "-" for rows that train nothing
    image_size: int | None
    rank1: tuple[float, ...]  # one per seed
    map10: tuple[float, ...]
    cpu_seconds: float
    wall_seconds: float
    queries: int
    gallery: int
    note: str = ""
    # The same rankings restricted to the 16 test iconic images: the orientation gallery, and
    # the diagnostic that tells "cannot tell the products apart" from "pulled to distractors".
    rank1_test_only: tuple[float, ...] = ()
    map10_test_only: tuple[float, ...] = ()
    # Rotated queries and rotation TTA (rows.QUERY_VARIANTS): "<variant> rank-1" / "<variant> mAP@10",
    # one value per seed.
    rotation: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # The same variants on the protocol's validation queries (fold 0), upright or turned as the variant
    # turns the test's (``RunSettings.validates_variants``), keyed as ``rotation``.
    rotation_validation: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # The same pipeline (model, options, fusion weights) on the validation split, one value per seed:
    # what a user choosing between rows would see without test labels.
    val_rank1: tuple[float, ...] = ()
    val_map10: tuple[float, ...] = ()
    # The mean over the validation folds the pipeline has not trained on (protocol.VALIDATION_FOLDS:
    # all of them for pipelines that train nothing, fold 0 alone otherwise), per seed.
    folds_rank1: tuple[float, ...] = ()
    folds_map10: tuple[float, ...] = ()
    folds_used: int = 0

    @staticmethod
    def spread(values: Sequence[float]) -> tuple[float, float]:
        """(mean, sample standard deviation); the deviation is 0 for one seed."""
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowResult:
        # JSON gives lists for the per-seed tuples; results written before a field existed leave it at
        # its default.
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        for variants in ("rotation", "rotation_validation"):
            values[variants] = {key: tuple(v) for key, v in values.get(variants, {}).items()}
        return cls(**values)


@dataclass(frozen=True)
class StepTimes:
    """Seconds per training batch, measured separately (no overlap) on one representative row."""

    row: str
    image_size: int
    batch_size: int
    batches: int
    data_loading: float
    forward: float
    backward_and_step: float

    @property
    def total(self) -> float:
        return self.data_loading + self.forward + self.backward_and_step


@dataclass
class RealDataReport:
    protocol: Protocol
    rows: list[RowResult]
    settings: dict[str, Any]
    step_times: StepTimes | None = None
    machine: str = field(
        default_factory=lambda: f"{platform.node()} ({os.cpu_count()} CPUs, torch {torch.__version__})"
    )
    date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))

    def row(self, name: str) -> RowResult:
        return next(row for row in self.rows if row.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": dataclasses.asdict(self.protocol),
            "rows": [row.to_dict() for row in self.rows],
            "settings": self.settings,
            "step_times": dataclasses.asdict(self.step_times) if self.step_times else None,
            "machine": self.machine,
            "date": self.date,
        }

    def to_markdown(self) -> str:
        p = self.protocol
        lines = [
            f"Grocery Store protocol, {self.date}, {self.machine}.",
            f"Command: `{self.settings['command']}`",
            "",
            f"Test: {p.test_queries} queries of {p.test_identities} unseen products against {p.test_gallery} "
            f"iconic images ({p.test_distractors} distractors; chance rank-1 {1 / p.test_gallery:.3f}). "
            f"Validation (fusion tuning): {p.val_queries} queries of {p.val_identities} held-out training "
            f"classes ({', '.join(p.val_classes)}) against {p.val_gallery} iconic images. "
            f"Training: {p.train_identities} identities, {p.train_images} images.",
            "",
            "| row | backbone | branches | recipe | seeds | epochs | size | rank-1 | mAP@10 | rank-1 (16) "
            "| mAP@10 (16) | CPU s | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            scores = (row.rank1, row.map10, row.rank1_test_only, row.map10_test_only)
            lines.append(
                f"| {row.name} | {row.backbone or '-'} | {row.branches or '-'} | {row.recipe} | "
                f"{','.join(map(str, row.seeds)) or '-'} | {row.epochs} | {row.image_size or '-'} | "
                + " | ".join(_mean_and_spread(values) for values in scores)
                + f" | {row.cpu_seconds:.0f} | {row.wall_seconds:.0f} |"
            )
        lines += [
            "",
            f"rank-1, mAP@10: against the protocol's {p.test_gallery}-image gallery; (16): the same rankings "
            "restricted to the 16 test iconic images. ± is the sample standard deviation over seeds. "
            "CPU s includes reaped DataLoader workers. A model row's seconds are training plus test "
            "extraction, summed over its seeds.",
        ]
        lines += self._agreement_lines()
        lines += self._rotation_lines()
        notes = [f"- {row.name}: {row.note}" for row in self.rows if row.note]
        if notes:
            lines += ["", "Notes:", *notes]
        if self.step_times:
            s = self.step_times
            lines += [
                "",
                f"Where a training step's time goes ({s.row}, {s.batch_size} images at {s.image_size} px, "
                f"mean of {s.batches} batches, each stage timed alone):",
                "",
                "| stage | s / batch | share |",
                "|---|---|---|",
                *(
                    f"| {stage} | {seconds:.3f} | {seconds / s.total:.0%} |"
                    for stage, seconds in (
                        ("data loading (decode + augment, one process)", s.data_loading),
                        ("forward + loss", s.forward),
                        ("backward + optimiser step", s.backward_and_step),
                    )
                ),
            ]
        return "\n".join(lines) + "\n"

    def _agreement_lines(self) -> list[str]:
        """Does validation rank the rows as the test does? Per validation (the protocol's fold 0, and the
        mean over the folds), Spearman's rho over the rows that have it, and the test score of the row
        it would pick against the test's best."""
        rows = [row for row in self.rows if row.val_map10]
        if len(rows) < 3:
            return []
        lines = ["", "Validation against test:"]
        for label, field_name in (
            ("the protocol's validation (5 packages)", "val_map10"),
            ("the mean over the validation folds", "folds_map10"),
        ):
            scored = [row for row in rows if getattr(row, field_name)]
            if len(scored) < 3:
                continue
            lines.append(f"- {label}: {_agreement(scored, field_name)}")
        lines += [
            "",
            "| row | validation rank-1 | validation mAP@10 | folds rank-1 | folds mAP@10 | folds "
            "| test rank-1 | test mAP@10 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            scores = [row.val_rank1, row.val_map10, row.folds_rank1, row.folds_map10]
            cells = [_mean_and_spread(values) for values in scores]
            cells += [str(row.folds_used or "-"), _mean_and_spread(row.rank1), _mean_and_spread(row.map10)]
            lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
        return lines

    def _rotation_lines(self) -> list[str]:
        """Each row's upright scores beside its rotated-query and rotation-TTA scores, on the test and,
        for the rows that validate them, on validation."""
        rows = [row for row in self.rows if row.rotation]
        if not rows:
            return []
        side = self.settings.get("rotation_side", "query")
        lines = [
            "",
            "Rotated queries and test-time options: each test query turned in-plane by a seeded angle "
            "in [-90, 90] degrees "
            "(whole photo kept, black corners). TTA: rotation test-time augmentation, "
            f"{side} views at -90/-45/0/45/90 degrees, a pair scored by its best view. Transductive: "
            "domain centring 0.5 and query augmentation 5 at the default neighbour weight (test-time "
            "statistics of the searched sets). "
            "rank-1 / mAP@10 against the 81 iconic images.",
            "",
            *_variant_table(rows, "rotation", lambda row: (row.rank1, row.map10)),
        ]
        validated = [row for row in rows if row.rotation_validation]
        if validated:
            lines += [
                "",
                "The same columns on the protocol's validation queries (fold 0, against the 81 iconic "
                "images), upright, or turned by seeded angles as the test's are: what a rotation "
                "option's default is chosen on, without the test's labels.",
                "",
                *_variant_table(validated, "rotation_validation", lambda row: (row.val_rank1, row.val_map10)),
            ]
        return lines


def _variant_table(
    rows: Sequence[RowResult],
    field_name: str,
    upright: Callable[[RowResult], tuple[Sequence[float], Sequence[float]]],
) -> list[str]:
    """A markdown table of each row's ``upright`` (rank-1, mAP@10) beside its variants' in ``field_name``."""
    scores = {row.name: getattr(row, field_name) for row in rows}
    variants = list(dict.fromkeys(key.rsplit(" ", 1)[0] for values in scores.values() for key in values))
    header = ["row", "upright", *variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [" / ".join(_mean_and_spread(values) for values in upright(row))]
        for variant in variants:
            pair = (scores[row.name].get(f"{variant} {metric}", ()) for metric in ("rank-1", "mAP@10"))
            cells.append(" / ".join(_mean_and_spread(values) for values in pair))
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return lines


def _agreement(rows: Sequence[RowResult], field_name: str) -> str:
    """Spearman's rho between a validation score (mAP@10) and the test's, and what validation picks."""
    val = [statistics.fmean(getattr(row, field_name)) for row in rows]
    test = [statistics.fmean(row.rank1) for row in rows]
    rho_rank1, rho_map = (
        _spearman(val, scores) for scores in (test, [statistics.fmean(r.map10) for r in rows])
    )
    picked = rows[max(range(len(rows)), key=lambda index: val[index])]
    best = rows[max(range(len(rows)), key=lambda index: test[index])]
    return (
        f"Spearman rho {rho_rank1} between validation mAP@10 and test rank-1 ({rho_map} with "
        f"test mAP@10) over {len(rows)} rows; it would pick {picked.name} (test rank-1 "
        f"{statistics.fmean(picked.rank1):.3f}), the test's best is {best.name} "
        f"({statistics.fmean(best.rank1):.3f})."
    )


def _spearman(first: Sequence[float], second: Sequence[float]) -> str:
    """Spearman's rho to two decimals, or why it is undefined (a side whose values are all equal)."""
    if len(set(first)) < 2 or len(set(second)) < 2:
        return "undefined (equal scores)"
    return f"{spearmanr(first, second).statistic:.2f}"


def _mean_and_spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = RowResult.spread(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"
