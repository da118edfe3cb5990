"""Re-ranking from top-k lists: agreement with dense references, and gains where neighbours inform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdfashion.features import FeatureSet
from jdfashion.metrics import evaluate
from jdfashion.options import RetrievalOptions
from jdfashion.ranking import ranked_lists
from jdfashion.rerank import database_augmentation, domain_centring, k_reciprocal_rerank, query_expansion
from jdfashion.search import topk


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dense_k_reciprocal(
    queries: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float
) -> np.ndarray:
    """Zhong et al.'s reference re-ranking, dense over the joint set, with d = 1 - cos: (Q, G) distances."""
    features = unit(np.concatenate([queries, gallery]))
    similarity = features @ features.T
    distance = 1 - similarity
    size, num_queries = len(features), len(queries)
    rank = np.argsort(-similarity, axis=1, kind="stable")
    half = int(np.around(k1 / 2))
    weights = np.zeros((size, size))
    for i in range(size):
        forward = rank[i, : k1 + 1]
        reciprocal = forward[np.where(rank[forward, : k1 + 1] == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            candidate_forward = rank[candidate, : half + 1]
            candidate_reciprocal = candidate_forward[
                np.where(rank[candidate_forward, : half + 1] == candidate)[0]
            ]
            if len(np.intersect1d(candidate_reciprocal, reciprocal)) > 2 / 3 * len(candidate_reciprocal):
                expansion = np.append(expansion, candidate_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-distance[i, expansion])
        weights[i, expansion] = weight / weight.sum()
    if k2 != 1:
        weights = np.stack([weights[rank[i, :k2]].mean(axis=0) for i in range(size)])
    jaccard = np.zeros((num_queries, size))
    for i in range(num_queries):
        overlap = np.minimum(weights[i][None, :], weights).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = jaccard * (1 - lambda_value) + distance[:num_queries] * lambda_value
    return final[:, num_queries:]


def clustered(
    seed: int,
    identities: int = 30,
    per_identity: int = 4,
    dim: int = 32,
    gallery_noise: float = 0.8,
    query_noise: float = 1.5,
) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]]]:
    """One query per identity and ``per_identity`` gallery images around the same centre: the
    gallery images of an identity are closer to each other than the query is to any of them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    gallery = np.repeat(centres, per_identity, axis=0) + gallery_noise * rng.normal(
        size=(identities * per_identity, dim)
    )
    queries = centres + query_noise * rng.normal(size=(identities, dim))
    truth = {
        f"q{i}": [f"g{j}" for j in range(i * per_identity, (i + 1) * per_identity)] for i in range(identities)
    }
    return queries.astype(np.float32), gallery.astype(np.float32), truth


def map_at_10(indices: np.ndarray, truth: dict[str, list[str]]) -> float:
    run = {f"q{row}": [f"g{i}" for i in ranked[:10]] for row, ranked in enumerate(indices.tolist())}
    return evaluate(run, truth).overall.map


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(6, 3, 0.3), (20, 6, 0.3), (4, 1, 0.1), (5, 2, 0.6)])
def test_sparse_rerank_equals_the_dense_reference(k1: int, k2: int, lambda_value: float) -> None:
    queries, gallery, _ = clustered(
        seed=0, identities=10, per_identity=5, dim=16, gallery_noise=0.6, query_noise=0.8
    )
    queries = queries[:8]
    reference = dense_k_reciprocal(queries, gallery, k1, k2, lambda_value)
    distances, indices = k_reciprocal_rerank(
        queries, gallery, k1=k1, k2=k2, lambda_value=lambda_value, candidates=len(gallery), chunk_size=7
    )
    np.testing.assert_array_equal(indices, np.argsort(reference, axis=1, kind="stable"))
    np.testing.assert_allclose(distances, np.take_along_axis(reference, indices, axis=1), atol=1e-6)
    # A shortlist re-orders only its own candidates, with the same distances.
    short_distances, short_indices = k_reciprocal_rerank(
        queries, gallery, k1=k1, k2=k2, lambda_value=lambda_value, candidates=15, top=12
    )
    shortlist = topk(queries, gallery, 15)[1]
    for row in range(len(queries)):
        assert set(short_indices[row]) <= set(shortlist[row])
        kept = sorted(shortlist[row], key=lambda i: reference[row, i])[:12]
        assert short_indices[row].tolist() == kept
    np.testing.assert_allclose(
        short_distances, np.take_along_axis(reference, short_indices, axis=1), atol=1e-6
    )


def test_query_expansion_and_augmentation_match_brute_force() -> None:
    queries, gallery, _ = clustered(
        seed=1, identities=8, per_identity=3, dim=12, gallery_noise=0.5, query_noise=1.0
    )
    similarity = unit(queries) @ unit(gallery).T
    self_similarity = unit(gallery) @ unit(gallery).T
    np.fill_diagonal(self_similarity, -np.inf)

    def expand(base: np.ndarray, scores: np.ndarray, top_n: int, alpha: float) -> np.ndarray:
        out = []
        for vector, row in zip(unit(base), scores, strict=True):
            best = np.argsort(-row, kind="stable")[:top_n]
            out.append(
                vector + ((np.clip(row[best], 0, None) ** alpha)[:, None] * unit(gallery)[best]).sum(axis=0)
            )
        return unit(np.array(out))

    expanded = query_expansion(queries, gallery, top_n=3, alpha=2.0, chunk_size=5)
    np.testing.assert_allclose(expanded.numpy(), expand(queries, similarity, 3, 2.0), atol=1e-5)
    augmented = database_augmentation(torch.from_numpy(gallery).half(), top_n=2, alpha=3.0, chunk_size=4)
    assert augmented.dtype == torch.float16
    np.testing.assert_allclose(augmented.float().numpy(), expand(gallery, self_similarity, 2, 3.0), atol=2e-3)


def test_k_reciprocal_rerank_helps_when_gallery_neighbours_are_informative() -> None:
    queries, gallery, truth = clustered(seed=0)
    before = map_at_10(topk(queries, gallery, 10)[1], truth)
    after = map_at_10(k_reciprocal_rerank(queries, gallery, top=10)[1], truth)
    assert after > before + 0.05


def test_query_expansion_helps_when_gallery_neighbours_are_informative() -> None:
    queries, gallery, truth = clustered(seed=0)
    before = map_at_10(topk(queries, gallery, 10)[1], truth)
    after = map_at_10(topk(query_expansion(queries, gallery), gallery, 10)[1], truth)
    assert after > before + 0.03


def test_database_augmentation_helps_when_gallery_neighbours_are_informative() -> None:
    queries, gallery, truth = clustered(seed=0)
    before = map_at_10(topk(queries, gallery, 10)[1], truth)
    after = map_at_10(topk(queries, database_augmentation(gallery), 10)[1], truth)
    assert after > before + 0.05


@pytest.mark.parametrize(
    "call",
    [
        lambda q, g: k_reciprocal_rerank(q, g, k1=0),
        lambda q, g: k_reciprocal_rerank(q, g, lambda_value=1.5),
        lambda q, g: query_expansion(q, g, top_n=0),
        lambda q, g: database_augmentation(g, alpha=-1),
    ],
)
def test_bad_parameters_are_refused(call) -> None:
    queries, gallery, _ = clustered(seed=2, identities=3)
    with pytest.raises(ValueError, match="need"):
        call(queries, gallery)


def test_neighbourhoods_larger_than_the_data_are_clipped_as_in_the_dense_code() -> None:
    queries, gallery, _ = clustered(seed=3, identities=4, per_identity=2, dim=8)
    reference = dense_k_reciprocal(queries[:3], gallery, k1=20, k2=6, lambda_value=0.3)
    distances, indices = k_reciprocal_rerank(queries[:3], gallery, candidates=100, top=10)
    assert indices.shape == (3, 8)
    np.testing.assert_array_equal(indices, np.argsort(reference, axis=1, kind="stable"))
    np.testing.assert_allclose(distances, np.take_along_axis(reference, indices, axis=1), atol=1e-6)


def two_domains(seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]]]:
    """Queries and gallery share item vectors, but each side adds its own large domain offset."""
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((40, 64))
    query_items = rng.integers(0, 40, 200)
    queries = items[query_items] + 1.2 * rng.standard_normal((200, 64)) + 6 * rng.standard_normal(64)
    gallery = items + 6 * rng.standard_normal(64)
    return queries, gallery, {f"q{q}": [f"g{i}"] for q, i in enumerate(query_items)}


def test_domain_centring_removes_each_sides_offset() -> None:
    queries, gallery, truth = two_domains(seed=0)
    before = map_at_10(topk(queries, gallery, 10)[1], truth)
    centred_queries = domain_centring(torch.from_numpy(queries).float(), 1.0)
    centred_gallery = domain_centring(torch.from_numpy(gallery).half(), 1.0)
    assert centred_gallery.dtype == torch.float16
    # The shared direction dominated every query; after full centring it hardly shows.
    shared = torch.nn.functional.normalize(torch.from_numpy(unit(queries).mean(axis=0)).float(), dim=0)
    before_share = (torch.from_numpy(unit(queries)).float() @ shared).mean()
    assert float((centred_queries @ shared).abs().mean()) < 0.3 * float(before_share)
    after = map_at_10(topk(centred_queries, centred_gallery, 10)[1], truth)
    assert after > before + 0.2
    views = torch.stack([torch.from_numpy(queries).float()] * 2)
    assert torch.allclose(domain_centring(views, 0.5)[1], domain_centring(views[0], 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="fraction"):
        domain_centring(views, 1.5)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_ranked_lists_centre_then_augment_the_queries(alpha: float) -> None:
    queries, gallery, _ = two_domains(seed=1)
    ids = [f"q{i}" for i in range(len(queries))], [f"g{i}" for i in range(len(gallery))]
    query_set = FeatureSet(ids[0], torch.from_numpy(queries).float())
    gallery_set = FeatureSet(ids[1], torch.from_numpy(gallery).float())
    options = RetrievalOptions(
        centring=0.5, query_augmentation=3, query_augmentation_alpha=alpha, show_progress=False
    )
    ranked = ranked_lists({"m": query_set}, {"m": gallery_set}, {"m": 1.0}, options)
    expected_queries = database_augmentation(domain_centring(query_set.features, 0.5), top_n=3, alpha=alpha)
    _, indices = topk(expected_queries, domain_centring(gallery_set.features, 0.5), 10)
    assert ranked == {q: [ids[1][i] for i in row] for q, row in zip(ids[0], indices.tolist(), strict=True)}


def test_query_augmentation_alpha_weights_the_added_queries_by_similarity() -> None:
    """alpha 0 adds every neighbour at weight 1; a large alpha leaves a query near itself."""
    queries = torch.nn.functional.normalize(
        torch.randn(40, 16, generator=torch.Generator().manual_seed(0)), dim=1
    )
    plain = database_augmentation(queries, top_n=4, alpha=0.0)
    _, neighbours = topk(queries, queries, 5)
    summed = queries.clone()
    for row, found in enumerate(neighbours):
        summed[row] += queries[[i for i in found if i != row][:4]].sum(dim=0)
    assert torch.allclose(plain, torch.nn.functional.normalize(summed, dim=1), atol=1e-5)
    steep = database_augmentation(queries, top_n=4, alpha=50.0)
    assert float((steep * queries).sum(dim=1).min()) > 0.99 > float((plain * queries).sum(dim=1).max())
    with pytest.raises(ValueError, match="query_augmentation_alpha"):
        RetrievalOptions(query_augmentation=5, query_augmentation_alpha=-1.0)


@pytest.mark.parametrize("reranked", [False, True])
def test_the_search_precision_option_reaches_the_search_and_never_changes_the_lists(
    reranked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RetrievalOptions.search_precision (the demonstration of one-place settings: its field, this
    pass-through and this test) picks the candidate pass; the lists stay a float64 search's."""
    from jdfashion import fusion
    from jdfashion import search as search_module

    queries, gallery, _ = two_domains(seed=2)
    ids = [f"q{i}" for i in range(len(queries))], [f"g{i}" for i in range(len(gallery))]
    sets = {"m": FeatureSet(ids[0], torch.from_numpy(queries).float())}
    gallery_sets = {"m": FeatureSet(ids[1], torch.from_numpy(gallery).float())}
    seen: list[str] = []
    search = search_module.search

    def recorded(*args: object, **options: object) -> object:
        seen.append(options.get("precision", "auto"))  # re-ranking's own neighbour searches: auto
        return search(*args, **options)

    for module in (search_module, fusion):  # topk's search (re-ranking) and fused_topk's
        monkeypatch.setattr(module, "search", recorded)
    lists = {}
    for precision in ("fp32", "bf16"):
        options = RetrievalOptions(search_precision=precision, query_expansion=reranked, show_progress=False)
        seen.clear()
        lists[precision] = ranked_lists(sets, gallery_sets, {"m": 1.0}, options)
        assert seen[-1] == precision  # the ranking's own search
    assert lists["fp32"] == lists["bf16"]
