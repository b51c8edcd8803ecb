""" "Representatives" dock widget: theoretical images (decoded centres) and the real crops
nearest them, globally or per group, highlighted on the images and exported on request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import napari
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info

from ..core.analysis import Representatives, export, find_representatives
from ..core.crop import MEASUREMENT_COLUMNS
from ..core.explore import METRICS
from ..core.represent import CENTERS
from ..core.store import Project
from ._common import (
    GAP,
    add_progress,
    folder_of,
    montage,
    open_project,
    project_field,
    show_gallery,
)
from ._nuclei import Highlighter, NucleusIndex
from ._settings import remember

ALL = "all"
MAX_GROUPS = 50
NOT_GROUPS = (set(MEASUREMENT_COLUMNS) - {"plane"}) | {"crop_index", "image_path"}  # per nucleus


def scope_choices(table: pd.DataFrame) -> list[str]:
    """'all', then the columns that split the crops into at most ``MAX_GROUPS`` groups."""
    choices = [ALL]
    for column in table.columns:
        values = table[column]
        groupable = isinstance(values.dtype, pd.CategoricalDtype) or not (
            pd.api.types.is_float_dtype(values)
        )
        if column not in NOT_GROUPS and groupable and 1 < values.nunique() <= MAX_GROUPS:
            choices.append(column)
    return choices


@dataclass
class Found:
    """Representatives and the practical crops, in the order of their table."""

    result: Representatives
    crops: np.ndarray


def find(
    project: Project,
    *,
    center: str,
    metric: str,
    k: int,
    by: str | None,
    stability: bool,
    progress=None,
    should_stop=None,
) -> Found:
    """Worker body: one centre and metric, practical crops read for display."""
    if progress is not None:
        progress(0, 0, f"{center} centre, {metric} ranking")
    result = find_representatives(
        project,
        centers=[center],
        metrics=[metric],
        k=k,
        by=by,
        stability=stability,
        pixel_baseline=False,
    )
    return Found(result, project.read_crops(result.latent.table["crop_index"].to_numpy()))


def practical_grid(table: pd.DataFrame, crops: np.ndarray, k: int) -> tuple[np.ndarray, list]:
    """Crops in a (groups × k) grid, empty cells black; and the group order."""
    groups = list(dict.fromkeys(table["group"]))
    size = crops.shape[-1] if len(crops) else 1
    grid = np.zeros((len(groups) * k, size, size), dtype=np.float32)
    row = np.array([groups.index(g) for g in table["group"]], dtype=np.int64)
    grid[row * k + table["rank"].to_numpy(np.int64) - 1] = crops
    return grid, groups


class RepresentWidget(Container):
    """Find objective representative nuclei and export them."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self.viewer = viewer
        self.project = project_field(viewer)
        self.center = ComboBox(choices=CENTERS, value="mean", label="centre")
        self.metric = ComboBox(choices=METRICS, value="euclidean", label="metric")
        self.scopes = [ALL]  # callable choices survive napari's reset_choices()
        self.scope = ComboBox(
            choices=lambda _: self.scopes,
            value=ALL,
            label="scope",
            tooltip="all crops, or per group of a column",
        )
        self.k = SpinBox(value=5, min=1, max=100, label="top k")
        self.stability = CheckBox(value=False, text="stability (bootstrap, slower)")
        self.find_button = PushButton(text="Find representatives")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.export_folder = FileEdit(mode="d", label="export folder")
        self.overwrite = CheckBox(value=False, text="overwrite files in that folder")
        self.export_button = PushButton(text="Export…", enabled=False)
        self.status = Label(value="")
        self.extend(
            [
                self.project,
                self.center,
                self.metric,
                self.scope,
                self.k,
                self.stability,
                self.find_button,
                self.cancel_button,
                self.export_folder,
                self.overwrite,
                self.export_button,
                self.status,
            ]
        )
        self.jobs = add_progress(self)
        self.found: Found | None = None
        self.highlight = Highlighter(viewer, "representatives")
        self.project.changed.connect(self.load)
        self.find_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.jobs.cancel)
        self.export_button.changed.connect(self.export)
        self.load()
        remember(self, "represent")

    def load(self) -> None:
        """Offer the project's groupable columns as scopes."""
        project = open_project(self.project, quiet=True)
        if project is None:
            return
        previous = self.scope.value
        self.scopes = scope_choices(project.table())
        self.scope.reset_choices()
        self.scope.value = previous if previous in self.scopes else ALL

    def start(self) -> None:
        project = open_project(self.project)
        if project is None:
            return
        self._busy(True)
        self.jobs.start(
            find,
            project,
            center=self.center.value,
            metric=self.metric.value,
            k=self.k.value,
            by=None if self.scope.value == ALL else self.scope.value,
            stability=self.stability.value,
            desc="Representatives",
            on_returned=lambda found: self.show(found, project),
            on_errored=self._failed,
        )
        self.jobs.worker.finished.connect(lambda: self._busy(False))

    def show(self, found: Found, project: Project) -> None:
        """Galleries of the theoretical and practical images; chosen nuclei highlighted."""
        self.found = found
        table = found.result.latent.table
        k = int(table["rank"].max()) if len(table) else 1
        grid, groups = practical_grid(table, found.crops, k)
        center, metric = self.center.value, self.metric.value
        theoretical = found.result.latent.theoretical
        column = np.stack([theoretical[(group, center)] for group in groups])
        size = project.crop_size
        show_gallery(self.viewer, f"theoretical ({center})", montage(column, 1))
        show_gallery(
            self.viewer,
            f"representatives ({center}, {metric})",
            montage(grid, k),
            offset=(0.0, size + GAP),
            crops=table["crop_index"].tolist(),
        )
        palette = matplotlib.colormaps["tab10"]
        colors = palette(np.array([groups.index(g) for g in table["group"]]) % 10)
        index = NucleusIndex.from_table(project.table())
        self.highlight.show(index, table["crop_index"].to_numpy(np.int64), colors)
        self.export_button.enabled = True
        scope = "all crops" if len(groups) == 1 else f"{len(groups)} groups of {self.scope.value}"
        self.status.value = f"top {k} of {scope}" + (
            f"; mean stability {table['stability'].mean():.2f}" if "stability" in table else ""
        )
        show_info(f"Representatives: {self.status.value}")

    def export(self) -> None:
        project = open_project(self.project)
        folder = folder_of(self.export_folder)
        if project is None or self.found is None:
            return
        if folder is None:
            show_error("Choose an export folder first.")
            return
        self._busy(True)
        self.jobs.start(
            _export,
            project,
            self.found.result,
            folder,
            overwrite=self.overwrite.value,
            desc="Exporting",
            on_returned=lambda paths: self._exported(paths, folder),
            on_errored=self._failed,
        )
        self.jobs.worker.finished.connect(lambda: self._busy(False))

    def _exported(self, paths: list[Path], folder: Path) -> None:
        self.status.value = f"exported {len(paths)} files to {folder}"
        show_info(self.status.value)

    def _busy(self, busy: bool) -> None:
        self.find_button.enabled = not busy
        self.export_button.enabled = not busy and self.found is not None
        self.cancel_button.enabled = busy

    def _failed(self, err: BaseException) -> None:
        self.jobs.report_error(err)
        self.status.value = str(err)[:200]


def _export(
    project: Project,
    result: Representatives,
    folder: Path,
    *,
    overwrite: bool,
    progress=None,
    should_stop=None,
) -> list[Path]:
    """Worker body: write the chosen crops, montage and CSV (never silently overwriting)."""
    return export(project, result.latent, folder, overwrite=overwrite)
