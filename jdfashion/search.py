"""Exact cosine top-k over a gallery too large for one score matrix.

The test gallery is 154,294 images x 4096-d per model (1.26 GB in fp16); a full 1000 x 154k fp32
score matrix would be another 0.6 GB per model and the gallery-gallery one (for re-ranking) 95 GB.
So the gallery is walked in chunks and each query keeps a running top-k. Beyond the features
themselves, peak memory is about

    6*C*D + 4*Q*D + 12*Qc*(C + k) + 12*Q*k bytes

(an fp16 gather and the fp32 copy of one gallery chunk, the fp32 queries, one query chunk's scores
with the running lists, the running lists) for gallery chunk C (``chunk_size``), query chunk Qc
(``query_chunk_size``), dimension D and Q queries: with the defaults (C = 8192, Qc = 1024) and
D = 4096 about 0.3 GB, whatever the gallery size (measured: 0.5 GB peak growth with allocator
overhead, 10.5 s on 2 CPU cores, for 1000 x 154,294 x 4096 fp16). V query views (below) add
4*(V-1)*Q*D + 4*Qc*C bytes.

Features may be fp16 or fp32, numpy (memory-mapped files too) or torch; every chunk is converted
to unit-norm fp32 on the compute device (fp16 matmul on CPU is slow, and a whole fp32 copy would
double the memory).

Ties are broken by the lower gallery index, so a ranking never depends on chunk sizes or on
torch.topk's unspecified order among equal values.

Queries may come as views (V, Q, D), e.g. each query photo turned to several in-plane angles
(rotation TTA), and so may the gallery (V, G, D): a pair's score is then the best over every pair
of views, max_(u,v) q_u . g_v, taken per gallery chunk, so views cost products but only one extra
chunk of scores, never a (V, Q, G) matrix; with gallery views the chunk shrinks to ``C / V`` rows,
so the gallery views of a chunk together take what one chunk did.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

Features = np.ndarray | torch.Tensor

DEFAULT_CHUNK_SIZE = 8192
DEFAULT_QUERY_CHUNK_SIZE = 1024


def rank_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row, best first, equal scores ordered by the lower column.

    torch.topk is fast but promises nothing about which of several equal values it keeps, so rows
    where a tie straddles the k-th place (rare with real features) are fully sorted instead.
    """
    values, columns = torch.topk(scores, k, dim=1)
    kth = values[:, -1:]
    straddling = ((scores == kth).sum(dim=1) > (values == kth).sum(dim=1)).nonzero().squeeze(1)
    if straddling.numel():
        ordered = torch.sort(scores[straddling], dim=1, descending=True, stable=True)
        values[straddling] = ordered.values[:, :k]
        columns[straddling] = ordered.indices[:, :k]
    by_column = torch.argsort(columns, dim=1)
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_value), columns.gather(1, by_value)


def is_half(features: Features) -> bool:
    return features.dtype == (torch.float16 if isinstance(features, torch.Tensor) else np.float16)


def unit_rows(features: Features, rows: np.ndarray, device: torch.device, what: str) -> torch.Tensor:
    """``features[rows]`` as unit fp32 rows on ``device``; a non-finite row is an error, not a mismatch."""
    # Increasing row numbers without gaps (every ungrouped search) are read as a slice: no gather copy.
    contiguous = len(rows) > 0 and int(rows[-1]) - int(rows[0]) + 1 == len(rows)
    index = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
    if isinstance(features, torch.Tensor):
        selected = features[index if contiguous else torch.from_numpy(rows).to(features.device)]
        block = selected.to(device=device, dtype=torch.float32, copy=True)
    else:
        block = torch.from_numpy(np.array(features[index], dtype=np.float32)).to(device)
    # ``block`` is a fresh copy, so normalising in place touches no caller data.
    norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
    finite = torch.isfinite(norms).squeeze(1)
    if not bool(finite.all()):
        bad = int(rows[int((~finite).nonzero()[0, 0])])
        raise ValueError(f"{what} features: row {bad} is not finite (NaN or inf)")
    return block.div_(norms.clamp_min_(1e-12))


def views(features: Features) -> list[Features]:
    """The views of (N, D) or (V, N, D) features, each (N, D)."""
    return [features] if features.ndim == 2 else [features[view] for view in range(features.shape[0])]


def best_view(queries: Features, gallery: Features) -> Features:
    """Per query the one view whose nearest gallery item scores highest, (Q, D); (Q, D) queries pass
    through. For methods that need one vector per query (k-reciprocal re-ranking)."""
    if queries.ndim == 2:
        return queries
    nearest = np.stack([topk(view, gallery, 1)[0][:, 0] for view in views(queries)])
    choice = torch.from_numpy(nearest.argmax(axis=0))
    return torch.as_tensor(queries)[choice, torch.arange(queries.shape[1])]


