"""A data root and a weights root as the chain sees them: trained models (each loaded once), their
cached features per split and view, the validation and test lists, and the routing of test images
to categories."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from jdfashion.checkpoint import TrainedModel, load_trained
from jdfashion.data.jdformat import Category, ImageRef, read_images, read_pairs, read_truth
from jdfashion.data.split import training_identities
from jdfashion.features import (
    FeatureCache,
    FeatureSet,
    Head,
    predicted_categories,
    stack_views,
)
from jdfashion.options import SUGGESTED_BACKBONE, RetrievalOptions, RotationSide
from jdfashion.paths import (
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    ROUTER,
    DataLayout,
    WeightsLayout,
    fixing_command,
    missing_message,
)
from jdfashion.ranking import self_trained
from jdfashion.search import keep_views, view_matches
from jdfashion.submission import TOP_K
from jdfashion.upright import (
    UPRIGHT_PHOTOS,
    VOTE_WEIGHT,
    TurnClassifier,
    fit_turn_classifier,
    stands_upright,
    training_turns,
)


@dataclass
class Workspace:
    data: DataLayout
    weights: WeightsLayout
    device: str | None = None
    _models: dict[Path, TrainedModel] = field(default_factory=dict, repr=False)
    _self_trained: dict[Hashable, tuple[FeatureSet, FeatureSet]] = field(default_factory=dict, repr=False)
    _turn_classifiers: dict[Hashable, TurnClassifier] = field(default_factory=dict, repr=False)

    @classmethod
    def at(
        cls, data_root: Path | str, weights_root: Path | str = "weights", device: str | None = None
    ) -> Workspace:
        return cls(DataLayout(Path(data_root)), WeightsLayout(Path(weights_root)), device)

    @cached_property
    def cache(self) -> FeatureCache:
        return FeatureCache(self.weights.features)

    @property
    def run_device(self) -> str:
        """The given device, else this process's GPU (its ``LOCAL_RANK`` under torchrun), else the CPU."""
        if self.device:
            return self.device
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"

    def self_trained_once(
        self, pair: tuple[FeatureSet, FeatureSet], options: RetrievalOptions, key: Hashable | None = None
    ) -> tuple[FeatureSet, FeatureSet]:
        """One model's (query, gallery) through its self-trained map (:func:`self_trained`) on this
        run's device. With ``key`` (which model's features of which split) the map is learned once per
        options: ``fuse --tune`` tunes, scores and compares on validation with the same map."""
        if options.self_training is None:
            return pair
        if key is None:
            return self_trained(*pair, options, self.run_device)
        # One model's map does not depend on how the models' scores are later put on one scale.
        key = (key, dataclasses.replace(options, score_normalisation="none"))
        if key not in self._self_trained:
            self._self_trained[key] = self_trained(*pair, options, self.run_device)
        return self._self_trained[key]

    @cached_property
    def categories(self) -> list[Category]:
        """The categories the data holds (see :func:`data_categories`), read once per workspace."""
        return data_categories(self.data)

    def command(self, *words: str) -> str:
        """A ``jdfashion`` command line on this workspace, for messages that name their fix."""
        roots = ["--data", str(self.data.root), "--weights-root", str(self.weights.root)]
        return " ".join(["jdfashion", *words, *roots])

    def train_command(self, task: Category | str, backbone: str) -> str:
        if task == ROUTER:
            return self.command("train", "--task", "category", "--backbone", backbone)
        label = task.label if isinstance(task, Category) else task
        return self.command("train", "--backbone", backbone, "--category", label)

    def backbones(self, category: Category, requested: Sequence[str] | None = None) -> list[str]:
        """``requested`` when given (each must be trained), else every backbone trained for ``category``."""
        trained = self.weights.trained_backbones(category)
        if requested is None:
            if not trained:
                others = sorted({name for _, name in self.weights.trained_models()})
                suggestion = others[0] if others else SUGGESTED_BACKBONE
                raise FileNotFoundError(
                    f"{self.weights.root / category.label}: no trained {category.label} model; train one: "
                    f"{self.train_command(category, suggestion)}"
                )
            return trained
        for backbone in requested:
            self.require_model(category, backbone)
        return list(requested)

    def require_model(self, task: Category | str, backbone: str) -> Path:
        """The model's folder, or an error naming the missing file and the command that trains it."""
        directory = self.weights.model_dir(task, backbone)
        for name in (MODEL_CONFIG, MODEL_WEIGHTS):
            if not (directory / name).is_file():
                trained = self.weights.trained_backbones(task) if isinstance(task, Category) else []
                found = f" (trained for {task.label}: {', '.join(trained)})" if trained else ""
                raise FileNotFoundError(
                    f"{directory / name}: missing{found}; train it: {self.train_command(task, backbone)}"
                )
        return directory

    def trained(self, task: Category | str, backbone: str) -> TrainedModel:
        """Each model is loaded (and its weights hashed) once per workspace."""
        directory = self.require_model(task, backbone)
        if directory not in self._models:
            try:
                self._models[directory] = load_trained(directory, self.run_device)
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
                reason = " ".join(str(error).split())[:200]
                raise ValueError(
                    f"{directory}: cannot load the model ({reason}); retrain it: "
                    f"{self.train_command(task, backbone)}"
                ) from error
        return self._models[directory]

    def features(
        self,
        task: Category | str,
        backbone: str,
        refs: Sequence[ImageRef],
        options: RetrievalOptions,
        description: str,
        head: Head = "embedding",
    ) -> FeatureSet:
        return self.cache.extract(
            self.trained(task, backbone), refs, self.data.images, options.extraction(head), description
        )

    def side_features(
        self,
        side: RotationSide,
        task: Category | str,
        backbone: str,
        refs: Sequence[ImageRef],
        options: RetrievalOptions,
        description: str,
    ) -> FeatureSet:
        """Query or gallery embeddings: (V, N, D) views when rotation TTA is on for ``side`` (each
        view cached under its own fingerprint), else (N, D); queries deskewed if asked."""
        trained = self.trained(task, backbone)
        deskew = options.deskew_queries and side == "query"
        return stack_views(
            [
                self.cache.extract(
                    trained,
                    refs,
                    self.data.images,
                    options.extraction(rotation=angle, deskew=deskew),
                    f"{description} {side}"
                    + (" deskewed" if deskew else "")
                    + (f" @{angle:g} deg" if angle else ""),
                )
                for angle in options.angles(side)
            ]
        )

    def upright_votes(
        self, task: Category, backbone: str, query_set: FeatureSet, options: RetrievalOptions
    ) -> np.ndarray:
        """(V, Q): for each query view, the log-likelihood (nats) this model's turn classifier gives
        every view's turn if that view were the upright one."""
        classifier = self.turn_classifier(task, backbone, options)
        return classifier.upright_votes(query_set.features, options.rotations).double().numpy()

    def turn_classifier(self, task: Category, backbone: str, options: RetrievalOptions) -> TurnClassifier:
        """The turn classifier of ``options``' query views for this model, learned once per workspace
        from up to ``UPRIGHT_PHOTOS`` training photos of ``task`` (a seeded sample), each extracted
        (and cached) at every turn those views can show, deskewed as the queries are."""
        turns = training_turns(options.rotations)
        key = (task, backbone, turns, options.deskew_queries, options.flip)
        if key not in self._turn_classifiers:
            photos = [ref for identity in training_identities(self.data, task) for ref in identity.consumers]
            if not photos:
                raise ValueError(
                    f"{self.data.train_pairs}: no {task.label} training photos to learn upright from"
                )
            photos = random.Random(0).sample(photos, min(UPRIGHT_PHOTOS, len(photos)))
            learning = dataclasses.replace(
                options, rotations=turns, choose_upright=False, rotation_side="query"
            )
            turned = self.side_features(
                "query", task, backbone, photos, learning, f"{task.label}/{backbone} upright"
            )
            self._turn_classifiers[key] = fit_turn_classifier(turned.features, turns)
        return self._turn_classifiers[key]


