"""Running the rows of the Grocery Store table (``rows``): train or reuse each model, extract, rank,
score on the test and on every validation fold, and fuse with equal, tuned or fold-tuned weights.
Every model goes through the toolkit's own ``train`` -> feature cache -> exact search ->
``metrics.evaluate``, as a user's would.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from jdfashion.atomic import atomic_write_text
from jdfashion.baseline import color_histogram_features
from jdfashion.config import TrainConfig
from jdfashion.data.jdformat import ImageRef, read_images, read_truth
from jdfashion.data.manifest import GROCERY_CATEGORY
from jdfashion.export import ensure_exported
from jdfashion.features import FeatureSet
from jdfashion.fusion import TuneResult
from jdfashion.metrics import Scores, evaluate
from jdfashion.options import RetrievalOptions
from jdfashion.paths import (
    MODEL_CONFIG,
    MODEL_METRICS,
    MODEL_WEIGHTS,
    RESUME_CHECKPOINT,
    DataLayout,
    WeightsLayout,
)
from jdfashion.pipeline import tune_on_validation
from jdfashion.ranking import ranked_lists
from jdfashion.realdata.protocol import ROTATED_DIR
from jdfashion.realdata.rows import ROWS, RowSpec, RunSettings, Weighting, train_config
from jdfashion.realdata.table import RowResult
from jdfashion.search import topk
from jdfashion.submission import TOP_K
from jdfashion.train import resolved, train
from jdfashion.workspace import (
    ValidationSet,
    Workspace,
    as_ranked,
    validation_as_ranked,
    validation_set,
)

TIMING_FILE = "timing.json"
SEED_COST_FILE = "seed-cost.json"
# The shrinks toward equal weights that fold-tuned fusion chooses among (``_Pipeline.folds``).
SHRINK_STEPS = (0.0, 0.25, 0.5, 0.75, 1.0)


def trained_model(
    spec: RowSpec, seed: int, settings: RunSettings, console: Console
) -> tuple[Workspace, bool]:
    """The workspace of the row's model for ``seed`` and whether it was trained now (else reused: an
    identical finished run was on disk). Training cost is kept beside the weights, so a reused model
    still reports what it took."""
    config = resolved(train_config(spec, seed, settings.epochs_for(spec), settings.size_for(spec)))
    weights_root = settings.weights_root(spec.name, seed)
    model_dir = WeightsLayout(weights_root).model_dir(GROCERY_CATEGORY, spec.backbone)
    reuse = _finished(model_dir, config)
    if reuse:
        console.print(f"[dim]{spec.name} seed {seed}: reusing {model_dir}")
    else:
        console.print(f"{spec.name} seed {seed}: {config.epochs} epochs at {config.image_size} px")
        with clock() as spent:
            train(config, settings.data_root, weights_root, show_progress=settings.options.show_progress)
        atomic_write_text(model_dir / TIMING_FILE, json.dumps(spent))
        # Resume state of a finished run: 0.1-0.3 GB per model that nothing here reads again.
        (model_dir / RESUME_CHECKPOINT).unlink(missing_ok=True)
    return settings.workspace(weights_root, retrained=not reuse), not reuse


@contextmanager
def clock() -> Iterator[dict[str, float]]:
    """CPU seconds of this process and its reaped children, and wall seconds, of the enclosed work."""
    spent: dict[str, float] = {}
    before, started = os.times(), time.perf_counter()
    try:
        yield spent
    finally:
        after = os.times()
        spent["cpu"] = sum(getattr(after, n) - getattr(before, n) for n in _CPU_FIELDS)
        spent["wall"] = time.perf_counter() - started


_CPU_FIELDS = ("user", "system", "children_user", "children_system")


def _finished(model_dir: Path, config: TrainConfig) -> bool:
    if not (model_dir / MODEL_WEIGHTS).exists() or not (model_dir / TIMING_FILE).exists():
        return False
    saved = json.loads((model_dir / MODEL_CONFIG).read_text())["train"]
    return saved == json.loads(json.dumps(config.to_dict()))


def _training_cost(workspace: Workspace, backbone: str) -> dict[str, float]:
    return json.loads((workspace.weights.model_dir(GROCERY_CATEGORY, backbone) / TIMING_FILE).read_text())


def _test_sets(layout: DataLayout) -> tuple[list[ImageRef], list[ImageRef], dict[str, list[str]]]:
    return read_images(layout.queries), read_images(layout.gallery), read_truth(layout.truth)


def _score_both(run: dict[str, list[str]], truth: dict[str, list[str]]) -> tuple[Scores, Scores]:
    """Scores of whole-gallery rankings on the protocol gallery and on the 16 test iconic images alone
    (dropping the other ids from a ranking is exactly ranking the smaller gallery)."""
    matches = {url for urls in truth.values() for url in urls}
    protocol = evaluate({query: ranked[:TOP_K] for query, ranked in run.items()}, truth)
    test_only = evaluate(
        {query: [url for url in ranked if url in matches][:TOP_K] for query, ranked in run.items()}, truth
    )
    return protocol, test_only


def _rank_and_score(
    sets: dict[str, tuple[FeatureSet, FeatureSet]],
    weights: dict[str, float],
    truth: dict[str, list[str]],
    options: RetrievalOptions,
) -> tuple[Scores, Scores]:
    """Fused whole-gallery rankings (every gallery id, so the 16-image view can be cut from them), scored."""
    queries = {name: pair[0] for name, pair in sets.items()}
    gallery = {name: pair[1] for name, pair in sets.items()}
    size = len(next(iter(gallery.values())))
    return _score_both(ranked_lists(queries, gallery, weights, options, k=size), truth)


@dataclass
class _SeedRuns:
    """What a row gathers seed by seed: test scores (protocol and 16-image), the query variants' scores
    on the test (and on validation, upright or turned, for the rows that choose a rotation option),
    each validation fold's, its cost and a note per seed."""

    per_seed: list[tuple[Scores, Scores]] = field(default_factory=list)
    rotation: list[dict[str, Scores]] = field(default_factory=list)
    rotation_validation: list[dict[str, Scores]] = field(default_factory=list)
    folds: list[list[Scores]] = field(default_factory=list)  # per seed, fold 0 first
    cpu: float = 0.0
    wall: float = 0.0
    notes: list[str] = field(default_factory=list)

    def spend(self, spent: dict[str, float]) -> None:
        self.cpu += spent["cpu"]
        self.wall += spent["wall"]


