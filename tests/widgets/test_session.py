"""One session per viewer: a change made in one widget shows in the others at once."""

import numpy as np

from napari_nucleae.widgets._session import Session
from napari_nucleae.widgets._settings import load_settings
from napari_nucleae.widgets.latent_explorer import LatentExplorerWidget
from napari_nucleae.widgets.outliers import OutliersWidget
from napari_nucleae.widgets.representatives import RepresentativesWidget
from napari_nucleae.widgets.segment import SegmentWidget
from napari_nucleae.widgets.train import TrainWidget

TIMEOUT = 60_000


def test_widgets_share_the_project_table_and_model(
    make_napari_viewer, qtbot, analysed, show_project
):
    viewer = make_napari_viewer()
    show_project(viewer, analysed)
    represent, train = RepresentativesWidget(viewer), TrainWidget(viewer)
    explorer, outliers = LatentExplorerWidget(viewer), OutliersWidget(viewer)
    session = Session.of(viewer)
    assert session is Session.of(viewer) and session.path == analysed.path.resolve()
    assert str(train.project.value) == str(analysed.path.resolve())  # prefilled
    assert "cluster" not in represent.scope.choices

    explorer.projection.value, explorer.clusters.value = "PCA", 2
    explorer.compute_button.clicked.emit()
    qtbot.waitUntil(lambda: not explorer.jobs.busy, timeout=TIMEOUT)
    assert "cluster" in represent.scope.choices  # no folder chosen again
    assert "PC_0" in outliers.table and explorer.columns == ("PC_0", "PC_1")

    first = session.loaded_model()
    assert session.loaded_model() is first  # the checkpoint is read once
    session.use_model(None)  # e.g. trained again
    assert session.loaded_model() is not first


def test_a_project_chosen_in_one_widget_reaches_the_others(make_napari_viewer, analysed):
    viewer = make_napari_viewer()
    outliers, represent = OutliersWidget(viewer), RepresentativesWidget(viewer)
    assert outliers.table is None
    represent.project.value = analysed.path
    assert str(outliers.project.value) == str(analysed.path.resolve())
    np.testing.assert_array_equal(outliers.table["crop_index"], np.arange(len(outliers.table)))
    assert "image_id" in represent.scope.choices


def test_docks_opened_the_way_napari_opens_them_share_one_session(
    make_napari_viewer, qtbot, analysed, show_project
):
    """napari gives every plugin dock its own proxy of the viewer: a lasso in the Latent
    explorer must still reach the Annotate & classify dock."""
    viewer = make_napari_viewer()
    show_project(viewer, analysed)
    _, explorer = viewer.window.add_plugin_dock_widget("napari-nucleae", "Latent explorer")
    _, classify = viewer.window.add_plugin_dock_widget("napari-nucleae", "Annotate & classify")
    assert explorer.viewer is not classify.viewer  # two proxies of one viewer
    assert explorer.session is classify.session is Session.of(viewer)
    explorer.projection.value = "PCA"
    explorer.compute_button.clicked.emit()
    qtbot.waitUntil(lambda: not explorer.jobs.busy, timeout=TIMEOUT)
    rows = np.arange(5)
    explorer.plot.selected.emit(rows)  # what a lasso over five points emits
    np.testing.assert_array_equal(classify.session.selection, rows)
    assert classify.assign_button.text == f"Assign to the {len(rows):,} selected"


def test_segment_opened_before_any_image_stores_its_settings(make_napari_viewer, synthetic):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.add_image(synthetic[0], name="nuclei")
    widget.reset_choices()
    widget.image.value = viewer.layers["nuclei"]
    widget.crop_size.value = 48  # stored: a layer in the widget no longer breaks saving
    stored = load_settings()["segment"]
    assert stored["crop_size"] == 48 and "image" not in stored
