""" "Representatives" dock widget: theoretical images (decoded centres) and the real crops
nearest them, globally or per group, highlighted on the images and exported on request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import napari
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, PushButton, SpinBox, Table
from napari.utils.notifications import show_error, show_info

from ..core.analysis import POOLS, Representatives, export, find_representatives, pool_line
from ..core.centers import CENTERS, DEFAULT_CENTER
from ..core.crop import IDENTITY_COLUMNS, MEASUREMENT_COLUMNS
from ..core.explore import METRICS
from ..core.represent import ALL, PERCENTILE, TOP_K
from ..core.store import Project
from ._common import (
    Dock,
    StatusLabel,
    add_progress,
    bind_project,
    compact,
    folder_of,
    montage,
    never_widen,
    require_project,
    show_result,
)
from ._nuclei import Highlighter
from ._session import Session
from ._settings import remember

MAX_GROUPS = 50
# per nucleus, so no population (a plane or an image is one)
NOT_GROUPS = {*IDENTITY_COLUMNS, *MEASUREMENT_COLUMNS} - {"plane", "image_id"}


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
    session: Session,
    *,
    center: str,
    metric: str,
    k: int,
    by: str | None,
    stability: bool,
    pool: str = POOLS[0],
    progress=None,
    should_stop=None,
) -> Found:
    """Worker body: one centre and metric with the session's model, practical crops read for
    display; ``should_stop`` is polled between groups."""
    if progress is not None:
        progress(0, 0, f"{center} centre, {metric} ranking")
    project = session.project
    result = find_representatives(
        project,
        centers=[center],
        metrics=[metric],
        k=k,
        by=by,
        model=session.loaded_model(),
        stability=stability,
        pixel_baseline=False,
        should_stop=should_stop,
        pool=pool,
    )
    return Found(result, project.read_crops(result.latent.table["crop_index"].to_numpy()))


def typicality_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per pick: its group, rank, crop, typicality and measured percentiles, rounded."""
    shown = ["group", "rank", "crop_index", "typicality", "typicality_vs_random"]
    shown += [c for c in table.columns if c.endswith(PERCENTILE)]
    rows = table[[c for c in shown if c in table]].copy()
    rows.columns = [
        c.removesuffix(PERCENTILE) + (" %" if c.endswith(PERCENTILE) else "") for c in rows
    ]
    rows["group"] = rows["group"].astype(str)
    return rows.round(2)


def practical_grid(table: pd.DataFrame, crops: np.ndarray, k: int) -> tuple[np.ndarray, list]:
    """Crops in a (groups × k) grid, empty cells black; and the group order."""
    groups = list(dict.fromkeys(table["group"]))
    size = crops.shape[-1] if len(crops) else 1
    grid = np.zeros((len(groups) * k, size, size), dtype=np.float32)
    row = np.array([groups.index(g) for g in table["group"]], dtype=np.int64)
    grid[row * k + table["rank"].to_numpy(np.int64) - 1] = crops
    return grid, groups


