"""Exploring a latent space: outliers, interpolation, reverse search and histograms.

Functions that scan every latent accept any 2-D array-like that supports ``shape`` and row
slicing (a NumPy array, a zarr array, ...) and read it one chunk of rows at a time, so a
1M x 512 latent array never needs a second full-size copy in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import InputError

Metric = Literal["euclidean", "cosine"]
METRICS: tuple[str, ...] = ("euclidean", "cosine")
OUTLIER_CATEGORIES = ["low", "normal", "high"]
OUTLIER_PCT = 1.0  # percentage of crops flagged in each MSE tail
INTERPOLATION_STEPS = 8
SEARCH_K = 10  # crops a reverse search returns
BLOCK_BYTES = 32 * 1024 * 1024


# ---------------------------------------------------------------------------- reading in row blocks
def block_rows(n_cols: int, itemsize: int = 8, budget: int = BLOCK_BYTES) -> int:
    """Rows per in-memory block so that one float64 block of ``n_cols`` columns uses about
    ``budget`` (not the zarr chunks of the store: see :func:`.store.chunk_rows`)."""
    return max(1, budget // max(1, n_cols * itemsize))


def iter_chunks(array: Any, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)`` row blocks of a 2-D array-like as NumPy arrays."""
    n, d = array.shape
    rows = rows or block_rows(d)
    for start in range(0, n, rows):
        yield start, np.asarray(array[start : start + rows])


def sample_rows(n: int, k: int, seed: int | None = 0) -> np.ndarray:
    """All ``n`` row indices, or a seeded random ``k`` of them; sorted."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    x = np.asarray(x)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


# ---------------------------------------------------------------------------- outliers
def outlier_flags(
    mse: np.ndarray, low_pct: float = OUTLIER_PCT, high_pct: float = OUTLIER_PCT
) -> pd.Categorical:
    """Flag the ``low_pct`` % lowest and ``high_pct`` % highest reconstruction errors.

    Flags are assigned by rank, so exactly ``round(n * pct / 100)`` crops are flagged at each
    tail (ties broken by crop order); NaN errors are never flagged.
    """
    mse = np.asarray(mse, dtype=np.float64).ravel()
    if not (0 <= low_pct <= 100 and 0 <= high_pct <= 100 and low_pct + high_pct <= 100):
        raise InputError("outlier percentages must lie in [0, 100] and sum to at most 100")
    valid = np.flatnonzero(np.isfinite(mse))
    order = valid[np.argsort(mse[valid], kind="stable")]
    n_low = round(len(valid) * low_pct / 100)
    n_high = round(len(valid) * high_pct / 100)
    codes = np.ones(len(mse), dtype=np.int8)
    codes[order[:n_low]] = 0
    codes[order[len(order) - n_high :]] = 2
    return pd.Categorical.from_codes(codes, categories=OUTLIER_CATEGORIES)


def rank_outliers(mse: np.ndarray, k: int, tail: Literal["high", "low"] = "high") -> np.ndarray:
    """Indices of the ``k`` most extreme errors at one tail, most extreme first (NaN skipped)."""
    if tail not in ("high", "low"):
        raise InputError(f"tail must be 'high' or 'low', got {tail!r}")
    mse = np.asarray(mse, dtype=np.float64).ravel()
    valid = np.flatnonzero(np.isfinite(mse))
    values = mse[valid] if tail == "low" else -mse[valid]
    k = min(k, len(valid))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    top = np.argpartition(values, k - 1)[:k]
    top = top[np.lexsort((valid[top], values[top]))]
    return valid[top].astype(np.int64)


# ---------------------------------------------------------------------------- interpolation
def interpolate(z_a: np.ndarray, z_b: np.ndarray, steps: int = INTERPOLATION_STEPS) -> np.ndarray:
    """Convex combinations ``(1 - t) z_a + t z_b`` for ``t`` evenly spaced from 0 to 1."""
    z_a, z_b = np.asarray(z_a), np.asarray(z_b)
    if z_a.ndim != 1 or z_a.shape != z_b.shape:
        raise InputError(f"two latent vectors of equal length needed, got {z_a.shape}, {z_b.shape}")
    if steps < 2:
        raise InputError(f"an interpolation needs at least 2 steps, got {steps}")
    dtype = np.result_type(z_a, z_b, np.float32)
    t = np.linspace(0.0, 1.0, steps, dtype=dtype)[:, None]
    return (1 - t) * z_a.astype(dtype) + t * z_b.astype(dtype)


def interpolation_strip(
    z_a: np.ndarray,
    z_b: np.ndarray,
    decode: Callable[[np.ndarray], np.ndarray],
    steps: int = INTERPOLATION_STEPS,
) -> np.ndarray:
    """Decoded images ``(steps, S, S)`` along the straight line from ``z_a`` to ``z_b``."""
    images = np.asarray(decode(interpolate(z_a, z_b, steps)))
    if images.ndim != 3 or len(images) != steps:
        raise InputError(f"decode returned shape {images.shape}, expected ({steps}, S, S)")
    return images


# ---------------------------------------------------------------------------- reverse search
def nearest(
    latents: Any,
    query: np.ndarray,
    k: int = SEARCH_K,
    metric: Metric = "euclidean",
    exclude: np.ndarray | list[int] | None = None,
    *,
    rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``latents`` closest to each query, best first.

    Scores are Euclidean distances (ascending) or cosine similarities (descending), computed
    in float64 one chunk of ``rows`` rows at a time; only a chunk-by-Q score block and the
    running top ``k`` are held in memory. ``exclude`` lists rows never returned (e.g. the
    query's own crop). A query of shape (D,) gives arrays of shape (k,), (Q, D) gives (Q, k);
    ``k`` shrinks to the number of eligible rows. Ties are broken by row index.
    """
    check_metric(metric)
    n, d = latents.shape
    q = np.asarray(query, dtype=np.float64)
    single = q.ndim == 1
    q = np.atleast_2d(q)
    if q.ndim != 2 or q.shape[1] != d:
        raise InputError(f"queries of shape {np.shape(query)} do not match latents of width {d}")
    excluded = np.unique(np.asarray([] if exclude is None else exclude, dtype=np.int64))
    if len(excluded) and (excluded[0] < 0 or excluded[-1] >= n):
        raise InputError(f"exclude holds rows outside 0..{n - 1}")
    k = max(0, min(int(k), n - len(excluded)))
    cosine = metric == "cosine"
    if cosine:
        q = l2_normalize(q)
    qq = np.einsum("ij,ij->i", q, q)
    best_cost = np.empty((len(q), 0))
    best_idx = np.empty((len(q), 0), dtype=np.int64)
    if k:
        rows = rows or block_rows(d + len(q))
        buffer = np.empty((min(rows, n), d))
        for start, block in iter_chunks(latents, rows):
            x = buffer[: len(block)]
            x[...] = block
            if cosine:
                cost = -(x @ q.T) / _safe_norm(x)[:, None]
            else:
                cost = np.einsum("ij,ij->i", x, x)[:, None] - 2 * (x @ q.T) + qq
            local = excluded[(excluded >= start) & (excluded < start + len(x))] - start
            cost[local] = np.inf
            idx = np.broadcast_to(np.arange(start, start + len(x))[:, None], cost.shape)
            best_cost, best_idx = _merge_top(
                np.concatenate([best_cost, cost.T], axis=1),
                np.concatenate([best_idx, idx.T], axis=1),
                k,
            )
    order = np.lexsort((best_idx, best_cost), axis=-1)
    best_cost = np.take_along_axis(best_cost, order, axis=1)
    best_idx = np.take_along_axis(best_idx, order, axis=1)
    scores = -best_cost if cosine else np.sqrt(np.maximum(best_cost, 0))
    return (best_idx[0], scores[0]) if single else (best_idx, scores)