# The models a chain fuses, by name: each one's workspace and backbone.
Models = Mapping[str, tuple[Workspace, str]]


def backbone_models(workspace: Workspace, backbones: Sequence[str]) -> Models:
    """One workspace's models, named by their backbones (what ``fuse`` and ``submit`` weigh)."""
    return {backbone: (workspace, backbone) for backbone in backbones}


def pair_features(
    models: Models,
    task: Category,
    queries: Sequence[ImageRef],
    gallery: Sequence[ImageRef],
    options: RetrievalOptions,
    split: str,
) -> dict[str, tuple[FeatureSet, FeatureSet]]:
    """Each model's query and gallery embeddings as ``options`` search them
    (:meth:`Workspace.side_features`), by model name.

    With ``choose_upright`` every model keeps the same view of a query, so that fused scores are of one
    photo. One model keeps the view its vote (:meth:`Workspace.upright_votes`, ``VOTE_WEIGHT`` cosine
    per nat) plus its best match puts first; several keep the one their summed votes put first, which
    on the Grocery validation photos picked better than their votes plus matches and than each model
    choosing alone (three backbones' ensemble: rank-1 0.945, 0.941-0.945, 0.938; docs/REALDATA.md).
    Several models search a set that stands upright (:func:`jdfashion.upright.stands_upright`,
    ``turned_share``) as taken instead: deskew cost their ensemble upright rank-1 that no choice of view
    won back (test 0.752 against 0.755, validation 0.945 against 0.971), while one network alone gained
    from it (Lite1 0.616 against 0.529, Lite2 0.644 against 0.577; docs/REALDATA.md)."""

    def extracted(
        workspace: Workspace, backbone: str, side: RotationSide, these: RetrievalOptions
    ) -> FeatureSet:
        refs = queries if side == "query" else gallery
        return workspace.side_features(side, task, backbone, refs, these, f"{task.label}/{backbone} {split}")

    pairs = {
        name: (
            extracted(workspace, backbone, "query", options),
            extracted(workspace, backbone, "gallery", options),
        )
        for name, (workspace, backbone) in models.items()
    }
    if not options.choose_upright:
        return pairs
    evidence = sum(
        workspace.upright_votes(task, backbone, pairs[name][0], options)
        for name, (workspace, backbone) in models.items()
    )
    if len(pairs) == 1:
        ((query_set, gallery_set),) = pairs.values()
        evidence = VOTE_WEIGHT * evidence + view_matches(query_set.features, gallery_set.features)
    choice = np.argmax(evidence, axis=0)
    if len(pairs) > 1 and stands_upright(choice, options.rotations, options.turned_share):
        as_taken = dataclasses.replace(options, rotations=(0.0,), deskew_queries=False, choose_upright=False)
        return {
            name: (extracted(workspace, backbone, "query", as_taken), pairs[name][1])
            for name, (workspace, backbone) in models.items()
        }
    return {
        name: (
            dataclasses.replace(query_set, features=keep_views(query_set.features, torch.from_numpy(choice))),
            gallery_set,
        )
        for name, (query_set, gallery_set) in pairs.items()
    }


