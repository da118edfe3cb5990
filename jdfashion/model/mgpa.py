"""MGPA: backbone -> part pooling over the branches -> per-part reduction, BatchNorm and classifier.

Training returns one logit tensor per part (the loss is the sum of their cross-entropies) and the
BN'd part features (for an optional triplet term). Evaluation returns the retrieval feature: each
part feature L2-normalised, concatenated and scaled by 1/sqrt(P), a unit vector whose dot
products are the mean of the per-part cosines.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from jdfashion.model.backbones import Pretrained, create_backbone
from jdfashion.model.partition import POOLING_MODES, PartPooling, resolve_branches


@dataclass(frozen=True)
class MGPAConfig:
    """Everything that fixes the network's shape; saved beside the weights as JSON."""

    backbone: str = "resnet50"
    branches: str = "all"  # a BRANCH_SETS key or a comma list of branch names
    reduction_dim: int = 256
    pooling: str = "avg"
    gem_p: float = 3.0
    last_stride_one: bool = True
    num_classes: int = 0  # 0: no classifiers (feature extraction only)

    def __post_init__(self) -> None:
        resolve_branches(self.branches)
        if self.pooling not in POOLING_MODES:
            raise ValueError(
                f"pooling: unknown mode {self.pooling!r}, expected one of {', '.join(POOLING_MODES)}"
            )
        if self.reduction_dim < 1:
            raise ValueError(f"reduction_dim: must be >= 1, got {self.reduction_dim}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes: must be >= 0, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MGPAConfig:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"model config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


class MGPAOutput(NamedTuple):
    logits: list[torch.Tensor]  # one (B, num_classes) per part; empty when num_classes == 0
    parts: torch.Tensor  # (B, P, D) BN'd part features


class MGPAHead(nn.Module):
    """Per part: 1x1 conv (C -> D, no bias) + BatchNorm, then a linear classifier.

    The parts' layers are stacked into single tensors so all parts run as one batched matmul, but
    nothing is shared: slice i of ``reduction_weight``/``classifier_weight`` and channels
    [i*D, (i+1)*D) of ``norm`` belong to part i alone, exactly as P separate layers would.
    """

    def __init__(self, in_channels: int, num_parts: int, reduction_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_parts = num_parts
        self.reduction_dim = reduction_dim
        # Kaiming (fan_out) as PCB initialises its reduction layers.
        self.reduction_weight = nn.Parameter(
            torch.randn(num_parts, reduction_dim, in_channels) * math.sqrt(2.0 / reduction_dim)
        )
        self.norm = nn.BatchNorm1d(num_parts * reduction_dim)
        self.classifier_weight = nn.Parameter(torch.randn(num_parts, num_classes, reduction_dim) * 1e-3)
        self.classifier_bias = nn.Parameter(torch.zeros(num_parts, num_classes))

    @property
    def num_classes(self) -> int:
        return self.classifier_bias.shape[1]

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, P) pooled parts -> (B, P, D) BN'd features and (B, P, num_classes) logits."""
        reduced = torch.einsum("bcp,pdc->bpd", pooled, self.reduction_weight)
        parts = self.norm(reduced.flatten(1)).view(-1, self.num_parts, self.reduction_dim)
        logits = torch.einsum("bpd,pkd->bpk", parts, self.classifier_weight) + self.classifier_bias
        return parts, logits


class MGPA(nn.Module):
    def __init__(self, config: MGPAConfig, backbone: nn.Module, channels: int) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.pooling = PartPooling(resolve_branches(config.branches), config.pooling, config.gem_p)
        self.head = MGPAHead(channels, self.pooling.num_parts, config.reduction_dim, config.num_classes)

    @property
    def num_parts(self) -> int:
        return self.pooling.num_parts

    @property
    def embedding_dim(self) -> int:
        return self.num_parts * self.config.reduction_dim

    def parts_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.pooling(self.backbone(images)))

    def forward(self, images: torch.Tensor) -> MGPAOutput | torch.Tensor:
        """Training: ``MGPAOutput``. Evaluation: the (B, P*D) unit retrieval feature."""
        parts, logits = self.parts_and_logits(images)
        if self.training:
            return MGPAOutput(list(logits.unbind(dim=1)) if self.config.num_classes else [], parts)
        return embed_parts(parts)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes): the mean of the part classifiers' logits, in either mode (for the router)."""
        if self.config.num_classes == 0:
            raise ValueError("this model has no classifiers (num_classes=0)")
        return self.parts_and_logits(images)[1].mean(dim=1)


def embed_parts(parts: torch.Tensor) -> torch.Tensor:
    """(B, P, D) -> (B, P*D): parts L2-normalised, concatenated, scaled to unit norm by 1/sqrt(P)."""
    return F.normalize(parts.float(), dim=-1).flatten(1) / math.sqrt(parts.shape[1])


def create_model(
    config: MGPAConfig,
    *,
    pretrained: Pretrained = False,
    pretrained_file: str | os.PathLike[str] | None = None,
) -> MGPA:
    """Build an MGPA; the weight options go to the backbone (see ``backbones.create_backbone``)."""
    backbone, channels = create_backbone(
        config.backbone,
        pretrained=pretrained,
        pretrained_file=pretrained_file,
        last_stride_one=config.last_stride_one,
    )
    return MGPA(config, backbone, channels)
