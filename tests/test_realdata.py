"""A micro run of the Grocery Store protocol on the real dataset: the split, two rows, a one-row rerun."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from jdfashion import ranking
from jdfashion.data.images import url_to_path
from jdfashion.data.jdformat import Box, ImageRef, read_images, read_pairs, read_truth
from jdfashion.data.manifest import GROCERY_CATEGORY, GROCERY_TEST_CLASSES
from jdfashion.features import FeatureExtractor
from jdfashion.options import RetrievalOptions
from jdfashion.paths import DataLayout
from jdfashion.realdata.bench import run_real_protocol
from jdfashion.realdata.protocol import ROTATED_DIR, build_rotated_queries, fold_layouts
from jdfashion.realdata.rows import (
    BRANCH_ROWS,
    DEFAULT_ROWS,
    DESKEW_ROWS,
    ENSEMBLE,
    ROWS,
    SHORT,
    TTA_ROWS,
    RunSettings,
)
from jdfashion.realdata.settings import RealRun
from jdfashion.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
# One seed, one epoch at the smallest size that keeps 8x8 maps, 32 queries, 3 photos per training
# identity: about a minute, not hours.
MICRO = {
    "seeds": (0,),
    "epochs": 1,
    "image_size": 128,
    "max_queries": 32,
    "max_train_photos": 3,
    "show_progress": False,
}
QUIET = Console(quiet=True)
MICRO_ROWS = ("histogram", "lite0-frozen-global", "lite0-tuned-global", "lite0-selftrained-global")


@pytest.fixture(scope="module")
def grocery() -> Path:
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grocery-store" / "dataset"
    if not (root / "classes.csv").is_file():
        pytest.skip(f"Grocery Store dataset not found at {root}")
    return root


@pytest.fixture(scope="module")
def micro_run(grocery: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("real")
    report = run_real_protocol(RealRun(dataset=grocery, out=out, rows=MICRO_ROWS, **MICRO), QUIET)
    return out, report


def test_split_follows_the_protocol(micro_run: tuple[Path, object], grocery: Path) -> None:
    out, report = micro_run
    layout = DataLayout(out / "data")
    test_names = {
        line.split(",")[0]
        for line in (grocery / "classes.csv").read_text().splitlines()[1:]
        if int(line.split(",")[1]) in GROCERY_TEST_CLASSES
    }
    gallery = read_images(layout.gallery)
    truth = read_truth(layout.truth)
    assert len(gallery) == 81 and report.protocol.test_distractors == 65
    assert all(ref.url.startswith("file://") for ref in gallery)
    assert not layout.images.exists(), "images must be read in place, never copied"
    matched = {url for urls in truth.values() for url in urls}
    assert len(matched) == 16
    assert {Path(url).parent.name for url in matched} == test_names
    trained_urls = {ref.url for pair in read_pairs(layout.train_pairs) for ref in (pair.consumer, pair.shop)}
    assert not trained_urls & (matched | set(truth)), "a test image leaked into training"
    assert report.protocol.train_identities + report.protocol.val_identities == 65
    assert report.protocol.val_gallery == 81
    # Validation identities are packages (classes 28-42), like the test's, never produce.
    package_names = {
        line.split(",")[0]
        for line in (grocery / "classes.csv").read_text().splitlines()[1:]
        if 28 <= int(line.split(",")[1]) <= 42
    }
    assert report.protocol.val_identities == 5
    assert set(report.protocol.val_classes) <= package_names


def test_rows_are_scored_on_the_81_image_gallery(micro_run: tuple[Path, object]) -> None:
    out, report = micro_run
    assert [row.name for row in report.rows] == list(MICRO_ROWS)
    for row in report.rows:
        assert row.gallery == 81 and row.queries == 32
        assert all(0 <= value <= 1 for value in (*row.rank1, *row.map10))
        assert row.cpu_seconds > 0 and row.wall_seconds > 0
    frozen, tuned = report.row("lite0-frozen-global"), report.row("lite0-tuned-global")
    assert frozen.epochs == 0 and frozen.recipe == "frozen"
    assert tuned.seeds == (0,) and tuned.epochs == 1 and tuned.image_size == 128
    steps = report.step_times
    assert steps is not None and min(steps.data_loading, steps.forward, steps.backward_and_step) > 0
    written = json.loads((out / "REALDATA-results.json").read_text())
    assert [row["name"] for row in written["rows"]] == list(MICRO_ROWS)
    markdown = (out / "REALDATA-results.md").read_text()
    assert "| lite0-frozen-global | efficientnet_lite0 | global | frozen | 0 | 0 | 128 |" in markdown
    assert "rank-1 (16)" in markdown


def test_one_row_rerun_keeps_the_table_and_reuses_the_model(
    micro_run: tuple[Path, object], grocery: Path
) -> None:
    out, first = micro_run
    model_dir = out / "weights" / "lite0-tuned-global" / "seed0" / "clothes" / "efficientnet_lite0"
    trained_at = (model_dir / "model.safetensors").stat().st_mtime_ns
    run = RealRun(dataset=grocery, out=out, rows=("lite0-tuned-global",), time_steps=False, **MICRO)
    report = run_real_protocol(run, QUIET)
    assert [row.name for row in report.rows] == list(MICRO_ROWS)
    assert report.row("histogram") == first.row("histogram")
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == trained_at, "the model was retrained"
    rerun, original = report.row("lite0-tuned-global"), first.row("lite0-tuned-global")
    assert (rerun.rank1, rerun.map10) == (original.rank1, original.map10)
    assert rerun.cpu_seconds == original.cpu_seconds, "a reused seed reports what it cost when computed"


def test_self_trained_row_maps_the_frozen_rows_features(micro_run: tuple[Path, object]) -> None:
    """Self-training ranks with the frozen row's model and cached features (no model of its own),
    on the searched queries alone."""
    out, report = micro_run
    learned, frozen = report.row("lite0-selftrained-global"), report.row("lite0-frozen-global")
    assert learned.recipe == "frozen + self-training" and learned.seeds == (0,)
    assert not (out / "weights" / "lite0-selftrained-global").exists()
    assert learned.rank1 != frozen.rank1 or learned.map10 != frozen.map10


def test_a_smaller_gallery_cannot_score_lower(micro_run: tuple[Path, object]) -> None:
    _, report = micro_run
    # The 16 test iconic images are a subset of the 81: a match can only move up when distractors go.
    for row in report.rows:
        assert len(row.rank1_test_only) == len(row.rank1) == 1
        assert row.rank1_test_only[0] >= row.rank1[0] and row.map10_test_only[0] >= row.map10[0]


def test_unknown_rows_and_too_small_images_are_refused(grocery: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown rows lite0-pcb"):
        RealRun(dataset=grocery, out=tmp_path, rows=("lite0-pcb",))
    with pytest.raises(ValueError, match="image_size must be >= 128"):
        RealRun(dataset=grocery, out=tmp_path, image_size=64)


def test_training_never_ships_below_its_starting_point_on_validation(micro_run: tuple[Path, object]) -> None:
    """The issue's guarantee on real photos: a short fine-tune with the shipped defaults (the
    ``finetune`` recipe) scores at least its epoch-0 validation mAP@10 and its frozen reference's."""
    out, _ = micro_run
    model_dir = out / "weights" / "lite0-tuned-global" / "seed0" / "clothes" / "efficientnet_lite0"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    start = next(row for row in metrics if row.get("epoch") == 0 and "stage" not in row)
    reference = next(row for row in metrics if row.get("stage") == "reference")
    (shipped,) = [row for row in metrics if row.get("stage") == "shipped"]
    assert shipped["val_map"] >= max(start["val_map"], reference["val_map"])
    assert (model_dir / "curves.png").is_file()


