"""Objective representatives: the real crops nearest a population's centres, per scope.

A *centre* (mean, coordinate-wise median or geometric median) summarises a population of
latents; decoded it is the *theoretical* image. The real crops ranked nearest the centre
(Euclidean distance or cosine similarity) are the *practical* representatives.

Scope. With ``groups`` (cluster labels, conditions, ...) every group gets its own centre and
ranking computed from that group's crops only. Missing group values (None / NaN) are left
out, and so is HDBSCAN's noise label (``noise_label=-1`` by default): noise is not a
population, and its centre would represent nothing. Pass ``noise_label=None`` to treat it as
an ordinary group.

The centres themselves are in :mod:`.centers`, the export in :mod:`.export`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .centers import CENTERS, as_rows, subset
from .centers import center as compute_center
from .errors import InputError
from .explore import METRICS, Metric, check_metric, nearest
from .export import TABLE_COLUMNS
from .progress import ShouldStop

ALL = "all"
TOP_K = 5  # representatives per centre and metric
Decode = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- rankings
@dataclass
class RepresentativeSet:
    """Representatives in long format plus the centres behind them.

    ``table``: one row per (group, center, metric, rank) with ``crop_index`` and ``score``
    (Euclidean distance, or cosine similarity) and, when requested, ``stability``.
    ``centres``: (group, center) -> centre vector. ``theoretical``: (group, center) ->
    decoded centre image, when a decoder was given.
    """

    table: pd.DataFrame
    centers: dict[tuple[Hashable, str], np.ndarray]
    theoretical: dict[tuple[Hashable, str], np.ndarray] = field(default_factory=dict)


def representatives(
    latents: Any,
    *,
    centers: Sequence[str] = CENTERS,
    metrics: Sequence[str] = METRICS,
    k: int = TOP_K,
    groups: Any = None,
    noise_label: Hashable | None = -1,
    decode: Decode | None = None,
    stability: bool = False,
    n_boot: int = 50,
    seed: int = 0,
    should_stop: ShouldStop | None = None,
    candidates: np.ndarray | None = None,
) -> RepresentativeSet:
    """Practical (nearest real crops) and theoretical (decoded centre) representatives.

    Without ``groups`` there is one scope, the group ``"all"``. With ``groups`` (one value
    per row) each group's centre and ranking use only that group's rows; None/NaN values and
    ``noise_label`` are left out. ``candidates`` (one bool per row) limits the crops that may
    be picked; the centres are still computed from the whole group. ``stability=True`` adds
    the bootstrap top-k frequency (see :func:`stability`) of every selected crop.
    ``should_stop()`` is polled before each scope and ranking; when it returns True an
    :class:`InterruptedError` is raised.
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
        candidates=candidates,
    )


def pixel_representatives(
    crops: Any,
    *,
    n_crops: int | None = None,
    centers: Sequence[str] = CENTERS,
    metrics: Sequence[str] = METRICS,
    k: int = TOP_K,
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

    def as_images(points: np.ndarray) -> np.ndarray:
        return points.reshape(len(points), *shape)

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
    should_stop: ShouldStop | None = None,
    candidates: np.ndarray | None = None,
) -> RepresentativeSet:
    for method in centers:
        if method not in CENTERS:
            raise InputError(f"centre must be one of {CENTERS}, got {method!r}")
    for metric in metrics:
        check_metric(metric)
    parts, points = [], {}
    for value, code, members in _scopes(groups, x.shape[0], noise_label):
        _check_stop(should_stop)
        scope = subset(x, members)
        vectors = np.stack([compute_center(scope, method) for method in centers])
        points.update({(value, method): v for method, v in zip(centers, vectors, strict=True)})
        boots = (
            np.concatenate(
                [
                    _bootstrap_centers(scope, method, v, n_boot, _rng(seed, code, method))
                    for method, v in zip(centers, vectors, strict=True)
                ]
            )
            if with_stability
            else None
        )
        _check_stop(should_stop)
        excluded = _excluded(candidates, members, x.shape[0])
        # one pass over the scope per metric ranks every centre (and bootstrap centre)
        ranked = {metric: nearest(scope, vectors, k, metric, excluded) for metric in metrics}
        boot_top = {
            metric: nearest(scope, boots, k, metric, excluded)[0].reshape(len(centers), n_boot, -1)
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
    return RepresentativeSet(table, points, _decode_centers(points, decode))


def _excluded(candidates: np.ndarray | None, members: np.ndarray | None, n: int) -> np.ndarray:
    """The scope's rows (local positions) that are not candidates."""
    if candidates is None:
        return np.empty(0, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=bool)
    if len(candidates) != n:
        raise InputError(f"{len(candidates)} candidate flags for {n} crops")
    return np.flatnonzero(~(candidates if members is None else candidates[members]))


def spectrum(
    latents: Any,
    n: int,
    *,
    center: str = "mean",
    metric: Metric = "euclidean",
    groups: Any = None,
    noise_label: Hashable | None = -1,
    candidates: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per group, ``n`` crops evenly spaced along the ranking by distance to the group's
    centre, from the most typical (rank 1) to the least; the table has the columns of
    :func:`representatives`' table. Groups with fewer candidates give them all."""
    if n < 1:
        raise InputError(f"a spectrum needs at least 1 crop, got {n}")
    if center not in CENTERS:
        raise InputError(f"centre must be one of {CENTERS}, got {center!r}")
    x = as_rows(latents)
    parts = []
    for value, _, members in _scopes(groups, x.shape[0], noise_label):
        scope = subset(x, members)
        vector = compute_center(scope, center)
        excluded = _excluded(candidates, members, x.shape[0])
        order, scores = nearest(scope, vector, scope.shape[0], metric, excluded)
        steps = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))))
        steps = steps.astype(np.int64)
        chosen = order[steps]
        parts.append(
            pd.DataFrame(
                {
                    "group": pd.Series([value] * len(chosen), dtype=object),
                    "center": center,
                    "metric": metric,
                    "rank": np.arange(1, len(chosen) + 1),
                    "crop_index": chosen if members is None else members[chosen],
                    "score": scores[steps],
                }
            )
        )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TABLE_COLUMNS)


