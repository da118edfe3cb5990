"""Fused top-10 search at the JD test scale: jdfashion against faiss, numpy and an fp64 reference.

1000 queries x 154,294 gallery images, four models x 4096-d fp16 features (as the feature cache
stores them), fused with unequal weights. Variants, each in a fresh process:

* jdfashion: ``fusion.fused_topk``, scores fused inside the chunked search, candidates in the
  precision ``auto`` picks on this machine, certified and re-scored in float64 (the default path);
* jdfashion, bf16 candidates: the same with ``precision="bf16"`` forced (fast only on CPUs with
  AVX512-BF16 or AMX);
* jdfashion before: ``fusion.fuse`` (a fused fp16 copy of the gallery) then ``search.topk``, the
  path this replaced (now also certified, so its cost is the copy plus the search);
* numpy: per model the full (Q, G) fp32 score matrix, their weighted sum, a full stable argsort;
* faiss: ``IndexFlatIP`` per model, top-``faiss_k`` per model, then the per-model lists fused;
* jdfashion with rotation TTA: ``TTA_VIEWS`` query views (noisy copies of each query), a pair scored
  by its best view: the cost of each extra angle is (its time - jdfashion's) / (views - 1).

Recall is measured against an exact float64 fusion computed here by numpy (not by jdfashion's code).
Every variant does the same 2*Q*G*D*M multiply-adds (faiss too: a flat index is exhaustive), so
GFLOP/s is comparable and is set against this machine's torch fp32 and bf16 matmul rates.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import MIB, Column, isolated, machine_info, parse_args, write_results

from jdfashion import search as search_module
from jdfashion.fusion import fuse, fused_topk
from jdfashion.precision import RATE_PROBE_DIM, RATE_PROBE_ROWS, error_bound, product_rates
from jdfashion.search import Member, topk

WEIGHTS = {"densenet169": 0.1, "resnet101": 0.4, "resnet152": 0.3, "resnext101": 0.2}
MODELS = tuple(sorted(WEIGHTS))
# Feature model: per image a shared latent z; model m sees unit(z + MODEL_NOISE * e_m), so the
# models' scores for the same pair are correlated (about 0.74 for unrelated pairs), as real
# backbones trained on the same data are. A query is a noisy view of one gallery image's latent.
MODEL_NOISE = 0.5
QUERY_NOISE = 1.5
GENERATION_CHUNK = 8192
TTA_VIEWS = 3  # enough to read the per-angle slope; the Grocery table uses 5 (-90..90 by 45)
VIEW_NOISE = 0.3


@dataclass(frozen=True)
class SearchSize:
    queries: int
    gallery: int
    dim: int
    k: int
    faiss_k: int
    matmul_size: int


FULL = SearchSize(queries=1000, gallery=154_294, dim=4096, k=10, faiss_k=100, matmul_size=4096)
QUICK = SearchSize(queries=200, gallery=20_000, dim=4096, k=10, faiss_k=100, matmul_size=2048)


def unit_noisy(latent: torch.Tensor, noise: float, generator: torch.Generator) -> np.ndarray:
    return F.normalize(latent + noise * torch.randn(latent.shape, generator=generator), dim=1).half().numpy()


def generate_features(size: SearchSize, directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write (M, Q, D) query and (M, G, D) gallery fp16 arrays once; every variant loads the same bytes."""
    query_path, gallery_path = directory / "queries.npy", directory / "gallery.npy"
    shape = (len(MODELS), size.gallery, size.dim)
    gallery = np.lib.format.open_memmap(gallery_path, mode="w+", dtype=np.float16, shape=shape)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(size.gallery, (size.queries,), generator=generator)
    query_latent = torch.empty(size.queries, size.dim)
    for start in range(0, size.gallery, GENERATION_CHUNK):
        stop = min(start + GENERATION_CHUNK, size.gallery)
        latent = torch.randn(stop - start, size.dim, generator=generator)
        for index in range(len(MODELS)):
            gallery[index, start:stop] = unit_noisy(latent, MODEL_NOISE, generator)
        inside = (targets >= start) & (targets < stop)
        query_latent[inside] = latent[targets[inside] - start]
    gallery.flush()
    del gallery
    query_latent += QUERY_NOISE * torch.randn(query_latent.shape, generator=generator)
    queries = np.stack([unit_noisy(query_latent, MODEL_NOISE, generator) for _ in MODELS])
    np.save(query_path, queries)
    return query_path, gallery_path


