"""Beyond the paper: k-reciprocal re-ranking, alpha query expansion, database augmentation (of the
gallery, or of the query set), and domain centring.

The paper skipped re-ranking "due to memory limitation": the dense k-reciprocal method needs the
(Q+G)^2 distance matrix, about 96 GB here. Everything below works from top-k neighbour lists
(:func:`jdfashion.search.topk`, bounded memory) and sparse vectors, so it fits a 154k gallery.
All three are off by default; run them per category, on the features that are searched.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

from jdfashion.blocks import map_rows, row_blocks
from jdfashion.search import Features, rank_rows, topk, unit_rows, views

CPU = torch.device("cpu")
NODE_BATCH = 8192
SET_BATCH = 1024
PAIR_BATCH = 8192
JACCARD_QUERY_BATCH = 256


class _JointGraph:
    """Top-L neighbour lists over the joint set of queries and gallery, computed only where asked.

    Node ``j < Q`` is query ``j``, node ``Q + i`` gallery item ``i`` (the layout of Zhong et al.'s
    code). Each list starts with the best match, normally the node itself; ties go to the lower node.
    """

    def __init__(
        self,
        queries: Features,
        gallery: Features,
        length: int,
        chunk_size: int | None,
        device: str | torch.device | None,
    ) -> None:
        self.queries, self.gallery = queries, gallery
        self.num_queries = len(queries)
        self.size = len(queries) + len(gallery)
        self.length = min(length, self.size)
        self.chunk_size, self.device = chunk_size, device
        self.neighbours = np.full((self.size, self.length), -1, dtype=np.int64)
        self.similarities = np.zeros((self.size, self.length), dtype=np.float32)
        self.known = np.zeros(self.size, dtype=bool)

    def features(self, nodes: np.ndarray) -> torch.Tensor:
        """Unit fp32 rows of ``nodes`` on the CPU."""
        is_query = nodes < self.num_queries
        rows = torch.empty((len(nodes), self.queries.shape[1]))
        if is_query.any():
            rows[torch.from_numpy(is_query)] = unit_rows(self.queries, nodes[is_query], CPU, "query")
        if not is_query.all():
            gallery_rows = nodes[~is_query] - self.num_queries
            rows[torch.from_numpy(~is_query)] = unit_rows(self.gallery, gallery_rows, CPU, "gallery")
        return rows

    def pair_similarities(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        out = np.empty(len(first), dtype=np.float32)
        for start in range(0, len(first), PAIR_BATCH):
            part = slice(start, start + PAIR_BATCH)
            dots = (self.features(first[part]) * self.features(second[part])).sum(dim=1)
            out[part] = dots.numpy()
        return out

    def ensure(self, nodes: np.ndarray) -> None:
        """Compute the lists of ``nodes`` not yet known: one exact search over queries, one over gallery."""
        todo = np.unique(nodes)
        todo = todo[~self.known[todo]]
        options = {"chunk_size": self.chunk_size, "device": self.device}
        for start in range(0, len(todo), NODE_BATCH):
            batch = todo[start : start + NODE_BATCH]
            rows = self.features(batch)
            query_scores, query_ids = topk(rows, self.queries, min(self.length, self.num_queries), **options)
            gallery_scores, gallery_ids = topk(
                rows, self.gallery, min(self.length, len(self.gallery)), **options
            )
            # Query nodes come first in the concatenation and have the lower ids, as ties require.
            scores = torch.from_numpy(np.concatenate([query_scores, gallery_scores], axis=1))
            ids = np.concatenate([query_ids, gallery_ids + self.num_queries], axis=1)
            best, columns = rank_rows(scores, self.length)
            self.neighbours[batch] = np.take_along_axis(ids, columns.numpy(), axis=1)
            self.similarities[batch] = best.numpy()
        self.known[todo] = True

    def expand(self, nodes: np.ndarray, width: int) -> np.ndarray:
        """``nodes`` with the first ``width`` entries of their lists, lists made available for all."""
        self.ensure(nodes)
        grown = np.unique(np.concatenate([nodes, self.neighbours[nodes, :width].ravel()]))
        self.ensure(grown)
        return grown


def _reciprocal_sets(graph: _JointGraph, nodes: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Each node's k1-reciprocal neighbours as (len(nodes), k1+1) candidates and a membership mask."""
    width = min(k1 + 1, graph.length)
    forward = graph.neighbours[nodes, :width]
    backward = graph.neighbours[forward, :width]
    return forward, (backward == nodes[:, None, None]).any(axis=-1)