def histogram_row(spec: RowSpec, settings: RunSettings) -> RowResult:
    layout = DataLayout(settings.data_root)
    queries, gallery, truth = _test_sets(layout)
    with clock() as spent:
        query_features = color_histogram_features(queries, layout.images, workers=2).features
        gallery_features = color_histogram_features(gallery, layout.images, workers=2).features
        _, indices = topk(torch.from_numpy(query_features), torch.from_numpy(gallery_features), len(gallery))
        gallery_ids = [ref.url for ref in gallery]
        run = {
            ref.url: [gallery_ids[i] for i in row] for ref, row in zip(queries, indices.tolist(), strict=True)
        }
        runs = _SeedRuns(
            per_seed=[_score_both(run, truth)], notes=["HSV 8x8x8 colour histogram, no training"]
        )
    runs.spend(spent)
    return _result(spec, (), runs, (len(queries), len(gallery)))


def model_row(spec: RowSpec, settings: RunSettings, console: Console) -> RowResult:
    layout = DataLayout(settings.data_root)
    queries, gallery, truth = _test_sets(layout)
    runs = _SeedRuns()
    for seed in settings.seeds_for(spec):
        options = spec.options(settings.options, seed)
        # A row on another row's model (self-training) uses that row's model and feature caches.
        model_spec, model_seed = (
            (ROWS[spec.model_row], settings.run.seeds[0]) if spec.model_row else (spec, seed)
        )
        with clock() as spent:
            workspace, trained_now = trained_model(model_spec, model_seed, settings, console)
            if spec.runtime != "torch":  # int8 kept whatever validation says: the row measures it
                for info in ensure_exported(workspace, GROCERY_CATEGORY, spec.backbone, spec.runtime):
                    console.print(f"exported {spec.backbone}: {info.summary}")
            single = _Pipeline(
                {spec.backbone: (workspace, spec.backbone)}, gallery, "equal", settings, spec.trains
            )
            runs.per_seed.append(
                _rank_and_score(single.sets(options, queries), single.weights(options), truth, options)
            )
        runs.spend(spent if spec.model_row else _seed_cost(workspace, spec.backbone, spent, trained_now))
        runs.folds.append(single.fold_validation(options))
        chosen = _validation_text(runs.folds[-1][0]) if spec.model_row else None
        runs.notes.append(f"seed {seed}: {chosen or _selection_text(workspace, spec.backbone)}")
        console.print(f"{spec.name} seed {seed}: {_scores_text(*runs.per_seed[-1])}")
        _variant_scores(runs, spec, settings, single, options, console)
    return _result(
        spec,
        settings.seeds_for(spec),
        runs,
        (len(queries), len(gallery)),
        epochs=settings.epochs_for(spec),
        image_size=settings.size_for(spec),
    )


