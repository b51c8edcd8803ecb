"""Export of chosen crops: TIFF / PNG files with safe names, a montage, and a CSV joined with
the crops' provenance (spreadsheet-safe); written in a staging folder and moved in."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError, NucleaeError
from .staging import staged

TABLE_COLUMNS = ["group", "center", "metric", "rank", "crop_index", "score"]


class ExportExistsError(NucleaeError, FileExistsError):
    """The export folder already holds files and overwriting was not requested."""


class ExportWriteError(NucleaeError):
    """The export folder cannot be created or written (its staging folder is removed)."""


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
    metadata: dict | None = None,
    pixel_size: float | None = None,
) -> list[Path]:
    """Write the chosen crops, a montage, a figure and ``representatives.csv``; return the
    paths.

    Per table row: ``<group>_<center>_<metric>_rank<NN>_crop<index>.tif`` (float32) and
    ``.png`` (8-bit, ``png_range`` mapped to 0-255, or each image's own range when None).
    Decoded centres from ``theoretical`` become ``theoretical_<group>_<center>.*``. The CSV
    joins the table with ``provenance`` rows (on ``crop_index`` when it has that column,
    else by position) and names each row's files. ``montage.png`` has one row per
    (group, center, metric), theoretical image first; ``figure.png`` shows the crops alone,
    one row per group, with a scale bar when ``pixel_size`` (µm per crop pixel) is given.
    ``metadata`` is written as ``provenance.json``. Files are written to a hidden staging
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
    try:
        with staged(out_dir, merge=True) as staging:
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
                _figure(staging / "figure.png", table, images, png_range, pixel_size)
            if metadata is not None:
                text = json.dumps(metadata, indent=2, default=str)
                (staging / "provenance.json").write_text(text + "\n")
            csv = _with_provenance(table, provenance)
            for fmt in formats:
                csv[f"{fmt}_file"] = files[fmt]
            spreadsheet_safe(csv).to_csv(staging / "representatives.csv", index=False)
            written = sorted(p.name for p in staging.iterdir())
    except OSError as err:
        raise write_error(out_dir, err) from err
    return [out_dir / name for name in written]


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


SCALE_BARS_UM = (1, 2, 5, 10, 20, 50, 100, 200, 500)  # scale-bar lengths offered


def _figure(
    path: Path,
    table: pd.DataFrame,
    images: np.ndarray,
    png_range: tuple[float, float] | None,
    pixel_size: float | None,
) -> None:
    """A figure-ready grid: one row per (group, center, metric), ranks left to right, the
    group named on the left, and a scale bar on the first crop when ``pixel_size`` is known."""
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(zip(table["group"], table["center"], table["metric"], strict=True)))
    n_cols = int(table["rank"].max())
    vmin, vmax = png_range if png_range else (None, None)
    fig = Figure(figsize=(n_cols + 1.0, len(keys)))
    axes = fig.subplots(len(keys), n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, (group, method, metric) in enumerate(keys):
        axes[r, 0].text(
            -0.08, 0.5, str(group), ha="right", va="center", transform=axes[r, 0].transAxes
        )
        rows = np.flatnonzero(
            (table["group"] == group) & (table["center"] == method) & (table["metric"] == metric)
        )
        for i in rows:
            axes[r, int(table["rank"].iat[i]) - 1].imshow(
                images[i], cmap="gray", vmin=vmin, vmax=vmax
            )
    if pixel_size:
        size = images.shape[-1]
        fitting = [b for b in SCALE_BARS_UM if b / pixel_size <= size * 0.6]
        if fitting:
            length = fitting[-1] / pixel_size
            ax = axes[0, 0]
            y = size * 0.9
            ax.plot([size * 0.05, size * 0.05 + length], [y, y], color="white", linewidth=2)
            ax.text(size * 0.05, y - size * 0.05, f"{fitting[-1]} µm", color="white", fontsize=6)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=1.0 / width, right=0.99, bottom=0.02, top=0.98, wspace=0.05)
    fig.savefig(path, dpi=min(300.0, 30_000 / height))


def tiff_pixel_size(path: str | os.PathLike) -> float | None:
    """The pixel size in µm a TIFF file states (its X resolution with a centimetre or inch
    unit, or ImageJ's micron unit), or None when it states none or cannot be read."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tag = page.tags.get("XResolution")
            unit = page.tags.get("ResolutionUnit")
            imagej = tif.imagej_metadata or {}
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    if tag is None:
        return None
    numerator, denominator = tag.value
    if not numerator or not denominator:
        return None
    per_unit = numerator / denominator  # pixels per unit
    unit_um = {2: 25_400.0, 3: 10_000.0}.get(int(getattr(unit, "value", 1)))
    if str(imagej.get("unit", "")).lower() in ("micron", "um", "µm", "\\u00b5m"):
        unit_um = 1.0
    return unit_um / per_unit if unit_um else None
