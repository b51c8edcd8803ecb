"""Reopen a napari-nucleae project folder in napari (npe2 reader).

A project keeps crops and a table, not the segmentation, so labels are not re-derived
(that would mean segmenting again with settings the project does not record). A project
opens as:

- each source image whose file still exists (``images.parquet`` ``path``; images that were
  napari layers only have a layer name there and are skipped), and
- per image, a Points layer at the nucleus centroids whose features are that image's rows
  of the project table: provenance, measurements and every analysis column (mse,
  projections, cluster, outlier).

The Points layers carry the same ``metadata["nucleae"]`` (image id, project folder) as the
Labels layers of "Segment & crop nuclei", so the analysis widgets link them too: selections
ring the points, clicks on a point pick its nucleus. Stacks get (plane, y, x) points.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .core.ingest import read_image
from .core.store import Project
from .widgets._nuclei import KEY

LayerData = tuple[object, dict, str]


def get_reader(path: str | os.PathLike | list):
    """``read_project`` when ``path`` is a project folder (holds project.json), else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_project if (Path(path) / "project.json").is_file() else None


def read_project(path: str | os.PathLike | list) -> list[LayerData]:
    """The project's images and one Points layer of nuclei per image."""
    if isinstance(path, list):
        path = path[0]
    project = Project.open(path)
    table = project.table()
    layers: list[LayerData] = []
    for record in project.images().itertuples():
        metadata = {KEY: {"image_id": str(record.image_id), "project": str(project.path)}}
        source = Path(str(getattr(record, "path", "") or ""))
        name = source.stem or str(record.image_id)
        if source.is_file():
            layers.append((read_image(source), {"name": name, "metadata": metadata}, "image"))
        rows = table[table["image_id"].astype(str) == str(record.image_id)]
        if len(rows):
            layers.append(nuclei_points(rows, f"{name} nuclei", metadata))
    return layers


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
