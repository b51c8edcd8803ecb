"""Reopen a napari-nucleae project folder in napari (npe2 reader).

The folder (napari asks which reader to use: napari nucleae) or its ``project.json`` (no
question: only this reader claims it) opens as:

- each source image whose file still exists (``images.parquet`` ``path``; images that were
  napari layers only have a layer name there and are skipped), and
- per image, its stored segmentation as a Labels layer whose features hold that image's rows
  of the project table by label (measurements and every analysis column: mse, projections,
  cluster, outlier), exactly as "Segment & crop nuclei" and the analysis widgets left them;
- for images ingested before segmentations were stored, a Points layer at the nucleus
  centroids with the rows as features (stacks get (plane, y, x) points).

Both carry ``metadata["nucleae"]`` (image id, project folder), so the analysis widgets link
them: selections highlight the nuclei, clicks pick them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from ._triton import guard_triton

guard_triton()  # before core imports torch: see napari_nucleae._triton

from .core.analysis import LAYER_KEY as KEY  # noqa: E402
from .core.analysis import layer_features  # noqa: E402
from .core.errors import ProjectError  # noqa: E402
from .core.ingest import read_image  # noqa: E402
from .core.store import Project  # noqa: E402

LayerData = tuple[object, dict, str]


def project_folder(path: str | os.PathLike | list) -> Path | None:
    """The project folder ``path`` names: the folder itself, or its ``project.json`` (which
    only this reader claims, so napari opens it without asking which reader to use)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    folder = path.parent if path.name == "project.json" else path
    return folder if (folder / "project.json").is_file() else None


def get_reader(path: str | os.PathLike | list):
    """``read_project`` when ``path`` is a project folder or its project.json, else None."""
    return read_project if project_folder(path) is not None else None


def read_project(path: str | os.PathLike | list) -> list[LayerData]:
    """The project's images and one Labels (or Points) layer of nuclei per image."""
    project = Project.open(project_folder(path))
    table = project.table()
    layers: list[LayerData] = []
    for record in project.images().itertuples():
        metadata = {KEY: {"image_id": str(record.image_id), "project": str(project.path)}}
        source = Path(str(getattr(record, "path", "") or ""))
        name = source.stem or str(record.image_id)
        if source.is_file():
            image_meta = {**metadata, "path": str(source)}
            layers.append((read_image(source), {"name": name, "metadata": image_meta}, "image"))
        rows = table[table["image_id"].astype(str) == str(record.image_id)]
        labels = _stored_labels(project, str(record.image_id))
        if labels is not None:
            layers.append(nuclei_labels(np.asarray(labels), rows, f"{name} nuclei", metadata))
        elif len(rows):
            layers.append(nuclei_points(rows, f"{name} nuclei", metadata))
    return layers


def _stored_labels(project: Project, image_id: str) -> zarr.Array | None:
    """The stored segmentation, or None (with a warning naming the lost tile) when part of it
    is lost: the nuclei then show as points at their centroids."""
    try:
        return project.read_labels(image_id)
    except ProjectError as err:
        warnings.warn(f"{err}; its nuclei are shown as points", UserWarning, stacklevel=2)
        return None


def nuclei_labels(labels: np.ndarray, rows: pd.DataFrame, name: str, metadata: dict) -> LayerData:
    """A Labels layer of the stored segmentation with the rows as features by label."""
    features, names = layer_features(rows, int(labels.max(initial=0)))
    metadata = {KEY: {**metadata[KEY], "categories": names}}
    return labels, {"name": name, "features": features, "metadata": metadata}, "labels"


def nuclei_points(rows: pd.DataFrame, name: str, metadata: dict) -> LayerData:
    """A Points layer at the centroids of ``rows``, sized like the nuclei, rows as features."""
    coords = ["centroid_y", "centroid_x"]
    if "plane" in rows and rows["plane"].max() > 0:
        coords.insert(0, "plane")
    diameter = 2 * np.sqrt(rows["area"].to_numpy(float) / np.pi) if "area" in rows else 10.0
    return (
        rows[coords].to_numpy(float),
        {
            "name": name,
            "features": rows.reset_index(drop=True),
            "size": diameter,
            "face_color": "transparent",
            "border_color": "yellow",
            "border_width": 0.1,
            "metadata": metadata,
        },
        "points",
    )
