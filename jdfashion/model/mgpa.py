"""MGPA: backbone -> part pooling over the branches -> per-part reduction, BatchNorm and classifier.

Training returns one logit tensor per part (the loss is the sum of their cross-entropies) and the
BN'd part features (for an optional triplet term). Evaluation returns the retrieval feature: each
part feature L2-normalised, concatenated and scaled by 1/sqrt(P), a unit vector whose dot
products are the mean of the per-part cosines.

Two heads: ``reduction`` is the paper's (1x1 conv + BN + classifier per part); ``identity`` keeps the
pooled backbone channels of each part as they are, so an untrained pretrained backbone is a complete
retrieval model: the frozen reference every trained model is measured against (``train --epochs 0``).
Either head may carry a per-part whitening learned on the training images (``model.whitening``),
applied to the L2-normalised part features at evaluation.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from jdfashion.model.backbones import Pretrained, create_backbone, input_normalization
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
    head: Literal["reduction", "identity"] = "reduction"
    whiten_dim: int = 0  # > 0: per-part whitening buffers projecting each part to this size
    # The input normalisation the backbone's weights expect; empty: timm's pretrained config for it.
    input_mean: tuple[float, ...] = ()
    input_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.head not in ("reduction", "identity"):
            raise ValueError(f"head: unknown head {self.head!r}, expected 'reduction' or 'identity'")
        if self.head == "identity" and self.num_classes:
            raise ValueError("head: the identity head has no classifiers; num_classes must be 0")
        if self.whiten_dim < 0:
            raise ValueError(f"whiten_dim: must be >= 0, got {self.whiten_dim}")
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
        values = dict(data)
        for key in ("input_mean", "input_std"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.input_mean and self.input_std:
            return self.input_mean, self.input_std
        return input_normalization(self.backbone)


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


class IdentityHead(nn.Module):
    """The pooled backbone channels are the part features: nothing trained between backbone and search."""

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = pooled.transpose(1, 2)
        return parts, parts.new_zeros(parts.shape[0], parts.shape[1], 0)


class PartWhitening(nn.Module):
    """Per part: L2-normalise, subtract the training mean, project (B, P, D) -> (B, P, whiten_dim)."""

    def __init__(self, num_parts: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_parts, in_dim))
        self.register_buffer("projection", torch.eye(in_dim, out_dim).repeat(num_parts, 1, 1))

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        centred = F.normalize(parts.float(), dim=-1) - self.mean
        return torch.einsum("bpd,pde->bpe", centred, self.projection)


class MGPA(nn.Module):
    def __init__(self, config: MGPAConfig, backbone: nn.Module, channels: int) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.pooling = PartPooling(resolve_branches(config.branches), config.pooling, config.gem_p)
        self.head: nn.Module = (
            IdentityHead()
            if config.head == "identity"
            else MGPAHead(channels, self.pooling.num_parts, config.reduction_dim, config.num_classes)
        )
        self.part_dim = channels if config.head == "identity" else config.reduction_dim
        self.whitening = (
            PartWhitening(self.pooling.num_parts, self.part_dim, config.whiten_dim)
            if config.whiten_dim
            else None
        )

    @property
    def num_parts(self) -> int:
        return self.pooling.num_parts

    @property
    def embedding_dim(self) -> int:
        return self.num_parts * (self.config.whiten_dim or self.part_dim)

    def parts_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.pooling(self.backbone(images)))

    def part_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P, D) part features before whitening: what the whitening is learned from."""
        return self.parts_and_logits(images)[0]

    def forward(self, images: torch.Tensor) -> MGPAOutput | torch.Tensor:
        """Training: ``MGPAOutput``. Evaluation: the (B, P*D) unit retrieval feature."""
        parts, logits = self.parts_and_logits(images)
        if self.training:
            return MGPAOutput(list(logits.unbind(dim=1)) if self.config.num_classes else [], parts)
        if self.whitening is not None:
            parts = self.whitening(parts)
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
