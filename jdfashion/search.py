"""Exact cosine top-k over a gallery too large for one score matrix, one model or several fused.

The test gallery is 154,294 images x 4096-d per model (1.26 GB in fp16); a full 1000 x 154k fp32
score matrix would be another 0.6 GB per model and the gallery-gallery one (for re-ranking) 95 GB.
So the gallery is walked in chunks and each query keeps a running list of candidates.

Score-level fusion happens inside that loop: a search has one or more :class:`Member` s (a model's
query and gallery features and its weight), and a pair's score is sum_m w_m * cos_m(q, g), formed
chunk by chunk from each model's own cached rows, so no fused copy of the gallery is ever built.

Two passes make it fast and exact:

1. **Candidates** keep the best ``k + margin`` gallery items per query. The members sit side by
   side (a chunk of rows of every member's unit features, the queries' parts weighted), so a chunk
   costs one product, fp32 sums inside it, in fp32 or a low precision (bf16 on a CPU, fp16 on CUDA).
2. **Exact re-score** of those candidates in float64, ranked best first with equal scores ordered by
   the lower gallery index.

The answer is certified per query: the pass's error on any pair is at most a bound ``delta``
(:func:`jdfashion.precision.error_bound`: how far rounding to the pass's precision moved the unit
rows, measured on the rows as they are converted; fp32 accumulation; the output's rounding,
relative to the score), so every true top-k item scores within about ``2 delta`` of the approximate
k-th score; only that window is re-scored (for fp32 candidates usually a few items past k; a bf16
window, about 5x wider, is first narrowed by fp32 scores of its items). When the candidate list
reaches below the window, nothing left out can enter the top-k, and the top-k equals a float64
search. Queries where it does not (more than ``margin`` near-ties) are searched again in the next
precision (fp32, then float64, exact by construction). So the result never depends on the
precision, the chunk sizes, or torch.topk's order among equal values.

``precision="auto"`` weighs speed against that certificate (:mod:`jdfashion.precision`): where the
device's low precision measures faster than fp32, a pilot of ``PILOT_QUERIES`` queries shows the
share it certifies before the rest of the queries are searched.

Beyond the features themselves, peak memory is about one gallery chunk of every member and view
side by side (``chunk_size`` rows, by default ``DEFAULT_CHUNK_ELEMENTS`` values: 134 MB in fp32, half
in bf16), reused chunk after chunk, the queries in the candidate precision, and per query chunk
(``query_chunk_size``) two score blocks and the running lists: with the defaults about 0.3 GB,
whatever the gallery size.

Features may be fp16 or fp32, numpy (memory-mapped files too) or torch; every chunk is converted to
unit rows on the compute device (a whole fp32 copy would double the memory).

Queries may come as views (V, Q, D), e.g. each query photo turned to several in-plane angles
(rotation TTA), and so may the gallery (V, G, D): a pair's score is then the best over every pair of
views of the fused score, max_(u,v) sum_m w_m q_mu . g_mv, taken per gallery chunk, so views cost
products but never a (V, Q, G) matrix.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jdfashion.precision import (
    LOW,
    NEXT_PRECISION,
    ErrorBound,
    Rounding,
    auto_dtype,
    candidate_dtype,
    error_bound,
    full_precision_matmuls,
    product_rates,
)

Features = np.ndarray | torch.Tensor
logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 8192 * 4096
DEFAULT_QUERY_CHUNK_SIZE = 1024
# Candidates kept past k: a bf16 or fp16 pass's certified window is about 5x an fp32 one's (its rows'
# rounding, measured: 0.0047 of a unit weight against fp32's 0.001, mostly the fp32 sums' bound), so
# on crowded scores (the search benchmark's) it holds about 90-250 items where fp32's holds 17.
DEFAULT_MARGIN = {torch.float64: 32, torch.float32: 32, torch.bfloat16: 256, torch.float16: 256}
PILOT_QUERIES = 64  # queries a low-precision pilot searches before precision="auto" chooses
RESCORE_ROWS = 256  # gathered rows per re-score step: 8 MB of fp64 at D = 4096, reused by malloc, where
# 268 MB blocks (8192 rows) went back to the OS and faulted in again each step, 5x slower here
CONVERT_ROWS = 256  # rows of each member normalised at a time on a CPU: 4 MB of fp32 at D = 4096


@dataclass(frozen=True)
class Member:
    """One model of a fused search: its (Q, D) or (V, Q, D) queries, (G, D) or (V, G, D) gallery, weight.

    ``query_scale``, (Q,) or (V, Q) positive numbers, multiplies each query's (view's) scores on top of
    the weight: per-query score normalisation (:func:`jdfashion.fusion.score_scales`), where one
    network's cosines spread wider than another's and would otherwise outvote it."""

    queries: Features
    gallery: Features
    weight: float = 1.0
    query_scale: torch.Tensor | None = None

    def scale_rows(self, view: int, rows: np.ndarray) -> torch.Tensor | float:
        return scale_column(self.query_scale, view, rows)

    @property
    def largest_weight(self) -> float:
        """The weight times the largest query scale: what bounds this member's share of a score."""
        return self.weight * (1.0 if self.query_scale is None else float(self.query_scale.max()))