def test_rotated_queries_are_the_test_queries_turned_by_seeded_angles(micro_run: tuple[Path, object]) -> None:
    out, _ = micro_run
    layout, rotated = DataLayout(out / "data"), DataLayout(out / "data" / ROTATED_DIR)
    upright, turned = read_images(layout.queries), read_images(rotated.queries)
    truth, turned_truth = read_truth(layout.truth), read_truth(rotated.truth)
    assert [turned_truth[ref.url] for ref in turned] == [truth[ref.url] for ref in upright]
    angles = json.loads((rotated.root / "angles.json").read_text())["angles"]
    assert len(angles) == len(upright) == 32 and all(-90 <= angle <= 90 for angle in angles)
    assert max(angles) - min(angles) > 90, "angles spread over the range"
    for ref, turned_ref, angle in list(zip(upright, turned, angles, strict=True))[:4]:
        width, height = Image.open(url_to_path(ref.url, layout.images)).size
        radians = math.radians(angle)
        expected = abs(width * math.cos(radians)) + abs(height * math.sin(radians))
        assert abs(turned_ref.box.x2 - expected) <= 2, "the canvas grows so that nothing is cut off"
    # The validation queries (fold 0) are turned too, by angles of their own, beside the same gallery.
    val = GROCERY_CATEGORY
    upright_val, turned_val = read_images(layout.val_queries(val)), read_images(rotated.val_queries(val))
    val_truth, turned_val_truth = read_truth(layout.val_truth(val)), read_truth(rotated.val_truth(val))
    assert [turned_val_truth[ref.url] for ref in turned_val] == [val_truth[ref.url] for ref in upright_val]
    assert read_images(rotated.val_gallery(val)) == read_images(layout.val_gallery(val))
    val_record = json.loads((rotated.root / "val-angles.json").read_text())
    assert val_record["seed"] == 1 and len(val_record["angles"]) == len(upright_val) == 32
    assert val_record["angles"][:32] != angles[:32]
    assert not {ref.url for ref in turned_val} & {ref.url for ref in turned}
    written = [url_to_path(ref.url, rotated.images).stat().st_mtime_ns for ref in (*turned, *turned_val)]
    build_rotated_queries(out / "data")
    again = [url_to_path(ref.url, rotated.images).stat().st_mtime_ns for ref in (*turned, *turned_val)]
    assert again == written


