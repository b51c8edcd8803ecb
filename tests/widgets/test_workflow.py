"""The whole workflow through the dock widgets on the real BBBC007 sample, as a user runs it:
segment → train → embed → map → select → outliers → representatives → export → reopen."""

from pathlib import Path

import numpy as np
import pandas as pd

from napari_nucleae.core.store import Project
from napari_nucleae.widgets._nuclei import Picker
from napari_nucleae.widgets.latent_explorer import LatentExplorerWidget
from napari_nucleae.widgets.outliers import OutliersWidget
from napari_nucleae.widgets.representatives import RepresentativesWidget
from napari_nucleae.widgets.segment import SegmentWidget
from napari_nucleae.widgets.train import TrainWidget

TIMEOUT = 180_000


def _dock(viewer, widget):
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    return widget


def _finish(qtbot, widget, button):
    button.clicked.emit()
    qtbot.waitUntil(lambda: widget.jobs.busy, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)


def test_the_whole_workflow_on_the_sample(make_napari_viewer, qtbot, tmp_path, visible_labels):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nucleae", "bbbc007")
    (image,) = viewer.layers
    folder = tmp_path / "project"

    # segment with the defaults (auto: the classical fallback, announced) into a project
    segment = _dock(viewer, SegmentWidget(viewer))
    segment.crop_size.value = 32
    segment.project.value = folder
    _finish(qtbot, segment, segment.run_button)
    nuclei = viewer.layers[f"{image.name} nuclei"]
    project = Project.open(folder)
    assert 40 < len(project) <= nuclei.data.max()
    assert "classical" in segment.status.value

    # train a small model for two epochs, then embed: mse reaches the Labels features
    train = _dock(viewer, TrainWidget(viewer))
    train.project.value = folder
    assert str(train.project.value) == str(folder)  # prefilled from the session
    train.epochs.value, train.min_steps.value = 2, 0
    _finish(qtbot, train, train.start_button)
    assert train.plot.epochs == [1, 2]
    _finish(qtbot, train, train.embed_button)
    mse = Project.open(folder).table()["mse"].to_numpy()
    cropped = nuclei.features.dropna(subset=["crop_index"])
    np.testing.assert_allclose(cropped["mse"], mse[cropped["crop_index"].astype(int)], rtol=1e-6)

    # map: PCA with 3 clusters; a box over the left half highlights exactly those nuclei
    explorer = _dock(viewer, LatentExplorerWidget(viewer))
    assert str(explorer.project.value) == str(folder)  # prefilled from the Labels layer
    explorer.projection.value, explorer.clusters.value = "PCA", 3
    _finish(qtbot, explorer, explorer.compute_button)
    table = Project.open(folder).table()
    xy = table[["PC_0", "PC_1"]].to_numpy()
    mid = np.median(xy[:, 0])
    rows = explorer.plot.select_box(xy[:, 0].min() - 1, xy[:, 1].min() - 1, mid, xy[:, 1].max())
    np.testing.assert_array_equal(rows, np.flatnonzero(xy[:, 0] <= mid))
    highlight = viewer.layers[f"{nuclei.name} [selection]"]
    assert visible_labels(highlight, nuclei) == set(table.loc[rows, "label"])
    # a click on a nucleus marks its point
    row = int(rows[0])
    Picker.of(viewer).pick_at(table.loc[row, ["centroid_y", "centroid_x"]].to_numpy())
    np.testing.assert_allclose(np.c_[explorer.plot._mark.get_data()], xy[[row]])

    # outliers: 5 % tails flagged in the project and on the image
    outliers = _dock(viewer, OutliersWidget(viewer))
    outliers.low.value = outliers.high.value = 5.0
    outliers.flag_button.clicked.emit()
    flags = Project.open(folder).table()["outlier"]
    assert (flags == "high").sum() == round(len(flags) * 0.05)
    flagged = set(table.loc[np.asarray(flags != "normal"), "label"])
    assert visible_labels(viewer.layers[f"{nuclei.name} [outliers]"], nuclei) == flagged

    # representatives per cluster, one click, then export
    represent = _dock(viewer, RepresentativesWidget(viewer))
    represent.scope.value = "cluster"
    represent.k.value = 2
    _finish(qtbot, represent, represent.find_button)
    assert "3 groups of cluster" in represent.status.value
    out = tmp_path / "export"
    represent.export_folder.value = out
    _finish(qtbot, represent, represent.export_button)
    exported = pd.read_csv(out / "representatives.csv")
    assert len(exported) == 3 * 2
    assert all((out / name).is_file() for name in exported["tiff_file"])

    # reopen the project in a fresh viewer: the nuclei come back with every column
    again = make_napari_viewer()
    again.open(str(folder / "project.json"), plugin=None)  # only nucleae claims it: no dialog
    stem = Path(image.metadata["path"]).stem  # the sample's file: the image comes back too
    np.testing.assert_array_equal(again.layers[stem].data, image.data)
    restored = again.layers[f"{stem} nuclei"]
    np.testing.assert_array_equal(restored.data, nuclei.data)
    final = Project.open(folder).table()
    by_label = restored.features.set_index("label").loc[final["label"]]
    np.testing.assert_allclose(by_label["mse"], final["mse"])
    np.testing.assert_allclose(by_label["PC_0"], final["PC_0"])
    names = restored.metadata["nucleae"]["categories"]["outlier"]
    assert [names[c] for c in by_label["outlier"]] == list(final["outlier"])
    reopened = _dock(again, LatentExplorerWidget(again))
    assert reopened.columns == ("PC_0", "PC_1") and len(reopened.table) == len(final)
