"""What the dock widgets share: the project field, status lines, jobs, clicks and results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import Container, FileEdit, Label
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QProgressBar, QScrollArea, QSizePolicy, QWidget

from ..core.errors import NucleaeError
from ..core.store import Project
from ._jobs import JobRunner
from ._nuclei import Pick, Picker
from ._session import Session, follow

RESULT_KEY = "nucleae_result"
TITLES = "result titles"  # the Points layer whose text names each result layer
GAP = 16  # world pixels between the data and the results
TITLE_SPACE = 40  # world pixels above each result for its title
# result kinds (one layer each, replaced when shown again), top to bottom beside the data
RESULTS = (
    "thumbnail map",
    "theoretical images",
    "representatives",
    "MSE gallery: highest",
    "MSE gallery: lowest",
    "interpolation",
    "similar nuclei",
)


class Dock(Container):
    """The container of a dock widget: its fields scroll, and nothing widens it.

    napari docks a magicgui widget's ``native``; for a scrollable container magicgui's
    ``native`` is the widget inside the scroll area, so the scroll area would be lost. Here
    ``native`` is the scroll area itself and ``inner`` the widget holding the layout.
    """

    def __init__(self) -> None:
        super().__init__(scrollable=True)

    @property
    def native(self) -> QScrollArea:
        return self.root_native_widget

    @property
    def inner(self) -> QWidget:
        return self.root_native_widget.widget()


class StatusLabel(Label):
    """A status line that wraps and never widens its dock (the full text is its tooltip)."""

    def __init__(self, value: str = ""):
        super().__init__(value=value)
        label = self.native
        label.setWordWrap(True)
        never_widen(label)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        label.setToolTip(value)
        self.changed.connect(lambda text: label.setToolTip(str(text)))


def never_widen(*widgets: QWidget) -> None:
    """Let a dock be narrower than these widgets would like (folder fields, plots, status
    lines); they still get all the width the dock has."""
    for widget in widgets:
        widget.setSizePolicy(QSizePolicy.Policy.Ignored, widget.sizePolicy().verticalPolicy())


def compact(field: FileEdit) -> FileEdit:
    """A file or folder field whose path gets the room: a short "…" button, never widening."""
    field.choose_btn.text = "…"
    field.choose_btn.tooltip = "choose in a dialog"
    never_widen(field.native)
    return field


def bind_project(container: Container, session: Session, on_change: Callable[[], None]) -> FileEdit:
    """A project-folder field that follows the session both ways.

    The session's project fills it in; a folder chosen in it becomes the session's project.
    ``on_change`` runs whenever the project or its table changed (in any widget).
    """
    field = compact(FileEdit(mode="d", label="project folder", value=str(session.path or "")))

    def chosen(value) -> None:
        folder = folder_of(field)
        if folder is not None and folder.resolve() == session.path:
            return
        try:
            session.open(folder)
        except NucleaeError as err:
            show_error(str(err))

    def opened(project) -> None:
        with field.changed.blocked():
            field.value = str(session.path or "")
        on_change()

    field.changed.connect(chosen)
    follow(container, session.project_changed, opened)
    follow(container, session.table_changed, lambda _: on_change())
    return field


def folder_of(field: FileEdit) -> Path | None:
    """The folder chosen in ``field``, or None when it is empty."""
    value = str(field.value)
    return Path(value) if value not in ("", ".") else None


def require_project(session: Session) -> Project | None:
    """The session's project, or None after telling the user to choose one."""
    if session.project is None:
        show_error("Choose the project folder (made by 'Segment & crop nuclei').")
    return session.project


def add_progress(container: Dock) -> JobRunner:
    """A hidden progress bar at the bottom of ``container`` and its job runner."""
    bar = QProgressBar()
    bar.setVisible(False)
    container.inner.layout().addWidget(bar)
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


def is_result(layer: napari.layers.Layer) -> bool:
    return bool(layer.metadata.get(RESULT_KEY)) or layer.name == TITLES


def show_result(
    viewer: napari.viewer.Viewer,
    kind: str,
    image: np.ndarray,
    title: str,
    crops: list[int] | None = None,
) -> napari.layers.Image:
    """Show a 2-D result image as the layer ``kind`` (one of :data:`RESULTS`), replacing the
    previous one, then lay the results out in a column right of the data, each titled.

    Grey colormap, contrast 0–1; ``crops`` (the project rows shown, in order) goes to the
    layer metadata; the active layer stays active.
    """
    if np.ndim(image) != 2 or kind not in RESULTS:
        raise ValueError(f"a result is a 2-D image of a known kind: {kind!r} {np.shape(image)}")
    active = viewer.layers.selection.active
    if kind in viewer.layers:
        viewer.layers.remove(kind)
    layer = viewer.add_image(
        image,
        name=kind,
        colormap="gray",
        contrast_limits=(0.0, 1.0),
        metadata={RESULT_KEY: kind, "title": title, "crop_index": crops or []},
    )
    arrange_results(viewer)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer


def remove_result(viewer: napari.viewer.Viewer, kind: str) -> None:
    if kind in viewer.layers:
        viewer.layers.remove(kind)
        arrange_results(viewer)


def arrange_results(viewer: napari.viewer.Viewer) -> None:
    """Stack the result layers in one column right of every other layer, in :data:`RESULTS`
    order, each under its title (titles never overlap a neighbour's)."""
    data = [layer.extent.world for layer in viewer.layers if not is_result(layer)]
    y = min((e[0][-2] for e in data), default=0.0) + TITLE_SPACE
    x = max((e[1][-1] for e in data), default=-GAP) + GAP
    positions, titles = [], []
    for kind in RESULTS:
        if kind not in viewer.layers:
            continue
        layer = viewer.layers[kind]
        layer.translate = (y, x)
        positions.append((y - 0.9 * TITLE_SPACE, x))  # the text hangs below this point
        titles.append(layer.metadata.get("title", kind))
        y += layer.data.shape[-2] + TITLE_SPACE
    _show_titles(viewer, np.array(positions).reshape(-1, 2), titles)


def _show_titles(viewer: napari.viewer.Viewer, positions: np.ndarray, titles: list[str]) -> None:
    if TITLES in viewer.layers:
        viewer.layers.remove(TITLES)
    if not titles:
        return
    viewer.add_points(
        positions,
        name=TITLES,
        features={"title": titles},
        text={"string": "{title}", "anchor": "lower_left", "size": 9, "color": "white"},
        size=1,
        face_color="transparent",
        border_width=0,
        metadata={RESULT_KEY: "titles"},
    )
