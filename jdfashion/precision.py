"""The candidate pass's precision: its error bound, the device's measured rates, the ``auto`` choice.

:mod:`jdfashion.search` certifies a low-precision pass with :func:`error_bound`. ``precision="auto"``
weighs speed against that certificate: the device's fp32 and low-precision products are measured
once per process (:func:`product_rates`; CPU flags do not say how fast torch uses the units: bf16
ran at 2.2x to 4x fp32 on 2-core AMD EPYCs with AVX512-BF16, at 0.3x on an Intel Xeon without), and
where the low precision is faster, the search's pilot shows the share of queries it certifies, since
a bf16 delta (0.0047 of a unit weight measured on the search benchmark's rows, 0.0093 from bf16's unit
roundoff alone) can swamp features whose scores crowd together; :func:`choose_precision` takes it
only where pass plus re-searches beat fp32.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from jdfashion.options import SearchPrecision

if TYPE_CHECKING:
    from jdfashion.search import Member

PRECISIONS: tuple[SearchPrecision, ...] = typing.get_args(SearchPrecision)
# precision="auto": the product rates are measured on RATE_PROBE_ROWS x RATE_PROBE_DIM blocks; a
# low precision is taken when its search is estimated at most AUTO_GAIN of the fp32 one, after a
# pilot (jdfashion.search.PILOT_QUERIES queries) showed the share its pass certifies.
RATE_PROBE_ROWS = 512
RATE_PROBE_DIM = 4096
AUTO_GAIN = 0.8
LOW = {"cpu": torch.bfloat16, "cuda": torch.float16}
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
# The precision ladder: a query the candidate pass cannot certify is searched again one step up.
NEXT_PRECISION = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64}
# torch.backends.cuda.matmul flags that trade fp32 sums for speed; off while a CUDA search runs.
CUDA_MATMUL_SHORTCUTS = (
    "allow_tf32",
    "allow_fp16_reduced_precision_reduction",
    "allow_bf16_reduced_precision_reduction",
)


def product_seconds(dtype: torch.dtype, device: torch.device, rows: int = RATE_PROBE_ROWS) -> float:
    """Best of three timed ``rows x RATE_PROBE_DIM @ RATE_PROBE_DIM x rows`` products in ``dtype``,
    after a warm-up: the candidate pass's own operation, on this process's device and threads."""
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(rows, RATE_PROBE_DIM, generator=generator).to(device, dtype) for _ in range(2))
    best = math.inf
    for attempt in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        left @ right.T
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            best = min(best, time.perf_counter() - started)
    return best


@functools.cache
def product_rates(device: torch.device, threads: int) -> dict[torch.dtype, float]:
    """GFLOP/s of fp32 and of the device's low precision (bf16 on a CPU, fp16 on CUDA), measured once
    per process and thread count (about 0.1 s): CPU flags say which units exist, not how fast torch's
    kernels use them (on a 2-core AMD EPYC with AVX512-BF16 bf16 ran at 4x fp32, on an Intel Xeon
    without them at 0.3x)."""
    flops = 2 * RATE_PROBE_ROWS**2 * RATE_PROBE_DIM
    with full_precision_matmuls(device):
        return {
            dtype: flops / product_seconds(dtype, device) / 1e9
            for dtype in (torch.float32, LOW.get(device.type, torch.float16))
        }


def choose_precision(rates: dict[torch.dtype, float], certified_share: float = 1.0) -> torch.dtype:
    """The candidate precision of the cheaper search: the low one when its pass, plus the fp32 pass
    that the ``1 - certified_share`` of queries it cannot certify need again, costs at most
    ``AUTO_GAIN`` of one fp32 pass; fp32 otherwise, so ``auto`` is never slower than fp32 by more
    than its pilot."""
    low = next(dtype for dtype in rates if dtype != torch.float32)
    relative_cost = rates[torch.float32] / rates[low] + (1.0 - certified_share)
    return low if relative_cost <= AUTO_GAIN else torch.float32


def auto_dtype(device: torch.device, certified_share: float = 1.0) -> torch.dtype:
    """``precision="auto"`` on ``device``, given the share of queries a low-precision pass certified
    (before the pilot: assumed all)."""
    return choose_precision(product_rates(device, torch.get_num_threads()), certified_share)


def candidate_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The candidate pass's precision; ``auto`` is the faster by the measured :func:`product_rates`,
    before :func:`jdfashion.search.search`'s pilot checks that the low precision certifies its queries."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return auto_dtype(device)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass(frozen=True)
class Rounding:
    """How far rounding a pass's rows to its precision moved them, measured on the rows themselves
    (:func:`jdfashion.search._side_by_side`): the largest sum over members of a query row's
    ||fp32 - rounded|| (the rows carry their weights), and the largest such sum over a gallery
    row's members, each weighted by the member's largest weight. Zero where the pass is exact."""

    query: float
    gallery: float


@dataclass(frozen=True)
class ErrorBound:
    """|approximate - exact| <= absolute + relative * |approximate| for every pair of a pass; the
    relative part is the rounding of the product's output to the pass's precision, which costs a
    score near 0.1 a tenth of what a bound relative to the largest possible score would."""

    absolute: float
    relative: float

    def lowest_kept(self, kth: torch.Tensor) -> torch.Tensor:
        """The lowest approximate score whose pair may still be in the top k, given the approximate
        k-th scores: below it a pair's highest possible exact score is under the k-th's lowest."""
        lowest_kth = kth - self.absolute - self.relative * kth.abs()
        reach = lowest_kth - self.absolute
        return torch.where(reach >= 0, reach / (1 + self.relative), reach / (1 - self.relative))


def error_bound(
    members: Sequence[Member], dtype: torch.dtype, rounding: Rounding | None = None
) -> ErrorBound:
    """A bound on |approximate - exact| fused score of any pair in a ``dtype`` pass.

    Per member, with unit roundoffs u (``dtype``), u_n (the normalisation: fp32, or fp64 in a fp64
    pass) and u_a (accumulation: fp32, or fp64): a row's norm, a sum of D squares then a square
    root, is off by at most (D / 2 + 1) u_n of itself, so the computed unit query rows Q (divided,
    then weighted) are off the exact ones by at most (D / 2 + 4) u_n of their norm, gallery rows G
    by (D / 2 + 3) u_n (D: the widest member's). Rounding them to
    ``dtype`` leaves residuals r_q = Q - Q', r_g = G - G', and Q'.G' - Q.G = -r_q.G' - Q.r_g, so by
    Cauchy-Schwarz the pair is off by at most ||r_q|| ||G'|| + ||Q|| ||r_g||, summed over members:
    ``rounding`` gives the largest such sums measured on the actual rows (a unit row rounded to bf16
    moves by about 0.0016, against the 2^-8 = 0.0039 that u allows); without it, the a-priori u of
    each row's norm. The members sit side by side in one product (:func:`_side_by_side`), and
    summing its n = sum D products in any order adds gamma_n = n u_a / (1 - n u_a) of the sum of
    their magnitudes (Higham, Accuracy and Stability, 3.1), at most the weight per member; the
    output is rounded to ``dtype``: u / (1 - u) of the approximate score, the relative part (plus
    half a subnormal step, for fp16's underflow). Residual norms are computed in the normalisation
    precision, n u_n of slack; u_a per member and 5 % on top are slack for the constants' own
    rounding.
    """
    u = UNIT_ROUNDOFF[dtype]
    u_n = u_a = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    dim = sum(member.queries.shape[-1] for member in members)
    gamma = dim * u_a / (1 - dim * u_a)
    weights = sum(member.largest_weight for member in members)
    norm = (max(member.queries.shape[-1] for member in members) / 2 + 1) * u_n
    e_q, e_g = norm + 3 * u_n, norm + 2 * u_n
    if rounding is None:
        rounding = Rounding(query=u * (1 + e_q) * weights, gallery=u * (1 + e_g) * weights)
    normalising = weights * (e_q + e_g + e_q * e_g)
    rounded = (1 + dim * u_n) * (rounding.query * (1 + e_g) * (1 + u) + rounding.gallery * (1 + e_q))
    accumulation = gamma * weights * ((1 + e_q) * (1 + e_g) * (1 + u) ** 2)
    underflow = torch.finfo(dtype).tiny * u
    absolute = normalising + rounded + accumulation + underflow + len(members) * u_a * 1.1 * weights
    return ErrorBound(absolute=1.05 * absolute, relative=1.05 * u / (1 - u))


@contextlib.contextmanager
def full_precision_matmuls(device: torch.device) -> Iterator[None]:
    """No TF32 and no reduced-precision split-K sums on CUDA: the error bound assumes fp32 sums."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = {name: getattr(matmul, name) for name in CUDA_MATMUL_SHORTCUTS}
    try:
        for name in CUDA_MATMUL_SHORTCUTS:
            setattr(matmul, name, False)
        yield
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)
