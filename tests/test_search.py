"""Exact chunked cosine top-k: brute-force agreement, tie-breaking, routing groups, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jdfashion import blocks
from jdfashion import precision as precision_module
from jdfashion import search as search_module
from jdfashion.fusion import fuse, fused_topk
from jdfashion.precision import candidate_dtype
from jdfashion.search import Member, search, topk


def half_sign_vectors(rng: np.random.Generator, count: int, dim: int = 16) -> np.ndarray:
    """Unit vectors with four +-0.5 entries: every dot product is a multiple of 1/4, exact in fp16/fp32
    whatever the summation order, so equal scores are truly equal and ties are everywhere."""
    vectors = np.zeros((count, dim), dtype=np.float32)
    for row in vectors:
        row[rng.choice(dim, size=4, replace=False)] = rng.choice([-0.5, 0.5], size=4)
    return vectors


def brute_force(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full float64 score matrix; best first, equal scores by the lower gallery index."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.array([np.lexsort((np.arange(len(g)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1000])
@pytest.mark.parametrize("query_chunk_size", [1, 4, 100])
def test_exact_ties_go_to_the_lower_index_whatever_the_chunking(
    chunk_size: int, query_chunk_size: int
) -> None:
    rng = np.random.default_rng(0)
    queries, gallery = half_sign_vectors(rng, 9), half_sign_vectors(rng, 150)
    expected_scores, expected_indices = brute_force(queries, gallery, 10)
    scores, indices = topk(queries, gallery, 10, chunk_size=chunk_size, query_chunk_size=query_chunk_size)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(scores, expected_scores.astype(np.float32))


@pytest.mark.parametrize("kind", ["numpy16", "numpy32", "torch16", "torch32"])
def test_input_kinds_give_the_same_ranking(kind: str) -> None:
    rng = np.random.default_rng(1)
    queries, gallery = half_sign_vectors(rng, 6), half_sign_vectors(rng, 90)
    dtype = np.float16 if kind.endswith("16") else np.float32
    q, g = queries.astype(dtype), gallery.astype(dtype)
    if kind.startswith("torch"):
        q, g = torch.from_numpy(q), torch.from_numpy(g)
    _, expected = brute_force(queries, gallery, 7)
    np.testing.assert_array_equal(topk(q, g, 7, chunk_size=16)[1], expected)


def test_random_features_match_float64_and_scale_does_not_matter() -> None:
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    gallery = rng.normal(size=(500, 32)).astype(np.float32)
    expected_scores, _ = brute_force(queries, gallery, 10)
    scaled = gallery * rng.uniform(0.1, 10, size=(500, 1)).astype(np.float32)
    scores, indices = topk(queries, scaled, 10, chunk_size=37, query_chunk_size=6)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    exact = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(np.take_along_axis(exact, indices, axis=1), scores, atol=1e-5)


def test_memory_mapped_fp16_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    queries, gallery = half_sign_vectors(rng, 5), half_sign_vectors(rng, 120)
    path = tmp_path / "gallery.npy"
    np.save(path, gallery.astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(
        topk(queries, mapped, 10, chunk_size=25)[1], brute_force(queries, gallery, 10)[1]
    )


def test_no_queries_give_empty_results() -> None:
    scores, indices = topk(np.zeros((0, 4), np.float32), np.eye(4, dtype=np.float32), 2)
    assert scores.shape == indices.shape == (0, 2)


@pytest.mark.parametrize(
    ("queries", "gallery", "k", "options", "message"),
    [
        (
            np.ones((2, 3)),
            np.ones((5, 4)),
            2,
            {},
            r"need \(Q, D\) or \(V, Q, D\) queries and \(G, D\) or \(V, G, D\) gallery",
        ),
        (np.ones((2, 3)), np.ones((5, 3)), 6, {}, "k must be between 1 and the gallery size 5"),
        (np.ones((2, 3)), np.ones((5, 3)), 0, {}, "k must be between 1"),
        (np.ones((2, 3)), np.ones((5, 3)), 2, {"chunk_size": 0}, "chunk sizes must be >= 1"),
    ],
)
def test_bad_arguments(queries, gallery, k, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        topk(queries, gallery, k, **options)


def test_a_non_finite_row_is_named() -> None:
    gallery = np.ones((30, 4), dtype=np.float32)
    gallery[17, 2] = np.nan
    with pytest.raises(ValueError, match="gallery features: row 17 is not finite"):
        topk(np.ones((2, 4), np.float32), gallery, 3, chunk_size=8)


def fused_brute_force(members: list[Member], k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 sum_m w_m cos_m, best pair of views; best first, equal scores by the lower index."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def stack(x: np.ndarray) -> np.ndarray:
        return unit(x)[None] if np.ndim(x) == 2 else unit(x)

    total = sum(m.weight * np.einsum("uqd,vgd->uvqg", stack(m.queries), stack(m.gallery)) for m in members)
    scores = total.max(axis=(0, 1))
    order = np.array([np.lexsort((np.arange(scores.shape[1]), -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, axis=1), order


def near_tie_members(rng: np.random.Generator, spread: float, queries: int = 7) -> list[Member]:
    """Three models whose gallery items all sit within ``spread`` of one direction: every query's
    fused scores differ by far less than bf16 or fp16 can resolve."""
    members = []
    for dim, weight in ((24, 0.5), (40, 0.3), (16, 0.2)):
        direction = rng.normal(size=dim)
        gallery = direction + spread * rng.normal(size=(300, dim))
        rows = direction + 0.5 * rng.normal(size=(queries, dim))
        members.append(Member(rows.astype(np.float32), gallery.astype(np.float32), weight))
    return members


@pytest.mark.parametrize(("chunk_size", "query_chunk_size"), [(1, 1), (7, 3), (64, 100), (None, 1024)])
@pytest.mark.parametrize("shape", ["plain", "query views", "gallery views"])
def test_fused_search_is_the_float64_weighted_sum(chunk_size, query_chunk_size, shape: str) -> None:
    rng = np.random.default_rng(5)
    members = []
    for dim, weight in ((12, 0.6), (20, 0.3), (8, 0.1)):
        queries = rng.normal(size=(3, 11, dim) if shape == "query views" else (11, dim))
        gallery = rng.normal(size=(2, 90, dim) if shape == "gallery views" else (90, dim))
        members.append(Member(queries.astype(np.float32), torch.from_numpy(gallery).half(), weight))
    expected_scores, expected = fused_brute_force(members, 10)
    scores, indices = search(members, 10, chunk_size=chunk_size, query_chunk_size=query_chunk_size)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("margin", [0, 5])
def test_candidates_in_low_precision_still_give_the_float64_top_k_on_near_ties(
    precision: str, margin: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = near_tie_members(np.random.default_rng(6), spread=1e-4)
    passes: list[torch.dtype] = []
    candidates = search_module._candidates

    def recorded(*args, **kwargs):
        passes.append(args[-1])
        return candidates(*args, **kwargs)

    monkeypatch.setattr(search_module, "_candidates", recorded)
    _, expected = fused_brute_force(members, 10)
    _, indices = search(members, 10, chunk_size=32, precision=precision, margin=margin)
    np.testing.assert_array_equal(indices, expected)
    # Scores this close cannot be certified from a low-precision pass: the ladder went up to float64.
    assert passes[0] == precision_module.candidate_dtype(precision, torch.device("cpu"))
    assert passes[-1] == torch.float64


def test_well_separated_scores_are_certified_by_the_first_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    gallery = rng.normal(size=(400, 64)).astype(np.float32)
    queries = gallery[:20] + 0.05 * rng.normal(size=(20, 64)).astype(np.float32)
    passes = []
    candidates = search_module._candidates
    monkeypatch.setattr(search_module, "_candidates", lambda *a: passes.append(a[-1]) or candidates(*a))
    _, indices = search([Member(queries, gallery)], 1, precision="bf16", margin=30)
    assert indices[:, 0].tolist() == list(range(20))
    assert passes == [torch.bfloat16]


def test_bf16_certifies_crowded_scores_from_its_rows_measured_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search benchmark's crowd at a small size: 4096-d random unit features whose unrelated
    cosines spread by 1/64, two models. The a-priori bf16 bound (u of every row) leaves more items
    in a query's window than the default list keeps; the rows' measured rounding certifies every
    query in the one bf16 pass, fp32 scores narrow each window before float64 re-scores it, and the
    top-k is the float64 one."""
    rng = np.random.default_rng(10)
    latent = rng.normal(size=(3000, 4096))
    members = []
    for weight in (0.6, 0.4):
        gallery = latent + 0.5 * rng.normal(size=latent.shape)
        queries = latent[:40] + 1.5 * rng.normal(size=(40, 4096))
        members.append(Member(queries.astype(np.float16), gallery.astype(np.float16), weight))
    passes, rescored = [], []
    candidates, rescore = search_module._candidates, search_module._rescore
    monkeypatch.setattr(search_module, "_candidates", lambda *a: passes.append(a[-1]) or candidates(*a))
    monkeypatch.setattr(
        search_module, "_rescore", lambda *a: rescored.append((a[-1], int(a[3].sum()))) or rescore(*a)
    )
    _, indices = search(members, 10, precision="bf16")
    np.testing.assert_array_equal(indices, fused_brute_force(members, 10)[1])
    assert passes == [torch.bfloat16]
    (first, window), (last, narrowed) = rescored
    assert (first, last) == (torch.float32, torch.float64)
    assert 10 * 40 <= narrowed < window / 2
    approximate, _, rounding = candidates(
        members,
        np.arange(40),
        np.arange(3000),
        266,
        search_module.Walk(1024, 1024, torch.device("cpu"), None),
        torch.bfloat16,
    )
    a_priori = search_module._window(
        approximate.double(), precision_module.error_bound(members, torch.bfloat16), 10
    )
    measured = search_module._window(
        approximate.double(), precision_module.error_bound(members, torch.bfloat16, rounding), 10
    )
    assert int(measured.sum()) == window
    assert bool((a_priori > search_module.DEFAULT_MARGIN[torch.float32] + 10).any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_error_bound_bounds_every_pair(dtype: torch.dtype) -> None:
    """Both the bound from the rows' measured rounding and the a-priori one hold for every pair, the
    measured one tighter where the pass rounds (bf16 about half: 0.0047 against 0.0093 of a unit
    weight on the search benchmark's features)."""
    rng = np.random.default_rng(8)
    members = [
        Member(torch.from_numpy(rng.normal(size=(40, dim))).half(), rng.normal(size=(500, dim)), weight)
        for dim, weight in ((256, 0.7), (128, 0.3))
    ]
    cpu = torch.device("cpu")
    approximate, rows, rounding = search_module._candidates(
        members, np.arange(40), np.arange(500), 500, search_module.Walk(128, 16, cpu, 0), dtype
    )
    exact = search_module._rescore(members, np.arange(40), rows, torch.full((40,), 500), cpu, torch.float64)
    approximate = approximate.double()
    error = (approximate - exact).abs()
    measured, a_priori = (
        precision_module.error_bound(members, dtype, rounding),
        precision_module.error_bound(members, dtype),
    )
    assert error.max() > 0
    for bound in (measured, a_priori):
        assert bool((error <= bound.absolute + bound.relative * approximate.abs()).all())
    if dtype == torch.float32:  # fp32 rows are the pass's own: nothing rounded
        assert rounding == precision_module.Rounding(query=0.0, gallery=0.0)
    else:
        assert 0 < rounding.query < precision_module.UNIT_ROUNDOFF[dtype]
        assert measured.absolute < 0.7 * a_priori.absolute
    assert measured.absolute < {torch.bfloat16: 0.01, torch.float16: 0.002, torch.float32: 1e-4}[dtype]


def test_the_window_keeps_every_pair_the_bound_allows_into_the_top_k() -> None:
    """lowest_kept inverts the bound: a pair just above it can still beat the lowest possible k-th
    exact score, one just below cannot, for k-th scores of either sign."""
    bound = precision_module.ErrorBound(absolute=0.01, relative=0.004)
    kth = torch.tensor([0.3, 0.015, -0.2], dtype=torch.float64)
    kept = bound.lowest_kept(kth)
    lowest_kth = kth - bound.absolute - bound.relative * kth.abs()

    def highest(approximate: torch.Tensor) -> torch.Tensor:
        return approximate + bound.absolute + bound.relative * approximate.abs()

    torch.testing.assert_close(highest(kept), lowest_kth)
    assert bool((highest(kept - 1e-9) < lowest_kth).all())
    assert bool((kept < kth).all())


@pytest.mark.parametrize(
    ("rates", "certified_share", "expected"),
    [
        ({torch.float32: 200.0, torch.bfloat16: 800.0}, 1.0, torch.bfloat16),  # AMD EPYC, AVX512-BF16
        ({torch.float32: 200.0, torch.bfloat16: 800.0}, 0.6, torch.bfloat16),  # 0.25 + 0.4 re-searched
        ({torch.float32: 200.0, torch.bfloat16: 800.0}, 0.4, torch.float32),  # 0.25 + 0.6 > 0.8
        ({torch.float32: 200.0, torch.bfloat16: 800.0}, 0.0, torch.float32),  # nothing certified
        ({torch.float32: 165.0, torch.bfloat16: 48.0}, 1.0, torch.float32),  # Intel Xeon, no bf16 units
        ({torch.float32: 19_000.0, torch.float16: 60_000.0}, 1.0, torch.float16),  # a GPU
    ],
)
def test_auto_takes_the_search_the_measured_rates_make_faster(
    rates: dict[torch.dtype, float], certified_share: float, expected: torch.dtype
) -> None:
    assert precision_module.choose_precision(rates, certified_share) == expected


def test_auto_measures_the_product_rates_once_per_device_and_thread_count() -> None:
    rates = precision_module.product_rates(torch.device("cpu"), torch.get_num_threads())
    assert set(rates) == {torch.float32, torch.bfloat16}
    assert all(rate > 0 for rate in rates.values())
    assert precision_module.product_rates(torch.device("cpu"), torch.get_num_threads()) is rates
    assert candidate_dtype("auto", torch.device("cpu")) == precision_module.choose_precision(rates)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        candidate_dtype("int8", torch.device("cpu"))


@pytest.mark.parametrize("separated", [True, False])
def test_auto_pilots_the_low_precision_and_keeps_it_only_where_it_certifies(
    separated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With bf16 reported 4x faster, 64 pilot queries go through bf16; the other 136 follow in bf16
    where the pilot certified them all (well separated scores) and in fp32 where it certified none
    (near ties, which the ladder then settles in float64). Either way the float64 top-k."""
    rng = np.random.default_rng(9)
    if separated:
        gallery = rng.normal(size=(400, 64)).astype(np.float32)
        members = [Member(gallery[:200] + 0.05 * rng.normal(size=(200, 64)).astype(np.float32), gallery)]
    else:
        members = near_tie_members(rng, spread=1e-4, queries=200)
    monkeypatch.setattr(
        precision_module, "product_rates", lambda *_: {torch.float32: 200.0, torch.bfloat16: 800.0}
    )
    passes: list[tuple[torch.dtype, int]] = []
    candidates = search_module._candidates
    monkeypatch.setattr(
        search_module, "_candidates", lambda *a: passes.append((a[-1], len(a[1]))) or candidates(*a)
    )
    _, indices = search(members, 10, precision="auto")
    np.testing.assert_array_equal(indices, fused_brute_force(members, 10)[1])
    assert passes[0] == (torch.bfloat16, search_module.PILOT_QUERIES)
    # The pilot queries it could not certify join the other 136 rather than cost a pass of their own.
    expected = (torch.bfloat16, 200 - search_module.PILOT_QUERIES) if separated else (torch.float32, 200)
    assert passes[1] == expected


def test_row_numbers_in_any_order_are_read_in_that_order() -> None:
    """A permutation of a contiguous range is not a slice: candidate ids come in score order."""
    features = np.eye(4, dtype=np.float32) * np.arange(1, 5, dtype=np.float32)[:, None]
    rows = search_module.unit_rows(features, np.array([0, 2, 1, 3]), torch.device("cpu"), "gallery")
    np.testing.assert_array_equal(rows.numpy(), np.eye(4, dtype=np.float32)[[0, 2, 1, 3]])


def test_fused_topk_ranks_like_a_search_over_the_concatenation() -> None:
    rng = np.random.default_rng(9)
    queries = {m: rng.normal(size=(15, 32)).astype(np.float32) for m in ("a", "b", "c")}
    gallery = {m: rng.normal(size=(200, 32)).astype(np.float32) for m in ("a", "b", "c")}
    weights = {"a": 0.5, "b": 0.5, "c": 0.0}
    scores, indices = fused_topk(queries, gallery, weights, 10)
    concatenated_scores, concatenated = topk(fuse(queries, weights), fuse(gallery, weights), 10)
    np.testing.assert_array_equal(indices, concatenated)
    np.testing.assert_allclose(scores, concatenated_scores, atol=1e-5)
    with pytest.raises(ValueError, match=r"no features for model\(s\) d"):
        fused_topk(queries, gallery, {"a": 1.0, "d": 1.0}, 10)


def test_cuda_searches_switch_off_tf32_and_reduced_precision_sums_then_restore_them() -> None:
    """The error bound assumes fp32 sums; the flags are process-wide, so they must come back."""
    matmul = torch.backends.cuda.matmul
    names = precision_module.CUDA_MATMUL_SHORTCUTS
    assert "allow_tf32" in names and all(hasattr(matmul, name) for name in names)
    saved = {name: getattr(matmul, name) for name in names}
    try:
        for name in names:
            setattr(matmul, name, True)
        with (
            pytest.raises(RuntimeError, match="inside"),
            precision_module.full_precision_matmuls(torch.device("cuda")),
        ):
            assert not any(getattr(matmul, name) for name in names)
            raise RuntimeError("inside")
        assert all(getattr(matmul, name) for name in names)
        with precision_module.full_precision_matmuls(torch.device("cpu")):
            assert all(getattr(matmul, name) for name in names)
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_map_rows_covers_every_row_of_every_view_block_by_block(dtype: type) -> None:
    """Across a block boundary and two views: each output row is the transform of its own row, in
    the input's half or full precision, and no block is ever larger than BLOCK_ROWS."""
    count = blocks.BLOCK_ROWS + 5
    features = np.random.default_rng(0).standard_normal((2, count, 3)).astype(dtype)
    seen = []

    def doubled(view: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        seen.append(len(rows))
        return torch.from_numpy(view[rows].astype(np.float32) * 2)

    out = blocks.map_rows(features, doubled)
    assert out.dtype == (torch.float16 if dtype == np.float16 else torch.float32)
    assert seen == [blocks.BLOCK_ROWS, 5] * 2
    assert torch.equal(out, torch.from_numpy(features.astype(np.float32) * 2).to(out.dtype))