def as_ranked(
    models: Models,
    task: Category,
    queries: Sequence[ImageRef],
    gallery: Sequence[ImageRef],
    options: RetrievalOptions,
    split: str,
    key: Hashable | None = None,
) -> dict[str, tuple[FeatureSet, FeatureSet]]:
    """Each model's features as ``options`` rank them: :func:`pair_features`, then, with self-training,
    each model's map on the run's device. With ``key`` (which split) a map is learned once per model,
    options and, where views were chosen, the models that chose them (its views depend on them)."""
    pairs = pair_features(models, task, queries, gallery, options, split)
    together = sorted((str(w.weights.root), b) for w, b in models.values()) if options.choose_upright else []
    return {
        name: workspace.self_trained_once(
            pairs[name], options, None if key is None else (key, backbone, *together)
        )
        for name, (workspace, backbone) in models.items()
    }


def data_categories(layout: DataLayout) -> list[Category]:
    """The categories of p.txt's pairs, or of the validation split when there is no p.txt."""
    if layout.pairs.exists():
        return sorted({pair.category for pair in read_pairs(layout.pairs)})
    return [category for category in Category if layout.val_queries(category).exists()]


def resolve_categories(workspace: Workspace, category: Category | None = None) -> list[Category]:
    """``category`` when the data holds it, else every category the data holds."""
    held = workspace.categories
    if not held:
        if not workspace.data.pairs.exists():
            raise FileNotFoundError(missing_message(workspace.data.pairs))
        fix = fixing_command(workspace.data.pairs)
        raise ValueError(f"{workspace.data.pairs}: lists no pairs; import your data: {fix}")
    if category is None:
        return held
    if category not in held:
        names = ", ".join(c.label for c in held)
        raise ValueError(
            f"{workspace.data.pairs}: no {category.label} pairs (the data holds {names}); "
            f"pass --category {held[0].label}"
        )
    return [category]


