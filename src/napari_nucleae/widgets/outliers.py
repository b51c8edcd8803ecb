""" "Outliers" dock widget: the reconstruction-error histogram, percentile cut-offs, flags on
the images and a gallery of the most extreme crops."""

from __future__ import annotations

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import FloatSlider, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info

from ..core.analysis import flag_outliers
from ..core.errors import NucleaeError
from ..core.explore import OUTLIER_PCT, outlier_flags, rank_outliers
from ..core.store import Project
from ._common import (
    Dock,
    StatusLabel,
    bind_project,
    montage,
    never_widen,
    remove_result,
    require_project,
    show_result,
)
from ._nuclei import Highlighter
from ._plots import OUTLIER_COLORS, MseHistogram
from ._session import Session
from ._settings import remember

GALLERY_COLUMNS = 8


def extremes(mse: np.ndarray, flags: pd.Categorical, tail: str, k: int) -> np.ndarray:
    """Up to ``k`` flagged rows of one tail, most extreme first."""
    n_flagged = int((np.asarray(flags) == tail).sum())
    return rank_outliers(mse, min(k, n_flagged), tail)


class OutliersWidget(Dock):
    """Flag the crops a model reconstructs worst (and best), and show where they are."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
        self.project = bind_project(self, self.session, self.load)
        self.low = FloatSlider(value=OUTLIER_PCT, min=0.0, max=50.0, step=0.5, label="low tail (%)")
        self.high = FloatSlider(
            value=OUTLIER_PCT, min=0.0, max=50.0, step=0.5, label="high tail (%)"
        )
        self.gallery_size = SpinBox(value=16, min=1, max=200, label="gallery crops per tail")
        self.flag_button = PushButton(text="Flag outliers")
        self.status = StatusLabel()
        self.extend(
            [self.project, self.low, self.high, self.gallery_size, self.flag_button, self.status]
        )
        self.histogram = MseHistogram()
        self.inner.layout().addWidget(self.histogram)
        never_widen(self.histogram)
        self.table: pd.DataFrame | None = None
        self.flags: pd.Categorical | None = None
        self.highlight = Highlighter(viewer, "outliers")
        self.low.changed.connect(self.preview)
        self.high.changed.connect(self.preview)
        self.flag_button.changed.connect(self.flag)
        self.load()
        remember(self, "outliers")

    @property
    def mse(self) -> np.ndarray:
        return self.table["mse"].to_numpy(float)

    def load(self) -> None:
        """Take the session's errors and preview the cut-offs."""
        table = self.session.table
        self.table = None
        if table is None:
            return
        if "mse" not in table:
            self.status.value = "no reconstruction errors yet: embed the crops first"
            return
        self.table = table
        self.preview()

    def preview(self) -> None:
        """Redraw the histogram with the current percentages (nothing is written)."""
        if self.table is None:
            return
        try:
            flags = outlier_flags(self.mse, self.low.value, self.high.value)
        except NucleaeError as err:
            self.status.value = str(err)
            return
        self.histogram.show(self.mse, flags)

    def flag(self) -> None:
        """Store the flags (every widget and layer follows), highlight them and show the
        galleries."""
        project = require_project(self.session)
        if project is None:
            return
        try:
            self.flags = flag_outliers(project, self.low.value, self.high.value)
        except NucleaeError as err:
            show_error(str(err))
            self.status.value = str(err)
            return
        self.session.refresh()
        flagged = np.flatnonzero(np.asarray(self.flags) != "normal")
        colors = np.array([OUTLIER_COLORS[f] for f in np.asarray(self.flags)[flagged]]).reshape(
            -1, 4
        )
        self.highlight.show(self.session.index, flagged, colors)
        self.histogram.show(self.mse, self.flags)
        self._galleries(project)
        counts = pd.Series(np.asarray(self.flags)).value_counts()
        self.status.value = (
            f"{counts.get('high', 0)} high (red) and {counts.get('low', 0)} low (blue) "
            f"of {len(self.flags)} crops flagged"
        )
        show_info(self.status.value)

    def _galleries(self, project: Project) -> None:
        """Montages of the most extreme flagged crops of each tail, most extreme first."""
        for tail, title in (("high", "highest"), ("low", "lowest")):
            kind = f"MSE gallery: {title}"
            rows = extremes(self.mse, self.flags, tail, self.gallery_size.value)
            if not len(rows):
                remove_result(self.viewer, kind)
                continue
            image = montage(project.read_crops(rows), GALLERY_COLUMNS)
            name = f"{len(rows)} {title}-error crops"
            show_result(self.viewer, kind, image, name, crops=rows.tolist())