class RepresentativesWidget(Dock):
    """Find objective representative nuclei and export them."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
        self.project = bind_project(self, self.session, self.load)
        self.center = ComboBox(choices=CENTERS, value=DEFAULT_CENTER, label="centre")
        self.metric = ComboBox(choices=METRICS, value=METRICS[0], label="metric")
        self.scopes = [ALL]  # callable choices survive napari's reset_choices()
        self.scope = ComboBox(
            choices=lambda _: self.scopes,
            value=ALL,
            label="scope",
            tooltip="all crops, or per group of a column",
        )
        self.k = SpinBox(value=TOP_K, min=1, max=100, label="top k")
        self.stability = CheckBox(
            value=False, text="stability", tooltip="bootstrap stability of the top k (slower)"
        )
        self.pool = ComboBox(
            choices=POOLS,
            value=POOLS[0],
            label="pick from",
            tooltip="qc: leave out the MSE tails, border nuclei, blank crops and crops far "
            "from their class (centres still use every crop); all: every crop",
        )
        self.find_button = PushButton(text="Find representatives")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.export_folder = FileEdit(mode="d", label="export to")
        self.export_button = PushButton(text="Export", enabled=False)
        self.overwrite = CheckBox(value=False, text="overwrite files there")
        self.status = StatusLabel()
        self.typicality = Table(
            value=pd.DataFrame(), label="typicality", tooltip="per pick: percentiles in its group"
        )
        never_widen(self.typicality.native)  # the table scrolls sideways instead
        self.extend(
            [
                self.project,
                self.center,
                self.metric,
                self.scope,
                self.k,
                self.pool,
                self.stability,
                self.find_button,
                self.cancel_button,
                Container(
                    layout="horizontal",
                    widgets=[self.export_folder, self.export_button],
                    labels=False,
                ),
                self.overwrite,
                self.status,
                self.typicality,
            ]
        )
        compact(self.export_folder)
        self.jobs = add_progress(self)
        self.jobs.bind([self.find_button], self.cancel_button)
        self.found: Found | None = None
        self.highlight = Highlighter(viewer, "representatives")
        self.jobs.busy_changed.connect(self._busy)
        self.find_button.changed.connect(self.start)
        self.export_button.changed.connect(self.export)
        self.load()
        remember(self, "represent")

    def load(self) -> None:
        """Offer the groupable columns of the session's table as scopes."""
        table = self.session.table
        if table is None:
            return
        previous = self.scope.value
        self.scopes = scope_choices(table)
        self.scope.reset_choices()
        self.scope.value = previous if previous in self.scopes else ALL

    def start(self) -> None:
        project = require_project(self.session)
        if project is None:
            return
        self.jobs.start(
            find,
            self.session,
            center=self.center.value,
            metric=self.metric.value,
            k=self.k.value,
            by=None if self.scope.value == ALL else self.scope.value,
            stability=self.stability.value,
            pool=self.pool.value,
            desc="Representatives",
            on_returned=lambda found: self.show(found, project),
            on_errored=self._failed,
            cancellable=True,
        )

    def show(self, found: Found, project: Project) -> None:
        """Galleries of the theoretical and practical images; chosen nuclei highlighted."""
        table = found.result.latent.table
        self.typicality.value = typicality_rows(table)
        self.found = found if len(table) else None  # nothing to export
        if not len(table):
            self.export_button.enabled = False
            self.status.value = (
                f"no crop to pick: {pool_line(found.result)}; pick from all crops, or improve "
                "the classes (more annotations) to keep more candidates"
            )
            show_error(self.status.value)
            return
        k = int(table["rank"].max()) if len(table) else 1
        grid, groups = practical_grid(table, found.crops, k)
        center, metric = self.center.value, self.metric.value
        theoretical = found.result.latent.theoretical
        column = np.stack([theoretical[(group, center)] for group in groups])
        show_result(
            self.viewer, "theoretical images", montage(column, 1), f"theoretical ({center})"
        )
        show_result(
            self.viewer,
            "representatives",
            montage(grid, k),
            f"representatives ({center}, {metric})",
            crops=table["crop_index"].tolist(),
        )
        palette = matplotlib.colormaps["tab10"]
        colors = palette(np.array([groups.index(g) for g in table["group"]]) % 10)
        self.highlight.show(self.session.index, table["crop_index"].to_numpy(np.int64), colors)
        self.export_button.enabled = True
        scope = "all crops" if len(groups) == 1 else f"{len(groups)} groups of {self.scope.value}"
        self.status.value = f"top {k} of {scope}; {pool_line(found.result)}" + (
            f"; mean stability {table['stability'].mean():.2f}" if "stability" in table else ""
        )
        show_info(f"Representatives: {self.status.value}")

    def export(self) -> None:
        project = require_project(self.session)
        folder = folder_of(self.export_folder)
        if project is None or self.found is None:
            return
        if folder is None:
            show_error("Choose the folder to export to (the field left of Export).")
            return
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

    def _exported(self, paths: list[Path], folder: Path) -> None:
        self.status.value = f"exported {len(paths)} files to {folder}"
        show_info(self.status.value)

    def _busy(self, busy: bool) -> None:
        self.export_button.enabled = not busy and self.found is not None

    def _failed(self, err: BaseException) -> None:
        self.jobs.report_error(err)
        self.status.value = str(err)


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
    return export(project, result, folder, overwrite=overwrite)