def _safe_norm(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1)
    return np.where(norms > 0, norms, 1)


def _merge_top(cost: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` lowest-cost columns of each row (unordered; ties go to lower ``idx``)."""
    if cost.shape[1] <= k:
        return cost, idx
    keep = np.argpartition(cost, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(cost, keep, axis=1).max(axis=1, keepdims=True)
    for row in np.flatnonzero((cost <= kth).sum(axis=1) > k):  # ties at the cut: rare
        keep[row] = np.lexsort((idx[row], cost[row]))[:k]
    return np.take_along_axis(cost, keep, axis=1), np.take_along_axis(idx, keep, axis=1)


# ---------------------------------------------------------------------------- histograms
def latent_histograms(
    latents: Any,
    bins: int = 50,
    dims: np.ndarray | list[int] | None = None,
    *,
    rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension histograms of latent values: ``counts (D', bins)``, ``edges (D', bins+1)``.

    Two streaming passes over row chunks (per-dimension range, then counts), so it works on a
    zarr array larger than memory. Each dimension gets ``bins`` equal bins spanning its own
    finite range (the last bin includes its right edge); non-finite values are not counted.
    """
    d = latents.shape[1]
    if bins < 1:
        raise InputError(f"bins must be at least 1, got {bins}")
    select = slice(None) if dims is None else np.asarray(dims, dtype=np.int64)
    width = d if dims is None else len(select)
    if dims is not None and width and (select.min() < -d or select.max() >= d):
        raise InputError(f"dims must index the {d} latent dimensions")
    lo, hi = np.full(width, np.inf), np.full(width, -np.inf)
    for x, _ in _finite_blocks(latents, select, rows):
        lo = np.fmin(lo, np.fmin.reduce(x, axis=0, initial=np.inf))
        hi = np.fmax(hi, np.fmax.reduce(x, axis=0, initial=-np.inf))
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    flat = hi <= lo
    lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)
    edges = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, bins + 1)
    counts = np.zeros(width * bins, dtype=np.int64)
    offsets = np.arange(width) * bins
    for x, finite in _finite_blocks(latents, select, rows):
        scaled = (x - lo.astype(x.dtype)) * (bins / (hi - lo)).astype(x.dtype)
        np.clip(scaled, 0, bins - 1, out=scaled)
        if finite is not None:
            scaled[~finite] = 0
        which = scaled.astype(np.intp) + offsets
        which = which.ravel() if finite is None else which[finite]
        counts += np.bincount(which, minlength=len(counts))
    return counts.reshape(width, bins), edges


def _finite_blocks(
    latents: Any, select: slice | np.ndarray, rows: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Float blocks of the selected columns, non-finite values as NaN (with their mask)."""
    for _, block in iter_chunks(latents, rows):
        x = np.asarray(block[:, select])
        x = x.astype(x.dtype if x.dtype in (np.float32, np.float64) else np.float64, copy=False)
        finite = np.isfinite(x)
        if finite.all():
            yield x, None
        else:
            yield np.where(finite, x, np.nan), finite