def test_rows_report_rotated_queries(micro_run: tuple[Path, object]) -> None:
    out, report = micro_run
    # No TTA columns outside TTA_ROWS (each costs 8 more extractions of the queries).
    for name in ("lite0-frozen-global", "lite0-tuned-global"):
        rotation = report.row(name).rotation
        assert sorted(rotation) == sorted(
            f"{v} {metric}" for v in ("rotated", "upright + transductive") for metric in ("rank-1", "mAP@10")
        )
        assert all(len(values) == 1 and 0 <= values[0] <= 1 for values in rotation.values())
    assert not report.row("histogram").rotation
    assert "| lite0-frozen-global |" in (out / "REALDATA-results.md").read_text().split("Rotated queries")[1]


def turned_query_photos(
    out: Path, tmp_path: Path, angle: float, step: int
) -> tuple[Path, list[ImageRef], list[ImageRef]]:
    """The micro run's frozen global model, every ``step``-th test query, and those photos turned by
    ``angle`` degrees (canvas grown, black corners, lossless PNG)."""
    model_dir = out / "weights" / "lite0-frozen-global" / "seed0" / "clothes" / "efficientnet_lite0"
    photos = read_images(DataLayout(out / "data").queries)[::step]
    turned = []
    for number, ref in enumerate(photos):
        path = tmp_path / f"{number}.png"
        image = Image.open(url_to_path(ref.url, tmp_path)).convert("RGB").rotate(angle, expand=True)
        image.save(path)
        turned.append(ImageRef(path.as_uri(), Box(0, 0, *image.size)))
    return model_dir, photos, turned