def _selection_text(workspace: Workspace, backbone: str) -> str:
    """What validation chose for this model: its epoch-0 and kept scores, WiSE-FT mix, whitening, and
    whether it shipped the frozen reference instead."""
    metrics = json.loads(
        (workspace.weights.model_dir(GROCERY_CATEGORY, backbone) / MODEL_METRICS).read_text()
    )
    parts = []
    start = next((row for row in metrics if row.get("epoch") == 0 and "stage" not in row), None)
    if start and "val_map" in start:
        parts.append(f"val mAP@10 at epoch 0 {start['val_map']:.3f}")
    for row in metrics:
        if row.get("stage") == "selected" and row["epoch"]:
            parts.append(f"kept epoch {row['epoch']} ({row['val_map']:.3f})")
        elif row.get("stage") == "selected":
            parts.append("kept epoch 0")
        elif row.get("stage") == "wise_selected":
            parts.append(f"WiSE-FT alpha {row['alpha']} ({row['val_map']:.3f})")
        elif row.get("stage") == "whitening":
            verdict = "" if row.get("kept", True) else ", dropped"
            parts.append(f"whitened {row.get('val_map', float('nan')):.3f}{verdict}")
        elif row.get("stage") == "reference":
            parts.append(f"frozen reference {row['val_map']:.3f}")
        elif row.get("stage") == "shipped" and row["model"] == "reference":
            parts.append("shipped the frozen reference")
    return ", ".join(parts)


def _validation_text(scores: Scores) -> str:
    """Validation scores of a model under a row's retrieval options (the frozen model's own are in its
    row): does validation agree with the test about what the options add?"""
    return (
        f"validation rank-1 {scores.overall.rank1:.3f} mAP@10 {scores.overall.map:.3f} with the row's options"
    )


def _seed_cost(
    workspace: Workspace, backbone: str, spent: dict[str, float], trained_now: bool
) -> dict[str, float]:
    """What one seed of a row cost from scratch (training + test extraction). Measured when the model
    was trained in this call; else the record of the call that trained it, as the features may now
    come from the cache; without a record, the model's training time plus this call's work."""
    path = workspace.weights.root / SEED_COST_FILE
    if path.exists() and not trained_now:
        return json.loads(path.read_text())
    training = {"cpu": 0.0, "wall": 0.0} if trained_now else _training_cost(workspace, backbone)
    cost = {key: spent[key] + training[key] for key in ("cpu", "wall")}
    atomic_write_text(path, json.dumps(cost))
    return cost


def fused_row(spec: RowSpec, settings: RunSettings, console: Console) -> RowResult:
    """Per seed, the member rows' models, weighted by validation mAP@10 (``fusion.tune_weights``), on
    the test. Frozen members are legitimate: they are what the trained members must add to."""
    layout = DataLayout(settings.data_root)
    queries, gallery, truth = _test_sets(layout)
    weighting = {
        "equal": "equal",
        "tuned": "tuned on validation",
        "folds": "tuned per validation fold, averaged, shrunk toward equal as the folds chose",
    }[spec.weighting]
    runs = _SeedRuns(notes=[f"weights {weighting}; seconds exclude training the members (their rows)"])
    for seed in settings.seeds_for(spec):
        workspaces = {}
        for member in spec.members:
            member_spec = ROWS[member]
            member_seed = seed if member_spec.multi_seed else settings.run.seeds[0]
            workspaces[member] = (
                trained_model(member_spec, member_seed, settings, console)[0],
                member_spec.backbone,
            )

        fusion = _Pipeline(workspaces, gallery, spec.weighting, settings, spec.trains)
        options = spec.options(settings.options, seed)
        with clock() as spent:
            runs.per_seed.append(
                _rank_and_score(fusion.sets(options, queries), fusion.weights(options), truth, options)
            )
        runs.spend(spent)
        runs.folds.append(fusion.fold_validation(options))
        tuned = fusion.tuning(options)
        weights_text = ", ".join(f"{m} {w:.2f}" for m, w in sorted(fusion.weights(options).items()))
        if spec.weighting == "folds":
            weights_text += f" (shrunk {fusion.folds(options)[1]:.2f} toward equal)"
        alone = ", ".join(f"{m} {v:.3f}" for m, (v, _) in sorted(tuned.per_model.items()))
        fused_map = runs.folds[-1][0].overall.map
        runs.notes.append(f"seed {seed}: {weights_text} (val mAP@10 fused {fused_map:.3f}; alone {alone})")
        console.print(f"fused seed {seed}: {weights_text}; {_scores_text(*runs.per_seed[-1])}")
        _variant_scores(runs, spec, settings, fusion, options, console)
    return _result(spec, settings.seeds_for(spec), runs, (len(queries), len(gallery)))


