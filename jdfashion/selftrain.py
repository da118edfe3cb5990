"""Transductive self-training: a part map learned from the searched lists themselves (beyond the paper).

Why it exists: on the Grocery protocol (docs/REALDATA.md) nothing learned from the training identities
transfers to unseen products, while statistics of the searched sets do (domain centring, query
augmentation). Self-training combines the two: rank the queries, take each confident query's top
gallery item as its label, learn one linear map shared by every part so that each labelled query
moves towards its item and away from the other candidates, then rank again with the mapped features.
It uses no label of any query or gallery image, only the lists a submission searches (as every
competitor has them at submission time), and it starts at the identity, so a map that learned nothing
ranks as the frozen features do.

The softmax runs over each step's candidates (the union of its anchors' top ``negatives`` gallery
items), so a step costs the same whether the gallery holds 81 images or 154k.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from jdfashion.blocks import map_rows
from jdfashion.options import SelfTraining
from jdfashion.search import Features


def confident_queries(scores: np.ndarray, keep: float) -> np.ndarray:
    """Indices of the ``keep`` share of queries whose first score leads their second the most.

    ``scores`` is (Q, >= 2), best first. A large lead is where the first result is most often right
    (measured: keeping 60 % beat 30 % and 100 %)."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"need (Q, >= 2) ranked scores, got {scores.shape}")
    margin = scores[:, 0].astype(np.float64) - scores[:, 1]
    count = max(1, math.ceil(keep * len(scores))) if len(scores) else 0
    return np.sort(np.argsort(-margin, kind="stable")[:count])


def part_view(features: Features, num_parts: int) -> torch.Tensor:
    """(..., P*C) embeddings (unit parts scaled by 1/sqrt(P), as ``model.mgpa.embed_parts``) as
    (..., P, C), in their own dtype and without a copy (a cached gallery stays fp16)."""
    features = torch.as_tensor(features)
    if features.shape[-1] % num_parts:
        raise ValueError(f"{features.shape[-1]}-d features do not split into {num_parts} parts")
    return features.unflatten(-1, (num_parts, features.shape[-1] // num_parts))


def as_parts(features: Features, num_parts: int) -> torch.Tensor:
    """Unit fp32 parts of (..., P*C) embeddings; zero rows (undecodable images) stay zero."""
    return F.normalize(part_view(features, num_parts).float(), dim=-1)


def embed(parts: torch.Tensor, part_map: torch.Tensor) -> torch.Tensor:
    """(..., P, C) parts through the shared (C, C) map, each re-normalised, concatenated, unit norm."""
    mapped = F.normalize(parts @ part_map, dim=-1)
    return mapped.flatten(-2) / math.sqrt(parts.shape[-2])


def learn_part_map(
    anchors: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    gallery: torch.Tensor,
    settings: SelfTraining,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The (C, C) map, identity start, that makes each anchor's labelled gallery item its nearest.

    ``anchors`` (n, P, C) query parts, ``labels`` (n,) their gallery rows, ``candidates`` (n, c) each
    anchor's top gallery rows (its competitors), ``gallery`` (M, P, C) gallery parts (any dtype, e.g.
    a :func:`part_view` of the fp16 cache: only each step's rows are converted).
    Cross-entropy over the step's candidates at ``settings.scale``, Adam, ``settings.steps`` batches
    drawn with replacement from a generator seeded by ``settings.seed``.
    """
    if len(anchors) != len(labels) or len(anchors) != len(candidates):
        raise ValueError(f"{len(anchors)} anchors, {len(labels)} labels, {len(candidates)} candidate rows")
    dim = anchors.shape[-1]
    part_map = torch.eye(dim, device=device, requires_grad=True)
    if not len(anchors):
        return part_map.detach().cpu()
    optimizer = torch.optim.Adam([part_map], lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    competitors = candidates[:, : settings.negatives]
    for _ in range(settings.steps):
        batch = torch.randint(len(anchors), (min(settings.batch_size, len(anchors)),), generator=generator)
        classes, targets = torch.unique(
            torch.cat([labels[batch], competitors[batch].flatten()]), return_inverse=True
        )
        queries, items = (
            F.normalize(x.to(device).float(), dim=-1) for x in (anchors[batch], gallery[classes])
        )
        logits = embed(queries, part_map) @ embed(items, part_map).T
        loss = F.cross_entropy(settings.scale * logits, targets[: len(batch)].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return part_map.detach().cpu()


def apply_part_map(features: Features, num_parts: int, part_map: torch.Tensor) -> torch.Tensor:
    """(N, D) or (V, N, D) embeddings through the map, by blocks; fp16 stays fp16, else fp32."""
    return map_rows(
        features, lambda view, rows: embed(as_parts(view[rows[0] : rows[-1] + 1], num_parts), part_map)
    )