def test_a_quarter_turned_photo_is_matched_by_its_turned_back_view(
    micro_run: tuple[Path, object], tmp_path: Path
) -> None:
    """Real photos through the frozen pretrained network: the -90 degree view of a photo turned by 90
    degrees is the upright photo (a quarter turn loses nothing), so TTA recovers its features."""
    model_dir, photos, turned = turned_query_photos(micro_run[0], tmp_path, angle=90, step=8)
    upright = FeatureExtractor(model_dir, device="cpu")(photos, tmp_path).features.float()
    views = FeatureExtractor(model_dir, device="cpu", rotations=(0.0, -90.0))(
        turned, tmp_path
    ).features.float()
    assert views.shape == (2, len(photos), upright.shape[1])
    as_turned, turned_back = (torch.nn.functional.cosine_similarity(view, upright) for view in views)
    assert bool((turned_back > 0.97).all()), turned_back
    assert bool((turned_back > as_turned).all())


def test_a_turned_photo_deskewed_is_nearer_its_upright_features(
    micro_run: tuple[Path, object], tmp_path: Path
) -> None:
    """Real photos through the frozen pretrained network: turned by 25 degrees (black corners, as the
    rotated protocol turns them), then deskewed by the tilt of their own edges, they come back nearer
    the upright photo's features than the turned photo is."""
    model_dir, photos, turned = turned_query_photos(micro_run[0], tmp_path, angle=25, step=4)
    upright = FeatureExtractor(model_dir, device="cpu")(photos, tmp_path).features.float()
    as_turned, deskewed = (
        torch.nn.functional.cosine_similarity(
            FeatureExtractor(model_dir, device="cpu", deskew=deskew)(turned, tmp_path).features.float(),
            upright,
        )
        for deskew in (False, True)
    )
    assert float(deskewed.median()) > float(as_turned.median()) + 0.05, (deskewed, as_turned)


def test_the_turn_classifier_learned_from_training_photos_finds_which_way_is_up(
    micro_run: tuple[Path, object], tmp_path: Path
) -> None:
    """Real photos through the frozen pretrained network: learned from the micro run's training photos
    alone, the classifier votes upright the 0 degree view of unseen upright test photos and the -90
    degree view of the same photos turned by 90."""
    out = micro_run[0]
    model_dir, photos, turned = turned_query_photos(out, tmp_path, angle=90, step=2)
    workspace = Workspace.at(out / "data", out / "weights" / "lite0-frozen-global" / "seed0", "cpu")
    views = (0.0, 90.0, -90.0)
    options = RetrievalOptions(rotations=views, num_workers=0, show_progress=False)
    classifier = workspace.turn_classifier(GROCERY_CATEGORY, "efficientnet_lite0", options)
    for refs, upright in ((photos, 0.0), (turned, -90.0)):
        features = FeatureExtractor(model_dir, device="cpu", rotations=views)(refs, tmp_path).features
        picked = classifier.upright_votes(features, views).argmax(0)
        assert float((picked == views.index(upright)).float().mean()) >= 0.8, (upright, picked)


def test_deskew_rows_score_their_columns_on_upright_and_turned_validation(
    micro_run: tuple[Path, object], grocery: Path, tmp_path: Path
) -> None:
    """A deskew row's columns are scored on validation too: the upright ones on the protocol's
    validation queries (the row's own validation when no option is added), the rotated ones on the
    same queries turned; the table shows them. Rows that choose no rotation option do not pay for it."""
    out, first = micro_run
    copy = tmp_path / "real"
    shutil.copytree(out, copy)
    name = "lite0-frozen-horizontal"
    report = run_real_protocol(
        RealRun(dataset=grocery, out=copy, rows=(name,), time_steps=False, **MICRO), QUIET
    )
    row = report.row(name)
    # The frozen reference of TTA_ROWS also has the rotation TTA columns.
    tta = {"upright + TTA", "rotated + TTA", "rotated + TTA + transductive"}
    assert {f"{v} {metric}" for v in tta for metric in ("rank-1", "mAP@10")} <= set(row.rotation)
    assert set(row.rotation_validation) == set(row.rotation)
    assert all(len(values) == 1 and 0 <= values[0] <= 1 for values in row.rotation_validation.values())
    # The turned validation photos are not the upright ones: their scores differ, and deskew with the
    # upright view wins back what turning them cost (the same holds on the test, docs/REALDATA.md).
    turned, chosen = (
        row.rotation_validation[f"{v} mAP@10"][0] for v in ("rotated", "rotated + deskew + upright view")
    )
    assert turned != row.val_map10[0]
    assert chosen > turned
    assert not first.row("lite0-frozen-global").rotation_validation
    table = (copy / "REALDATA-results.md").read_text().split("on the protocol's validation queries")[1]
    assert f"| {name} |" in table


