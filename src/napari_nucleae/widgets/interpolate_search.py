""" "Interpolate & search" dock widget: interpolate between two crops and search the crops
most similar to one. Clicking nuclei in the viewer fills in the crops: the last click is the
search query and the interpolation's end, the click before it the interpolation's start."""

from __future__ import annotations

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, PushButton, SpinBox, create_widget

from ..core.analysis import interpolate_crops, query_crop, search_similar
from ..core.explore import INTERPOLATION_STEPS, METRICS, SEARCH_K
from ._common import (
    Dock,
    StatusLabel,
    add_progress,
    bind_project,
    follow_picks,
    montage,
    require_project,
    show_result,
)
from ._nuclei import Highlighter, Pick
from ._session import Session
from ._settings import remember

QUERY_COLOR = (1.0, 0.15, 0.15, 1.0)
FOUND_COLOR = (0.0, 0.9, 1.0, 1.0)


def similar_crops(
    session: Session,
    query: int | np.ndarray,
    *,
    k: int,
    metric: str,
    progress=None,
    should_stop=None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Worker body: the ``k`` nearest crops to a crop of the project (by index) or to a new
    crop image, and a stack of the query followed by them."""
    project = session.project
    found = search_similar(project, query, k=k, metric=metric, model=session.loaded_model())
    crops = project.read_crops(found["crop_index"].to_numpy(np.int64))
    if isinstance(query, np.ndarray):
        first = query_crop(project, query)
    else:
        first = project.read_crops([query])[0]
    return found, np.concatenate([first[np.newaxis], crops])


def interpolation(
    session: Session, a: int, b: int, *, steps: int, progress=None, should_stop=None
) -> np.ndarray:
    """Worker body: decoded images from crop ``a`` to crop ``b``."""
    return interpolate_crops(session.project, a, b, steps, session.loaded_model())


class InterpolateSearchWidget(Dock):
    """Latent interpolation between two nuclei and reverse search from one (both quick, so
    neither offers a Cancel)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
        self.project = bind_project(self, self.session, lambda: None)
        self.crop_a = SpinBox(value=0, min=0, max=10**9, label="from crop")
        self.crop_b = SpinBox(value=1, min=0, max=10**9, label="to crop")
        self.steps = SpinBox(value=INTERPOLATION_STEPS, min=2, max=64, label="steps")
        self.interpolate_button = PushButton(text="Interpolate")
        self.query = SpinBox(value=0, min=0, max=10**9, label="query crop")
        self.query_image = create_widget(
            annotation=napari.layers.Image | None,
            label="or query image",
            options={
                "tooltip": "an image layer holding one crop-sized nucleus image "
                "(e.g. an exported crop); it is encoded with the model"
            },
        )
        self.k = SpinBox(value=SEARCH_K, min=1, max=500, label="neighbours")
        self.metric = ComboBox(choices=METRICS, value=METRICS[0], label="metric")
        self.search_button = PushButton(text="Find similar nuclei")
        self.status = StatusLabel("click nuclei in the viewer to fill in the crops")
        self.extend(
            [
                self.project,
                self.crop_a,
                self.crop_b,
                self.steps,
                self.interpolate_button,
                self.query,
                self.query_image,
                self.k,
                self.metric,
                self.search_button,
                self.status,
            ]
        )
        self.jobs = add_progress(self)
        self.jobs.bind([self.interpolate_button, self.search_button])
        self.highlight = Highlighter(viewer, "similar")
        self.picker = follow_picks(viewer, self, self.use_pick)
        self.interpolate_button.changed.connect(self.interpolate)
        self.search_button.changed.connect(self.search)
        remember(self, "explore", skip=("crop_a", "crop_b"))

    def _row(self, pick: Pick) -> int | None:
        index = self.session.index
        return None if index is None else index.row_of(pick.image_id, pick.label)

    def use_pick(self, pick: Pick) -> None:
        """A clicked nucleus becomes the query and the interpolation's end."""
        row = self._row(pick)
        if row is None:
            self.status.value = f"{pick.layer}, label {pick.label}: not a crop of this project"
            return
        self.query.value = self.crop_b.value = row
        rows = [self._row(p) for p in self.picker.history]
        if len(rows) == 2 and rows[0] is not None:
            self.crop_a.value = rows[0]
        self.status.value = f"picked crop {row} ({pick.layer}, label {pick.label})"

    def interpolate(self) -> None:
        if require_project(self.session) is None:
            return
        a, b = self.crop_a.value, self.crop_b.value
        self._start(
            interpolation,
            self.session,
            a,
            b,
            steps=self.steps.value,
            desc="Interpolating",
            on_returned=lambda strip: self._show_strip(strip, a, b),
        )

    def _show_strip(self, strip: np.ndarray, a: int, b: int) -> None:
        show_result(self.viewer, "interpolation", montage(strip, len(strip)), f"crop {a} → {b}")
        self.status.value = f"{len(strip)} decoded steps from crop {a} to crop {b}"

    def search(self) -> None:
        if require_project(self.session) is None:
            return
        layer = self.query_image.value
        query = self.query.value if layer is None else np.asarray(layer.data)
        self._start(
            similar_crops,
            self.session,
            query,
            k=self.k.value,
            metric=self.metric.value,
            desc="Searching",
            on_returned=lambda result: self._show_similar(*result, query),
        )

    def _show_similar(
        self, found: pd.DataFrame, stack: np.ndarray, query: int | np.ndarray
    ) -> None:
        rows = found["crop_index"].to_numpy(np.int64)
        colors = np.array([FOUND_COLOR] * len(found)).reshape(-1, 4)
        if isinstance(query, np.ndarray):
            name = f"similar to {self.query_image.value.name}"
            described = f"{self.query_image.value.name} (first)"
            crops = [-1, *rows.tolist()]
        else:
            rows, colors = np.r_[query, rows], np.r_[[QUERY_COLOR], colors]
            name, described = f"similar to crop {query}", f"crop {query} (red)"
            crops = rows.tolist()
        show_result(self.viewer, "similar nuclei", montage(stack, len(stack)), name, crops=crops)
        self.highlight.show(self.session.index, rows, colors)
        self.status.value = f"{described} and its {len(found)} nearest crops (cyan)"

    def _start(self, func, *args, **kwargs) -> None:
        self.jobs.start(func, *args, on_errored=self._failed, **kwargs)

    def _failed(self, err: BaseException) -> None:
        self.jobs.report_error(err)
        self.status.value = str(err)