def _check_stop(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise InterruptedError("representatives: stopped")


def _decode_centers(
    centers: dict[tuple[Hashable, str], np.ndarray], decode: Decode | None
) -> dict[tuple[Hashable, str], np.ndarray]:
    if decode is None or not centers:
        return {}
    keys = list(centers)
    images = np.asarray(decode(np.stack([centers[key] for key in keys]).astype(np.float32)))
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
    k: int = TOP_K,
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
        scope = subset(x, members)
        estimate = compute_center(scope, center)
        boots = _bootstrap_centers(scope, center, estimate, n_boot, _rng(seed, code, center))
        out[inside] = _frequency(nearest(scope, boots, k, metric)[0], local)
    return out


def _rng(seed: int, code: int, method: str) -> np.random.Generator:
    return np.random.default_rng([seed, code, zlib.crc32(method.encode())])


def _bootstrap_centers(
    x: Any, method: str, estimate: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    n = x.shape[0]
    init = estimate if method == "geomedian" else None
    return np.stack(
        [compute_center(x[rng.integers(0, n, n)], method, init=init) for _ in range(n_boot)]
    )


def _frequency(top: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Per row in ``local``, the fraction of rows of ``top`` (n_boot, k) that contain it."""
    return (top[:, :, None] == np.asarray(local)[None, None, :]).any(axis=1).mean(axis=0)


# ---------------------------------------------------------------------------- typicality
TYPICALITY_MEASURES = ("area", "mean_intensity", "eccentricity", "major_axis_length", "mse")
PERCENTILE = "_percentile"  # suffix of a measure's percentile column


def typicality(picks: pd.DataFrame, measures: pd.DataFrame, groups: Any = None) -> pd.DataFrame:
    """``picks`` with, per pick, its percentile (0-100) within its group for each measure of
    :data:`TYPICALITY_MEASURES` that ``measures`` has (one row per crop), a ``typicality``
    score and ``typicality_vs_random``.

    ``typicality`` is 1 minus twice the mean distance of the percentiles from 50 %: 1 for a
    crop at its group's median in every measure, 0 at the extremes. ``typicality_vs_random``
    is the share of the group's crops that are less typical (ties count half): 0.5 is what a
    random pick of the group scores on average. The percentiles are pandas' ranks
    (``rank(pct=True)``, ties averaged) within each group; the group is the whole set
    without ``groups``.
    """
    present = [m for m in TYPICALITY_MEASURES if m in measures]
    out = picks.copy()
    if not present:
        return out
    keys = pd.Series([ALL] * len(measures) if groups is None else groups, dtype=object)
    keys = keys.astype(str).where(keys.notna(), None).reset_index(drop=True)
    values = measures[present].reset_index(drop=True).apply(pd.to_numeric, errors="coerce")
    percent = values.groupby(keys, dropna=False).rank(pct=True) * 100
    score = 1 - (percent - 50).abs().mean(axis=1, skipna=True) / 50
    versus = score.groupby(keys, dropna=False).rank(pct=True) - 0.5 / keys.map(keys.value_counts())
    index = out["crop_index"].to_numpy(np.int64)
    for measure in present:
        out[measure + PERCENTILE] = percent[measure].to_numpy()[index]
    out["typicality"] = score.to_numpy()[index]
    out["typicality_vs_random"] = versus.to_numpy()[index]
    return out