def load_features(paths: tuple[Path, Path]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read into memory (not memory-mapped), as a loaded feature cache is, so every variant holds the same."""
    queries, gallery = (np.load(path) for path in paths)
    return dict(zip(MODELS, queries, strict=True)), dict(zip(MODELS, gallery, strict=True))


def unit_rows64(features: np.ndarray) -> np.ndarray:
    rows = features.astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def unit_fp32(features: np.ndarray) -> np.ndarray:
    """Unit fp32 rows; einsum forms the squared norms without a second full-size temporary."""
    rows = features.astype(np.float32)
    rows /= np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    return rows


def outcome(started: float, preparing: float, top: np.ndarray) -> dict[str, Any]:
    """A variant's result: seconds since ``started``, of which ``preparing`` before the search."""
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "prepare": preparing, "search": seconds - preparing, "top": top}


def timed(function: Callable[..., Any], log: list[dict[str, Any]], **recorded: Any) -> Callable[..., Any]:
    """``function``, appending its seconds and ``recorded`` (name: how to read it from the arguments
    and the result)."""

    def wrapper(*args: Any) -> Any:
        started = time.perf_counter()
        result = function(*args)
        seconds = time.perf_counter() - started
        log.append({**{name: read(args, result) for name, read in recorded.items()}, "seconds": seconds})
        return result

    return wrapper


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def timed_fused_search(
    queries: dict[str, Any], gallery: dict[str, np.ndarray], k: int, precision: str = "auto"
) -> dict[str, Any]:
    """The fused search, and where its time went: each candidate pass (precision, queries) and the
    float64 re-scores, timed by wrapping the search module's two stages in this process."""
    passes: list[dict[str, Any]] = []
    rescores: list[dict[str, Any]] = []
    search_module._candidates = timed(
        search_module._candidates,
        passes,
        precision=lambda a, _: dtype_name(a[-1]),
        queries=lambda a, _: len(a[1]),
        width=lambda a, _: a[3],
        delta=lambda a, result: error_bound(a[0], a[-1], result[2]).absolute,
    )
    search_module._rescore = timed(
        search_module._rescore,
        rescores,
        precision=lambda a, _: dtype_name(a[-1]),
        pairs=lambda a, _: int(a[3].sum()),
    )
    rates = product_rates(torch.device("cpu"), torch.get_num_threads())
    started = time.perf_counter()
    result = outcome(started, 0.0, fused_topk(queries, gallery, WEIGHTS, k, precision=precision)[1])
    return {
        **result,
        "passes": passes,
        "rescores": rescores,
        "probe_gflops": {dtype_name(dtype): rate for dtype, rate in rates.items()},
    }