def _search(
    queries: Features,
    query_rows: np.ndarray,
    gallery: Features,
    gallery_rows: np.ndarray,
    k: int,
    chunk_size: int,
    query_chunk_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``gallery[gallery_rows]`` for ``queries[query_rows]``; indices are gallery row numbers."""
    query_starts = range(0, len(query_rows), query_chunk_size)
    best_scores = [torch.empty((0,), device=device)] * len(query_starts)
    best_ids = [torch.empty((0,), dtype=torch.int64, device=device)] * len(query_starts)
    query_views = views(queries)
    query_blocks = [
        [
            unit_rows(view, query_rows[start : start + query_chunk_size], device, "query")
            for view in query_views
        ]
        for start in query_starts
    ]
    gallery_views = views(gallery)
    chunk_size = max(1, chunk_size // len(gallery_views))
    for start in range(0, len(gallery_rows), chunk_size):
        rows = gallery_rows[start : start + chunk_size]
        blocks = [unit_rows(view, rows, device, "gallery") for view in gallery_views]
        block_ids = torch.from_numpy(rows).to(device)
        for slot, view_blocks in enumerate(query_blocks):
            pairs = itertools.product(view_blocks, blocks)
            query_block, block = next(pairs)
            scores = query_block @ block.T
            for query_block, block in pairs:
                torch.maximum(scores, query_block @ block.T, out=scores)
            # Running entries come first and hold lower gallery rows, so column order is row order.
            if start:
                scores = torch.cat([best_scores[slot], scores], dim=1)
                ids = torch.cat([best_ids[slot], block_ids.expand(len(scores), -1)], dim=1)
            else:
                ids = block_ids.expand(len(scores), -1)
            best_scores[slot], columns = rank_rows(scores, min(k, scores.shape[1]))
            best_ids[slot] = ids.gather(1, columns)
    return (
        torch.cat(best_scores).cpu().numpy().astype(np.float32, copy=False),
        torch.cat(best_ids).cpu().numpy().astype(np.int64, copy=False),
    )


def topk(
    queries: Features,
    gallery: Features,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    query_groups: np.ndarray | None = None,
    gallery_groups: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k``: (Q, k) float32 scores and (Q, k) int64 gallery indices, best first.

    ``queries`` is (Q, D) or (V, Q, D), ``gallery`` (G, D) or (V, G, D): views of each image, a pair
    scored by its best pair of views.

    With ``query_groups`` / ``gallery_groups`` (e.g. predicted categories) a query ranks only the
    gallery items of its own group, searched group by group so other groups cost nothing. When its
    group has fewer than ``k`` items, the remaining places go to the best items of the other groups,
    after all of its own group's items: a submission needs exactly ``k`` distinct ids.
    """
    if queries.ndim not in (2, 3) or gallery.ndim not in (2, 3) or queries.shape[-1] != gallery.shape[-1]:
        raise ValueError(
            "need (Q, D) or (V, Q, D) queries and (G, D) or (V, G, D) gallery, "
            f"got {tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    num_queries, gallery_size = queries.shape[-2], gallery.shape[-2]
    if not 1 <= k <= gallery_size:
        raise ValueError(f"k must be between 1 and the gallery size {gallery_size}, got {k}")
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError("chunk sizes must be >= 1")
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("give both query_groups and gallery_groups, or neither")
    if num_queries == 0:
        return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
    if device is None:
        device = gallery.device if isinstance(gallery, torch.Tensor) else "cpu"
    device = torch.device(device)
    sizes = (chunk_size, query_chunk_size, device)
    if query_groups is None:
        return _search(queries, np.arange(num_queries), gallery, np.arange(gallery_size), k, *sizes)
    query_groups, gallery_groups = np.asarray(query_groups), np.asarray(gallery_groups)
    if query_groups.shape != (num_queries,) or gallery_groups.shape != (gallery_size,):
        raise ValueError("query_groups and gallery_groups need one label per query and per gallery item")
    scores = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    for group in np.unique(query_groups):
        query_rows = np.flatnonzero(query_groups == group)
        inside = np.flatnonzero(gallery_groups == group)
        parts = []
        if len(inside):
            parts.append(_search(queries, query_rows, gallery, inside, min(k, len(inside)), *sizes))
        if len(inside) < k:
            outside = np.flatnonzero(gallery_groups != group)
            parts.append(_search(queries, query_rows, gallery, outside, k - len(inside), *sizes))
        scores[query_rows] = np.concatenate([part[0] for part in parts], axis=1)
        indices[query_rows] = np.concatenate([part[1] for part in parts], axis=1)
    return scores, indices