def _sparse_weights(graph: _JointGraph, nodes: np.ndarray, k1: int) -> sparse.csr_matrix:
    """Rows V_x of Zhong et al.: exp(-d(x, n)) over x's expanded k-reciprocal set R*(x), summing to 1.

    R*(x) is R(x, k1) plus R(c, round(k1/2)) for each c in R(x) sharing more than 2/3 of it with R(x).
    """
    half = int(np.around(k1 / 2))
    rows, columns, values = [], [], []
    for start in range(0, len(nodes), SET_BATCH):
        batch = nodes[start : start + SET_BATCH]
        forward, reciprocal = _reciprocal_sets(graph, batch, k1)
        half_forward, half_reciprocal = _reciprocal_sets(graph, forward.ravel(), half)
        half_forward = half_forward.reshape(*forward.shape, -1)
        half_reciprocal = half_reciprocal.reshape(half_forward.shape)
        in_set = (half_forward[..., None] == forward[:, None, None, :]) & reciprocal[:, None, None, :]
        shared = (in_set.any(axis=-1) & half_reciprocal).sum(axis=-1)
        expands = reciprocal & (shared > 2 / 3 * half_reciprocal.sum(axis=-1))
        added = np.where(expands[..., None] & half_reciprocal, half_forward, -1)
        members = np.concatenate([np.where(reciprocal, forward, -1), added.reshape(len(batch), -1)], axis=1)
        members = np.sort(members, axis=1)
        members[:, 1:][members[:, 1:] == members[:, :-1]] = -1
        row, slot = np.nonzero(members >= 0)
        member = members[row, slot]
        # Most members are in x's own list, whose similarities are known; the rest are computed.
        listed = graph.neighbours[batch][row] == member[:, None]
        similarity = (graph.similarities[batch][row] * listed).sum(axis=1)
        unlisted = ~listed.any(axis=1)
        similarity[unlisted] = graph.pair_similarities(batch[row[unlisted]], member[unlisted])
        weight = np.exp(similarity.astype(np.float64) - 1.0)
        totals = np.bincount(row, weights=weight, minlength=len(batch))
        rows.append(row + start)
        columns.append(member)
        values.append(weight / totals[row])
    return sparse.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))),
        shape=(len(nodes), graph.size),
    )


