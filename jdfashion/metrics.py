"""The challenge metric, defined once: rank-1 accuracy and mAP@10 (docs/METHOD.md).

AP@k = (1 / N_q) * sum_{i=1..k} P@i * rel_i, where the divisor N_q depends on ``ap_norm``:

* ``"min"`` (default): min(|T_q|, k), the reading docs/METHOD.md fixes; equal to trec_eval / ranx
  ``map@10`` whenever |T_q| <= 10.
* ``"truth"``: |T_q| (trec_eval / ranx ``map@10`` for any |T_q|).
* ``"hits"``: the number of relevant items in the top k (0 when there are none).

rank-1 is 1 when the first item of the list is relevant. Both come from one batch core,
:func:`average_precision`, so scoring a submission (:func:`evaluate`) and scoring thousands of
fusion weight vectors during tuning can never disagree.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from rich.table import Table

ApNorm = Literal["min", "truth", "hits"]
AP_NORMS: tuple[str, ...] = ("min", "truth", "hits")
ALL = "all"


def average_precision(
    relevant: np.ndarray, truth_sizes: np.ndarray, *, ap_norm: ApNorm = "min"
) -> np.ndarray:
    """AP over ranked relevance flags ``relevant`` (..., k) with ``truth_sizes`` |T_q| broadcastable to (...).

    Leading dimensions are free, so a (weights, queries, k) stack is scored in one call.
    """
    if ap_norm not in AP_NORMS:
        raise ValueError(f"ap_norm must be one of {', '.join(AP_NORMS)}, got {ap_norm!r}")
    relevant = np.asarray(relevant, dtype=bool)
    k = relevant.shape[-1]
    hits_so_far = np.cumsum(relevant, axis=-1, dtype=np.float64)
    precision_sum = (hits_so_far / np.arange(1, k + 1) * relevant).sum(axis=-1)
    sizes = np.asarray(truth_sizes, dtype=np.float64)
    if ap_norm == "min":
        divisor = np.broadcast_to(np.minimum(sizes, k), precision_sum.shape)
    elif ap_norm == "truth":
        divisor = np.broadcast_to(sizes, precision_sum.shape)
    else:
        divisor = hits_so_far[..., -1] if k else np.zeros_like(precision_sum)
    # No hit means a zero numerator; the divisor is only zero then ("hits"), and AP is 0.
    return np.divide(precision_sum, divisor, out=np.zeros_like(precision_sum), where=divisor > 0)


def rank1(relevant: np.ndarray) -> np.ndarray:
    """1.0 where the first ranked item is relevant, over (..., k) relevance flags."""
    relevant = np.asarray(relevant, dtype=bool)
    if relevant.shape[-1] == 0:
        return np.zeros(relevant.shape[:-1])
    return relevant[..., 0].astype(np.float64)


def relevance_row(query: str, ranked: Sequence[str], truth: Collection[str], k: int) -> np.ndarray:
    """Relevance flags of the first ``k`` ranked ids (padded with False when the list is shorter)."""
    top = list(ranked[:k])
    if len(set(top)) != len(top):
        duplicate = next(item for index, item in enumerate(top) if item in top[:index])
        raise ValueError(f"query {query}: ranked list repeats {duplicate} (a ranked list holds distinct ids)")
    row = np.zeros(k, dtype=bool)
    row[: len(top)] = [item in truth for item in top]
    return row


def truth_matrix(
    query_ids: Sequence[str], gallery_ids: Sequence[str], truth: Mapping[str, Collection[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, G) relevance of every gallery item to every query, and |T_q| per query.

    |T_q| counts relevant ids even when they are missing from ``gallery_ids``, as :func:`evaluate` does.
    """
    column = {gallery_id: index for index, gallery_id in enumerate(gallery_ids)}
    relevant = np.zeros((len(query_ids), len(gallery_ids)), dtype=bool)
    sizes = np.zeros(len(query_ids), dtype=np.int64)
    for row, query in enumerate(query_ids):
        if query not in truth:
            raise ValueError(f"query {query} has no ground truth")
        items = set(truth[query])
        if not items:
            raise ValueError(f"query {query}: empty ground-truth set (|T_q| must be >= 1)")
        sizes[row] = len(items)
        relevant[row, [column[item] for item in items if item in column]] = True
    return relevant, sizes


