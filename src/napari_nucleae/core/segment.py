"""Nucleus segmentation: a small cellpose adapter (v3 and v4) and a classical fallback."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import relabel_sequential, watershed

from .arrays import as_array, pixel_range, read_plane
from .errors import InputError, WeightsUnavailableError
from .progress import Progress, ShouldStop

log = logging.getLogger(__name__)

METHODS = ("auto", "cellpose", "classical")
CELLPOSE_MODELS = ("default", "cpsam", "nuclei", "cyto3")  # named models; a file path works too
MIN_SIDE = 8
MAX_PLANE_PIXELS = 2**28  # 16384 × 16384
MAX_PIXELS_ENV = "NUCLEAE_MAX_PLANE_PIXELS"
MAX_CHANNELS = 4  # a 3-D image with at most this many planes may be channel-first (C, Y, X)
CHANNEL_CORRELATION = 0.5  # planes of a z or time stack correlate more than this ...
CHANNEL_DISTRIBUTION = 0.2  # ... and their intensity distributions differ less (KS distance)
NOISE_SMOOTH_VARIANCE = 0.15  # a nuclear stain keeps most of its variance when smoothed
LABELS_FLATNESS = 0.9  # share of equal neighbours inside the foreground of a label image


@dataclass(frozen=True)
class SegmentParams:
    """Segmentation settings shared by the widget, the CLI and the API.

    ``method="auto"`` uses cellpose and falls back to the classical pipeline (with a note in
    the result) when cellpose or its weights are unavailable. ``model`` is a cellpose model
    name (``"cpsam"`` on cellpose 4; ``"nuclei"``, ``"cyto3"`` … on cellpose 3), a path to a
    custom model file, or ``"default"`` for the installed cellpose's nuclear default.
    """

    method: str = "auto"
    model: str = "default"
    diameter: float | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    gpu: bool | None = None
    min_area: int | None = None
    max_plane_pixels: int | None = None  # None: $NUCLEAE_MAX_PLANE_PIXELS or 2**28

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.diameter is not None and self.diameter <= 0:
            raise InputError(
                f"diameter must be positive (or empty for automatic), got {self.diameter}"
            )
        if self.max_plane_pixels is not None and self.max_plane_pixels < MIN_SIDE**2:
            raise InputError(
                f"max_plane_pixels must be at least {MIN_SIDE**2}, got {self.max_plane_pixels}"
            )


@dataclass
class Segmentation:
    """Labels for every plane (labels unique across planes), how they were made, and signs
    that the result is implausible."""

    labels: np.ndarray
    method: str
    method_note: str = ""  # e.g. the fallback from cellpose to the classical method
    warnings: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        """Everything worth telling the user, in one line."""
        return "; ".join(filter(None, [self.method_note, *self.warnings]))

    @property
    def n_nuclei(self) -> int:
        return int(len(np.unique(self.labels)) - (self.labels == 0).any())


# ---------------------------------------------------------------------------- input handling
def max_plane_pixels(limit: int | None = None) -> int:
    """The largest plane segmented: ``limit``, else ``$NUCLEAE_MAX_PLANE_PIXELS``, else 2**28."""
    if limit is not None:
        return limit
    value = os.environ.get(MAX_PIXELS_ENV)
    if not value:
        return MAX_PLANE_PIXELS
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{MAX_PIXELS_ENV}={value!r} is not a whole number of pixels") from None


def check_plane_size(shape: tuple[int, ...], limit: int | None = None) -> None:
    """Refuse planes ``(..., Y, X)`` above the pixel limit, before any pixel is read."""
    height, width = shape[-2:]
    limit = max_plane_pixels(limit)
    if height * width > limit:
        raise InputError(
            f"the image plane is {height}×{width} = {height * width:,} pixels, above the limit "
            f"of {limit:,} pixels (segmentation holds several float64 copies of a plane, "
            f"{8 * height * width / 2**30:.1f} GiB each). Tile the image or crop a region of "
            f"it, or raise the limit (the max_plane_pixels setting or the {MAX_PIXELS_ENV} "
            "environment variable) if this machine has the memory."
        )


def prepare_planes(
    image: Any,
    channel: int | None = None,
    channel_axis: int | None = None,
    max_pixels: int | None = None,
    stack: bool = False,
) -> tuple[Any, bool]:
    """Validate an image; return grayscale planes ``(P, Y, X)`` and whether it is a stack.

    Accepts 2-D ``(Y, X)`` and 3-D ``(T or Z, Y, X)`` images. Multichannel data needs a
    ``channel``; the channel axis is ``channel_axis``, else the last for RGB(A)-looking
    images, else the first when a ``channel`` is given. A 3-D image of at most
    :data:`MAX_CHANNELS` planes that differ like channels do (see :func:`looks_like_channels`)
    is refused unless ``stack``. NumPy images stay NumPy; dask, zarr and other lazy arrays
    come back as dask arrays, and nothing is read before the shape checks (see
    :func:`check_plane_size`).
    """
    image = as_array(image)
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise InputError(f"images must be numeric (integer or float), got dtype {image.dtype}")
    if channel_axis is None and image.ndim >= 3 and image.shape[-1] in (3, 4):
        channel_axis = -1
    if channel_axis is None and channel is not None and image.ndim == 3:
        channel_axis = 0  # a channel chosen in a (C, Y, X) image
    maybe_channels = (
        not stack and channel_axis is None and image.ndim == 3 and image.shape[0] <= MAX_CHANNELS
    )
    if channel_axis is not None:
        n_channels = image.shape[channel_axis]
        if channel is None:
            raise InputError(
                f"the image of shape {image.shape} has {n_channels} channels on axis "
                f"{channel_axis} (RGB or multichannel): choose the nuclear channel "
                f"(0–{n_channels - 1})"
            )
        if not 0 <= channel < n_channels:
            raise InputError(
                f"channel {channel} does not exist: the image has {n_channels} channels"
            )
        image = np.take(image, channel, axis=channel_axis)
    is_stack = image.ndim == 3
    if image.ndim == 2:
        image = image[np.newaxis]
    if image.ndim != 3:
        raise InputError(
            f"expected a 2-D (Y, X) or 3-D (T/Z, Y, X) image, got shape {image.shape}; for "
            "multichannel data choose a channel (and its axis)"
        )
    if min(image.shape[1:]) < MIN_SIDE:
        raise InputError(f"the image is too small ({image.shape[1]}×{image.shape[2]} pixels)")
    check_plane_size(image.shape, max_pixels)
    finite, lo, hi = pixel_range(image)
    if not finite:
        raise InputError("the image contains NaN or infinite values; clean or fill them first")
    if lo == hi:
        raise InputError(f"the image is empty: every pixel equals {lo:g}")
    if maybe_channels and len(image) > 1:
        refuse_channels(image)
    return image, is_stack


def refuse_channels(planes: Any) -> None:
    """Raise :class:`InputError` when the planes ``(P, Y, X)`` look like channels."""
    differ = looks_like_channels([_sample(read_plane(planes, i)) for i in range(len(planes))])
    if differ is not None:
        correlation, distance = differ
        n = len(planes)
        raise InputError(
            f"the image of shape {tuple(planes.shape)} looks like {n} channels on axis 0, not "
            f"a z or time stack: its planes differ in content (correlation {correlation:.2f}) "
            f"and in brightness (distribution distance {distance:.2f}). Choose the nuclear "
            f"channel (0–{n - 1}; --channel in the command line), or treat the image as a "
            "stack anyway (--stack)"
        )


def looks_like_channels(planes: list[np.ndarray]) -> tuple[float, float] | None:
    """The lowest correlation and the largest Kolmogorov–Smirnov distance between the
    intensity distributions of two planes when both say "channels" (planes of one stain in
    a z or time stack look alike and share a distribution), else None."""
    pairs = [(a, b) for i, a in enumerate(planes) for b in planes[i + 1 :]]
    correlation = min(_correlation(a, b) for a, b in pairs)
    distance = max(_ks_distance(a, b) for a, b in pairs)
    if correlation < CHANNEL_CORRELATION and distance > CHANNEL_DISTRIBUTION:
        return correlation, distance
    return None


def _sample(plane: np.ndarray, side: int = 512) -> np.ndarray:
    """A plane subsampled to about ``side`` × ``side`` pixels, as float64."""
    step = max(1, max(plane.shape) // side)
    return np.asarray(plane[::step, ::step], dtype=np.float64)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    both = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, both, side="right") / a.size
    cdf_b = np.searchsorted(b, both, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def implausible(plane: np.ndarray, n_nuclei: int) -> str:
    """Why a plane's segmentation is unlikely to be real nuclei ('' when nothing stands out):
    an image that is mostly pixel-to-pixel noise, or a label image passed as an image."""
    sample = _sample(plane)
    variance = sample.var()
    if n_nuclei and variance > 0:
        kept = gaussian(sample, sigma=2).var() / variance
        if kept < NOISE_SMOOTH_VARIANCE:
            return (
                f"the image varies mostly from one pixel to the next, like pure noise (smoothed, "
                f"it keeps {kept:.0%} of its variance; a nuclear stain keeps most of it): the "
                f"{n_nuclei} nuclei found are unlikely to be real"
            )
    if np.issubdtype(plane.dtype, np.integer) and len(np.unique(sample)) > 2:
        inside = (sample[:, 1:] != 0) & (sample[:, :-1] != 0)
        flat = sample[:, 1:][inside] == sample[:, :-1][inside]
        if flat.size and flat.mean() > LABELS_FLATNESS:
            return (
                "the image looks like a label image (regions of one whole number each), not a "
                "nuclear stain: segment the image itself, or crop with these labels directly"
            )
    return ""


# ---------------------------------------------------------------------------- cellpose adapter
def cellpose_version() -> int | None:
    """Major version of the installed cellpose, or None when it is not installed."""
    try:
        return int(importlib.metadata.version("cellpose").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return None


def default_model_name(major: int) -> str:
    """The nuclear model of a cellpose major version."""
    return "cpsam" if major >= 4 else "nuclei"


def expected_weights_path(model: str) -> Path:
    """Where cellpose looks for a named model's weights (or the custom path itself)."""
    if os.path.sep in model or Path(model).suffix or Path(model).exists():
        return Path(model).expanduser()
    from cellpose import models

    basename = f"{model}torch_0" if model in ("cyto", "cyto2", "nuclei") else model
    return Path(models.MODEL_DIR) / basename


