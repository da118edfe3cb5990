"""Scoring ranked lists: jdfashion.metrics.evaluate against ranx, on the same runs, with agreement checked.

Data: per query a random ranked list of 10 distinct ids from a 154,294-image gallery and a truth
set of 1..15 ids, part of them placed in the list (so APs are neither all 0 nor all 1).

ranx's map@10 divides by |T_q| (trec_eval's AP@k), which is jdfashion's ``ap_norm="truth"``; its
precision@1 is rank-1. ranx needs its own Qrels/Run objects (timed separately) and compiles its
metrics with numba on first use: the first call is timed with an empty numba cache (compilation)
and again in a new process that finds the compiled code in numba's on-disk cache, then warm.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from common import Column, isolated, machine_info, parse_args, write_results

from jdfashion.metrics import average_precision, evaluate, relevance_row

RANX_METRICS = ["map@10", "precision@1"]


@dataclass(frozen=True)
class ScoringSize:
    queries: int
    gallery: int
    k: int
    max_truth: int
    repeats: int


FULL = ScoringSize(queries=1000, gallery=154_294, k=10, max_truth=15, repeats=7)
QUICK = ScoringSize(queries=200, gallery=154_294, k=10, max_truth=15, repeats=3)

Lists = dict[str, list[str]]


def make_data(size: ScoringSize, seed: int = 0) -> tuple[Lists, Lists]:
    """(run, truth): query order and every id fixed by ``seed``, so each process builds the same data."""
    rng = np.random.default_rng(seed)
    run, truth = {}, {}
    for number in range(size.queries):
        query = f"http://img.example.com/q/{number}.jpg"
        ranked = rng.choice(size.gallery, size=size.k, replace=False)
        truth_size = int(rng.integers(1, size.max_truth + 1))
        hits = int(rng.binomial(min(truth_size, size.k), 0.4))
        relevant = set(rng.choice(ranked, size=hits, replace=False).tolist())
        while len(relevant) < truth_size:
            candidate = int(rng.integers(size.gallery))
            if candidate not in ranked:
                relevant.add(candidate)
        run[query] = [f"http://img.example.com/g/{item}.jpg" for item in ranked]
        truth[query] = [f"http://img.example.com/g/{item}.jpg" for item in sorted(relevant)]
    return run, truth


def seconds_of(function: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls, in call order (the first may carry warm-up costs)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def run_jdfashion(size: ScoringSize) -> dict[str, Any]:
    run, truth = make_data(size)
    times = seconds_of(lambda: evaluate(run, truth, k=size.k, ap_norm="truth"), size.repeats)
    scores = evaluate(run, truth, k=size.k, ap_norm="truth")
    return {
        "first": times[0],
        "warm": statistics.median(times[1:]),
        "map": scores.overall.map,
        "rank1": scores.overall.rank1,
    }


def to_ranx(run: Lists, truth: Lists) -> tuple[Any, Any]:
    """Qrels (relevance 1) and a Run whose scores fall with rank, as ranx needs them."""
    from ranx import Qrels, Run

    qrels = Qrels.from_dict({query: dict.fromkeys(items, 1) for query, items in truth.items()})
    ranked = Run.from_dict(
        {
            query: {item: float(len(items) - rank) for rank, item in enumerate(items)}
            for query, items in run.items()
        }
    )
    return qrels, ranked


def run_ranx(size: ScoringSize) -> dict[str, Any]:
    from ranx import evaluate as ranx_evaluate  # here, so numba and llvmlite stay out of the jdfashion RSS

    # ranx's own cast of qrels ids; it changes no value, so it stays out of the report.
    warnings.filterwarnings("ignore", message="unsafe cast", module="ranx")

    run, truth = make_data(size)
    conversions = seconds_of(lambda: to_ranx(run, truth), size.repeats)
    qrels, ranked = to_ranx(run, truth)
    first = seconds_of(lambda: ranx_evaluate(qrels, ranked, RANX_METRICS), 1)[0]
    warm = seconds_of(lambda: ranx_evaluate(qrels, ranked, RANX_METRICS), size.repeats)
    means = ranx_evaluate(qrels, ranked, RANX_METRICS)
    per_query = {query: float(ranked.scores["map@10"][query]) for query in run}
    return {
        "conversion": statistics.median(conversions),
        "first": first,
        "warm": statistics.median(warm),
        "map": float(means["map@10"]),
        "rank1": float(means["precision@1"]),
        "per_query_map": per_query,
    }


def agreement(size: ScoringSize, ranx_per_query: dict[str, float]) -> dict[str, float]:
    """Largest per-query AP gaps between jdfashion's core and ranx, per divisor where they should meet."""
    run, truth = make_data(size)
    relevant = np.stack([relevance_row(q, run[q], set(items), size.k) for q, items in truth.items()])
    sizes = np.array([len(set(items)) for items in truth.values()])
    reference = np.array([ranx_per_query[q] for q in truth])
    by_truth = average_precision(relevant, sizes, ap_norm="truth")
    by_min = average_precision(relevant, sizes, ap_norm="min")
    small = sizes <= size.k
    return {
        "truth_max_abs_diff": float(np.abs(by_truth - reference).max()),
        "min_max_abs_diff_small_truth": float(np.abs(by_min - reference)[small].max()),
        "min_mean_minus_ranx": float(by_min.mean() - reference.mean()),
        "queries_with_truth_over_k": int((~small).sum()),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    size = QUICK if args.quick else FULL
    machine = machine_info()
    mine, mine_rss = isolated(run_jdfashion, size)
    with tempfile.TemporaryDirectory(prefix="jdfashion-bench-numba-") as numba_cache:
        # The first child compiles into the empty cache; the second finds it filled, as a later process would.
        compiled, compiled_rss = isolated(run_ranx, size, env={"NUMBA_CACHE_DIR": numba_cache})
        cached, cached_rss = isolated(run_ranx, size, env={"NUMBA_CACHE_DIR": numba_cache})
    checks = agreement(size, cached["per_query_map"])
    reference = mine["warm"]
    rows = [
        ("jdfashion.metrics.evaluate (warm, median)", mine["warm"], mine_rss, "lists in, Scores out"),
        ("jdfashion.metrics.evaluate (first call)", mine["first"], mine_rss, ""),
        ("ranx conversion: dicts -> Qrels + Run (median)", cached["conversion"], cached_rss, ""),
        ("ranx.evaluate (warm, median)", cached["warm"], cached_rss, "map@10 + precision@1"),
        (
            "ranx conversion + warm evaluate",
            cached["conversion"] + cached["warm"],
            cached_rss,
            "what a warm process pays per scoring",
        ),
        ("ranx.evaluate, first call, numba on-disk cache", cached["first"], cached_rss, "new process"),
        ("ranx.evaluate, first call, empty numba cache", compiled["first"], compiled_rss, "JIT compilation"),
    ]
    table_rows = [
        {
            "variant": label,
            "ms": seconds * 1e3,
            "vs_jdfashion": seconds / reference,
            "peak_rss_mib": rss,
            "note": note,
        }
        for label, seconds, rss, note in rows
    ]
    columns = [
        Column("variant", "variant"),
        Column("ms", "ms", ".2f"),
        Column("vs_jdfashion", "time / jdfashion warm", ".1f"),
        Column("peak_rss_mib", "process peak RSS MiB", ",.0f"),
        Column("note", "note"),
    ]
    map_agrees = abs(mine["map"] - cached["map"]) < 1e-12 and checks["truth_max_abs_diff"] < 1e-12
    rank1_agrees = abs(mine["rank1"] - cached["rank1"]) < 1e-12
    notes = [
        f"Agreement: jdfashion ap_norm='truth' mAP@10 {mine['map']:.6f} vs ranx map@10 {cached['map']:.6f} "
        f"(largest per-query difference {checks['truth_max_abs_diff']:.1e}): "
        f"{'agree' if map_agrees else 'DISAGREE'}; rank-1 {mine['rank1']:.4f} vs precision@1 "
        f"{cached['rank1']:.4f}: {'agree' if rank1_agrees else 'DISAGREE'}.",
        f"jdfashion's default ap_norm='min' divides by min(|T_q|, 10): it equals ranx on the queries with "
        f"|T_q| <= 10 (largest difference {checks['min_max_abs_diff_small_truth']:.1e}) and is higher on the "
        f"{checks['queries_with_truth_over_k']} queries with |T_q| > 10 "
        f"(mean AP {checks['min_mean_minus_ranx']:+.4f}).",
        f"{size.queries} queries, lists of {size.k} from a {size.gallery:,}-id gallery, |T_q| uniform in "
        f"1..{size.max_truth}; warm figures are medians of {size.repeats} calls "
        f"(jdfashion: of calls 2..{size.repeats}).",
        "Each row's peak RSS is its whole process's (interpreter, numpy, rich; ranx adds numba, llvmlite).",
    ]
    write_results(
        "scoring",
        "Scoring ranked lists: jdfashion.metrics vs ranx",
        columns,
        table_rows,
        quick=args.quick,
        machine=machine,
        parameters=asdict(size),
        notes=notes,
        details={
            "jdfashion": mine,
            "ranx": {key: value for key, value in cached.items() if key != "per_query_map"},
            "ranx_empty_cache": {key: value for key, value in compiled.items() if key != "per_query_map"},
            "agreement": {**checks, "map_agrees": map_agrees, "rank1_agrees": rank1_agrees},
        },
    )


if __name__ == "__main__":
    main()