def k_reciprocal_rerank(
    query_features: Features,
    gallery_features: Features,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    candidates: int = 100,
    top: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Zhong et al. (CVPR 2017) k-reciprocal re-ranking of each query's top ``candidates``, sparsely.

    Returns (Q, n) float32 final distances, ascending, and (Q, n) int64 gallery indices, with
    n = ``top`` or all candidates. The algorithm is the reference code's, over the joint query +
    gallery set, with two differences: only each query's top ``candidates`` are re-ordered, and the
    original distance is d = 1 - cos instead of squared Euclidean over each column's maximum (a
    dense-only quantity; the two agree when a column's farthest item is orthogonal). Neighbour
    lists are computed only for the nodes the sets reach (queries, candidates and their
    neighbourhoods), so cost follows the candidates, not (Q+G)^2.
    final = (1 - lambda) * jaccard(V'_q, V'_g) + lambda * d(q, g).
    """
    if min(k1, k2, candidates, top or 1) < 1 or not 0 <= lambda_value <= 1:
        raise ValueError("need k1, k2, candidates, top >= 1 and 0 <= lambda_value <= 1")
    num_queries = len(query_features)
    num_candidates = min(candidates, len(gallery_features))
    similarity, shortlist = topk(
        query_features, gallery_features, num_candidates, chunk_size=chunk_size, device=device
    )
    if not num_queries:
        return similarity[:, :top], shortlist[:, :top]
    graph = _JointGraph(query_features, gallery_features, max(k1 + 1, k2), chunk_size, device)
    endpoints = np.unique(np.concatenate([np.arange(num_queries), shortlist.ravel() + num_queries]))
    # V is needed for the endpoints' k2 neighbours (local query expansion), whose reciprocal sets
    # reach k1 neighbours, whose half-size sets reach round(k1/2) further ones.
    weighted = graph.expand(endpoints, min(k2, graph.length))
    reached = graph.expand(weighted, min(k1 + 1, graph.length))
    graph.expand(reached, min(int(np.around(k1 / 2)) + 1, graph.length))
    weights = _sparse_weights(graph, weighted, k1)
    expansion_width = min(k2, graph.length)
    expansion = sparse.csr_matrix(
        (
            np.full(len(endpoints) * expansion_width, 1 / expansion_width),
            (
                np.repeat(np.arange(len(endpoints)), expansion_width),
                np.searchsorted(weighted, graph.neighbours[endpoints, :expansion_width].ravel()),
            ),
        ),
        shape=(len(endpoints), len(weighted)),
    )
    expanded = expansion @ weights
    query_rows = np.searchsorted(endpoints, np.arange(num_queries))
    candidate_rows = np.searchsorted(endpoints, shortlist + num_queries)
    overlap = np.empty(shortlist.shape, dtype=np.float64)
    for start in range(0, num_queries, JACCARD_QUERY_BATCH):
        part = slice(start, start + JACCARD_QUERY_BATCH)
        left = expanded[np.repeat(query_rows[part], num_candidates)]
        right = expanded[candidate_rows[part].ravel()]
        overlap[part] = np.asarray(left.minimum(right).sum(axis=1)).reshape(-1, num_candidates)
    jaccard = 1 - overlap / (2 - overlap)
    final = (1 - lambda_value) * jaccard + lambda_value * (1 - similarity.astype(np.float64))
    order = np.argsort(final, axis=1, kind="stable")[:, :top]
    return (
        np.take_along_axis(final, order, axis=1).astype(np.float32),
        np.take_along_axis(shortlist, order, axis=1),
    )


def _weighted_neighbour_sum(
    base: Features, gallery: Features, scores: np.ndarray, indices: np.ndarray, alpha: float, what: str
) -> torch.Tensor:
    """unit(base + sum_i max(s_i, 0)^alpha * g_i) per row; fp16 stays fp16 (a fused gallery is large)."""
    weights = torch.from_numpy(np.clip(scores, 0, None).astype(np.float32)) ** alpha

    def summed(view: Features, rows: np.ndarray) -> torch.Tensor:
        neighbours = unit_rows(gallery, indices[rows].ravel(), CPU, "gallery")
        neighbours = neighbours.reshape(len(rows), indices.shape[1], view.shape[1])
        total = unit_rows(view, rows, CPU, what) + (weights[rows, :, None] * neighbours).sum(dim=1)
        return torch.nn.functional.normalize(total, dim=1)

    return map_rows(base, summed)


def query_expansion(
    query_features: Features,
    gallery_features: Features,
    *,
    top_n: int = 5,
    alpha: float = 3.0,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """alpha-QE (Radenovic et al.): each query plus its top ``top_n`` gallery neighbours, weighted
    by similarity^alpha (the query itself has weight 1), re-normalised; fp16 stays fp16, else fp32."""
    if top_n < 1 or alpha < 0:
        raise ValueError("need top_n >= 1 and alpha >= 0")
    scores, indices = topk(
        query_features,
        gallery_features,
        min(top_n, len(gallery_features)),
        chunk_size=chunk_size,
        device=device,
    )
    return _weighted_neighbour_sum(query_features, gallery_features, scores, indices, alpha, "query")


def database_augmentation(
    gallery_features: Features,
    *,
    top_n: int = 5,
    alpha: float = 3.0,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """DBA: every gallery item becomes itself plus its top ``top_n`` other gallery items weighted by
    similarity^alpha, re-normalised. The gallery-gallery search is chunked like any other."""
    if top_n < 1 or alpha < 0:
        raise ValueError("need top_n >= 1 and alpha >= 0")
    size = len(gallery_features)
    width = min(top_n + 1, size)
    scores, indices = topk(gallery_features, gallery_features, width, chunk_size=chunk_size, device=device)
    # Drop the item itself (or, when duplicates crowd it out, the last neighbour).
    keep = np.argsort(indices == np.arange(size)[:, None], axis=1, kind="stable")[:, : width - 1]
    scores, indices = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(indices, keep, axis=1)
    return _weighted_neighbour_sum(gallery_features, gallery_features, scores, indices, alpha, "gallery")


def domain_centring(features: Features, fraction: float) -> Features:
    """Each unit row minus ``fraction`` of the set's mean unit row, re-normalised; fp16 stays fp16.

    Consumer photos share a component (in-store light, clutter, phone optics) that every photo has
    and no identity owns, and shop images share another (studio background): cosines across the two
    domains are dominated by it. Centring each side on its own mean (queries on the query set, the
    gallery on the gallery: test-time statistics, no labels) removes much of it; ``fraction`` < 1
    keeps part, as a full centring also removes what the items of a small set genuinely share.
    (N, D) or (V, N, D) views: one mean over every view.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"centring fraction must be in [0, 1], got {fraction}")
    if fraction == 0 or features.shape[-2] == 0:
        return features
    parts = views(features)
    chunks = list(row_blocks(len(parts[0])))
    mean = sum(unit_rows(view, rows, CPU, "centred").sum(dim=0) for view in parts for rows in chunks)
    mean = mean / (len(parts) * len(parts[0]))
    return map_rows(
        features,
        lambda view, rows: torch.nn.functional.normalize(
            unit_rows(view, rows, CPU, "centred") - fraction * mean, dim=1
        ),
    )
