"""Labels + image → fixed-size, centred nucleus crops and a measurement table.

Measurements come from one pass over the labelled pixels (``np.bincount`` moments and
``scipy.ndimage.find_objects``), and every crop of an image is sampled in one vectorised
gather (or one ``map_coordinates`` call when nuclei are rotated or rescaled), so the cost
does not grow with one full-image operation per nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .arrays import as_array, read_plane
from .errors import InputError, NoNucleiError
from .store import CropParams

BATCH = 512
FILL = 0.9  # a rescaled nucleus spans this fraction of the crop
CROP_SIZES = (32, 48, 64, 96, 128, 192, 256)  # offered crop sizes (each fits auto blocks)
SUGGEST_MARGIN = 1.15  # the suggested crop is this much wider than the large nuclei

MEASUREMENT_COLUMNS = [
    "plane",
    "label",
    "centroid_y",
    "centroid_x",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "area",
    "mean_intensity",
    "eccentricity",
    "orientation",
    "major_axis_length",
    "touches_border",
]
IDENTITY_COLUMNS = ("crop_index", "image_id", "image_path", "plane", "label")  # which nucleus
# what an export names for each crop: where it comes from, where it lies, how large it is
PROVENANCE_COLUMNS = (
    *IDENTITY_COLUMNS,
    *MEASUREMENT_COLUMNS[2 : MEASUREMENT_COLUMNS.index("area") + 1],
)


@dataclass
class CropResult:
    """Crops of the kept nuclei, their table rows, and measurements of every nucleus."""

    crops: np.ndarray  # (N, S, S) float32 in [0, 1]
    table: pd.DataFrame  # one row per crop
    measurements: pd.DataFrame  # one row per label (kept or not), with a ``cropped`` flag


# ---------------------------------------------------------------------------- measurements
def measure_plane(plane: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per-label geometry and intensity for one plane (labels need not be sequential).

    Orientation and eccentricity follow scikit-image's ``regionprops`` conventions.
    """
    flat = np.flatnonzero(labels)
    if len(flat) == 0:
        return pd.DataFrame(columns=MEASUREMENT_COLUMNS[1:])
    rows, cols = np.divmod(flat, labels.shape[1])
    ids = labels.ravel()[flat]
    present, inverse = _dense_ids(ids)
    area = np.bincount(inverse).astype(np.float64)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=values) / area

    r, c = rows.astype(np.float64), cols.astype(np.float64)
    cy, cx = mean(r), mean(c)
    dr, dc = r - cy[inverse], c - cx[inverse]
    mu_rr, mu_cc, mu_rc = mean(dr * dr), mean(dc * dc), mean(dr * dc)
    half_gap = np.sqrt(((mu_rr - mu_cc) / 2) ** 2 + mu_rc**2)
    lam1 = (mu_rr + mu_cc) / 2 + half_gap
    lam2 = (mu_rr + mu_cc) / 2 - half_gap
    eccentricity = np.sqrt(np.clip(1 - lam2 / np.where(lam1 > 0, lam1, 1), 0, 1))
    orientation = 0.5 * np.arctan2(2 * mu_rc, mu_rr - mu_cc)
    orientation[(mu_rr == mu_cc) & (mu_rc == 0)] = -np.pi / 4  # regionprops' isotropic case

    bbox = _bounding_boxes(rows, cols, inverse, len(present), labels.shape)
    touches = (
        (bbox[:, 0] == 0)
        | (bbox[:, 1] == 0)
        | (bbox[:, 2] == labels.shape[0])
        | (bbox[:, 3] == labels.shape[1])
    )
    return pd.DataFrame(
        {
            "label": present.astype(np.int64),
            "centroid_y": cy,
            "centroid_x": cx,
            "bbox_y0": bbox[:, 0],
            "bbox_x0": bbox[:, 1],
            "bbox_y1": bbox[:, 2],
            "bbox_x1": bbox[:, 3],
            "area": area,
            "mean_intensity": mean(np.asarray(plane).ravel()[flat].astype(np.float64)),
            "eccentricity": eccentricity,
            "orientation": orientation,
            "major_axis_length": 4 * np.sqrt(np.maximum(lam1, 0)),
            "touches_border": touches,
        }
    )


