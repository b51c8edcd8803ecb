"""Centres of a population of latents: mean, coordinate-wise median and geometric median
(Weiszfeld), over in-memory arrays, zarr arrays or lazy row views.

Every scan over the data reads row chunks (see :func:`.explore.iter_chunks`), so a
1M x 512 float32 array is handled without a full-size float64 copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from .errors import InputError
from .explore import block_rows, iter_chunks

CenterMethod = Literal["mean", "median", "geomedian"]
CENTERS: tuple[str, ...] = ("mean", "median", "geomedian")
DEFAULT_CENTER = "geomedian"  # robust to outliers: the one a single pick uses
STALL_ITERATIONS = 5
LANDING_CHECK = 10  # iterations between tries of the nearest data point


# ---------------------------------------------------------------------------- lazy row views
@dataclass(frozen=True)
class RowView:
    """A lazy 2-D view: rows ``rows`` of ``source`` (all when None), flattened to (n, d).

    ``source`` is an array-like (NumPy, zarr, ...) of shape (N, ...) or a reader callable
    ``read(index: slice | ndarray) -> (n, ...)`` such as ``Project.read_crops``.
    """

    source: Any
    n_source: int
    width: int
    dtype: np.dtype
    rows: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_source if self.rows is None else len(self.rows), self.width)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        if self.rows is not None:
            index = self.rows[index]
        rows = read_rows(self.source, index).reshape(-1, self.width)
        return rows.astype(self.dtype, copy=False)

    def subset(self, rows: np.ndarray) -> RowView:
        rows = np.asarray(rows, dtype=np.int64)
        base = rows if self.rows is None else self.rows[rows]
        return RowView(self.source, self.n_source, self.width, self.dtype, base)


def read_rows(source: Any, index: slice | np.ndarray) -> np.ndarray:
    """Rows of an array-like or reader callable, by slice or by integer array (any order,
    repeats allowed; lazy sources are asked for sorted unique rows only)."""
    if isinstance(index, slice) or isinstance(source, np.ndarray):
        return np.asarray(source(index) if callable(source) else source[index])
    unique, inverse = np.unique(np.asarray(index, dtype=np.int64), return_inverse=True)
    if callable(source):
        rows = source(unique)
    else:
        oindex = getattr(source, "oindex", None)
        rows = oindex[unique] if oindex is not None else source[unique]
    return np.asarray(rows)[inverse]


def as_rows(data: Any, n: int | None = None) -> RowView | np.ndarray:
    """``data`` as a floating 2-D row source (float64 stays, anything else reads as float32).

    NumPy 2-D float32/float64 arrays pass through; other arrays and reader callables (which
    need ``n``, the number of rows) become :class:`RowView` s.
    """
    if isinstance(data, np.ndarray) and data.ndim == 2 and data.dtype in (np.float32, np.float64):
        return data
    if callable(data):
        if n is None:
            raise InputError("a reader callable needs the number of rows (n_crops)")
        sample = np.asarray(data(slice(0, 1)))
        shape, dtype = (n, *sample.shape[1:]), sample.dtype
    else:
        shape, dtype = tuple(data.shape), np.dtype(data.dtype)
    if len(shape) < 2:
        raise InputError(f"expected an (N, ...) array with N rows, got shape {shape}")
    as_float = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    return RowView(data, shape[0], int(np.prod(shape[1:])), as_float)


def subset(x: RowView | np.ndarray, rows: np.ndarray | None) -> RowView | np.ndarray:
    """Rows of a scope: copied from an in-memory array, a lazy view of anything else."""
    if rows is None:
        return x
    return x[rows] if isinstance(x, np.ndarray) else x.subset(rows)


# ---------------------------------------------------------------------------- centres
def center(
    latents: Any,
    method: CenterMethod = "mean",
    *,
    tol: float = 1e-7,
    max_iter: int = 500,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """The centre ``(D,)`` float64 of the rows: ``mean``, ``median`` (coordinate-wise) or
    ``geomedian`` (see :func:`geometric_median` for ``tol``, ``max_iter`` and ``init``)."""
    x = _nonempty(as_rows(latents))
    if method == "mean":
        return _mean(x)
    if method == "median":
        return _coordinate_median(x)
    if method == "geomedian":
        return geometric_median(x, tol=tol, max_iter=max_iter, init=init)
    raise InputError(f"centre must be one of {CENTERS}, got {method!r}")


def _nonempty(x: RowView | np.ndarray) -> RowView | np.ndarray:
    if x.shape[0] == 0:
        raise InputError("cannot compute the centre of zero latents")
    return x


def _pass_rows(x: Any) -> int:
    """Rows per chunk for single passes: large blocks keep BLAS calls efficient."""
    return block_rows(x.shape[1], itemsize=4, budget=64 * 1024 * 1024)


def _mean(x: Any) -> np.ndarray:
    total = np.zeros(x.shape[1])
    for _, block in iter_chunks(x, _pass_rows(x)):
        total += block.sum(axis=0, dtype=np.float64)
    return total / x.shape[0]


def _coordinate_median(x: Any, budget: int = 256 * 1024 * 1024) -> np.ndarray:
    """Per-dimension median, a block of columns at a time (a transposed copy of one block)."""
    n, d = x.shape
    width = max(1, min(d, budget // (x.dtype.itemsize * n)))
    half = n // 2
    kth = [half - 1, half] if n % 2 == 0 else [half]
    out = np.empty(d)
    for j in range(0, d, width):
        cols = slice(j, min(d, j + width))
        buffer = np.empty((cols.stop - cols.start, n), dtype=x.dtype)
        for start, block in iter_chunks(x, _pass_rows(x)):
            buffer[:, start : start + len(block)] = block[:, cols].T
        buffer.partition(kth, axis=1)
        out[cols] = buffer[:, kth].mean(axis=1, dtype=np.float64)
    return out


def geometric_median(
    latents: Any,
    *,
    tol: float = 1e-7,
    max_iter: int = 500,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Geometric median (point minimising the sum of Euclidean distances), float64 ``(D,)``.

    Weiszfeld iterations with the Vardi–Zhang modification, so an estimate that lands on a
    data point is handled (it is either the optimum, or the step moves it off). Each
    iteration is one chunked pass of two BLAS products in the input precision: squared
    distances are expanded about the mean ``c`` as ``|x-c|^2 - 2 (x-c).(y-c) + |y-c|^2``,
    and any distance small enough for rounding to matter is recomputed exactly in float64.
    Starts from ``init`` or the mean; stops when a step moves less than ``tol`` times the mean
    distance, when the objective stops decreasing (the rounding floor, about 1e-7 of the
    data's magnitude for float32 input) or after ``max_iter`` iterations. Weiszfeld creeps
    slowly towards a median that sits on a data point, so the nearest data point is tried
    every ``LANDING_CHECK`` iterations and at the end (one extra pass each).
    """
    x = _nonempty(as_rows(latents))
    n = x.shape[0]
    dtype = x.dtype.type
    c = _mean(x).astype(dtype).astype(np.float64)
    xc2 = np.concatenate(
        [_squared_norms(block - c.astype(dtype)) for _, block in iter_chunks(x, _pass_rows(x))]
    )
    y = c.copy() if init is None else np.asarray(init, dtype=np.float64)
    best, stalled, done = np.inf, 0, False
    for iteration in range(1, max_iter + 1):
        y = c + (y - c).astype(dtype)
        state = _weiszfeld_pass(x, c, xc2, y, dtype)
        # exact Weiszfeld steps always lower the objective: a run without progress is the
        # rounding floor
        stalled = 0 if state.objective < best else stalled + 1
        best = min(best, state.objective)
        if done or stalled == STALL_ITERATIONS or state.weight == 0:
            break  # (weight 0: every point coincides with y)
        if iteration % LANDING_CHECK == 0:
            point = _better_data_point(x, c, xc2, state, dtype)
            if point is not None:
                y = point
                continue
        target = state.weighted / state.weight
        if state.n_zero:  # Vardi–Zhang: y sits on data points
            pull = np.linalg.norm(state.weighted - state.weight * y)
            if pull <= state.n_zero:
                break  # optimality condition at a data point: y is the median
            gamma = state.n_zero / pull
            target = (1 - gamma) * target + gamma * y
        done = np.linalg.norm(target - y) <= tol * state.objective / n
        y = target
    point = _better_data_point(x, c, xc2, state, dtype)
    return y if point is None else point