@dataclass(frozen=True)
class GroupScores:
    rank1: float
    map: float
    num_queries: int

    def to_dict(self) -> dict[str, float | int]:
        return {"rank1": self.rank1, "map": self.map, "num_queries": self.num_queries}


@dataclass(frozen=True)
class Scores:
    """Overall and per-category scores, and which queries of truth/run did not meet."""

    overall: GroupScores
    per_category: dict[str, GroupScores]
    k: int
    ap_norm: str
    missing_queries: tuple[str, ...] = field(default=())
    ignored_queries: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "ap_norm": self.ap_norm,
            ALL: self.overall.to_dict(),
            "categories": {name: scores.to_dict() for name, scores in self.per_category.items()},
            "missing_queries": list(self.missing_queries),
            "ignored_queries": list(self.ignored_queries),
        }


def evaluate(
    run: Mapping[str, Sequence[str]],
    truth: Mapping[str, Collection[str]],
    *,
    k: int = 10,
    ap_norm: ApNorm = "min",
    categories: Mapping[str, str] | None = None,
) -> Scores:
    """Score ranked lists against ground truth.

    Every query of ``truth`` counts: one the run lacks scores 0 (listed in ``missing_queries``);
    run queries without truth are left out (listed in ``ignored_queries``). ``categories`` maps
    each truth query to a label for per-category rows.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = list(truth)
    if categories is not None:
        unlabelled = [query for query in queries if query not in categories]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} queries have no category, e.g. {unlabelled[0]}")
    relevant = np.zeros((len(queries), k), dtype=bool)
    sizes = np.zeros(len(queries), dtype=np.int64)
    for row, query in enumerate(queries):
        items = set(truth[query])
        if not items:
            raise ValueError(f"query {query}: empty ground-truth set (|T_q| must be >= 1)")
        sizes[row] = len(items)
        relevant[row] = relevance_row(query, run.get(query, ()), items, k)
    ap = average_precision(relevant, sizes, ap_norm=ap_norm)
    top1 = rank1(relevant)

    def group(mask: np.ndarray) -> GroupScores:
        count = int(mask.sum())
        if not count:
            return GroupScores(0.0, 0.0, 0)
        return GroupScores(float(top1[mask].mean()), float(ap[mask].mean()), count)

    labels = np.array([str(categories[query]) for query in queries] if categories is not None else [])
    per_category = {label: group(labels == label) for label in dict.fromkeys(labels.tolist())}
    return Scores(
        overall=group(np.ones(len(queries), dtype=bool)),
        per_category=per_category,
        k=k,
        ap_norm=ap_norm,
        missing_queries=tuple(query for query in queries if query not in run),
        ignored_queries=tuple(query for query in run if query not in truth),
    )


def scores_table(scores: Scores, title: str | None = None) -> Table:
    """Rows per category then overall; a caption says which queries were missing or ignored."""
    table = Table(title=title)
    table.add_column("category")
    table.add_column("queries", justify="right")
    table.add_column("rank-1", justify="right")
    table.add_column(f"mAP@{scores.k}", justify="right")
    for name, group in [*scores.per_category.items(), (ALL, scores.overall)]:
        table.add_row(name, str(group.num_queries), f"{group.rank1:.2%}", f"{group.map:.4f}")
    notes = [f"AP divisor: {scores.ap_norm}"]
    if scores.missing_queries:
        notes.append(f"{len(scores.missing_queries)} truth queries missing from the run (scored 0)")
    if scores.ignored_queries:
        notes.append(f"{len(scores.ignored_queries)} run queries without truth (ignored)")
    table.caption = "; ".join(notes)
    return table
