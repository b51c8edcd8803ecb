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
    rows, cols = np.nonzero(labels)
    if len(rows) == 0:
        return pd.DataFrame(columns=MEASUREMENT_COLUMNS[1:])
    ids = labels[rows, cols]
    present, inverse = np.unique(ids, return_inverse=True)
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

    objects = ndi.find_objects(labels)
    bbox = np.array(
        [[s.start for s in objects[i - 1]] + [s.stop for s in objects[i - 1]] for i in present]
    )
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
            "mean_intensity": mean(plane[rows, cols].astype(np.float64)),
            "eccentricity": eccentricity,
            "orientation": orientation,
            "major_axis_length": 4 * np.sqrt(np.maximum(lam1, 0)),
            "touches_border": touches,
        }
    )


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
    plane = plane.astype(np.float32, copy=False)
    if params.normalize == "image":
        lo, hi = np.percentile(plane, params.percentiles)
    else:
        lo, hi = float(plane.min()), float(plane.max())
    return (plane - lo) / np.float32(hi - lo if hi > lo else 1.0)


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
def gather_windows(padded: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Copy ``size``×``size`` windows whose top-left corners (in ``padded``) are given."""
    views = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    return views[corners[:, 0], corners[:, 1]]


def sample_rotated(
    plane: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
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
    rows = centres[:, 0, None, None] + s * (u * sin + v * cos)
    cols = centres[:, 1, None, None] + s * (-u * cos + v * sin)
    coords = np.stack([rows, cols])
    image = ndi.map_coordinates(plane, coords, order=1, mode="constant", cval=0.0)
    lab = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return image.astype(np.float32), lab


def crop_plane(
    plane: np.ndarray, labels: np.ndarray, measurements: pd.DataFrame, params: CropParams
) -> np.ndarray:
    """Crops for the measured nuclei of one plane.

    Unrotated, unscaled nuclei are copied out of a once-padded plane; the others are
    resampled. Both go in batches to bound memory.
    """
    size = params.size
    norm = normalize_plane(plane, params)
    centres = measurements[["centroid_y", "centroid_x"]].to_numpy(np.float64)
    n = len(measurements)
    angles = measurements["orientation"].to_numpy(np.float64) if params.align else np.zeros(n)
    scales = np.ones(n)
    if params.rescale_large:
        if params.align:
            extent = measurements["major_axis_length"].to_numpy(np.float64)
        else:
            extent = np.maximum(
                measurements["bbox_y1"] - measurements["bbox_y0"],
                measurements["bbox_x1"] - measurements["bbox_x0"],
            ).to_numpy(np.float64)
        scales = np.maximum(extent / (FILL * size), 1.0)
    ids = measurements["label"].to_numpy()
    simple = np.flatnonzero((angles == 0) & (scales == 1))
    resampled = np.flatnonzero((angles != 0) | (scales != 1))
    out = np.empty((n, size, size), dtype=np.float32)
    if len(simple):
        padded_img, padded_lab = np.pad(norm, size), np.pad(labels, size)
        corners = np.rint(centres[simple]).astype(np.int64) - size // 2 + size
        for start in range(0, len(simple), BATCH):
            part = simple[start : start + BATCH]
            rows = corners[start : start + BATCH]
            windows = gather_windows(padded_img, rows, size)
            out[part] = _finish(windows, gather_windows(padded_lab, rows, size), ids[part], params)
    for start in range(0, len(resampled), BATCH):
        part = resampled[start : start + BATCH]
        windows, window_labels = sample_rotated(
            norm, labels, centres[part], angles[part], scales[part], size
        )
        out[part] = _finish(windows, window_labels, ids[part], params)
    return out


def _finish(
    windows: np.ndarray, window_labels: np.ndarray, ids: np.ndarray, params: CropParams
) -> np.ndarray:
    """Per-crop normalisation, background masking and clipping to [0, 1]."""
    masks = window_labels == ids[:, None, None]
    if params.normalize == "crop":
        windows = normalize_crops(windows, masks, params)
    if params.mask_background:
        windows = np.where(masks, windows, 0.0)
    return np.clip(windows, 0.0, 1.0)


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
    return CropResult(np.concatenate(crops), table, measurements)