def _better_data_point(
    x: Any, c: np.ndarray, xc2: np.ndarray, state: _Pass, dtype: type
) -> np.ndarray | None:
    """The data point nearest the estimate, if it has a lower objective.

    Weiszfeld only creeps towards a median that sits on a data point (when the point's pull
    nearly balances its multiplicity); jumping there lands exactly.
    """
    if state.nearest_distance == 0:
        return None
    point = np.asarray(x[state.nearest : state.nearest + 1], dtype=np.float64)[0]
    better = _weiszfeld_pass(x, c, xc2, point, dtype).objective < state.objective
    return point if better else None


class _Pass(NamedTuple):
    objective: float  # sum of distances to y
    weighted: np.ndarray  # sum of w_i x_i with w_i = 1 / d_i
    weight: float  # sum of w_i
    n_zero: int  # points coinciding with y (no weight)
    nearest: int  # row nearest y
    nearest_distance: float


def _weiszfeld_pass(x: Any, c: np.ndarray, xc2: np.ndarray, y: np.ndarray, dtype: type) -> _Pass:
    u = (y - c).astype(dtype)
    cu, uu = float(c @ u), float(u @ u)
    eps = np.finfo(dtype).eps
    # rounding error of the expanded |x - y|^2 is about eps * sqrt(D) * |x| * |u|
    slack = 1e3 * 4 * np.sqrt(x.shape[1]) * eps * np.sqrt(uu)
    scale = np.sqrt(xc2) + np.linalg.norm(c)  # bounds |x|
    objective, weight, n_zero, nearest, nearest_d2 = 0.0, 0.0, 0, 0, np.inf
    weighted = np.zeros(x.shape[1])
    for start, block in iter_chunks(x, _pass_rows(x)):
        rows = slice(start, start + len(block))
        d2 = xc2[rows] - 2 * ((block @ u).astype(np.float64) - cu) + uu
        exact = np.flatnonzero(d2 <= slack * scale[rows])
        if len(exact):
            diff = block[exact].astype(np.float64) - y
            d2[exact] = np.einsum("ij,ij->i", diff, diff)
        dist = np.sqrt(np.maximum(d2, 0))
        apart = dist > eps * scale[rows]
        w = np.divide(1.0, dist, out=np.zeros_like(dist), where=apart)
        weighted += (w.astype(dtype) @ block).astype(np.float64)
        objective += float(dist.sum())
        weight += float(w.sum())
        n_zero += int(len(w) - apart.sum())
        closest = int(np.argmin(d2))
        if d2[closest] < nearest_d2:
            nearest, nearest_d2 = start + closest, float(d2[closest])
    return _Pass(objective, weighted, weight, n_zero, nearest, np.sqrt(max(nearest_d2, 0.0)))


def _squared_norms(diff: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