@dataclass
class _Pipeline:
    """One seed's models of a row (name -> workspace, backbone) and their weights (equal, tuned on
    validation, or tuned on the folds) under the same retrieval options (rotation TTA on, if on) as
    the test ranking. ``trains``: a member learned from the training identities, which folds 1.. are
    made of, so only fold 0 validates it."""

    models: dict[str, tuple[Workspace, str]]
    gallery: list[ImageRef]
    weighting: Weighting
    settings: RunSettings
    trains: bool = False
    _tunings: dict[tuple[RetrievalOptions, int], TuneResult] = field(default_factory=dict)
    _folds: dict[RetrievalOptions, tuple[dict[str, float], float]] = field(default_factory=dict)
    _lists: dict[int, ValidationSet] = field(default_factory=dict)  # each fold's, read once

    def sets(
        self, options: RetrievalOptions, queries: list[ImageRef]
    ) -> dict[str, tuple[FeatureSet, FeatureSet]]:
        """Each model's test features as ``options`` rank them (:func:`as_ranked`), each map learned once
        per run for these queries and gallery."""
        urls = tuple(ref.url for ref in queries), tuple(ref.url for ref in self.gallery)
        return as_ranked(
            self.models, GROCERY_CATEGORY, queries, self.gallery, options, "test", ("test", *urls)
        )

    def weights(self, options: RetrievalOptions) -> dict[str, float]:
        if self.weighting == "tuned":
            return self.tuning(options).weights
        if self.weighting == "folds":
            return self.folds(options)[0]
        return dict.fromkeys(self.models, 1.0)

    def tuning(self, options: RetrievalOptions, fold: int = 0) -> TuneResult:
        if (options, fold) not in self._tunings:
            self._tunings[options, fold] = tune_on_validation(
                self._validation_sets(options, fold), self._val(fold), options
            )
        return self._tunings[options, fold]

    def folds(self, options: RetrievalOptions) -> tuple[dict[str, float], float]:
        """Weights tuned on each fold, averaged, and shrunk toward equal weights by the step of
        ``SHRINK_STEPS`` whose weights, tuned on one fold, score best on the others (mean mAP@10;
        ties go to the larger shrink): (weights, shrink)."""
        if options not in self._folds:
            folds = self._fold_numbers
            tuned = [self.tuning(options, fold).weights for fold in folds]
            held_out = {
                shrink: statistics.fmean(
                    self.validation(options, other, _shrunk(weights, shrink)).overall.map
                    for fold, weights in zip(folds, tuned, strict=True)
                    for other in folds
                    if other != fold
                )
                for shrink in SHRINK_STEPS
            }
            shrink = max(SHRINK_STEPS, key=lambda step: (round(held_out[step], 9), step))
            mean = {m: statistics.fmean(weights[m] for weights in tuned) for m in self.models}
            self._folds[options] = (_shrunk(mean, shrink), shrink)
        return self._folds[options]

    def validation(
        self, options: RetrievalOptions, fold: int = 0, weights: dict[str, float] | None = None
    ) -> Scores:
        """Validation scores on ``fold`` of this pipeline's ranking under ``options``, with its weights
        (or ``weights``)."""
        sets = self._validation_sets(options, fold)
        chosen = weights or self.weights(options)
        return _rank_and_score(sets, chosen, self._val(fold).truth, options)[0]

    def variant_validation(self, options: RetrievalOptions, rotated: bool) -> Scores:
        """Validation scores of the protocol's validation queries (fold 0), upright or turned
        (``protocol.build_rotated_queries``), under ``options`` and this pipeline's weights."""
        if not rotated:
            return self.validation(options)
        turned = DataLayout(self.settings.data_root / ROTATED_DIR)
        sets = validation_as_ranked(self.models, GROCERY_CATEGORY, options, turned)
        truth = read_truth(turned.val_truth(GROCERY_CATEGORY))
        return _rank_and_score(sets, self.weights(options), truth, options)[0]

    def fold_validation(self, options: RetrievalOptions) -> list[Scores]:
        """Validation scores on every fold this pipeline has not trained on."""
        return [self.validation(options, fold) for fold in self._fold_numbers]

    @property
    def _fold_numbers(self) -> list[int]:
        return [0] if self.trains else list(range(self.settings.folds))

    def _on_fold(self, fold: int) -> dict[str, tuple[Workspace, str]]:
        if not fold:
            return self.models
        return {
            m: (self.settings.workspace(w.weights.root, fold=fold), b) for m, (w, b) in self.models.items()
        }

    def _val(self, fold: int) -> ValidationSet:
        if fold not in self._lists:
            workspace = next(iter(self._on_fold(fold).values()))[0]
            self._lists[fold] = validation_set(workspace.data, GROCERY_CATEGORY)
        return self._lists[fold]

    def _validation_sets(
        self, options: RetrievalOptions, fold: int
    ) -> dict[str, tuple[FeatureSet, FeatureSet]]:
        """Each model's validation features on ``fold`` as ``options`` rank them (self-trained once per
        options and fold)."""
        return validation_as_ranked(self._on_fold(fold), GROCERY_CATEGORY, options)


