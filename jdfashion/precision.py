"""The candidate pass's precision: its error bound, the device's measured rates, the ``auto`` choice.

:mod:`jdfashion.search` certifies a low-precision pass with :func:`error_bound`. ``precision="auto"``
weighs speed against that certificate: the device's fp32 and low-precision products are measured
once per process (:func:`product_rates`; CPU flags do not say how fast torch uses the units: bf16
ran at 4x fp32 on a 2-core AMD EPYC with AVX512-BF16, at 0.3x on an Intel Xeon without), and where
the low precision is faster, the search's pilot shows the share of queries it certifies, since a
bf16 delta (about 0.02 of a unit weight) swamps features whose scores crowd together;
:func:`choose_precision` takes it only where pass plus re-searches beat fp32.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import typing
from collections.abc import Iterator, Sequence
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


def error_bound(members: Sequence[Member], dtype: torch.dtype) -> float:
    """An upper bound on |approximate - exact| fused score of any pair in a ``dtype`` pass.

    Per member, with unit roundoffs u (``dtype``), u_n (the normalisation: fp32, or fp64 in a fp64
    pass) and u_a (accumulation: fp32, or fp64): query rows carry relative error e_q <= 4 u_n + 2 u
    (normalising, scaling by the weight, rounding to ``dtype``), gallery rows e_g <= 3 u_n + u, so by
    Cauchy-Schwarz the product of unit rows is off by at most e_q + e_g + e_q e_g; the members sit side
    by side in one product (:func:`_side_by_side`), and summing its n = sum D products in any order
    adds gamma_n = n u_a / (1 - n u_a) of the sum of their magnitudes (Higham, Accuracy and Stability,
    3.1), at most the weight per member; the output is rounded to ``dtype`` (u). u_a per member and
    5 % on top are slack for the constants' own rounding.
    """
    u = UNIT_ROUNDOFF[dtype]
    u_n = u_a = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    dim = sum(member.queries.shape[-1] for member in members)
    gamma = dim * u_a / (1 - dim * u_a)
    total = 0.0
    for member in members:
        e_q, e_g = 4 * u_n + 2 * u, 3 * u_n + u
        growth = (1 + e_q) * (1 + e_g)
        total += member.largest_weight * ((e_q + e_g + e_q * e_g) + gamma * growth + u * growth * (1 + gamma))
    weights = sum(member.largest_weight for member in members)
    return 1.05 * (total + len(members) * u_a * 1.1 * weights)


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