def scale_column(query_scale: torch.Tensor | None, view: int, rows: np.ndarray) -> torch.Tensor | float:
    """The per-query multipliers (:attr:`Member.query_scale`) of ``rows`` of query view ``view``, as a
    float64 column, or 1.0 without a scale."""
    if query_scale is None:
        return 1.0
    scale = query_scale[view] if query_scale.ndim == 2 else query_scale
    return scale[torch.from_numpy(rows)].double().unsqueeze(1)


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


def copied_rows(
    features: Features, rows: np.ndarray, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A fresh copy of ``features[rows]`` in ``dtype`` on ``device``."""
    # Increasing row numbers without gaps (every ungrouped search) are read as a slice: no gather copy.
    contiguous = len(rows) > 0 and bool((np.diff(rows) == 1).all())
    index = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
    if isinstance(features, torch.Tensor):
        selected = features[index if contiguous else torch.from_numpy(rows).to(features.device)]
        return selected.to(device=device, dtype=dtype, copy=True)
    # torch converts fp16 about twice as fast as numpy's astype; a slice needs no gather copy
    selected = features[index]
    if not selected.flags.writeable:  # torch refuses to wrap read-only (memory-mapped) arrays
        selected = np.array(selected)
    return torch.from_numpy(selected).to(device=device, dtype=dtype, copy=True)


def unit_rows(
    features: Features, rows: np.ndarray, device: torch.device, what: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``features[rows]`` as unit rows (fp32 or fp64) on ``device``; a non-finite row is an error."""
    block = copied_rows(features, rows, device, dtype)  # a fresh copy: normalised in place
    norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
    finite = torch.isfinite(norms).squeeze(1)
    if not bool(finite.all()):
        bad = int(rows[int((~finite).nonzero()[0, 0])])
        raise ValueError(f"{what} features: row {bad} is not finite (NaN or inf)")
    return block.div_(norms.clamp_min_(1e-12))


def views(features: Features) -> list[Features]:
    """The views of (N, D) or (V, N, D) features, each (N, D)."""
    return [features] if features.ndim == 2 else [features[view] for view in range(features.shape[0])]


def view_matches(queries: Features, gallery: Features) -> np.ndarray:
    """(V, Q): each query view's best gallery score, the evidence :func:`best_view` keeps a view by
    and :mod:`jdfashion.upright` adds its vote to."""
    return np.stack([topk(view, gallery, 1)[0][:, 0] for view in views(queries)])


def keep_views(queries: Features, choice: torch.Tensor) -> Features:
    """(V, Q, D) views -> (Q, D): view ``choice[q]`` of each query q."""
    return torch.as_tensor(queries)[choice, torch.arange(queries.shape[1])]


def best_view(queries: Features, gallery: Features) -> Features:
    """Per query the one view whose nearest gallery item scores highest, (Q, D); (Q, D) queries pass
    through. For methods that need one vector per query (k-reciprocal re-ranking, self-training)."""
    if queries.ndim == 2:
        return queries
    return keep_views(queries, torch.from_numpy(view_matches(queries, gallery).argmax(axis=0)))


RowScale = Callable[[np.ndarray], "float | torch.Tensor"]


@dataclass(frozen=True)
class Walk:
    """How a search walks the gallery and how many candidates a pass keeps past k; never what it
    finds (module docstring)."""

    chunk_size: int
    query_chunk_size: int
    device: torch.device
    margin: int | None  # None: DEFAULT_MARGIN of each pass's precision

    def width(self, k: int, gallery_size: int, dtype: torch.dtype) -> int:
        """How many candidates per query a ``dtype`` pass keeps."""
        margin = DEFAULT_MARGIN[dtype] if self.margin is None else self.margin
        return min(gallery_size, k + margin)


def _side_by_side(
    parts: Sequence[tuple[Features, RowScale]],
    rows: np.ndarray,
    device: torch.device,
    what: str,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rows`` of every member's features side by side in ``out[:len(rows)]``, (rows, sum D) in the
    pass's dtype: each member's unit rows (normalised in fp32, or fp64 for a fp64 pass) times its
    ``scale(rows)`` (a number, or a column per row). One product of two such blocks is the weighted
    fused score of every pair. Also, where the pass's dtype rounds them, each row's residual norm
    per member, (rows, members): what :class:`jdfashion.precision.Rounding` bounds the pass by.

    ``out`` is reused chunk after chunk: a fresh 100 MB block costs more in page faults than the
    conversion. On a CPU the rows are converted ``CONVERT_ROWS`` at a time, so the fp32 copy stays
    in cache (converting a whole chunk at once took 5x as long on a 2-core AMD EPYC).
    """
    normalise = torch.float64 if out.dtype == torch.float64 else torch.float32
    out = out[: len(rows)]
    rounds = out.dtype != normalise
    residuals = torch.empty((len(rows), len(parts)), dtype=normalise, device=device) if rounds else None
    step = CONVERT_ROWS if device.type == "cpu" else max(1, len(rows))
    for start in range(0, len(rows), step):
        block_rows = rows[start : start + step]
        column = 0
        for index, (features, scale) in enumerate(parts):
            block = unit_rows(features, block_rows, device, what, normalise)
            factor = scale(block_rows)
            if isinstance(factor, torch.Tensor):
                block.mul_(factor.to(device=device, dtype=normalise))
            elif factor != 1.0:
                block.mul_(factor)
            dim = features.shape[-1]
            rounded = out[start : start + len(block_rows), column : column + dim]
            rounded.copy_(block)
            if residuals is not None:  # the difference of a number and its rounding is exact in fp32
                residual = block.sub_(rounded.to(normalise))
                residuals[start : start + len(block_rows), index] = torch.linalg.vector_norm(residual, dim=1)
            column += dim
    return out, residuals


def _candidates(
    members: Sequence[Member],
    query_rows: np.ndarray,
    gallery_rows: np.ndarray,
    width: int,
    walk: Walk,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, Rounding]:
    """The ``width`` best gallery rows per query by the ``dtype`` fused score: (Q, width) scores and
    rows, and how far rounding to ``dtype`` moved the rows (:class:`jdfashion.precision.Rounding`).

    Members sit side by side (:func:`_side_by_side`), the queries' parts weighted, so each pair of
    views costs one product per gallery chunk, summed in fp32 inside it, and nothing is added
    afterwards."""
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    dim = sum(member.queries.shape[-1] for member in members)
    chunk_size, query_chunk_size, device = walk.chunk_size, walk.query_chunk_size, walk.device
    # fp32, the dtype residuals are measured in (only passes that round, so never fp64, have them)
    largest_weights = torch.tensor([m.largest_weight for m in members], dtype=torch.float32, device=device)
    worst = {"query": 0.0, "gallery": 0.0}  # Rounding's fields, measured as the rows are converted
    # A pass that can climb keeps its lists unordered, whichever of equal scores: its window is
    # certified whatever the order, and ranking them exactly cost 2.4x the top-k. The float64 pass
    # cannot climb, so where more equal scores straddle its window than it keeps, its lists must
    # hold the lower gallery rows: running entries come first and hold lower rows, and rank_rows
    # keeps the lower column of equal scores.
    keep = rank_rows if dtype == torch.float64 else functools.partial(torch.topk, dim=1, sorted=False)

    def block(count: int) -> torch.Tensor:
        return torch.empty((count, dim), dtype=dtype, device=device)

    def query_parts(view: int) -> list[tuple[Features, RowScale]]:
        return [
            (views(m.queries)[view], lambda rows, m=m: m.weight * m.scale_rows(view, rows)) for m in members
        ]

    def side_by_side(
        parts: Sequence[tuple[Features, RowScale]], rows: np.ndarray, what: str, out: torch.Tensor
    ) -> torch.Tensor:
        rounded, residuals = _side_by_side(parts, rows, device, what, out)
        if residuals is not None and len(rows):  # query rows carry their weights; gallery rows do not
            weighted = residuals if what == "query" else residuals * largest_weights
            worst[what] = max(worst[what], float(weighted.sum(dim=1).max()))
        return rounded

    query_starts = range(0, len(query_rows), query_chunk_size)
    query_blocks = [  # [slot][view]
        [
            side_by_side(query_parts(view), rows, "query", block(len(rows)))
            for view in range(len(views(members[0].queries)))
        ]
        for rows in (query_rows[start : start + query_chunk_size] for start in query_starts)
    ]
    gallery_parts = [
        [(views(m.gallery)[view], lambda _: 1.0) for m in members]
        for view in range(len(views(members[0].gallery)))
    ]
    buffers = [block(min(chunk_size, len(gallery_rows))) for _ in gallery_parts]
    best_scores = [torch.empty((0,), device=device)] * len(query_starts)
    best_ids = [torch.empty((0,), dtype=torch.int64, device=device)] * len(query_starts)
    for start in range(0, len(gallery_rows), chunk_size):
        rows = gallery_rows[start : start + chunk_size]
        gallery_blocks = [
            side_by_side(parts, rows, "gallery", buffer)
            for parts, buffer in zip(gallery_parts, buffers, strict=True)
        ]
        block_ids = torch.from_numpy(rows).to(device)
        for slot, queries in enumerate(query_blocks):
            scores = None
            for gallery in gallery_blocks:
                for query in queries:
                    fused = (query @ gallery.T).to(accumulate)
                    scores = fused if scores is None else torch.maximum(scores, fused, out=scores)
            assert scores is not None
            if start:
                scores = torch.cat([best_scores[slot], scores], dim=1)
                ids = torch.cat([best_ids[slot], block_ids.expand(len(scores), -1)], dim=1)
            else:
                ids = block_ids.expand(len(scores), -1)
            best_scores[slot], columns = keep(scores, min(width, scores.shape[1]))
            best_ids[slot] = ids.gather(1, columns)
    scores, ids = torch.cat(best_scores), torch.cat(best_ids)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), ids.gather(1, order), Rounding(**worst)


def _rescore(
    members: Sequence[Member],
    query_rows: np.ndarray,
    candidates: torch.Tensor,
    counts: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Fused scores of each query's first ``counts`` candidates in ``dtype`` (float64: exact), as
    (Q, width) float64; -inf after them.

    Queries are taken in order of their counts, so each step gathers about as many rows as its
    queries need rather than every query as many as the step's largest window."""
    out = torch.full(candidates.shape, -math.inf, dtype=torch.float64, device=device)
    order = np.argsort(-counts.cpu().numpy(), kind="stable")
    start = 0
    while start < len(order):
        width = int(counts[int(order[start])])
        positions = order[start : start + max(1, RESCORE_ROWS // max(1, width))]
        start += len(positions)
        rows = query_rows[positions]
        taken = torch.from_numpy(positions).to(device)
        ids = candidates[taken, :width].cpu().numpy().ravel()
        best = None
        for member in members:
            # Gallery rows as stored (the pass found them finite), scores divided by their norms:
            # a pass fewer over the gathered rows than normalising them.
            gathered = [
                copied_rows(view, ids, device, dtype).view(len(rows), width, -1)
                for view in views(member.gallery)
            ]
            norms = [torch.linalg.vector_norm(g, dim=2).clamp_min_(1e-12) for g in gathered]
            queries = [
                unit_rows(view, rows, device, "query", dtype).mul_(
                    torch.as_tensor(member.scale_rows(number, rows), dtype=dtype, device=device)
                )
                for number, view in enumerate(views(member.queries))
            ]
            pairs = torch.stack(
                [
                    torch.linalg.vecdot(g, q.unsqueeze(1)).div_(norm)  # batched bmm ran 3x slower
                    for g, norm in zip(gathered, norms, strict=True)
                    for q in queries
                ]
            )
            best = member.weight * pairs if best is None else best.add_(pairs, alpha=member.weight)
        assert best is not None
        out[taken, :width] = best.amax(dim=0).to(torch.float64)
    inside = torch.arange(candidates.shape[1], device=device) < counts.unsqueeze(1)
    return out.masked_fill_(~inside, -math.inf)


def _window(scores: torch.Tensor, bound: ErrorBound, k: int) -> torch.Tensor:
    """Per query, how many of its candidates (sorted best first) may be in the true top k."""
    return (scores >= bound.lowest_kept(scores[:, k - 1]).unsqueeze(1)).sum(dim=1)


def _search(
    members: Sequence[Member],
    query_rows: np.ndarray,
    gallery_rows: np.ndarray,
    k: int,
    walk: Walk,
    dtype: torch.dtype,
    climb: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact fused top-k of ``gallery_rows`` for ``query_rows``, and which queries the ``dtype`` pass
    could not certify: searched again in the next precision, or with ``climb=False`` left as they are
    (their rows not final) for the caller to search.

    With approximate scores a ~ s, |a - s| <= delta, the true top-k all have a >= a_k - 2 delta (a_k:
    the approximate k-th; :meth:`jdfashion.precision.ErrorBound.lowest_kept` gives the exact window),
    so re-scoring that window of the candidate list in float64 finds them. It is certain when the list
    reaches below the window (its last score is under it, so every item left out is outside it too);
    otherwise the query is searched in the next precision. A low-precision window is wide (about 90
    to 250 items a query on crowded scores), so it is narrowed by fp32 scores of its items first, the
    same certificate one step up: float64 then re-scores the fp32 window (about 17), where gathering
    every item of the wide one in float64 took most of the search's time.
    """
    width = walk.width(k, len(gallery_rows), dtype)
    with full_precision_matmuls(walk.device):
        approximate, candidates, rounding = _candidates(members, query_rows, gallery_rows, width, walk, dtype)
    counts = _window(approximate.to(torch.float64), error_bound(members, dtype, rounding), k)
    uncertain = (counts == width).cpu().numpy() & (width < len(gallery_rows))
    if dtype in LOW.values():
        closer = _rescore(members, query_rows, candidates, counts, walk.device, torch.float32)
        order = torch.argsort(closer, dim=1, descending=True)  # the -inf past each window stays last
        closer, candidates = closer.gather(1, order), candidates.gather(1, order)
        counts = _window(closer, error_bound(members, torch.float32), k)
    exact = _rescore(members, query_rows, candidates, counts, walk.device, torch.float64)
    # In gallery-row order, rank_rows's lower-column tie rule is the lower-gallery-row rule.
    by_row = torch.argsort(candidates, dim=1)
    exact, candidates = exact.gather(1, by_row), candidates.gather(1, by_row)
    scores, columns = rank_rows(exact, k)
    ids = candidates.gather(1, columns)
    if climb and uncertain.any() and dtype != torch.float64:
        again = _search(members, query_rows[uncertain], gallery_rows, k, walk, NEXT_PRECISION[dtype])
        scores[torch.from_numpy(uncertain)] = torch.from_numpy(again[0]).to(scores)
        ids[torch.from_numpy(uncertain)] = torch.from_numpy(again[1]).to(ids)
    return (
        scores.cpu().numpy().astype(np.float32),
        ids.cpu().numpy().astype(np.int64, copy=False),
        uncertain,
    )


def _search_auto(
    members: Sequence[Member],
    query_rows: np.ndarray,
    gallery_rows: np.ndarray,
    k: int,
    walk: Walk,
    fast: torch.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_search` in the precision that ranks these features fastest.

    A low precision multiplies faster but certifies only queries whose k-th score stands clear of
    the rest by its error bound; on features crowded closer than that bound (near-duplicates) it
    certifies none and every query would be searched again in fp32. So ``fast``
    (the faster by the measured rates) first searches ``PILOT_QUERIES`` queries spread over the list,
    and the rest, with the pilot queries it could not certify, go to the precision
    :func:`jdfashion.precision.auto_dtype` picks given the share it certified."""
    if fast == torch.float32 or len(query_rows) <= 2 * PILOT_QUERIES:
        return _search(members, query_rows, gallery_rows, k, walk, torch.float32)[:2]
    pilot = np.zeros(len(query_rows), dtype=bool)
    pilot[np.linspace(0, len(query_rows) - 1, PILOT_QUERIES).astype(int)] = True
    pilot_scores, pilot_ids, uncertain = _search(
        members, query_rows[pilot], gallery_rows, k, walk, fast, climb=False
    )
    dtype = auto_dtype(walk.device, 1.0 - uncertain.mean())
    rates = product_rates(walk.device, torch.get_num_threads())
    logger.info(
        "precision auto: %s (products %s; the %s pilot certified %d of %d queries)",
        str(dtype).removeprefix("torch."),
        ", ".join(f"{str(t).removeprefix('torch.')} {rate:.0f} GFLOP/s" for t, rate in rates.items()),
        str(fast).removeprefix("torch."),
        int((~uncertain).sum()),
        PILOT_QUERIES,
    )
    final = pilot.copy()  # the pilot queries it left uncertain join the rest's search
    final[np.flatnonzero(pilot)[uncertain]] = False
    scores = np.empty((len(query_rows), k), dtype=np.float32)
    ids = np.empty((len(query_rows), k), dtype=np.int64)
    scores[final], ids[final] = pilot_scores[~uncertain], pilot_ids[~uncertain]
    scores[~final], ids[~final], _ = _search(members, query_rows[~final], gallery_rows, k, walk, dtype)
    return scores, ids


def topk(
    queries: Features,
    gallery: Features,
    k: int,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of one model: :func:`search` with a single member of weight 1."""
    return search([Member(queries, gallery)], k, **options)


def search(
    members: Sequence[Member],
    k: int,
    *,
    chunk_size: int | None = None,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    device: str | torch.device | None = None,
    precision: str = "auto",
    margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact fused top-``k``: (Q, k) float32 scores and (Q, k) int64 gallery indices, best first.

    Each member's ``queries`` is (Q, D) or (V, Q, D), its ``gallery`` (G, D) or (V, G, D): views of each
    image, a pair scored by its best pair of views. ``chunk_size`` (gallery rows per chunk) defaults
    to ``DEFAULT_CHUNK_ELEMENTS`` values over every member and view; ``precision`` and ``margin``
    (candidates kept past k; by default ``DEFAULT_MARGIN`` of each pass's precision) set the
    candidate pass (module docstring), never the result.

    Routing test images to categories is the caller's (:func:`jdfashion.pipeline.submit` searches each
    category's gallery and fills short lists by the router's likelihoods, one policy).
    """
    if not members:
        raise ValueError("a search needs at least one member")
    first = members[0]
    for member in members:
        queries, gallery = member.queries, member.gallery
        if queries.ndim not in (2, 3) or gallery.ndim not in (2, 3) or queries.shape[-1] != gallery.shape[-1]:
            raise ValueError(
                "need (Q, D) or (V, Q, D) queries and (G, D) or (V, G, D) gallery, "
                f"got {tuple(queries.shape)} and {tuple(gallery.shape)}"
            )
        if (len(views(queries)), queries.shape[-2], len(views(gallery)), gallery.shape[-2]) != (
            len(views(first.queries)),
            first.queries.shape[-2],
            len(views(first.gallery)),
            first.gallery.shape[-2],
        ):
            raise ValueError("every member needs the same numbers of queries, gallery items and views")
        if not (math.isfinite(member.weight) and member.weight > 0):
            raise ValueError(f"member weights must be finite and > 0, got {member.weight}")
        scale = member.query_scale
        if scale is not None and (
            scale.shape not in ((queries.shape[-2],), (len(views(queries)), queries.shape[-2]))
            or not bool(torch.isfinite(scale).all() and (scale > 0).all())
        ):
            raise ValueError(
                f"query_scale must be (Q,) or (V, Q) finite numbers > 0 for queries {tuple(queries.shape)}, "
                f"got shape {tuple(scale.shape)}"
            )
    num_queries, gallery_size = first.queries.shape[-2], first.gallery.shape[-2]
    if not 1 <= k <= gallery_size:
        raise ValueError(f"k must be between 1 and the gallery size {gallery_size}, got {k}")
    if chunk_size is None:
        values = sum(m.gallery.shape[-1] * len(views(m.gallery)) for m in members)
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // values)
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError("chunk sizes must be >= 1")
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if device is None:
        device = first.gallery.device if isinstance(first.gallery, torch.Tensor) else "cpu"
    device = torch.device(device)
    dtype = candidate_dtype(precision, device)
    if num_queries == 0:
        return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
    walk = Walk(chunk_size, query_chunk_size, device, margin)
    rows = (members, np.arange(num_queries), np.arange(gallery_size), k, walk, dtype)
    return _search_auto(*rows) if precision == "auto" else _search(*rows)[:2]
