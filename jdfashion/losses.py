"""Training losses, each returned as a named term so the loop can log what moves and what does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jdfashion.config import TrainConfig
from jdfashion.model.mgpa import MGPAOutput, embed_parts


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Hardest positive and negative per anchor (Hermans et al. 2017) on unit embeddings."""
    distances = torch.cdist(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    hardest_positive = (distances * same).amax(dim=1)
    hardest_negative = distances.masked_fill(same, float("inf")).amin(dim=1)
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def mgpa_losses(output: MGPAOutput, labels: torch.Tensor, config: TrainConfig) -> dict[str, torch.Tensor]:
    """``loss`` (what is optimised) and its terms: the paper's sum of per-part cross-entropies and the
    optional batch-hard triplet on the search-time embedding."""
    terms = {
        "cross_entropy": sum(
            F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            for logits in output.logits
        )
    }
    if config.triplet_weight > 0:
        terms["triplet"] = batch_hard_triplet(embed_parts(output.parts), labels, config.triplet_margin)
    terms["loss"] = terms["cross_entropy"] + config.triplet_weight * terms.get("triplet", 0.0)
    return terms
