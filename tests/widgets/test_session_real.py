"""A real napari session on the BBBC007 sample, as a user drives it: a 1280×800 window, every
dock opened from the Layers menu, one deliberate failure per step, then
segment → train → embed → explorer → outliers → representatives → export → reopen.

After each step: the canvas keeps ≥ 40 % of the window width, every button is enabled again
(Cancel/Stop disabled), and napari's status bar shows a hovered nucleus its own row. With
``NUCLEAE_SCREENSHOTS=<folder>`` each step saves a screenshot of the window there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from magicgui.widgets import Container, PushButton
from qtpy.QtWidgets import QApplication

from napari_nucleae.core.ingest import file_checksum
from napari_nucleae.core.store import Project

TIMEOUT = 180_000
STOPS = ("Cancel", "Stop")


def _menu_actions(window):
    """Every action under napari's Layers menu, by text."""

    def walk(menu):
        for action in menu.actions():
            if action.menu() is not None:
                yield from walk(action.menu())
            else:
                yield action

    bar = window._qt_window.menuBar()
    layers = next(a.menu() for a in bar.actions() if a.text().replace("&", "") == "Layers")
    return {action.text().replace("&&", "&"): action for action in walk(layers)}


def _open_dock(viewer, title: str) -> Container:
    """Open a nucleae dock through its Layers-menu action; the widget it docked."""
    _menu_actions(viewer.window)[f"{title} (napari nucleae)"].trigger()
    _settle()
    return viewer.window.dock_widgets[f"{title} (napari nucleae)"]


def _settle() -> None:
    for _ in range(5):
        QApplication.processEvents()


def _buttons(container: Container) -> list[PushButton]:
    found = []
    for widget in container:
        if isinstance(widget, PushButton):
            found.append(widget)
        elif isinstance(widget, Container):
            found.extend(_buttons(widget))
    return found


