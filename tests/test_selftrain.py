"""Transductive self-training: confident pseudo-labels, the shared part map, and its place in the ranking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jdfashion import ranking
from jdfashion.data.jdformat import Box, Category, ImageRef
from jdfashion.features import FeatureSet
from jdfashion.options import RetrievalOptions, SelfTraining
from jdfashion.pipeline import tune_on_validation
from jdfashion.ranking import ranked_lists, self_trained
from jdfashion.search import topk
from jdfashion.selftrain import (
    apply_part_map,
    as_parts,
    confident_queries,
    learn_part_map,
)
from jdfashion.workspace import ValidationSet, Workspace

PARTS, DIM = 2, 24
FAST = SelfTraining(lr=1e-2)  # the synthetic nuisance is larger than a real one: a larger step


def nuisance_domains(
    seed: int, items: int = 40, photos: int = 8
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Gallery parts, and query parts that are their item plus noise plus a strong component in a
    4-d nuisance subspace (a consumer-photo style no item owns): (Q, P, C), (M, P, C), labels."""
    rng = np.random.default_rng(seed)
    gallery = F.normalize(torch.from_numpy(rng.normal(size=(items, PARTS, DIM))).float(), dim=-1)
    basis = torch.from_numpy(np.linalg.qr(rng.normal(size=(DIM, 4)))[0]).float()
    labels = np.repeat(np.arange(items), photos)
    noise = torch.from_numpy(rng.normal(scale=0.25, size=(len(labels), PARTS, DIM))).float()
    style = torch.from_numpy(rng.normal(scale=1.2, size=(len(labels), PARTS, 4))).float() @ basis.T
    return F.normalize(gallery[labels] + noise + style, dim=-1), gallery, labels


def embedded(parts: torch.Tensor) -> torch.Tensor:
    return parts.flatten(1) / parts.shape[1] ** 0.5


def feature_sets(seed: int) -> tuple[FeatureSet, FeatureSet, dict[str, list[str]]]:
    queries, gallery, labels = nuisance_domains(seed)
    query_ids = [f"q{i}" for i in range(len(queries))]
    gallery_ids = [f"g{i}" for i in range(len(gallery))]
    truth = {q: [gallery_ids[label]] for q, label in zip(query_ids, labels, strict=True)}
    return (
        FeatureSet(query_ids, embedded(queries).half(), parts=PARTS),
        FeatureSet(gallery_ids, embedded(gallery).half(), parts=PARTS),
        truth,
    )


def refs(urls: list[str]) -> list[ImageRef]:
    return [ImageRef(url, Box(0, 0, 1, 1)) for url in urls]


def rank1(ranked: dict[str, list[str]], truth: dict[str, list[str]]) -> float:
    return float(np.mean([ranked[q][0] in truth[q] for q in truth]))


def test_confident_queries_are_those_whose_first_result_leads_most() -> None:
    scores = np.array([[0.9, 0.1], [0.5, 0.45], [0.8, 0.2], [0.6, 0.59], [0.7, 0.0]])
    assert confident_queries(scores, 0.6).tolist() == [0, 2, 4]
    assert confident_queries(scores, 0.01).tolist() == [0]
    assert confident_queries(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="ranked scores"):
        confident_queries(scores[:, :1], 0.5)


