"""The metric: AP@10 against ranx (trec_eval's definition), the three divisors, and bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ranx
from rich.console import Console

from jdfashion.metrics import average_precision, evaluate, rank1, scores_table, truth_matrix

GALLERY = [f"g{index:03d}" for index in range(80)]


def random_case(
    seed: int, num_queries: int, max_truth: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Runs of 10 distinct ids drawn half from the truth, half at random; some queries miss entirely."""
    rng = np.random.default_rng(seed)
    truth, run = {}, {}
    for index in range(num_queries):
        query = f"q{index:02d}"
        truth[query] = list(rng.choice(GALLERY, size=rng.integers(1, max_truth + 1), replace=False))
        pool = truth[query][: rng.integers(0, 6)] + list(rng.choice(GALLERY, size=20, replace=False))
        ranked = list(dict.fromkeys(pool))[:10]
        rng.shuffle(ranked)
        run[query] = ranked
    return truth, run


def ranx_scores(truth: dict[str, list[str]], run: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    qrels = ranx.Qrels({query: dict.fromkeys(items, 1) for query, items in truth.items()})
    # Strictly decreasing scores make ranx's order the list order.
    ranx_run = ranx.Run(
        {query: {doc: 10.0 - rank for rank, doc in enumerate(ranked)} for query, ranked in run.items()}
    )
    ranx.evaluate(qrels, ranx_run, ["map@10", "precision@1"])
    return {metric: dict(scores) for metric, scores in ranx_run.scores.items()}


def per_query_ap(truth: dict[str, list[str]], run: dict[str, list[str]], ap_norm: str) -> dict[str, float]:
    return {
        query: evaluate({query: run[query]}, {query: truth[query]}, ap_norm=ap_norm).overall.map
        for query in truth
    }


def test_truth_divisor_and_rank1_match_ranx_with_large_truth_sets_and_misses() -> None:
    truth, run = random_case(seed=1, num_queries=40, max_truth=15)
    assert any(len(items) > 10 for items in truth.values())
    assert any(not set(run[q]) & set(truth[q]) for q in truth)
    reference = ranx_scores(truth, run)
    ours = per_query_ap(truth, run, "truth")
    for query in truth:
        assert ours[query] == pytest.approx(reference["map@10"][query], abs=1e-12)
    scores = evaluate(run, truth, ap_norm="truth")
    assert scores.overall.map == pytest.approx(np.mean(list(reference["map@10"].values())), abs=1e-12)
    assert scores.overall.rank1 == pytest.approx(np.mean(list(reference["precision@1"].values())), abs=1e-12)
    assert scores.overall.num_queries == 40


def test_default_divisor_matches_ranx_when_truth_sets_are_small() -> None:
    truth, run = random_case(seed=2, num_queries=40, max_truth=10)
    reference = ranx_scores(truth, run)
    assert evaluate(run, truth).overall.map == pytest.approx(
        np.mean(list(reference["map@10"].values())), abs=1e-12
    )


def test_default_divisor_caps_at_ten_where_ranx_does_not() -> None:
    truth = {"q": [f"g{index:03d}" for index in range(15)]}
    run = {"q": truth["q"][:10]}
    assert evaluate(run, truth).overall.map == pytest.approx(1.0)
    assert evaluate(run, truth, ap_norm="truth").overall.map == pytest.approx(10 / 15)
    assert ranx_scores(truth, run)["map@10"]["q"] == pytest.approx(10 / 15)


def test_the_three_divisors_on_a_hand_computed_list() -> None:
    truth = {"q": ["a", "b", "c", "d", "e"]}
    run = {"q": ["a", "x", "b", "y"]}
    precision_sum = 1 / 1 + 2 / 3
    assert evaluate(run, truth, ap_norm="min").overall.map == pytest.approx(precision_sum / 5)
    assert evaluate(run, truth, ap_norm="truth").overall.map == pytest.approx(precision_sum / 5)
    assert evaluate(run, truth, ap_norm="hits").overall.map == pytest.approx(precision_sum / 2)
    no_hit = evaluate({"q": ["x", "y"]}, truth, ap_norm="hits")
    assert no_hit.overall.map == 0.0
    assert no_hit.overall.rank1 == 0.0


def test_only_the_first_k_ranks_count() -> None:
    truth = {"q": ["late"]}
    run = {"q": [f"n{index}" for index in range(10)] + ["late"]}
    assert evaluate(run, truth).overall.map == 0.0
    assert evaluate(run, truth, k=11).overall.map == pytest.approx(1 / 11)


def test_missing_queries_score_zero_and_extra_queries_are_ignored() -> None:
    truth = {"a": ["g1"], "b": ["g2"]}
    run = {"a": ["g5", "g1"], "stray": ["g2"]}
    scores = evaluate(run, truth)
    assert scores.missing_queries == ("b",)
    assert scores.ignored_queries == ("stray",)
    assert scores.overall.num_queries == 2
    assert scores.overall.map == pytest.approx((1 / 2) / 2)
    assert scores.overall.rank1 == 0.0


def test_per_category_rows_equal_scoring_each_category_alone() -> None:
    truth, run = random_case(seed=3, num_queries=30, max_truth=12)
    categories = {query: ("bags", "clothes", "shoes")[index % 3] for index, query in enumerate(truth)}
    scores = evaluate(run, truth, categories=categories)
    assert list(scores.per_category) == ["bags", "clothes", "shoes"]
    for label, group in scores.per_category.items():
        subset = {query: items for query, items in truth.items() if categories[query] == label}
        alone = evaluate(run, subset).overall
        assert group.num_queries == alone.num_queries == 10
        assert group.map == pytest.approx(alone.map)
        assert group.rank1 == pytest.approx(alone.rank1)
    assert scores.overall.map == pytest.approx(np.mean([g.map for g in scores.per_category.values()]))


def test_batch_form_scores_each_stacked_run_like_evaluate() -> None:
    rng = np.random.default_rng(4)
    flags = rng.random((3, 25, 10)) < 0.3
    sizes = np.maximum(rng.integers(1, 14, size=25), flags.sum(axis=2).max(axis=0))
    batch_ap = average_precision(flags, sizes)
    batch_rank1 = rank1(flags)
    for b in range(3):
        truth = {f"q{i}": [f"rel{j}" for j in range(sizes[i])] for i in range(25)}
        hits = np.cumsum(flags[b], axis=1) - 1
        run = {
            f"q{i}": [f"rel{hits[i, r]}" if flags[b, i, r] else f"non{r}" for r in range(10)]
            for i in range(25)
        }
        scores = evaluate(run, truth)
        assert scores.overall.map == pytest.approx(batch_ap[b].mean())
        assert scores.overall.rank1 == pytest.approx(batch_rank1[b].mean())


def test_truth_matrix_counts_relevant_items_outside_the_gallery() -> None:
    relevant, sizes = truth_matrix(["q1", "q2"], ["a", "b", "c"], {"q1": ["b", "zz"], "q2": ["a", "c"]})
    assert relevant.tolist() == [[False, True, False], [True, False, True]]
    assert sizes.tolist() == [2, 2]


@pytest.mark.parametrize(
    ("run", "truth", "options", "message"),
    [
        ({"q": ["a", "b", "a"]}, {"q": ["a"]}, {}, "query q: ranked list repeats a"),
        ({"q": ["a"]}, {"q": []}, {}, "query q: empty ground-truth set"),
        ({"q": ["a"]}, {"q": ["a"]}, {"ap_norm": "mean"}, "ap_norm must be one of"),
        (
            {"q": ["a"]},
            {"q": ["a"], "r": ["b"]},
            {"categories": {"q": "bags"}},
            "1 queries have no category, e.g. r",
        ),
        ({"q": ["a"]}, {"q": ["a"]}, {"k": 0}, "k must be >= 1"),
    ],
)
def test_bad_input_is_named(run, truth, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(run, truth, **options)


def test_json_and_table_report_the_same_numbers() -> None:
    truth = {"a": ["g1"], "b": ["g2", "g3"], "c": ["g4"]}
    run = {"a": ["g1"], "b": ["g9", "g3"], "extra": ["g1"]}
    scores = evaluate(run, truth, categories={"a": "bags", "b": "bags", "c": "shoes"})
    document = json.loads(json.dumps(scores.to_dict()))
    # a: AP 1; b: one hit at rank 2 of |T| = 2 -> (1/2) / 2; c: missing -> 0.
    assert document["all"] == {
        "rank1": pytest.approx(1 / 3),
        "map": pytest.approx(1.25 / 3),
        "num_queries": 3,
    }
    assert document["categories"]["shoes"]["map"] == 0.0
    assert document["missing_queries"] == ["c"]
    assert document["ignored_queries"] == ["extra"]
    console = Console(record=True, width=120)
    console.print(scores_table(scores, title="demo"))
    text = console.export_text()
    assert "0.6250" in text  # bags: (1 + 0.25) / 2
    assert "33.33%" in text
    assert "1 truth queries missing" in text