def _check(viewer, widgets: list[Container], shot: str) -> None:
    """The canvas keeps its share, every button is back, and a screenshot when asked."""
    _settle()
    window = viewer.window._qt_window
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 0.4 * window.width(), (canvas.width(), window.width())
    for widget in widgets:
        jobs = getattr(widget, "jobs", None)  # Outliers runs no jobs
        assert jobs is None or not jobs.busy
        for button in _buttons(widget):
            stop = button.text in STOPS
            assert button.enabled != stop or button.text == "Export", (widget, button.text)
    folder = os.environ.get("NUCLEAE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(Path(folder) / f"session_{shot}.png"), canvas_only=False)
    if shot.endswith("representatives"):  # the results beside the data, titled
        viewer.reset_view()
        viewer.screenshot(str(Path(folder) / "session_results.png"), canvas_only=True)


def _hover_status(viewer, layer, label: int) -> str:
    """napari's status text with the cursor on one pixel of ``label``."""
    y, x = np.argwhere(np.asarray(layer.data) == label)[0]
    viewer.layers.selection.active = layer
    viewer.mouse_over_canvas = True
    viewer.cursor.position = (float(y), float(x))
    viewer.update_status_from_cursor()
    status = viewer.status
    return str(status["coordinates"] if isinstance(status, dict) else status)


def _shown(status: str, column: str) -> float:
    """The value napari's status text shows for ``column`` (it prints 3 significant digits)."""
    match = re.search(rf"(?:^|[;,] ){column}: ([^,;]+)", status)
    assert match is not None, (column, status)
    return float(match.group(1))


def _check_hover(viewer, layer, folder: Path, column: str | None = None) -> None:
    """The status of a hovered nucleus shows its own project row (and ``column``)."""
    table = Project.open(folder).table()
    row = table.iloc[len(table) // 2]
    status = _hover_status(viewer, layer, int(row["label"]))
    assert _shown(status, "label") == row["label"]
    assert _shown(status, "crop_index") == row["crop_index"]
    if column is not None:
        assert np.isclose(_shown(status, column), row[column], rtol=0.01), (column, status)


def _run(qtbot, widget, button) -> None:
    button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)


def test_a_whole_session_through_the_menus(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    viewer.open_sample("napari-nucleae", "bbbc007")
    (image,) = viewer.layers
    folder = tmp_path / "project"

    # segment: an oversized crop and a missing cellpose model fail; then the defaults work
    segment = _open_dock(viewer, "Segment & crop nuclei")
    segment.image.value = image
    segment.crop_size.value = 512
    segment.run_button.clicked.emit()
    assert "larger than the image" in segment.status.value and not segment.jobs.busy
    segment.crop_size.value = 32
    segment.method.value, segment.model.value = "cellpose", "custom file…"
    segment.model_file.value = tmp_path / "missing-model"
    _run(qtbot, segment, segment.run_button)
    assert "switched the method" in segment.status.value
    _check(viewer, [segment], "1_failed_segmentation")  # a long message: the canvas stays
    segment.project.value = folder
    _run(qtbot, segment, segment.run_button)
    nuclei = viewer.layers[f"{image.name} nuclei"]
    project = Project.open(folder)
    assert len(project) > 40
    (image_id,) = project.images()["image_id"]
    assert image_id == file_checksum(image.metadata["path"])  # the id `nucleae ingest` gives
    _check_hover(viewer, nuclei, folder)
    _check(viewer, [segment], "2_segmented")

    # train: the project comes from the session; a bad model name fails in the job
    train = _open_dock(viewer, "Train / load model")
    assert Path(str(train.project.value)) == folder.resolve()
    train.name.value = "no/slashes"
    _run(qtbot, train, train.start_button)
    assert "may hold only letters" in train.status.value
    _check(viewer, [segment, train], "3_failed_training")
    train.name.value = "default"
    train.epochs.value, train.min_steps.value = 2, 0
    _run(qtbot, train, train.start_button)
    assert train.plot.epochs == [1, 2]
    _run(qtbot, train, train.embed_button)
    assert "embedded" in train.status.value
    _check_hover(viewer, nuclei, folder, "mse")
    _check(viewer, [segment, train], "4_embedded")

    # explorer: PCA components beyond the latent size fail; then PCA with 3 clusters
    explorer = _open_dock(viewer, "Latent explorer")
    explorer.projection.value, explorer.pc_x.value = "PCA", 4000
    _run(qtbot, explorer, explorer.compute_button)
    assert explorer.status.value
    explorer.pc_x.value, explorer.clusters.value = 0, 3
    _run(qtbot, explorer, explorer.compute_button)
    assert explorer.columns == ("PC_0", "PC_1")
    _run(qtbot, explorer, explorer.thumbnails_button)
    assert "thumbnail map" in viewer.layers
    _check_hover(viewer, nuclei, folder, "PC_0")
    _check(viewer, [segment, train, explorer], "5_explorer")

    # outliers: 5 % tails with their galleries
    outliers = _open_dock(viewer, "Outliers")
    outliers.low.value = outliers.high.value = 5.0
    outliers.flag_button.clicked.emit()
    assert "MSE gallery: highest" in viewer.layers
    _check(viewer, [segment, train, explorer, outliers], "6_outliers")

    # representatives: the clusters are a scope at once; an export onto a file fails
    represent = _open_dock(viewer, "Representatives")
    assert "cluster" in represent.scope.choices
    represent.scope.value, represent.k.value = "cluster", 2
    _run(qtbot, represent, represent.find_button)
    assert "3 groups of cluster" in represent.status.value
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    represent.export_folder.value = blocker
    _run(qtbot, represent, represent.export_button)
    assert represent.export_button.enabled and represent.status.value
    out = tmp_path / "export"
    represent.export_folder.value = out
    _run(qtbot, represent, represent.export_button)
    assert len(pd.read_csv(out / "representatives.csv")) == 3 * 2
    results = [viewer.layers[name] for name in ("thumbnail map", "representatives")]
    assert results[1].translate[0] >= results[0].translate[0] + results[0].data.shape[0]
    assert results[0].translate[1] >= nuclei.extent.world[1][-1]  # right of the image
    assert all(layer.ndim == 2 for layer in results) and viewer.dims.ndim == 2
    _check(viewer, [segment, train, explorer, outliers, represent], "7_representatives")

    # reopen: the sample's image comes back with its nuclei and every column
    again = make_napari_viewer(show=True)
    again.window._qt_window.resize(1280, 800)
    again.open(str(folder), plugin="napari-nucleae")
    stem = Path(image.metadata["path"]).stem
    np.testing.assert_array_equal(again.layers[stem].data, image.data)
    restored = again.layers[f"{stem} nuclei"]
    np.testing.assert_array_equal(restored.data, nuclei.data)
    _check_hover(again, restored, folder, "mse")
    reopened = _open_dock(again, "Latent explorer")
    assert reopened.columns == ("PC_0", "PC_1")
    _check(again, [reopened], "8_reopened")