def _bounding_boxes(
    rows: np.ndarray, cols: np.ndarray, inverse: np.ndarray, n: int, shape: tuple[int, int]
) -> np.ndarray:
    """``(n, 4)`` boxes ``y0, x0, y1, x1`` (exclusive ends) of each object's pixels."""
    lo = np.full((2, n), max(shape), dtype=np.intp)
    hi = np.full((2, n), -1, dtype=np.intp)
    for axis, coords in enumerate((rows, cols)):
        np.minimum.at(lo[axis], inverse, coords)
        np.maximum.at(hi[axis], inverse, coords)
    return np.column_stack([lo[0], lo[1], hi[0] + 1, hi[1] + 1])


def _dense_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids (sorted) and each pixel's index among them: one counting pass
    through a lookup table when the ids are not much larger than the pixel count, a sort
    otherwise (huge, sparse ids)."""
    top = int(ids.max())
    if top > 4 * len(ids) + 2**20:
        return np.unique(ids, return_inverse=True)
    present = np.flatnonzero(np.bincount(ids, minlength=top + 1))
    lookup = np.zeros(top + 1, dtype=np.intp)
    lookup[present] = np.arange(len(present))
    return present, lookup[ids]


def plane_percentiles(plane: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(plane, percentiles)`` (linear interpolation); for 8- and 16-bit images
    computed exactly from a histogram, which is several times faster than partitioning."""
    if plane.dtype not in (np.uint8, np.uint16) or plane.size == 0:
        lo, hi = np.percentile(plane, percentiles)
        return float(lo), float(hi)
    cumulative = np.cumsum(np.bincount(plane.ravel()))
    values = []
    for pct in percentiles:
        position = (plane.size - 1) * pct / 100
        k = int(np.floor(position))
        below, above = np.searchsorted(cumulative, [k, min(k + 1, plane.size - 1)], "right")
        values.append(float(below + (position - k) * (above - below)))
    return values[0], values[1]


# ---------------------------------------------------------------------------- normalisation
def normalize_plane(plane: np.ndarray, params: CropParams) -> np.ndarray:
    """Scale a plane towards [0, 1].

    ``"image"``: the plane's percentiles; ``"crop"``: min–max here, percentiles per crop later;
    ``"none"``: 8- and 16-bit unsigned images by their dtype's maximum, float images in
    [0, 1] unchanged; other images raise :class:`InputError` rather than give black or
    saturated crops.
    """
    if params.normalize == "none":
        check_unnormalised(plane)
        scale = np.iinfo(plane.dtype).max if np.issubdtype(plane.dtype, np.integer) else 1.0
        return plane.astype(np.float32) / np.float32(scale)
    if params.normalize == "image":
        lo, hi = plane_percentiles(plane, params.percentiles)
    else:
        lo, hi = float(plane.min()), float(plane.max())
    plane = plane.astype(np.float32, copy=False)
    return (plane - np.float32(lo)) / np.float32(hi - lo if hi > lo else 1.0)


def check_unnormalised(plane: np.ndarray) -> None:
    """Refuse images that ``normalize="none"`` cannot map to [0, 1] faithfully."""
    advice = "choose the 'image' or 'crop' normalisation"
    if np.issubdtype(plane.dtype, np.integer):
        if plane.dtype not in (np.uint8, np.uint16):
            raise InputError(
                f"normalize='none' divides by the dtype's maximum, which suits only 8- and "
                f"16-bit unsigned images, not {plane.dtype}; {advice}"
            )
        return
    lo, hi = float(plane.min()), float(plane.max())
    if lo < 0 or hi > 1:
        raise InputError(
            f"normalize='none' keeps float values as they are, but this image spans "
            f"{lo:g} to {hi:g} instead of 0 to 1; {advice}"
        )


def normalize_crops(crops: np.ndarray, masks: np.ndarray, params: CropParams) -> np.ndarray:
    """Per-crop percentile normalisation over each nucleus' own pixels (the whole window for
    a nucleus with no pixel in its window, e.g. one cut into far-apart pieces)."""
    lo_pct, hi_pct = params.percentiles
    has_pixels = masks.reshape(len(crops), -1).any(axis=1)[:, None, None]
    values = np.where(masks | ~has_pixels, crops, np.nan).reshape(len(crops), -1)
    lo = np.nanpercentile(values, lo_pct, axis=1)[:, None, None]
    hi = np.nanpercentile(values, hi_pct, axis=1)[:, None, None]
    return (crops - lo) / np.where(hi > lo, hi - lo, 1.0)


