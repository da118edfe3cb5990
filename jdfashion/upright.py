"""Which way is up: each query's view chosen by a turn classifier and its best match, not by the match alone.

Deskewed (:mod:`jdfashion.data.deskew`), a photo turned past 45 degrees is a quarter turn from
upright, so its views at 0, 90 and -90 degrees hold one upright view. Scoring every view by its best
gallery match lets a wrong view of another product outscore the right view of the photo's own, which
cost upright photos 0.02-0.05 rank-1 on the Grocery protocol (docs/REALDATA.md). Photos know which
way is up, though: shelves stand, print runs left to right. A softmax regression on the model's own
embeddings learns, from the training photos (upright as taken, so no label is needed), by how much a
view is turned; each query's views then vote on which of them is upright, that vote is added to each
view's best match (:func:`jdfashion.search.view_matches`; models fused together sum their votes
instead, :func:`jdfashion.workspace.pair_features`), and the one view kept goes on to everything after
it (re-ranking, self-training, fusion) as one vector per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

# Training photos the classifier learns from (a seeded sample), each extracted at every turn: 1,200
# photos at 4 turns is about 4 minutes here and picked the right view for 93-96 % of the test photos.
UPRIGHT_PHOTOS = 1200
WEIGHT_DECAY = 1e-4
# How much the vote counts against the match, in cosine units per nat: 0.05 chosen on the Grocery
# validation queries, upright and turned (docs/REALDATA-HISTORY.md, 'Which way is up').
VOTE_WEIGHT = 0.05


def _angle(degrees: float) -> float:
    """``degrees`` in (-180, 180], so that turns compare exactly."""
    turn = float(round(degrees, 6) % 360.0)
    return turn - 360.0 if turn > 180.0 else turn


def training_turns(views: Sequence[float]) -> tuple[float, ...]:
    """The turns from upright a query's views can show: if its view at angle b is the upright one,
    its view at angle a is turned by a - b. Each is a class of :class:`TurnClassifier`."""
    return tuple(sorted({_angle(a - b) for a in views for b in views}, key=lambda turn: (abs(turn), turn)))


@dataclass(frozen=True)
class TurnClassifier:
    """Softmax regression from one embedding to the turn it was taken at (``turns``, degrees)."""

    turns: tuple[float, ...]
    weights: torch.Tensor  # (T, D)
    bias: torch.Tensor  # (T,)

    def upright_votes(self, views: torch.Tensor, angles: Sequence[float]) -> torch.Tensor:
        """(V, N, D) views at ``angles`` -> (V, N): for each view, the log-likelihood of every view's
        turn if that view were the upright one."""
        log_turn = torch.log_softmax(views.float() @ self.weights.T + self.bias, dim=-1)
        index = {turn: number for number, turn in enumerate(self.turns)}
        try:
            return torch.stack(
                [
                    sum(log_turn[a, :, index[_angle(angle - upright)]] for a, angle in enumerate(angles))
                    for upright in angles
                ]
            )
        except KeyError:
            raise ValueError(f"views at {tuple(angles)} show turns this classifier has not learned") from None


def stands_upright(choice: np.ndarray, angles: Sequence[float], turned_share: float) -> bool:
    """Whether a query set stands upright: fewer than ``turned_share`` of its photos keep a turned view
    (``choice``: each photo's kept view, an index into ``angles``). Decided for the whole set, since a
    set mixing deskewed photos with photos as taken ranked worse than either kind alone."""
    turned = np.array([_angle(angle) != 0 for angle in angles])[choice]
    return bool(turned.mean() < turned_share)


def fit_turn_classifier(
    turned: torch.Tensor, turns: Sequence[float], weight_decay: float = WEIGHT_DECAY
) -> TurnClassifier:
    """(T, N, D) embeddings of N upright photos, each at the T ``turns`` -> their classifier.

    Cross-entropy plus ``weight_decay`` times the weights' squared norm, L-BFGS from zero (scipy): the
    same input always fits the same classifier."""
    if turned.ndim != 3 or len(turned) != len(turns) or len(set(turns)) != len(turns):
        raise ValueError(
            f"need (T, N, D) embeddings at {len(turns)} distinct turns, got {tuple(turned.shape)}"
        )
    count, dim = turned.shape[1], turned.shape[2]
    classes = len(turns)
    features = turned.double().reshape(-1, dim).numpy()
    labels = np.repeat(np.arange(classes), count)
    one_hot = np.eye(classes)[labels]

    def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = flat[: classes * dim].reshape(classes, dim), flat[classes * dim :]
        logits = features @ weights.T + bias
        top = logits.max(1, keepdims=True)
        log_total = top + np.log(np.exp(logits - top).sum(1, keepdims=True))
        error = (np.exp(logits - log_total) - one_hot) / len(features)
        loss = float((log_total[:, 0] - logits[np.arange(len(labels)), labels]).mean())
        gradient = np.concatenate([(error.T @ features + 2 * weight_decay * weights).ravel(), error.sum(0)])
        return loss + weight_decay * float((weights * weights).sum()), gradient

    flat = minimize(
        loss_and_gradient,
        np.zeros(classes * (dim + 1)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 1000},
    ).x
    return TurnClassifier(
        tuple(_angle(turn) for turn in turns),
        torch.from_numpy(flat[: classes * dim].reshape(classes, dim)).float(),
        torch.from_numpy(flat[classes * dim :]).float(),
    )