def test_the_identity_map_gives_back_the_features_and_failed_rows_stay_zero() -> None:
    queries, _, _ = nuisance_domains(0)
    features = embedded(queries)
    features[3] = 0
    mapped = apply_part_map(features.half(), PARTS, torch.eye(DIM))
    assert mapped.dtype == torch.float16, "a cached fp16 gallery stays fp16"
    assert torch.allclose(mapped.float(), features, atol=2e-3)
    assert not mapped[3].any()
    views = apply_part_map(torch.stack([features, features.flip(0)]), PARTS, torch.eye(DIM))
    assert views.shape == (2, *features.shape) and torch.allclose(views[1], features.flip(0), atol=1e-6)
    with pytest.raises(ValueError, match="do not split into 5 parts"):
        as_parts(features, 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_map_learned_from_confident_pseudo_labels_lifts_rank1(seed: int) -> None:
    """No true label is used: the frozen ranking labels the confident queries, and the map learned on
    them moves every query (labelled or not) towards its item."""
    queries, gallery, labels = nuisance_domains(seed)
    scores, rows = topk(embedded(queries), embedded(gallery), FAST.negatives + 1)
    before = float((rows[:, 0] == labels).mean())
    anchors = confident_queries(scores, FAST.keep)
    assert (rows[anchors, 0] == labels[anchors]).mean() > before, "confident labels are the better ones"
    rows_t = torch.from_numpy(rows[anchors])
    part_map = learn_part_map(queries[anchors], rows_t[:, 0], rows_t[:, 1:], gallery, FAST)
    assert not torch.equal(part_map, torch.eye(DIM))
    _, after_rows = topk(
        apply_part_map(embedded(queries), PARTS, part_map),
        apply_part_map(embedded(gallery), PARTS, part_map),
        1,
    )
    assert float((after_rows[:, 0] == labels).mean()) > before + 0.03
    again = learn_part_map(queries[anchors], rows_t[:, 0], rows_t[:, 1:], gallery, FAST)
    assert torch.equal(again, part_map), "seeded: the same map twice"


def mapped_sets(
    queries: dict[str, FeatureSet], gallery: dict[str, FeatureSet], options: RetrievalOptions
) -> tuple[dict[str, FeatureSet], dict[str, FeatureSet]]:
    """Each model's pair through its own self-training: the stage before any ranking."""
    pairs = {m: self_trained(queries[m], gallery[m], options) for m in queries}
    return {m: pair[0] for m, pair in pairs.items()}, {m: pair[1] for m, pair in pairs.items()}


def test_each_model_self_trained_then_fused() -> None:
    (q0, g0, truth), (q1, g1, _) = feature_sets(0), feature_sets(1)
    # Two models of the same images: the second's features are another draw of the same items.
    q1, g1 = dataclasses.replace(q1, ids=q0.ids), dataclasses.replace(g1, ids=g0.ids)
    queries, gallery, weights = {"a": q0, "b": q1}, {"a": g0, "b": g1}, {"a": 0.5, "b": 0.5}
    plain = RetrievalOptions(show_progress=False)
    learned = dataclasses.replace(plain, self_training=FAST)
    before = rank1(ranked_lists(queries, gallery, weights, plain), truth)
    ranked = ranked_lists(*mapped_sets(queries, gallery, learned), weights, learned)
    assert rank1(ranked, truth) > before + 0.02
    assert ranked == ranked_lists(*mapped_sets(queries, gallery, learned), weights, learned), "seeded"
    # The ranking is the ordinary fused search of the mapped features; unmapped ones are refused.
    assert ranked == ranked_lists(*mapped_sets(queries, gallery, learned), weights, plain)
    with pytest.raises(ValueError, match="features of a, b are not mapped"):
        ranked_lists(queries, gallery, weights, learned)


def test_self_training_follows_query_views_and_refuses_gallery_views() -> None:
    """Two identical views of each query rank as one view does, through the same learned map."""
    queries, gallery, _ = feature_sets(2)
    views = dataclasses.replace(queries, features=torch.stack([queries.features] * 2))
    options = RetrievalOptions(show_progress=False, self_training=FAST, rotations=(0.0, 90.0))
    mapped_views, mapped_gallery = self_trained(views, gallery, options)
    mapped_queries, _ = self_trained(queries, gallery, options)
    assert mapped_views.features.shape == views.features.shape
    assert torch.allclose(mapped_views.features[1], mapped_queries.features, atol=1e-5)
    assert mapped_gallery.features.shape == gallery.features.shape
    single = ranked_lists({"m": mapped_queries}, {"m": mapped_gallery}, {"m": 1.0}, options)
    assert ranked_lists({"m": mapped_views}, {"m": mapped_gallery}, {"m": 1.0}, options) == single
    with pytest.raises(ValueError, match="rotation-side query"):
        RetrievalOptions(self_training=FAST, rotations=(0.0, 90.0), rotation_side="gallery")
    with pytest.raises(ValueError, match="keep"):
        SelfTraining(keep=0)


def test_fusion_is_tuned_on_self_trained_features() -> None:
    (q0, g0, truth), (q1, g1, _) = feature_sets(0), feature_sets(1)
    q1, g1 = dataclasses.replace(q1, ids=q0.ids), dataclasses.replace(g1, ids=g0.ids)
    val = ValidationSet(Category.CLOTHES, refs(q0.ids), refs(g0.ids), truth)
    sets = {"a": (q0, g0), "b": (q1, g1)}
    plain = tune_on_validation(sets, val, RetrievalOptions(show_progress=False))
    options = RetrievalOptions(show_progress=False, self_training=FAST)
    with pytest.raises(ValueError, match="not mapped"):
        tune_on_validation(sets, val, options)
    learned = tune_on_validation({m: self_trained(*pair, options) for m, pair in sets.items()}, val, options)
    assert learned.fused_map > plain.fused_map


@pytest.mark.parametrize("self_training", [None, FAST])
def test_fusion_tuning_scores_what_the_transductive_ranking_ranks(self_training) -> None:
    """Centring and query augmentation act per model before the weighted sum, so the validation
    scores fusion tuning reports are those of the lists ranked with its weights."""
    from jdfashion.metrics import evaluate

    (q0, g0, truth), (q1, g1, _) = feature_sets(0), feature_sets(1)
    q1, g1 = dataclasses.replace(q1, ids=q0.ids), dataclasses.replace(g1, ids=g0.ids)
    val = ValidationSet(Category.CLOTHES, refs(q0.ids), refs(g0.ids), truth)
    options = RetrievalOptions(
        show_progress=False, centring=0.5, query_augmentation=3, self_training=self_training
    )
    queries, gallery = mapped_sets({"a": q0, "b": q1}, {"a": g0, "b": g1}, options)
    tuned = tune_on_validation({m: (queries[m], gallery[m]) for m in queries}, val, options)
    assert 0 < min(tuned.weights.values()) < max(tuned.weights.values()) < 1
    ranked = ranked_lists(queries, gallery, tuned.weights, options)
    scores = evaluate(ranked, truth).overall
    assert (scores.map, scores.rank1) == pytest.approx((tuned.fused_map, tuned.fused_rank1), abs=1e-6)
    plain = tune_on_validation({"a": (q0, g0), "b": (q1, g1)}, val, RetrievalOptions(show_progress=False))
    assert plain.fused_map != tuned.fused_map


def test_a_run_learns_each_map_once_on_its_own_device(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun (a GPU mocked: none here) rank 1 learns on cuda:1; a keyed pair is learned once
    per options; mapped sets are ranked as given and never mapped again."""
    devices = []

    def recording(anchors: torch.Tensor, *args: object) -> torch.Tensor:
        devices.append(args[-1])
        return torch.eye(anchors.shape[-1])  # the identity: torch's optimiser would look for the GPU

    monkeypatch.setattr(ranking, "learn_part_map", recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    workspace = Workspace.at(tmp_path / "data", tmp_path / "weights")
    queries, gallery, _ = feature_sets(0)
    options = RetrievalOptions(show_progress=False, self_training=FAST)
    mapped = workspace.self_trained_once((queries, gallery), options, key=("val", "m"))
    assert devices == ["cuda:1"]
    assert workspace.self_trained_once((queries, gallery), options, key=("val", "m")) is mapped
    assert all(side.part_mapped for side in mapped) and len(devices) == 1
    reseeded = dataclasses.replace(options, self_training=dataclasses.replace(FAST, seed=1))
    workspace.self_trained_once((queries, gallery), reseeded, key=("val", "m"))
    assert len(devices) == 2
    with pytest.raises(ValueError, match="part-mapped already"):
        self_trained(*mapped, options)
    plain = RetrievalOptions(show_progress=False)
    assert ranked_lists({"m": mapped[0]}, {"m": mapped[1]}, {"m": 1.0}, options) == ranked_lists(
        {"m": mapped[0]}, {"m": mapped[1]}, {"m": 1.0}, plain
    )
    assert len(devices) == 2
    with pytest.raises(ValueError, match="the query features are part-mapped already"):
        self_trained(mapped[0], gallery, options)


def test_table_rows_seed_self_training_and_share_the_frozen_model() -> None:
    from jdfashion.realdata.rows import ROWS, TRANSDUCTIVE

    base = RetrievalOptions(show_progress=False)
    row = ROWS["lite0-selftrained-horizontal-transductive"]
    options = row.options(base, seed=2)
    assert options.self_training == SelfTraining(seed=2)
    assert (options.centring, options.query_augmentation) == tuple(TRANSDUCTIVE.values())
    assert row.model_row == "lite0-frozen-horizontal" and row.multi_seed
    assert ROWS["lite0-frozen-horizontal"].options(base, seed=2) == base
    assert ROWS["lite0-selftrained-all"].options(base, seed=1).centring == 0