def extraction_targets(
    workspace: Workspace,
    category: Category | None = None,
    backbones: Sequence[str] | None = None,
    every_model: bool = False,
) -> list[tuple[Category, str]]:
    """The (category, backbone) pairs to extract: every trained model, or per category the given
    backbones (default: those trained for it)."""
    if not every_model:
        return [
            (c, b) for c in resolve_categories(workspace, category) for b in workspace.backbones(c, backbones)
        ]
    targets = workspace.weights.trained_models()
    if not targets:
        train = workspace.command("train", "--backbone", SUGGESTED_BACKBONE)
        raise FileNotFoundError(f"{workspace.weights.root}: no trained models; train one: {train}")
    return targets


@dataclass
class ValidationSet:
    category: Category
    queries: list[ImageRef]
    gallery: list[ImageRef]
    truth: dict[str, list[str]]


def validation_set(layout: DataLayout, category: Category) -> ValidationSet:
    split_command = fixing_command(layout.val_queries(category))
    if not layout.val_queries(category).exists():
        raise FileNotFoundError(missing_message(layout.val_queries(category)))
    val = ValidationSet(
        category,
        read_images(layout.val_queries(category)),
        read_images(layout.val_gallery(category)),
        read_truth(layout.val_truth(category)),
    )
    if not val.queries or not val.gallery:
        empty = layout.val_queries(category) if not val.queries else layout.val_gallery(category)
        raise ValueError(
            f"{empty}: lists no images; split again with more validation: {split_command} --val-fraction 0.3"
        )
    return val


def extract_validation(
    workspace: Workspace, backbone: str, category: Category, options: RetrievalOptions
) -> tuple[FeatureSet, FeatureSet]:
    """One model's validation features (the views it keeps, if ``choose_upright``, chosen alone)."""
    val = validation_set(workspace.data, category)
    models = backbone_models(workspace, [backbone])
    return pair_features(models, category, val.queries, val.gallery, options, "val")[backbone]


def validation_as_ranked(
    models: Models, category: Category, options: RetrievalOptions, data: DataLayout | None = None
) -> dict[str, tuple[FeatureSet, FeatureSet]]:
    """Each model's validation features as ``options`` rank them (:func:`as_ranked`), each map learned
    once per run. ``data``: another data root's validation lists (the Grocery protocol's turned
    queries) instead of the first model's own."""
    data = data or next(iter(models.values()))[0].data
    val = validation_set(data, category)
    key = ("val", category.label, str(data.root))
    return as_ranked(models, category, val.queries, val.gallery, options, "val", key)


