"""What the analysis dock widgets share: the project folder, jobs, clicks and galleries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import Container, FileEdit
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QProgressBar

from ..core.errors import NucleaeError
from ..core.store import Project
from ._jobs import JobRunner
from ._nuclei import KEY, Pick, Picker

GALLERY_KEY = "nucleae_gallery"
GAP = 16  # world pixels between the data and the galleries


def default_project(viewer: napari.viewer.Viewer) -> str:
    """The project folder of the first nucleae layer in the viewer ('' when none)."""
    for layer in viewer.layers:
        info = layer.metadata.get(KEY)
        if isinstance(info, dict) and info.get("project"):
            return str(info["project"])
    return ""


def project_field(viewer: napari.viewer.Viewer) -> FileEdit:
    """A project-folder picker, prefilled from the layers already in the viewer."""
    return FileEdit(mode="d", label="project folder", value=default_project(viewer))


def folder_of(field: FileEdit) -> Path | None:
    """The folder chosen in ``field``, or None when it is empty."""
    value = str(field.value)
    return Path(value) if value not in ("", ".") else None


def open_project(field: FileEdit, *, quiet: bool = False) -> Project | None:
    """Open the project chosen in ``field``; errors are shown unless ``quiet``."""
    folder = folder_of(field)
    if folder is None or (quiet and not (folder / "project.json").exists()):
        if not quiet:
            show_error("Choose the project folder (made by 'Segment & crop nuclei').")
        return None
    try:
        return Project.open(folder)
    except NucleaeError as err:
        if not quiet:
            show_error(str(err))
        return None


def derived_columns(project: Project) -> list[str]:
    """The per-crop columns analysis wrote (mse, projections, cluster, outlier, ...)."""
    return list(project.features().columns)


def add_progress(container: Container) -> JobRunner:
    """A hidden progress bar at the bottom of ``container`` and its job runner."""
    bar = QProgressBar()
    bar.setVisible(False)
    container.native.layout().addWidget(bar)
    return JobRunner(bar)


def follow_picks(
    viewer: napari.viewer.Viewer, container: Container, callback: Callable[[Pick], None]
) -> Picker:
    """Call ``callback`` for each nucleus clicked in ``viewer`` until ``container`` closes."""
    picker = Picker.of(viewer)
    picker.picked.connect(callback)
    container.native.destroyed.connect(lambda: picker.picked.disconnect(callback))
    return picker


def montage(images: np.ndarray, n_cols: int, pad: int = 2) -> np.ndarray:
    """Images ``(n, S, S)`` tiled row by row into one 2-D image with ``pad`` black pixels."""
    images = np.asarray(images, dtype=np.float32)
    n, s = len(images), images.shape[-1]
    n_cols = max(1, min(n_cols, n))
    n_rows = -(-n // n_cols)
    step = s + pad
    out = np.zeros((n_rows * step - pad, n_cols * step - pad), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, n_cols)
        out[r * step : r * step + s, c * step : c * step + s] = image
    return out


def gallery_origin(viewer: napari.viewer.Viewer) -> np.ndarray:
    """World (y, x) just right of every layer that is not a gallery."""
    extents = [
        layer.extent.world
        for layer in viewer.layers
        if not layer.metadata.get(GALLERY_KEY) and layer.ndim >= 2
    ]
    if not extents:
        return np.zeros(2)
    return np.array([min(e[0][-2] for e in extents), max(e[1][-1] for e in extents) + GAP])


def show_gallery(
    viewer: napari.viewer.Viewer,
    name: str,
    data: np.ndarray,
    offset: tuple[float, float] = (0.0, 0.0),
    crops: list[int] | None = None,
    **kwargs,
) -> napari.layers.Image:
    """Show crops (an image or a stack) right of the data, replacing the layer ``name``.

    Grey colormap, contrast 0–1; ``crops`` (the project rows shown, in order) goes to the
    layer metadata; the active layer stays active.
    """
    translate = np.zeros(np.ndim(data))
    translate[-2:] = gallery_origin(viewer) + offset
    settings = {
        "colormap": "gray",
        "contrast_limits": (0.0, 1.0),
        "translate": translate,
        "metadata": {GALLERY_KEY: True, "crop_index": crops or []},
        **kwargs,
    }
    if name in viewer.layers:
        viewer.layers.remove(name)
    active = viewer.layers.selection.active
    layer = viewer.add_image(data, name=name, **settings)
    if active is not None:
        viewer.layers.selection.active = active
    return layer
