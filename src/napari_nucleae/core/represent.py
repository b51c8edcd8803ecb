"""Objective representatives: centres of a population, the real crops nearest them, export.

A *centre* (mean, coordinate-wise median or geometric median) summarises a population of
latents; decoded it is the *theoretical* image. The real crops ranked nearest the centre
(Euclidean distance or cosine similarity) are the *practical* representatives.

Scope. With ``groups`` (cluster labels, conditions, ...) every group gets its own centre and
ranking computed from that group's crops only. Missing group values (None / NaN) are left
out, and so is HDBSCAN's noise label (``noise_label=-1`` by default): noise is not a
population, and its centre would represent nothing. Pass ``noise_label=None`` to treat it as
an ordinary group.

Every scan over the data reads row chunks (see :func:`.explore.iter_chunks`), so a
1M x 512 float32 array is handled without a full-size float64 copy.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from .errors import InputError, NucleaeError
from .explore import Metric, check_metric, chunk_rows, iter_chunks, nearest

CenterMethod = Literal["mean", "median", "geomedian"]
CENTERS: tuple[str, ...] = ("mean", "median", "geomedian")
ALL = "all"
STALL_ITERATIONS = 5
LANDING_CHECK = 10  # iterations between tries of the nearest data point
TABLE_COLUMNS = ["group", "center", "metric", "rank", "crop_index", "score"]
Decode = Callable[[np.ndarray], np.ndarray]


class ExportExistsError(NucleaeError, FileExistsError):
    """The export folder already holds files and overwriting was not requested."""


class ExportWriteError(NucleaeError):
    """The export folder cannot be created or written (its staging folder is removed)."""


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


def _subset(x: RowView | np.ndarray, rows: np.ndarray | None) -> RowView | np.ndarray:
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


_center = center  # for functions whose ``center`` argument shadows it


def _nonempty(x: RowView | np.ndarray) -> RowView | np.ndarray:
    if x.shape[0] == 0:
        raise InputError("cannot compute the centre of zero latents")
    return x


def _pass_rows(x: Any) -> int:
    """Rows per chunk for single passes: large blocks keep BLAS calls efficient."""
    return chunk_rows(x.shape[1], itemsize=4, budget=64 * 1024 * 1024)


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


# ---------------------------------------------------------------------------- rankings
def rank_to_center(
    latents: Any,
    centre: np.ndarray,
    metric: Metric = "euclidean",
    k: int = 10,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows nearest ``centre``, best first, with their distances / similarities."""
    return nearest(as_rows(latents), centre, k, metric, exclude)


@dataclass
class RepresentativeSet:
    """Representatives in long format plus the centres behind them.

    ``table``: one row per (group, center, metric, rank) with ``crop_index`` and ``score``
    (Euclidean distance, or cosine similarity) and, when requested, ``stability``.
    ``centres``: (group, center) -> centre vector. ``theoretical``: (group, center) ->
    decoded centre image, when a decoder was given.
    """

    table: pd.DataFrame
    centres: dict[tuple[Hashable, str], np.ndarray]
    theoretical: dict[tuple[Hashable, str], np.ndarray] = field(default_factory=dict)