@dataclass
class TestAssignment:
    """The test queries and gallery with each image's predicted category (the router's output)."""

    queries: list[ImageRef]
    gallery: list[ImageRef]
    query_categories: np.ndarray
    gallery_categories: np.ndarray
    gallery_probabilities: np.ndarray

    def subset(self, category: Category) -> tuple[list[ImageRef], list[ImageRef]]:
        return (
            [ref for ref, c in zip(self.queries, self.query_categories, strict=True) if c == category],
            [ref for ref, c in zip(self.gallery, self.gallery_categories, strict=True) if c == category],
        )

    @property
    def categories(self) -> list[Category]:
        """The categories that hold at least one test query."""
        return [Category(int(c)) for c in np.unique(self.query_categories)]

    @classmethod
    def uniform(cls, queries: list[ImageRef], gallery: list[ImageRef], category: Category) -> TestAssignment:
        """Every image in one category: what one-category data needs instead of a router."""
        probabilities = np.zeros((len(gallery), len(Category)), dtype=np.float32)
        probabilities[:, int(category)] = 1
        return cls(
            queries,
            gallery,
            np.full(len(queries), int(category)),
            np.full(len(gallery), int(category)),
            probabilities,
        )


def read_test_lists(workspace: Workspace) -> tuple[list[ImageRef], list[ImageRef]]:
    """The test queries and gallery; an empty list is an error that names its fix."""
    lists = workspace.data.queries, workspace.data.gallery
    for path in lists:
        if not path.exists():
            raise FileNotFoundError(missing_message(path))
    queries, gallery = (read_images(path) for path in lists)
    for path, refs in zip(lists, (queries, gallery), strict=True):
        if not refs:
            raise ValueError(
                f"{path}: lists no images; import the test images (rows with role test): "
                f"{fixing_command(path)}"
            )
    if len({ref.url for ref in gallery}) < TOP_K:
        raise ValueError(
            f"{lists[1]}: {len(gallery)} images, fewer than the {TOP_K} results every query needs; add "
            f"shop images (manifest rows with role distractor): {fixing_command(lists[1])}"
        )
    return queries, gallery


def assign_test(
    workspace: Workspace,
    router_backbone: str,
    options: RetrievalOptions,
    category: Category | None = None,
) -> TestAssignment:
    """Each test image's category: ``category``, the data's only one, or the router's prediction.

    A router is needed only when the data mixes categories and no ``category`` is given.
    """
    queries, gallery = read_test_lists(workspace)
    held = workspace.categories
    single = category if category is not None else (held[0] if len(held) == 1 else None)
    if single is not None:
        return TestAssignment.uniform(queries, gallery, single)
    router = workspace.weights.model_dir(ROUTER, router_backbone)
    if not (router / MODEL_WEIGHTS).is_file():
        names = ", ".join(c.label for c in held) or "no categories in p.txt"
        raise FileNotFoundError(
            f"{router / MODEL_WEIGHTS}: missing; the data mixes categories ({names}), so test images "
            f"need the category router; train it: {workspace.train_command(ROUTER, router_backbone)} "
            "(or pass --category to treat every test image as one category)"
        )
    return route_test(workspace, router_backbone, options, queries, gallery)


def route_test(
    workspace: Workspace,
    router_backbone: str,
    options: RetrievalOptions,
    queries: list[ImageRef] | None = None,
    gallery: list[ImageRef] | None = None,
) -> TestAssignment:
    """Predict every test query's and gallery image's category with the trained router (cached)."""
    if queries is None or gallery is None:
        queries, gallery = read_test_lists(workspace)
    query_probs = workspace.features(
        ROUTER, router_backbone, queries, options, "route queries", "probabilities"
    )
    gallery_probs = workspace.features(
        ROUTER, router_backbone, gallery, options, "route gallery", "probabilities"
    )
    return TestAssignment(
        queries,
        gallery,
        predicted_categories(query_probs),
        predicted_categories(gallery_probs),
        gallery_probs.features.float().numpy(),
    )


def extract_test(
    workspace: Workspace,
    backbone: str,
    category: Category,
    assignment: TestAssignment,
    options: RetrievalOptions,
) -> tuple[FeatureSet, FeatureSet]:
    """One model's test features of ``category``'s routed images (views kept as in
    :func:`extract_validation`)."""
    queries, gallery = assignment.subset(category)
    models = backbone_models(workspace, [backbone])
    return pair_features(models, category, queries, gallery, options, "test")[backbone]