def _shrunk(weights: dict[str, float], shrink: float) -> dict[str, float]:
    """``weights`` (normalised to sum 1) moved toward equal weights by ``shrink`` (0: as tuned, 1: equal)."""
    total = sum(weights.values())
    return {m: (1 - shrink) * w / total + shrink / len(weights) for m, w in weights.items()}


def _variant_scores(
    runs: _SeedRuns,
    spec: RowSpec,
    settings: RunSettings,
    pipeline: _Pipeline,
    row_options: RetrievalOptions,
    console: Console,
) -> None:
    """One seed's scores of the row's rankings for each variant (rotated queries, rotation TTA,
    transductive, deskew) on the test, and on validation where the row validates its variants."""
    scores, validation = {}, {}
    for variant in settings.variants(spec):
        options = settings.options_for(variant, row_options)
        variant_queries, truth = settings.queries_for(variant)
        scores[variant.name] = _rank_and_score(
            pipeline.sets(options, variant_queries), pipeline.weights(options), truth, options
        )[0]
        text = f"  {variant.name}: rank-1 {scores[variant.name].overall.rank1:.3f}"
        if settings.validates_variants(spec):
            validation[variant.name] = pipeline.variant_validation(options, variant.rotated)
            text += f" (validation {validation[variant.name].overall.rank1:.3f})"
        console.print(text)
    runs.rotation.append(scores)
    runs.rotation_validation.append(validation)


def _scores_text(protocol: Scores, test_only: Scores) -> str:
    return (
        f"rank-1 {protocol.overall.rank1:.3f} mAP@10 {protocol.overall.map:.3f} "
        f"(16 only: {test_only.overall.rank1:.3f} / {test_only.overall.map:.3f})"
    )


def _by_variant(per_seed: list[dict[str, Scores]]) -> dict[str, tuple[float, ...]]:
    """Per-seed scores of each variant as ``RowResult.rotation`` keeps them."""
    by_variant: dict[str, tuple[float, ...]] = {}
    for variant in per_seed[0] if per_seed else ():
        by_variant[f"{variant} rank-1"] = tuple(seed[variant].overall.rank1 for seed in per_seed)
        by_variant[f"{variant} mAP@10"] = tuple(seed[variant].overall.map for seed in per_seed)
    return by_variant


def _result(
    spec: RowSpec,
    seeds: tuple[int, ...],
    runs: _SeedRuns,
    sizes: tuple[int, int],
    epochs: int | str = "-",
    image_size: int | None = None,
) -> RowResult:
    per_seed, folds = runs.per_seed, runs.folds
    return RowResult(
        name=spec.name,
        backbone=spec.backbone,
        branches=spec.branches,
        recipe=spec.label,
        seeds=seeds,
        epochs=epochs,
        image_size=image_size,
        rank1=tuple(protocol.overall.rank1 for protocol, _ in per_seed),
        map10=tuple(protocol.overall.map for protocol, _ in per_seed),
        cpu_seconds=runs.cpu,
        wall_seconds=runs.wall,
        queries=sizes[0],
        gallery=sizes[1],
        note="; ".join(runs.notes),
        rank1_test_only=tuple(test_only.overall.rank1 for _, test_only in per_seed),
        map10_test_only=tuple(test_only.overall.map for _, test_only in per_seed),
        rotation=_by_variant(runs.rotation),
        rotation_validation=_by_variant(runs.rotation_validation),
        val_rank1=tuple(seed[0].overall.rank1 for seed in folds or ()),
        val_map10=tuple(seed[0].overall.map for seed in folds or ()),
        folds_rank1=tuple(statistics.fmean(s.overall.rank1 for s in seed) for seed in folds or ()),
        folds_map10=tuple(statistics.fmean(s.overall.map for s in seed) for seed in folds or ()),
        folds_used=len(folds[0]) if folds else 0,
    )
