import numpy as np

from napari_nucleae.core.store import Project
from napari_nucleae.widgets.segment import SegmentWidget
from napari_nucleae.widgets.train import TrainWidget

TIMEOUT = 120_000


def _segmented_then_train(make_napari_viewer, qtbot, image, tmp_path):
    """A viewer whose image was segmented into a project, and a docked Train widget on it."""
    viewer = make_napari_viewer()
    viewer.add_image(image, name="nuclei")
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    segment.reset_choices()
    segment.method.value = "classical"
    segment.diameter.value = 16
    segment.crop_size.value = 32
    segment.project.value = tmp_path / "project"
    segment.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "nuclei nuclei" in viewer.layers, timeout=TIMEOUT)
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.project.value = tmp_path / "project"
    return viewer, widget


def test_train_then_embed_updates_plot_project_and_labels_features(
    make_napari_viewer, qtbot, synthetic, tmp_path
):
    image, truth = synthetic
    viewer, widget = _segmented_then_train(make_napari_viewer, qtbot, image, tmp_path)
    widget.epochs.value = 2
    widget.min_steps.value = 0  # two short epochs: a test of the widget, not of training
    widget.start_button.clicked.emit()
    qtbot.waitUntil(lambda: "finished" in widget.status.value, timeout=TIMEOUT)
    assert widget.plot.epochs == [1, 2] and len(widget.plot.val) == 2
    assert Project.open(tmp_path / "project").meta.active_model == "default"

    widget.embed_button.clicked.emit()
    qtbot.waitUntil(lambda: "embedded" in widget.status.value, timeout=TIMEOUT)
    project = Project.open(tmp_path / "project")
    mse = project.table()["mse"].to_numpy()
    assert len(mse) == truth.max() and (mse > 0).all()
    features = viewer.layers["nuclei nuclei"].features
    np.testing.assert_allclose(features["mse"].to_numpy(), mse, rtol=1e-6)


def test_bad_checkpoint_is_reported_not_raised(make_napari_viewer, qtbot, tmp_path):
    from napari_nucleae.core.store import CropParams

    Project.create(tmp_path / "project", CropParams(size=32))
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    widget.project.value = tmp_path / "project"
    widget.checkpoint.value = bad
    widget.load_button.clicked.emit()
    assert widget.session.model is None
    assert "garbage.pt" in widget.status.value


def test_collapse_warnings_stay_visible_and_names_are_not_overwritten(
    make_napari_viewer, qtbot, synthetic, tmp_path
):
    viewer, widget = _segmented_then_train(make_napari_viewer, qtbot, synthetic[0], tmp_path)
    # the seed's plain network at a rate that kills its ReLUs: training must restart it
    settings = {"arch": "reference", "lr": 0.3, "n_blocks": 2, "base_filters": 8}
    settings |= {"latent_dim": 16, "batch_size": 32, "min_steps": 300, "patience": 0}
    for name, value in settings.items():
        getattr(widget, name).value = value
    widget.epochs.value = 3
    widget.start_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=5 * TIMEOUT)  # 300+ small steps
    assert "restart" in widget.warning.value and "from scratch" in widget.warning.value
    warning = widget.warning.value
    widget.checkpoint.value = tmp_path / "missing.pt"
    widget.load_button.clicked.emit()
    assert "missing.pt" in widget.status.value  # a later message ...
    assert widget.warning.value == warning  # ... does not hide the warning

    widget.min_steps.value = 0
    widget.start_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    assert "already exists" in widget.status.value and widget.start_button.enabled
    widget.overwrite.value = True
    widget.start_button.clicked.emit()
    qtbot.waitUntil(lambda: "finished" in widget.status.value, timeout=TIMEOUT)
    assert "restarted" not in widget.warning.value  # each training starts a clean line