def representatives(
    latents: Any,
    *,
    centers: Sequence[str] = CENTERS,
    metrics: Sequence[str] = ("euclidean", "cosine"),
    k: int = 5,
    groups: Any = None,
    noise_label: Hashable | None = -1,
    decode: Decode | None = None,
    stability: bool = False,
    n_boot: int = 50,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> RepresentativeSet:
    """Practical (nearest real crops) and theoretical (decoded centre) representatives.

    Without ``groups`` there is one scope, the group ``"all"``. With ``groups`` (one value
    per row) each group's centre and ranking use only that group's rows; None/NaN values and
    ``noise_label`` are left out. ``stability=True`` adds the bootstrap top-k frequency
    (see :func:`stability`) of every selected crop. ``should_stop()`` is polled before each
    scope and ranking; when it returns True an :class:`InterruptedError` is raised.
    """
    return _select(
        as_rows(latents),
        centers,
        metrics,
        k,
        groups,
        noise_label,
        decode,
        stability,
        n_boot,
        seed,
        should_stop=should_stop,
    )


def pixel_representatives(
    crops: Any,
    *,
    n_crops: int | None = None,
    centers: Sequence[str] = CENTERS,
    metrics: Sequence[str] = ("euclidean", "cosine"),
    k: int = 5,
    groups: Any = None,
    noise_label: Hashable | None = -1,
    stability: bool = False,
    n_boot: int = 50,
    seed: int = 0,
) -> RepresentativeSet:
    """The pixel-space baseline: the same selection on flattened crops.

    ``crops`` is an (N, S, S) array-like (NumPy, zarr) or a reader ``read(index) -> (n, S, S)``
    such as ``Project.read_crops`` (then ``n_crops`` is required); rows are read in chunks.
    The theoretical images are the centres themselves, reshaped to (S, S).
    """
    x = as_rows(crops, n_crops)
    shape = np.shape(crops(slice(0, 1)))[1:] if callable(crops) else tuple(crops.shape[1:])

    def as_images(centres: np.ndarray) -> np.ndarray:
        return centres.reshape(len(centres), *shape)

    return _select(x, centers, metrics, k, groups, noise_label, as_images, stability, n_boot, seed)


def _select(
    x: Any,
    centers: Sequence[str],
    metrics: Sequence[str],
    k: int,
    groups: Any,
    noise_label: Hashable | None,
    decode: Decode | None,
    with_stability: bool,
    n_boot: int,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
) -> RepresentativeSet:
    for method in centers:
        if method not in CENTERS:
            raise InputError(f"centre must be one of {CENTERS}, got {method!r}")
    for metric in metrics:
        check_metric(metric)
    parts, centres = [], {}
    for value, code, members in _scopes(groups, x.shape[0], noise_label):
        _check_stop(should_stop)
        scope = _subset(x, members)
        vectors = np.stack([center(scope, method) for method in centers])
        centres.update({(value, method): v for method, v in zip(centers, vectors, strict=True)})
        boots = (
            np.concatenate(
                [
                    _bootstrap_centres(scope, method, v, n_boot, _rng(seed, code, method))
                    for method, v in zip(centers, vectors, strict=True)
                ]
            )
            if with_stability
            else None
        )
        _check_stop(should_stop)
        # one pass over the scope per metric ranks every centre (and bootstrap centre)
        ranked = {metric: nearest(scope, vectors, k, metric) for metric in metrics}
        boot_top = {
            metric: nearest(scope, boots, k, metric)[0].reshape(len(centers), n_boot, -1)
            for metric in (metrics if boots is not None else ())
        }
        for i, method in enumerate(centers):
            for metric in metrics:
                idx, scores = ranked[metric][0][i], ranked[metric][1][i]
                part = pd.DataFrame(
                    {
                        "group": pd.Series([value] * len(idx), dtype=object),
                        "center": method,
                        "metric": metric,
                        "rank": np.arange(1, len(idx) + 1),
                        "crop_index": idx if members is None else members[idx],
                        "score": scores,
                    }
                )
                if boots is not None:
                    part["stability"] = _frequency(boot_top[metric][i], idx)
                parts.append(part)
    columns = TABLE_COLUMNS + (["stability"] if with_stability else [])
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return RepresentativeSet(table, centres, _decode_centres(centres, decode))


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise InterruptedError("representatives: stopped")


def _decode_centres(
    centres: dict[tuple[Hashable, str], np.ndarray], decode: Decode | None
) -> dict[tuple[Hashable, str], np.ndarray]:
    if decode is None or not centres:
        return {}
    keys = list(centres)
    images = np.asarray(decode(np.stack([centres[key] for key in keys]).astype(np.float32)))
    if images.ndim != 3 or len(images) != len(keys):
        raise InputError(f"decode returned shape {images.shape}, expected ({len(keys)}, S, S)")
    return dict(zip(keys, images, strict=True))


def _scopes(
    groups: Any, n: int, noise_label: Hashable | None
) -> list[tuple[Hashable, int, np.ndarray | None]]:
    """(group value, group code, member rows) per scope; one ``"all"`` scope without groups."""
    if groups is None:
        return [(ALL, 0, None)]
    values = pd.Series(groups)
    if len(values) != n:
        raise InputError(f"{len(values)} group values for {n} crops")
    try:
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError:  # mixed types cannot be sorted
        codes, uniques = pd.factorize(values)
    return [
        (value, code, np.flatnonzero(codes == code))
        for code, value in enumerate(uniques)
        if noise_label is None or value != noise_label
    ]


# ---------------------------------------------------------------------------- stability
def stability(
    latents: Any,
    selected_indices: np.ndarray | Sequence[int],
    *,
    center: str = "mean",
    metric: Metric = "euclidean",
    k: int = 5,
    n_boot: int = 50,
    seed: int = 0,
    groups: Any = None,
    noise_label: Hashable | None = -1,
) -> np.ndarray:
    """Per selected crop, the fraction of bootstrap resamples in which it stays in the top k.

    Each resample draws the scope's crops with replacement and recomputes the centre; the
    scope's crops (each once) are then re-ranked against it. This measures how much the
    choice depends on the sample the centre was estimated from. With ``groups`` the scope is
    the selected crop's group; crops outside every scope get NaN. Resamples are seeded per
    (seed, group, centre), so :func:`representatives` with ``stability=True`` agrees.
    Cost: ``n_boot`` centre computations on materialised resamples per scope.
    """
    x = as_rows(latents)
    check_metric(metric)
    selected = np.asarray(selected_indices, dtype=np.int64)
    if len(selected) and (selected.min() < 0 or selected.max() >= x.shape[0]):
        raise InputError(f"selected crops must be rows 0..{x.shape[0] - 1}")
    out = np.full(len(selected), np.nan)
    for _, code, members in _scopes(groups, x.shape[0], noise_label):
        inside = np.ones(len(selected), bool) if members is None else np.isin(selected, members)
        if not inside.any():
            continue
        local = selected[inside] if members is None else np.searchsorted(members, selected[inside])
        scope = _subset(x, members)
        estimate = _center(scope, center)
        boots = _bootstrap_centres(scope, center, estimate, n_boot, _rng(seed, code, center))
        out[inside] = _frequency(nearest(scope, boots, k, metric)[0], local)
    return out


def _rng(seed: int, code: int, method: str) -> np.random.Generator:
    return np.random.default_rng([seed, code, zlib.crc32(method.encode())])


def _bootstrap_centres(
    x: Any, method: str, estimate: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    n = x.shape[0]
    init = estimate if method == "geomedian" else None
    return np.stack([_center(x[rng.integers(0, n, n)], method, init=init) for _ in range(n_boot)])


def _frequency(top: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Per row in ``local``, the fraction of rows of ``top`` (n_boot, k) that contain it."""
    return (top[:, :, None] == np.asarray(local)[None, None, :]).any(axis=1).mean(axis=0)


# ---------------------------------------------------------------------------- export
def safe_name(value: Any, max_length: int = 64) -> str:
    """A file-name fragment safe on every OS: only ``[A-Za-z0-9._-]``, no leading/trailing dot."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip(".")
    return name[:max_length].rstrip(".") or "group"


def _unique_safe_names(values: Iterable[Hashable]) -> dict[Hashable, str]:
    """Distinct safe names per value (case-insensitively, for macOS and Windows)."""
    names: dict[Hashable, str] = {}
    used: set[str] = set()
    for value in values:
        if value in names:
            continue
        base = name = safe_name(value)
        suffix = 2
        while name.lower() in used:
            name, suffix = f"{base}-{suffix}", suffix + 1
        used.add(name.lower())
        names[value] = name
    return names


def export_representatives(
    table: pd.DataFrame,
    crops_reader: Callable[[np.ndarray], np.ndarray],
    provenance: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("tiff", "png"),
    overwrite: bool = False,
    theoretical: dict[tuple[Hashable, str], np.ndarray] | None = None,
    png_range: tuple[float, float] | None = (0.0, 1.0),
) -> list[Path]:
    """Write the chosen crops, a montage and ``representatives.csv``; return the paths.

    Per table row: ``<group>_<center>_<metric>_rank<NN>_crop<index>.tif`` (float32) and
    ``.png`` (8-bit, ``png_range`` mapped to 0-255, or each image's own range when None).
    Decoded centres from ``theoretical`` become ``theoretical_<group>_<center>.*``. The CSV
    joins the table with ``provenance`` rows (on ``crop_index`` when it has that column,
    else by position) and names each row's files. ``montage.png`` has one row per
    (group, center, metric), theoretical image first. Files are written to a hidden staging
    folder beside ``out_dir`` and moved in at the end. A non-empty ``out_dir`` raises
    :class:`ExportExistsError` unless ``overwrite`` (then same-named files are replaced and
    other files are left alone). A folder that cannot be written (a file in its path, no
    permission, a full disk) raises :class:`ExportWriteError`, and the staging is removed.
    """
    formats = tuple(formats)
    if not formats or not set(formats) <= {"tiff", "png"}:
        raise InputError(f"formats must be a non-empty subset of ('tiff', 'png'), got {formats}")
    missing = set(TABLE_COLUMNS) - set(table.columns)
    if missing:
        raise InputError(f"the representatives table lacks columns {sorted(missing)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportExistsError(f"{out_dir} is a file; choose a folder to export into")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportExistsError(
            f"{out_dir} already contains files; choose an empty folder or allow overwriting"
        )
    table = table.reset_index(drop=True)
    theoretical = theoretical or {}
    names = _unique_safe_names([*table["group"], *(group for group, _ in theoretical)])
    stems = [
        f"{names[row.group]}_{safe_name(row.center)}_{safe_name(row.metric)}"
        f"_rank{int(row.rank):02d}_crop{int(row.crop_index)}"
        for row in table.itertuples()
    ]
    if len(set(stems)) != len(stems):
        raise InputError("the table repeats a (group, center, metric, rank) row")
    unique, inverse = np.unique(table["crop_index"].to_numpy(np.int64), return_inverse=True)
    images = np.asarray(crops_reader(unique))[inverse] if len(unique) else np.empty((0, 1, 1))
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        files = {
            fmt: [
                _write_image(staging, stem, image, fmt, png_range)
                for stem, image in zip(stems, images, strict=True)
            ]
            for fmt in formats
        }
        for (group, method), image in theoretical.items():
            stem = f"theoretical_{names[group]}_{safe_name(method)}"
            for fmt in formats:
                _write_image(staging, stem, np.asarray(image), fmt, png_range)
        if len(table):
            _montage(staging / "montage.png", table, images, theoretical, png_range)
        csv = _with_provenance(table, provenance)
        for fmt in formats:
            csv[f"{fmt}_file"] = files[fmt]
        spreadsheet_safe(csv).to_csv(staging / "representatives.csv", index=False)
        return _move_into(staging, out_dir)
    except OSError as err:
        raise write_error(out_dir, err) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_error(out_dir: Path, err: OSError) -> ExportWriteError:
    """Why ``out_dir`` could not be written, in words (a file in the way, permissions ...)."""
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    else:
        reason = err.strerror or str(err)
    return ExportWriteError(
        f"cannot export to {out_dir}: {reason}; choose a folder you can write to"
    )


def _write_image(
    folder: Path, stem: str, image: np.ndarray, fmt: str, png_range: tuple[float, float] | None
) -> str:
    if fmt == "tiff":
        import tifffile

        name = f"{stem}.tif"
        tifffile.imwrite(folder / name, np.asarray(image, dtype=np.float32))
    else:
        from PIL import Image

        name = f"{stem}.png"
        Image.fromarray(_to_uint8(image, png_range)).save(folder / name)
    return name


def _to_uint8(image: np.ndarray, png_range: tuple[float, float] | None) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    finite = image[np.isfinite(image)]
    lo, hi = png_range if png_range else (finite.min(initial=0), finite.max(initial=1))
    scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return np.round(np.clip(np.nan_to_num(scaled), 0, 1) * 255).astype(np.uint8)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the text cells a spreadsheet would run as a formula (starting with
    = + - @, a tab or a carriage return: an ``image_path`` like ``=HYPERLINK(...)``) prefixed
    with ``'``, so that they show as text."""
    out = frame.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]):
            out[column] = out[column].map(_escape_formula)
    return out


def _escape_formula(value: Any) -> Any:
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _with_provenance(table: pd.DataFrame, provenance: pd.DataFrame) -> pd.DataFrame:
    """Table rows joined with their crops' provenance rows (columns not already present)."""
    index = table["crop_index"].to_numpy(np.int64)
    if "crop_index" in provenance.columns:
        rows = provenance.drop_duplicates("crop_index").set_index("crop_index").reindex(index)
    else:
        if len(index) and index.max() >= len(provenance):
            raise InputError(f"crop index {index.max()} is beyond the {len(provenance)} rows")
        rows = provenance.iloc[index]
    extra = rows.drop(columns=[c for c in rows.columns if c in table.columns])
    return pd.concat([table, extra.reset_index(drop=True)], axis=1)


def _montage(
    path: Path,
    table: pd.DataFrame,
    images: np.ndarray,
    theoretical: dict[tuple[Hashable, str], np.ndarray],
    png_range: tuple[float, float] | None,
) -> None:
    """One row per (group, center, metric): the theoretical image, then ranks 1..k."""
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(zip(table["group"], table["center"], table["metric"], strict=True)))
    lead = 1 if theoretical else 0
    n_cols = lead + int(table["rank"].max())
    vmin, vmax = png_range if png_range else (None, None)
    fig = Figure(figsize=(1.3 * n_cols + 1.5, 1.4 * len(keys)))
    axes = fig.subplots(len(keys), n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, (group, method, metric) in enumerate(keys):
        first = axes[r, 0]
        first.text(
            -0.1,
            0.5,
            f"{group}\n{method}\n{metric}",
            ha="right",
            va="center",
            transform=first.transAxes,
            fontsize=7,
        )
        if (group, method) in theoretical:
            first.imshow(theoretical[(group, method)], cmap="gray", vmin=vmin, vmax=vmax)
            first.set_title("theoretical", fontsize=7)
        rows = np.flatnonzero(
            (table["group"] == group) & (table["center"] == method) & (table["metric"] == metric)
        )
        for i in rows:
            rank, crop = int(table["rank"].iat[i]), int(table["crop_index"].iat[i])
            ax = axes[r, lead + rank - 1]
            ax.imshow(images[i], cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_title(f"#{rank} crop {crop}", fontsize=7)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=1.5 / width, right=0.98, bottom=0.1 / height, top=1 - 0.3 / height, hspace=0.4
    )
    fig.savefig(path, dpi=min(100.0, 30_000 / height))  # stay within image size limits


def _move_into(staging: Path, out_dir: Path) -> list[Path]:
    """Move every staged file into ``out_dir`` (a rename of the folder when it is absent)."""
    names = sorted(p.name for p in staging.iterdir())
    if out_dir.exists():
        for name in names:
            os.replace(staging / name, out_dir / name)
    else:
        os.rename(staging, out_dir)
    return [out_dir / name for name in names]
