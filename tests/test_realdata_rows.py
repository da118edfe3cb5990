"""The real-data table's rows across the packaged backbones, and its validation-against-test report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jdfashion.model.backbones import BACKBONE_PRESETS, PACKAGED_BACKBONES
from jdfashion.options import RetrievalOptions
from jdfashion.realdata.protocol import Protocol
from jdfashion.realdata.rows import (
    DEFAULT_ROWS,
    ENSEMBLE,
    NATIVE,
    ROWS,
    SHORT_NAMES,
    RunSettings,
    train_config,
)
from jdfashion.realdata.settings import RealRun
from jdfashion.realdata.table import RealDataReport, RowResult

SETTINGS = RunSettings(RealRun(out=Path("out"), seeds=(0, 1)), RetrievalOptions())


def test_every_packaged_backbone_has_frozen_and_best_pipeline_rows_at_its_native_size() -> None:
    for backbone in PACKAGED_BACKBONES:
        short = SHORT_NAMES[backbone]
        rows = [ROWS[f"{short}-frozen-{b}"] for b in ("horizontal", "all")]
        best = ROWS[f"{short}-selftrained-horizontal-transductive"]
        assert all(row.backbone == backbone for row in [*rows, best])
        assert best.model_row == f"{short}-frozen-horizontal" and best.self_training and best.transductive
        native = BACKBONE_PRESETS[backbone].native_size
        assert SETTINGS.size_for(rows[0]) == native
        for changed, size in (({"smoke": True}, 128), ({"image_size": 160}, 160)):
            run = dataclasses.replace(SETTINGS.run, **changed)
            assert dataclasses.replace(SETTINGS, run=run).size_for(rows[0]) == size
        assert {row.name for row in [*rows, best]} <= set(DEFAULT_ROWS)
    assert [SETTINGS.size_for(ROWS[f"{short}-frozen-horizontal"]) for short in SHORT_NAMES.values()] == [
        224,
        240,
        260,
    ]


@pytest.mark.parametrize("level", ["frozen", "best"])
def test_ensemble_rows_fuse_one_model_per_backbone_with_each_weighting_and_normalisation(level: str) -> None:
    rows = [spec for name, spec in ROWS.items() if name.startswith(f"fused-{level}-horizontal-{ENSEMBLE}")]
    assert {(spec.weighting, spec.score_normalisation) for spec in rows} == {
        (weighting, normalisation)
        for weighting in ("equal", "tuned", "folds")
        for normalisation in ("none", "zscore")
    }
    for spec in rows:
        assert sorted(ROWS[member].backbone for member in spec.members) == sorted(PACKAGED_BACKBONES)
        options = spec.options(SETTINGS.options, seed=1)
        assert options.score_normalisation == spec.score_normalisation
        assert (options.self_training is not None) == (level == "best")
        assert (options.self_training.seed if options.self_training else 1) == 1
        # Frozen members are deterministic: the frozen fusions run once, the self-trained ones per seed.
        assert SETTINGS.seeds_for(spec) == ((0, 1) if level == "best" else (0,))
        assert (spec.name in DEFAULT_ROWS) == (spec.score_normalisation == "none")


def test_native_rows_keep_the_last_stride_and_fuse_only_native_members() -> None:
    """The ``-native`` rows are their frozen rows with one change, the backbone's own last stride, so the
    table's pair of rows (and of fusions) measures that change alone. The stride stays removed, so they
    are opt-in references (``--rows``), not default rows."""
    for short in SHORT_NAMES.values():
        native, removed = ROWS[f"{short}-frozen-horizontal-{NATIVE}"], ROWS[f"{short}-frozen-horizontal"]
        configs = [train_config(spec, 0, 0, SETTINGS.size_for(spec)) for spec in (native, removed)]
        assert not configs[0].last_stride_one and configs[1].last_stride_one
        assert dataclasses.replace(configs[0], last_stride_one=True) == configs[1]
        assert "native last stride" in native.label and "native" not in removed.label
        assert native.name not in DEFAULT_ROWS and removed.name in DEFAULT_ROWS
    fused = [
        spec for name, spec in ROWS.items() if name.startswith(f"fused-frozen-{NATIVE}-horizontal-{ENSEMBLE}")
    ]
    assert {spec.weighting for spec in fused} == {"equal", "tuned", "folds"}
    for spec in fused:
        assert not any(ROWS[member].last_stride_one for member in spec.members)
        assert sorted(ROWS[member].backbone for member in spec.members) == sorted(PACKAGED_BACKBONES)
        assert spec.name not in DEFAULT_ROWS and not spec.trains


def result(name: str, val_map: float, test_rank1: float, folds_map: float) -> RowResult:
    return RowResult(
        name, "b", "horizontal", "frozen", (0,), 0, 224, (test_rank1,), (test_rank1 + 0.1,), 1.0, 1.0, 9, 3,
        val_rank1=(val_map - 0.1,), val_map10=(val_map,), folds_rank1=(folds_map - 0.1,),
        folds_map10=(folds_map,), folds_used=3,
    )  # fmt: skip


def test_the_report_says_how_well_validation_ranks_the_rows_and_which_it_would_pick() -> None:
    protocol = Protocol("data", 60, 5, 272, 81, 16, 923, 81, 65)
    rows = [
        result("a", 0.5, 0.40, 0.5),
        result("b", 0.7, 0.45, 0.6),
        result("c", 0.6, 0.50, 0.7),
        result("d", 0.4, 0.30, 0.4),
    ]
    unscored = dataclasses.replace(result("no-validation", 0.0, 0.9, 0.0), val_map10=(), folds_map10=())
    text = RealDataReport(protocol, [*rows, unscored], {"command": "x"}).to_markdown()
    # Validation orders the rows b, c, a, d, the folds c, b, a, d, as the test does: rho 0.8 and 1.0.
    assert (
        "- the protocol's validation (5 packages): Spearman rho 0.80 between validation mAP@10 and test "
        "rank-1 (0.80 with test mAP@10) over 4 rows; it would pick b (test rank-1 0.450), the test's best "
        "is c (0.500)."
    ) in text
    assert "- the mean over the validation folds: Spearman rho 1.00" in text and "pick c (test" in text
    assert "| c | 0.500 | 0.600 | 0.600 | 0.700 | 3 | 0.500 | 0.600 |" in text
    assert "no-validation |" not in text.split("Validation against test:")[1]
    restored = RowResult.from_dict(json.loads(json.dumps(rows[1].to_dict())))
    assert restored == rows[1] and restored.folds_map10 == (0.6,)
    flat = [dataclasses.replace(row, val_map10=(0.5,)) for row in rows]
    assert (
        "Spearman rho undefined (equal scores)"
        in RealDataReport(protocol, flat, {"command": "x"}).to_markdown()
    )


def test_a_run_records_every_setting_and_the_command_that_repeats_it() -> None:
    """RealRun is the one declaration: the record holds each field and the retrieval options the rows
    start from, and its command, given to `bench real`, parses back to the same run."""
    from jdfashion.cli.runs import bench_real
    from jdfashion.settings import from_options

    run = RealRun(dataset=Path("."), out=Path("runs/x"), seeds=(0, 2), epochs=3, rows=("histogram",))
    run = dataclasses.replace(run, rotation=False, rotation_side="gallery")
    record = run.record(RetrievalOptions(num_workers=0))
    assert {field.name for field in dataclasses.fields(RealRun)} < set(record)
    assert record["retrieval"] == dataclasses.asdict(RetrievalOptions(num_workers=0))
    words = record["command"].split()
    assert words[:3] == ["jdfashion", "bench", "real"]
    with bench_real.make_context("real", words[3:]) as context:
        assert from_options(RealRun, context.params) == run