# ---------------------------------------------------------------------------- sampling
def gather_windows(plane: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Copy the ``size``×``size`` windows of ``plane`` whose top-left corners are given; the
    parts of a window outside the plane read as 0 (no padded copy of the plane is made)."""
    h, w = plane.shape
    inside = (
        (corners[:, 0] >= 0)
        & (corners[:, 1] >= 0)
        & (corners[:, 0] + size <= h)
        & (corners[:, 1] + size <= w)
    )
    if inside.all():
        views = np.lib.stride_tricks.sliding_window_view(plane, (size, size))
        return views[corners[:, 0], corners[:, 1]]
    out = np.zeros((len(corners), size, size), dtype=plane.dtype)
    if inside.any():
        views = np.lib.stride_tricks.sliding_window_view(plane, (size, size))
        out[inside] = views[corners[inside, 0], corners[inside, 1]]
    for i in np.flatnonzero(~inside):  # near the border: copy the overlap
        r0, c0 = corners[i]
        rs, re, cs, ce = max(r0, 0), min(r0 + size, h), max(c0, 0), min(c0 + size, w)
        if rs < re and cs < ce:
            out[i, rs - r0 : re - r0, cs - c0 : ce - c0] = plane[rs:re, cs:ce]
    return out


def sample_rotated(
    plane: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray,
    angles: np.ndarray,
    scales: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample windows rotated by ``angles`` (crop columns along the angle) and stretched by
    ``scales`` (image pixels per crop pixel) in one ``map_coordinates`` call each for the
    image (linear) and the labels (nearest). Outside the image reads as 0."""
    offsets = np.arange(size, dtype=np.float64) - size // 2
    u, v = np.meshgrid(offsets, offsets, indexing="ij")  # crop rows, crop columns
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    s = scales[:, None, None]
    # crop columns run along (cos, sin) in (row, col) image coordinates; rows along (sin, -cos)
    rows = centers[:, 0, None, None] + s * (u * sin + v * cos)
    cols = centers[:, 1, None, None] + s * (-u * cos + v * sin)
    coords = np.stack([rows, cols])
    image = ndi.map_coordinates(plane, coords, order=1, mode="constant", cval=0.0)
    lab = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return image.astype(np.float32), lab


def crop_scales(measurements: pd.DataFrame, params: CropParams) -> np.ndarray:
    """Image pixels per crop pixel of each nucleus: 1, or more for a nucleus shrunk to fit
    (``rescale_large``: its extent spans :data:`FILL` of the crop)."""
    if not params.rescale_large:
        return np.ones(len(measurements))
    if params.align:
        extent = measurements["major_axis_length"].to_numpy(np.float64)
    else:
        extent = nucleus_extent(measurements)
    return np.maximum(extent / (FILL * params.size), 1.0)


def crop_plane(
    plane: np.ndarray, labels: np.ndarray, measurements: pd.DataFrame, params: CropParams
) -> np.ndarray:
    """Crops for the measured nuclei of one plane.

    Unrotated, unscaled nuclei are copied straight out of the plane; the others are
    resampled. Both go in batches to bound memory.
    """
    size = params.size
    norm = normalize_plane(plane, params)
    centers = measurements[["centroid_y", "centroid_x"]].to_numpy(np.float64)
    n = len(measurements)
    angles = measurements["orientation"].to_numpy(np.float64) if params.align else np.zeros(n)
    scales = crop_scales(measurements, params)
    ids = measurements["label"].to_numpy()
    simple = np.flatnonzero((angles == 0) & (scales == 1))
    resampled = np.flatnonzero((angles != 0) | (scales != 1))
    out = np.empty((n, size, size), dtype=np.float32)
    if len(simple):
        corners = np.rint(centers[simple]).astype(np.int64) - size // 2
        for start in range(0, len(simple), BATCH):
            part = simple[start : start + BATCH]
            rows = corners[start : start + BATCH]
            windows = gather_windows(norm, rows, size)
            out[part] = _finish(windows, gather_windows(labels, rows, size), ids[part], params)
    for start in range(0, len(resampled), BATCH):
        part = resampled[start : start + BATCH]
        windows, window_labels = sample_rotated(
            norm, labels, centers[part], angles[part], scales[part], size
        )
        out[part] = _finish(windows, window_labels, ids[part], params)
    return out


def _finish(
    windows: np.ndarray, window_labels: np.ndarray, ids: np.ndarray, params: CropParams
) -> np.ndarray:
    """Per-crop normalisation, background fill and clipping to [0, 1], in place on
    ``windows`` (a fresh copy made by the sampling). ``background="mean"`` fills outside the
    nucleus with its interior mean (0 for a nucleus with no pixel in its window)."""
    masks = window_labels == ids[:, None, None]
    if params.normalize == "crop":
        windows = normalize_crops(windows, masks, params)
    if params.background == "zero":
        np.copyto(windows, 0.0, where=~masks)
    elif params.background == "mean":
        inside = masks.sum(axis=(1, 2))
        means = np.where(masks, windows, 0).sum(axis=(1, 2)) / np.maximum(inside, 1)
        np.copyto(windows, np.broadcast_to(means[:, None, None], windows.shape), where=~masks)
    return np.clip(windows, 0.0, 1.0, out=windows)


# ---------------------------------------------------------------------------- entry point
def crop_nuclei(planes: Any, labels: np.ndarray, params: CropParams | None = None) -> CropResult:
    """Crop every nucleus of ``planes`` (``(Y, X)`` or ``(P, Y, X)``) given matching labels.

    ``planes`` may be a dask or zarr array; it is then read one plane at a time.
    """
    params = params or CropParams()
    planes, labels = as_array(planes), np.asarray(labels)
    if labels.shape != planes.shape:
        raise InputError(
            f"labels of shape {labels.shape} do not match the image of shape {planes.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise InputError("labels must not be negative")
    if planes.ndim == 2:
        planes, labels = planes[np.newaxis], labels[np.newaxis]
    tables, crops = [], []
    for p, plane_labels in enumerate(labels):
        plane = read_plane(planes, p)
        measured = measure_plane(plane, plane_labels)
        measured.insert(0, "plane", p)
        tables.append(measured)
        keep = ~measured["touches_border"].to_numpy(bool) if params.skip_border else slice(None)
        crops.append(crop_plane(plane, plane_labels, measured[keep], params))
    measurements = pd.concat(tables, ignore_index=True)
    if len(measurements) == 0:
        raise NoNucleiError("no nuclei: the labels contain no objects")
    cropped = (
        ~measurements["touches_border"].to_numpy(bool)
        if params.skip_border
        else np.ones(len(measurements), bool)
    )
    measurements["cropped"] = cropped
    table = measurements[cropped].drop(columns="cropped").reset_index(drop=True)
    return CropResult(crops[0] if len(crops) == 1 else np.concatenate(crops), table, measurements)


def nucleus_extent(table: pd.DataFrame) -> np.ndarray:
    """Each nucleus's larger bounding-box side in pixels (what a crop must hold)."""
    height = table["bbox_y1"].to_numpy(np.float64) - table["bbox_y0"].to_numpy(np.float64)
    width = table["bbox_x1"].to_numpy(np.float64) - table["bbox_x0"].to_numpy(np.float64)
    return np.maximum(height, width)


def suggest_crop_size(table: pd.DataFrame) -> int | None:
    """The smallest offered crop size that holds 95 % of the measured nuclei with a margin,
    so that nuclei fill the crop (None without measurements)."""
    if len(table) == 0 or not {"bbox_y0", "bbox_x1"} <= set(table):
        return None
    wanted = SUGGEST_MARGIN * float(np.percentile(nucleus_extent(table), 95))
    return next((size for size in CROP_SIZES if size >= wanted), CROP_SIZES[-1])


def crop_size_note(table: pd.DataFrame, crop_size: int) -> str | None:
    """A suggestion when the crop size is far from the measured nuclei (None when it fits):
    mostly-background crops teach an autoencoder little, cut nuclei lose their shape."""
    suggested = suggest_crop_size(table)
    if suggested is None or suggested == crop_size:
        return None
    if CROP_SIZES.index(suggested) - _nearest_offered(crop_size) in (-1, 0, 1):
        return None  # one step away: close enough
    extent = float(np.percentile(nucleus_extent(table), 95))
    return (
        f"95 % of the nuclei are at most {extent:.0f} px across: crop size {suggested} would "
        f"fill it with them (now {crop_size})"
    )


def _nearest_offered(size: int) -> int:
    """Index of the offered crop size closest to ``size``."""
    return int(np.argmin([abs(np.log2(size / s)) for s in CROP_SIZES]))
