"""The matplotlib canvases of the docks: the latent map (lasso / box selection, hover crop),
the loss curve and the reconstruction-error histogram."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.path import Path as MplPath
from matplotlib.widgets import LassoSelector, RectangleSelector
from qtpy.QtCore import Signal

from ..core.explore import sample_rows

MAX_DRAWN = 50_000
HOVER_RADIUS = 5.0  # display pixels
SELECTION_COLOR = (1.0, 0.84, 0.0, 1.0)
OUTLIER_COLORS = {"high": (1.0, 0.15, 0.15, 1.0), "low": (0.2, 0.55, 1.0, 1.0)}


# ---------------------------------------------------------------------------- latent map
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
        colors = np.where((codes < 0)[:, None], (0.6, 0.6, 0.6, 1.0), palette(codes % palette.N))
        x, y = self.xy[self.drawn].T
        self.axes.scatter(x, y, c=colors, **style)
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


# ---------------------------------------------------------------------------- loss curve
class LossPlot(FigureCanvasQTAgg):
    """Train and validation loss per epoch, redrawn as epochs end."""

    def __init__(self):
        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        super().__init__(self.figure)
        self.axes = self.figure.add_subplot()
        self.epochs: list[int] = []
        self.train: list[float] = []
        self.val: list[float] = []
        self.setMinimumHeight(180)
        self._plot()  # drawn when first shown; a pending redraw would outlive an unshown widget

    def set_history(self, epochs, train_loss, val_loss) -> None:
        self.epochs, self.train, self.val = list(epochs), list(train_loss), list(val_loss)
        self.redraw()

    def add(self, epoch: int, train_loss: float, val_loss: float) -> None:
        self.epochs.append(epoch)
        self.train.append(train_loss)
        self.val.append(val_loss)
        self.redraw()

    def redraw(self) -> None:
        self._plot()
        self.draw_idle()

    def _plot(self) -> None:
        ax = self.axes
        ax.clear()
        ax.plot(self.epochs, self.train, "o-", label="train")
        ax.plot(self.epochs, self.val, "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        if self.epochs:
            ax.legend(loc="upper right")


# ---------------------------------------------------------------------------- error histogram
def cut_offs(mse: np.ndarray, flags: pd.Categorical) -> tuple[float | None, float | None]:
    """The largest flagged-low and the smallest flagged-high error (None when none)."""
    flags = np.asarray(flags)
    low, high = mse[flags == "low"], mse[flags == "high"]
    return (float(low.max()) if len(low) else None, float(high.min()) if len(high) else None)


class MseHistogram(FigureCanvasQTAgg):
    """Histogram of the reconstruction error with the two cut-offs."""

    def __init__(self):
        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        super().__init__(self.figure)
        self.axes = self.figure.add_subplot()
        self.setMinimumHeight(200)

    def show(self, mse: np.ndarray, flags: pd.Categorical) -> None:
        ax = self.axes
        ax.clear()
        finite = mse[np.isfinite(mse)]
        ax.hist(finite, bins=min(60, max(5, len(finite) // 5)), color="0.5")
        counts = pd.Series(np.asarray(flags)).value_counts()
        for tail, cut in zip(("low", "high"), cut_offs(mse, flags), strict=True):
            if cut is not None:
                ax.axvline(cut, color=OUTLIER_COLORS[tail], lw=1.5, label=f"{tail}: {counts[tail]}")
        ax.set_xlabel("reconstruction MSE")
        ax.set_ylabel("crops")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        self.draw_idle()