_LOAD_FAILURES: dict[tuple[str, bool], tuple[WeightsUnavailableError, Path | None]] = {}


def load_cellpose(model: str, gpu: bool):
    """Load a cellpose model by name or path.

    Models are cached per process; so are failures, until the missing weights file appears.
    """
    failure, weights = _LOAD_FAILURES.get((model, gpu), (None, None))
    if failure is not None and not (weights is not None and weights.exists()):
        raise failure
    try:
        return _load_cellpose(model, gpu)
    except WeightsUnavailableError as err:
        _LOAD_FAILURES[model, gpu] = (err, _weights_if_known(model))
        raise


def _weights_if_known(model: str) -> Path | None:
    """The weights path of a model, or None when cellpose itself cannot be imported."""
    major = cellpose_version()
    try:
        return expected_weights_path(default_model_name(major) if model == "default" else model)
    except Exception:  # cellpose missing or broken: nothing to wait for
        return None


@functools.lru_cache(maxsize=4)
def _load_cellpose(model: str, gpu: bool):
    major = cellpose_version()
    if major is None:
        raise WeightsUnavailableError(
            "cellpose is not installed; install it or use the classical method"
        )
    try:
        from cellpose import models
    except Exception as err:  # e.g. a torchvision that does not match the installed torch
        raise WeightsUnavailableError(
            f"cellpose {major} is installed but cannot be imported ({type(err).__name__}: {err}); "
            "use the classical method or repair the cellpose installation"
        ) from err

    name = default_model_name(major) if model == "default" else model
    weights = expected_weights_path(name)
    is_path = weights == Path(name).expanduser()
    if is_path and not weights.exists():
        raise WeightsUnavailableError(f"no cellpose model file at {weights}")
    try:
        if major >= 4 or is_path:
            return models.CellposeModel(gpu=gpu, pretrained_model=str(weights) if is_path else name)
        return models.CellposeModel(gpu=gpu, model_type=name)
    except Exception as err:  # cellpose raises many kinds when weights cannot be fetched
        raise WeightsUnavailableError(
            f"cellpose model '{name}' could not be loaded: its weights are looked for at "
            f"{weights} and could not be downloaded ({type(err).__name__}: {err}). Copy the "
            "file there, choose a custom model file, or use the classical (scikit-image) method."
        ) from err