def run_jdfashion(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    return timed_fused_search(*load_features(paths), size.k)


def run_jdfashion_fp32(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    return timed_fused_search(*load_features(paths), size.k, precision="fp32")


def run_jdfashion_bf16(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    return timed_fused_search(*load_features(paths), size.k, precision="bf16")


def run_concatenation(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    queries, gallery = load_features(paths)
    started = time.perf_counter()
    fused_gallery = fuse({m: torch.from_numpy(f) for m, f in gallery.items()}, WEIGHTS)
    fused_queries = fuse({m: torch.from_numpy(f) for m, f in queries.items()}, WEIGHTS)
    return outcome(started, time.perf_counter() - started, topk(fused_queries, fused_gallery, size.k)[1])


def run_jdfashion_views(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    queries, gallery = load_features(paths)
    generator = torch.Generator().manual_seed(1)
    views = {  # view 0 is the upright query; the others are perturbed copies, as turned photos are
        m: np.stack(
            [f]
            + [unit_noisy(torch.from_numpy(f).float(), VIEW_NOISE, generator) for _ in range(TTA_VIEWS - 1)]
        )
        for m, f in queries.items()
    }
    return timed_fused_search(views, gallery, size.k)


def run_float64(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    """The reference: sum_m w_m cos_m in float64 by numpy, gallery in chunks, full stable sort."""
    queries, gallery = load_features(paths)
    started = time.perf_counter()
    total = np.zeros((size.queries, size.gallery), dtype=np.float64)
    for model in MODELS:
        query_rows = WEIGHTS[model] * unit_rows64(queries[model])
        for start in range(0, size.gallery, GENERATION_CHUNK):
            total[:, start : start + GENERATION_CHUNK] += (
                query_rows @ unit_rows64(gallery[model][start : start + GENERATION_CHUNK]).T
            )
    return outcome(started, 0.0, np.argsort(-total, axis=1, kind="stable")[:, : size.k])


def run_numpy(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    queries, gallery = load_features(paths)
    started = time.perf_counter()
    total = np.zeros((size.queries, size.gallery), dtype=np.float32)
    preparing = 0.0
    for model in MODELS:
        normalising = time.perf_counter()
        query_rows, gallery_rows = WEIGHTS[model] * unit_fp32(queries[model]), unit_fp32(gallery[model])
        preparing += time.perf_counter() - normalising
        total += query_rows @ gallery_rows.T
        del gallery_rows  # before the next model's copy is made, as a one-expression loop would
    top = np.argsort(-total, axis=1, kind="stable")[:, : size.k]
    return outcome(started, preparing, top)


def fuse_candidate_lists(
    scores: list[np.ndarray], ids: list[np.ndarray], weights: list[float], k: int
) -> np.ndarray:
    """Rank the union of per-model top lists by sum_m w_m * s_m, where a model whose list lacks an item
    gives it that list's last (k-th) score: an upper bound on its true score, so a candidate seen by
    one model is not buried under ones seen by all. Equal sums go to the lower gallery index."""
    gains = np.concatenate(
        [w * (s - s[:, -1:]) for w, s in zip(weights, scores, strict=True)], axis=1
    )  # the sum of the k-th scores is the same for every candidate of a query, so it is left out
    candidates = np.concatenate(ids, axis=1)
    top = np.empty((len(candidates), k), dtype=np.int64)
    for row, (row_ids, row_gains) in enumerate(zip(candidates, gains, strict=True)):
        unique_ids, inverse = np.unique(row_ids, return_inverse=True)
        totals = np.bincount(inverse, weights=row_gains)
        top[row] = unique_ids[np.lexsort((unique_ids, -totals))[:k]]
    return top


def run_faiss(size: SearchSize, paths: tuple[Path, Path]) -> dict[str, Any]:
    import faiss  # here, so its OpenMP runtime is loaded only in this variant's process

    queries, gallery = load_features(paths)
    started = time.perf_counter()
    scores, ids, preparing = [], [], 0.0
    for model in MODELS:
        building = time.perf_counter()
        index = faiss.IndexFlatIP(size.dim)
        index.add(unit_fp32(gallery[model]))
        query_rows = unit_fp32(queries[model])
        preparing += time.perf_counter() - building
        model_scores, model_ids = index.search(query_rows, size.faiss_k)
        del index
        scores.append(model_scores)
        ids.append(model_ids)
    top = fuse_candidate_lists(scores, ids, [WEIGHTS[m] for m in MODELS], size.k)
    return outcome(started, preparing, top)


def matmul_gflops(matrix_size: int, dtype: str = "float32", repeats: int = 3) -> float:
    """This machine's GEMM rate through torch in ``dtype`` (best of ``repeats`` after one warm-up)."""
    kind = getattr(torch, dtype)
    left, right = (
        torch.randn(matrix_size, matrix_size).to(kind),
        torch.randn(matrix_size, matrix_size).to(kind),
    )
    torch.mm(left, right)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(left, right)
        best = min(best, time.perf_counter() - started)
    return 2 * matrix_size**3 / best / 1e9


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k."""
    return float(
        np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, exact, strict=True)]) / exact.shape[1]
    )


VARIANTS = (
    (
        "jdfashion",
        "jdfashion: fused_topk, precision auto (fused in the chunk loop, fp64 re-score)",
        run_jdfashion,
    ),
    ("fp32", "jdfashion: fused_topk with fp32 candidates forced", run_jdfashion_fp32),
    ("bf16", "jdfashion: fused_topk with bf16 candidates forced", run_jdfashion_bf16),
    ("concatenation", "jdfashion before: fuse (fp16 copy of the gallery) + search.topk", run_concatenation),
    ("numpy", "numpy: full fp32 score matrix per model + weighted sum + full argsort", run_numpy),
    ("faiss", "faiss-cpu: IndexFlatIP per model, top-{faiss_k} each, lists fused", run_faiss),
    (
        "views",
        f"jdfashion with rotation TTA: {TTA_VIEWS} query views, best view per pair",
        run_jdfashion_views,
    ),
    ("float64", "reference: numpy float64 fusion, full stable sort", run_float64),
)


def fused_score_spread(paths: tuple[Path, Path], queries: int = 50, gallery: int = 20_000) -> float:
    """The standard deviation of the fused score over the first queries x gallery items: nearly all
    unrelated pairs, the crowd a query's k-th score must stand clear of to be certified."""
    query_features, gallery_features = load_features(paths)
    fused = sum(
        WEIGHTS[m] * unit_fp32(query_features[m][:queries]) @ unit_fp32(gallery_features[m][:gallery]).T
        for m in MODELS
    )
    return float(np.std(fused))


def where_time_went(outcomes: dict[str, Any], size: SearchSize, spread: float) -> list[str]:
    """A note per jdfashion variant: its candidate passes (precision, queries, kept candidates, certified
    delta, seconds) and re-scores (precision, pairs, seconds); then what ``auto`` measured and chose,
    and the windows that decide whether a pass certifies."""
    lines = []
    for key in ("jdfashion", "fp32", "bf16", "views"):
        result = outcomes[key][0]
        steps = [
            f"{entry['precision']} pass over {entry['queries']} queries keeping {entry['width']} "
            f"(delta {entry['delta']:.2g}) {entry['seconds']:.2f} s"
            for entry in result["passes"]
        ] + [
            f"{entry['precision']} re-score of {entry['pairs']:,} pairs ({entry['pairs'] / size.queries:.1f} "
            f"per query) {entry['seconds']:.2f} s"
            for entry in result["rescores"]
        ]
        lines.append(f"Where the time went, {key}: " + "; ".join(steps) + ".")
    probe = outcomes["jdfashion"][0]["probe_gflops"]
    first = outcomes["jdfashion"][0]["passes"][0]
    members = [Member(np.empty((1, size.dim)), np.empty((1, size.dim)), w) for w in WEIGHTS.values()]
    a_priori = {dtype_name(t): error_bound(members, t).absolute for t in (torch.float32, torch.bfloat16)}
    measured = next(e["delta"] for e in outcomes["bf16"][0]["passes"] if e["precision"] == "bfloat16")
    lines.append(
        "precision auto measured its products at "
        + ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in probe.items())
        + f" ({RATE_PROBE_ROWS}x{RATE_PROBE_DIM} blocks); its first pass was {first['precision']} over "
        f"{first['queries']} queries (a pilot, when bf16 measured faster). A pass certifies a query when "
        "fewer than the candidates it keeps score within about 2 delta of its k-th (delta: the bound on "
        "any pair's error, plus its output rounding relative to the score); a bf16 pass measures how far "
        "rounding moved its rows: delta "
        f"{measured:.2g} here, against {a_priori['bfloat16']:.2g} from bf16's unit roundoff alone and "
        f"{a_priori['float32']:.2g} for fp32. The fused scores of unrelated pairs here have a standard "
        f"deviation of {spread:.4f}, so the bf16 window spans {2 * measured / spread:.2f} of them "
        f"({2 * a_priori['bfloat16'] / spread:.2f} a priori), the fp32 one "
        f"{2 * a_priori['float32'] / spread:.2f}."
    )
    return lines


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    size = QUICK if args.quick else FULL
    machine = machine_info()
    rates_before = {
        dtype: isolated(matmul_gflops, size.matmul_size, dtype)[0] for dtype in ("float32", "bfloat16")
    }
    flops = 2 * size.queries * size.gallery * size.dim * len(MODELS)
    with tempfile.TemporaryDirectory(prefix="jdfashion-bench-search-") as scratch:
        started = time.perf_counter()
        paths = generate_features(size, Path(scratch))
        generation_seconds = time.perf_counter() - started
        spread = fused_score_spread(paths)
        outcomes = {}
        for key, _, function in VARIANTS:
            print(f"running {key} ...", flush=True)
            outcomes[key] = isolated(function, size, paths)
    # Measured before and after: on a shared machine the higher one is nearer what the CPU can do.
    rates_after = {dtype: isolated(matmul_gflops, size.matmul_size, dtype)[0] for dtype in rates_before}
    peak = {dtype: max(rates_before[dtype], rates_after[dtype]) for dtype in rates_before}
    exact = outcomes["float64"][0]["top"]
    feature_mib = (size.queries + size.gallery) * size.dim * len(MODELS) * 2 / MIB
    best_rate = max(peak.values())
    rows = []
    for key, label, _ in VARIANTS:
        result, peak_rss = outcomes[key]
        views = key == "views"  # V times the products, and a different (best-view) ranking
        rate = flops * (TTA_VIEWS if views else 1) / result["seconds"] / 1e9
        rows.append(
            {
                "variant": label.format(faiss_k=size.faiss_k),
                "seconds": result["seconds"],
                "prepare": result["prepare"],
                "search": result["search"],
                "vs_faiss": result["seconds"] / outcomes["faiss"][0]["seconds"],
                "gflops": rate,
                "of_fp32": rate / peak["float32"],
                "of_bf16": rate / peak["bfloat16"],
                "of_best": rate / best_rate,
                "peak_rss_mib": peak_rss,
                "rss_vs_features": peak_rss / feature_mib,
                "recall": None if views else recall_at_k(result["top"], exact),
            }
        )
    per_angle = (outcomes["views"][0]["seconds"] - outcomes["jdfashion"][0]["seconds"]) / (TTA_VIEWS - 1)
    columns = [
        Column("variant", "variant"),
        Column("seconds", "total s", ".2f"),
        Column("prepare", "normalise / fuse / index s", ".2f"),
        Column("search", "score + top-k s", ".2f"),
        Column("vs_faiss", "time / faiss", ".2f"),
        Column("gflops", "GFLOP/s", ".1f"),
        Column("of_fp32", "of fp32 matmul rate", ".0%"),
        Column("of_bf16", "of bf16 matmul rate", ".0%"),
        Column("of_best", "of best matmul rate", ".0%"),
        Column("peak_rss_mib", "peak RSS MiB", ",.0f"),
        Column("rss_vs_features", "peak RSS / features", ".2f"),
        Column("recall", "recall@10 vs float64", ".4f"),
    ]
    notes = [
        f"torch matmul rates on this machine ({size.matmul_size}x{size.matmul_size} torch.mm, best of 3 in a "
        f"process of its own, before and after the variants, the higher used): fp32 {peak['float32']:.1f} "
        f"GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s; 'best matmul rate' is the higher, "
        f"{best_rate:.1f} GFLOP/s.",
        *where_time_went(outcomes, size, spread),
        f"Work per variant: {flops / 1e12:.2f} TFLOP (2*Q*G*D*M). Peak RSS includes the loaded fp16 features "
        f"({feature_mib:,.0f} MiB, the 'features' of the ratio column) and the interpreter with torch "
        "imported; each variant ran in a fresh process.",
        "Times exclude loading the features. Prepare: fp16 to unit fp32 (jdfashion before: the fused copy; "
        "faiss: also building the index). jdfashion's fused_topk has no separate preparation: it converts "
        "each gallery chunk inside the loop.",
        f"faiss fusion: the union of the per-model top-{size.faiss_k} lists is ranked by the weighted score "
        "sum; a model whose list lacks a candidate contributes its list's last score (an upper bound on the "
        "missing one).",
        "Recall is against the float64 reference row (numpy, independent of jdfashion's search code).",
        f"Features: random, unit, fp16; model m = unit(z + {MODEL_NOISE}*e_m), query latent = its target's "
        f"z + {QUERY_NOISE}*noise. Weights {WEIGHTS}. Generating them took {generation_seconds:.0f} s "
        "(not timed).",
        f"Rotation TTA: each extra query angle costs {per_angle:.2f} s of search here "
        f"({per_angle / outcomes['jdfashion'][0]['search']:.2f}x jdfashion's one-view search), "
        f"plus one extraction of the {size.queries} queries at that angle (bench_extraction.py's "
        "rotated-view row). The "
        f"{TTA_VIEWS}-view row's GFLOP/s counts its {TTA_VIEWS}x products; its ranking is a different one "
        "(best view per pair), so it has no recall against the one-view reference.",
    ]
    write_results(
        "search",
        "Fused top-10 search",
        columns,
        rows,
        quick=args.quick,
        machine=machine,
        parameters={**asdict(size), "models": len(MODELS)},
        notes=notes,
        details={
            "matmul_gflops_before": rates_before,
            "matmul_gflops_after": rates_after,
            "flops": flops,
            "feature_mib": feature_mib,
            "weights": WEIGHTS,
            "model_noise": MODEL_NOISE,
            "query_noise": QUERY_NOISE,
            "generation_seconds": generation_seconds,
            "tta_views": TTA_VIEWS,
            "seconds_per_extra_angle": per_angle,
            "candidate_passes": {key: outcomes[key][0]["passes"] for key in ("jdfashion", "fp32", "bf16")},
            "fused_score_spread": spread,
        },
    )


if __name__ == "__main__":
    main()