def test_deskew_columns_are_measured_on_the_deskew_rows_only() -> None:
    settings = RunSettings(RealRun(out=Path("out"), seeds=(0,), rotation=True), RetrievalOptions())
    for name in DEFAULT_ROWS:
        deskewed = [variant for variant in settings.variants(ROWS[name]) if variant.deskew]
        assert bool(deskewed) == (name in DESKEW_ROWS), name
        for variant in deskewed:
            options = settings.options_for(variant, ROWS[name].options(settings.options, 0))
            assert options.deskew_queries and options.rotation_side == "query"
            assert options.rotations == ((0.0, 90.0, -90.0) if variant.choose_upright else (0.0,))
            assert options.choose_upright == variant.choose_upright
    names = [variant.name for variant in settings.variants(ROWS[DESKEW_ROWS[0]])]
    assert {"upright + deskew + upright view", "rotated + deskew + upright view"} <= set(names)
    smoke = dataclasses.replace(settings, run=dataclasses.replace(settings.run, smoke=True))
    assert not any(variant.deskew for name in DESKEW_ROWS for variant in smoke.variants(ROWS[name]))


def test_the_default_table_is_self_contained_and_keeps_every_reference() -> None:
    """The rows `bench real` runs without --rows: every frozen branch set (the references), each
    backbone's best pipeline, the ensemble, and every row another default row ranks with or fuses; the
    fine-tunes (which ship their frozen reference on this protocol) are opt-in."""
    assert set(DEFAULT_ROWS) <= set(ROWS)
    assert {f"{SHORT}-frozen-{branches}" for branches in BRANCH_ROWS} <= set(DEFAULT_ROWS)
    assert not any(ROWS[name].recipe == "finetune" for name in DEFAULT_ROWS)
    assert {ROWS[name].backbone for name in DEFAULT_ROWS if ROWS[name].kind == "fused"} == {ENSEMBLE}
    for name in DEFAULT_ROWS:
        spec = ROWS[name]
        needed = set(spec.members) | ({spec.model_row} if spec.model_row else set())
        assert needed <= set(DEFAULT_ROWS), name
    assert set(TTA_ROWS) <= set(DEFAULT_ROWS)
    assert set(DESKEW_ROWS) <= set(DEFAULT_ROWS)


def test_rows_on_one_model_learn_each_self_trained_map_once(
    micro_run: tuple[Path, object], grocery: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A self-trained row and its transductive twin share the run's maps: 4 test maps (upright and turned
    queries, with and without the transductive options) and 2 validation ones per fold (3 folds: the
    frozen model trains on none), where learning row by row took 16; every score is the one a row
    learned on its own."""
    out, first = micro_run
    copy = tmp_path / "real"
    shutil.copytree(out, copy)
    learned = []
    learn = ranking.learn_part_map

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        learned.append(args[0])
        return learn(*args, **kwargs)

    monkeypatch.setattr(ranking, "learn_part_map", counting)
    names = [f"{SHORT}-selftrained-global", f"{SHORT}-selftrained-global-transductive"]
    report = run_real_protocol(
        RealRun(dataset=grocery, out=copy, rows=tuple(names), time_steps=False, **MICRO), QUIET
    )
    assert len(learned) == 4 + 2 * len(fold_layouts(copy / "data")) == 10
    plain, transductive = (report.row(name) for name in names)
    alone = first.row(names[0])
    assert (plain.rank1, plain.map10, plain.rotation) == (alone.rank1, alone.map10, alone.rotation)
    assert plain.rotation["upright + transductive rank-1"] == transductive.rank1