def cellpose_plane(plane: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Segment one plane with cellpose; returns sequential labels."""
    model = load_cellpose(params.model, _use_gpu(params))
    kwargs = {
        "diameter": params.diameter,
        "flow_threshold": params.flow_threshold,
        "cellprob_threshold": params.cellprob_threshold,
    }
    if cellpose_version() < 4:
        kwargs["channels"] = [0, 0]
    masks = model.eval(plane.astype(np.float32), **kwargs)[0]
    return relabel_sequential(np.asarray(masks, dtype=np.int32))[0]


# ---------------------------------------------------------------------------- classical fallback
def classical_plane(plane: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Smoothing, Otsu threshold, distance-transform watershed and a size filter."""
    diameter = params.diameter or 16.0
    smoothed = gaussian(plane, sigma=max(1.0, diameter / 12))
    if smoothed.min() == smoothed.max():
        return np.zeros(plane.shape, dtype=np.int32)
    mask = ndi.binary_fill_holes(smoothed > threshold_otsu(smoothed))
    distance = gaussian(ndi.distance_transform_edt(mask), sigma=max(1.0, diameter / 16))
    components, _ = ndi.label(mask)
    peaks = peak_local_max(
        distance, min_distance=max(2, int(diameter / 3)), labels=components, exclude_border=False
    )
    markers = np.zeros(plane.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=mask)
    min_area = params.min_area if params.min_area is not None else int(np.pi * (diameter / 4) ** 2)
    labels[(np.bincount(labels.ravel()) < min_area)[labels]] = 0
    return relabel_sequential(labels.astype(np.int32))[0]


# ---------------------------------------------------------------------------- entry point
def segment(
    image: Any,
    params: SegmentParams | None = None,
    *,
    channel: int | None = None,
    channel_axis: int | None = None,
    stack: bool = False,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> Segmentation:
    """Segment an image; labels have its spatial shape (``(Y, X)`` or ``(P, Y, X)``).
    ``stack`` treats a 3-D image as planes even when they differ like channels."""
    max_pixels = params.max_plane_pixels if params is not None else None
    planes, is_stack = prepare_planes(image, channel, channel_axis, max_pixels, stack)
    seg = segment_planes(planes, params, progress=progress, should_stop=should_stop)
    if not is_stack:
        seg.labels = seg.labels[0]
    return seg


def segment_planes(
    planes: Any,
    params: SegmentParams | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> Segmentation:
    """Segment validated planes ``(P, Y, X)`` one by one (a lazy stack is read one plane at a
    time); labels are unique across planes."""
    params = params or SegmentParams()
    method, note = params.method, ""
    if method in ("auto", "cellpose"):
        try:
            load_cellpose(params.model, _use_gpu(params))
            method = "cellpose"
        except WeightsUnavailableError as err:
            if params.method == "cellpose":
                raise
            method, note = "classical", f"cellpose unavailable, used the classical method: {err}"
            log.warning(note)
    run_plane = cellpose_plane if method == "cellpose" else classical_plane
    labels = np.zeros(planes.shape, dtype=np.int32)
    offset, warnings = 0, []
    for i in range(len(planes)):
        if should_stop is not None and should_stop():
            raise InterruptedError("segmentation cancelled")
        plane = read_plane(planes, i)
        plane_labels = run_plane(plane, params)
        labels[i] = np.where(plane_labels > 0, plane_labels + offset, 0)
        offset += int(plane_labels.max())
        warning = implausible(plane, int(plane_labels.max()))
        if warning and not warnings:
            warnings.append(warning if len(planes) == 1 else f"plane {i}: {warning}")
            log.warning(warnings[-1])
        if progress is not None:
            progress(i + 1, len(planes), f"segmented plane {i + 1}/{len(planes)}")
    return Segmentation(labels, method, note, warnings)


def _use_gpu(params: SegmentParams) -> bool:
    import torch

    return torch.cuda.is_available() if params.gpu is None else params.gpu
