import dask.array as da
import numpy as np

from napari_nucleae.core.store import Project
from napari_nucleae.widgets.segment import SegmentWidget

TIMEOUT = 60_000


def _widget(make_napari_viewer, image, name="nuclei", **layer_kwargs):
    viewer = make_napari_viewer()
    viewer.add_image(image, name=name, **layer_kwargs)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    return viewer, widget


def test_segment_widget_adds_labels_with_features_and_saves_crops(
    make_napari_viewer, qtbot, synthetic, tmp_path
):
    image, truth = synthetic
    viewer, widget = _widget(make_napari_viewer, image)
    widget.method.value = "classical"
    widget.diameter.value = 16
    widget.crop_size.value = 32
    widget.project.value = tmp_path / "project"
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "nuclei nuclei" in viewer.layers, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    labels = viewer.layers["nuclei nuclei"]
    n = truth.max()
    assert labels.data.max() == n
    features = labels.features
    assert features["label"].tolist() == list(range(1, n + 1))  # row i <-> label i + 1
    assert features["area"].dtype == float
    assert features["crop_index"].tolist() == list(range(n))
    project = Project.open(tmp_path / "project")
    assert len(project) == n and project.crop_size == 32
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    # a second run on the same image replaces its layer and does not duplicate the project
    widget.run_button.clicked.emit()
    assert widget.jobs.busy
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    assert len(viewer.layers) == 2 and viewer.layers["nuclei nuclei"] is not labels
    assert len(Project.open(tmp_path / "project")) == n


def test_rgb_layer_without_channel_shows_a_clear_error(make_napari_viewer, qtbot, synthetic):
    image, _ = synthetic
    rgb = np.stack([image, image, image], axis=-1)
    viewer, widget = _widget(make_napari_viewer, rgb, rgb=True)
    widget.method.value = "classical"
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "choose the nuclear channel" in widget.status.value, timeout=TIMEOUT)
    assert len(viewer.layers) == 1
    widget.channel.value = 0
    widget.diameter.value = 16
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    assert viewer.layers[1].data.shape == image.shape


def test_missing_cellpose_weights_switch_to_the_fallback(
    make_napari_viewer, qtbot, synthetic, tmp_path
):
    image, _ = synthetic
    viewer, widget = _widget(make_napari_viewer, image)
    widget.method.value = "cellpose"
    widget.model.value = "custom file…"
    widget.model_file.value = tmp_path / "missing-model"
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "switched the method" in widget.status.value, timeout=TIMEOUT)
    assert "missing-model" in widget.status.value
    assert widget.method.value == "classical"
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)


def test_a_dask_stack_is_segmented_one_plane_at_a_time(
    make_napari_viewer, qtbot, synthetic, recorded_reads
):
    image, truth = synthetic
    stack = recorded_reads(np.stack([image, image[::-1], image[:, ::-1]]))
    lazy = da.from_array(stack, chunks=stack.shape)  # one chunk: slicing decides the reads
    viewer, widget = _widget(make_napari_viewer, lazy)
    widget.method.value = "classical"
    widget.diameter.value = 16
    widget.crop_size.value = 32
    stack.reads.clear()  # napari reads the whole chunk for its contrast limits and display
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "nuclei nuclei" in viewer.layers, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    labels = viewer.layers["nuclei nuclei"]
    assert labels.data.shape == stack.shape and labels.data.max() == 3 * truth.max()
    assert (labels.features["cropped"] == 1).sum() == 3 * truth.max()
    assert labels.metadata["nucleae"]["categories"]["cropped"] == ["no", "yes"]
    assert stack.largest_read == image.size  # the widget reads one plane at a time


def test_a_multiscale_layer_is_segmented_at_full_resolution(make_napari_viewer, qtbot, synthetic):
    image, truth = synthetic
    viewer, widget = _widget(make_napari_viewer, [image, image[::2, ::2]], multiscale=True)
    widget.method.value = "classical"
    widget.diameter.value = 16
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "nuclei nuclei" in viewer.layers, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    labels = viewer.layers["nuclei nuclei"]
    assert labels.data.shape == image.shape and labels.data.max() == truth.max()


def test_a_crop_size_the_nuclei_fill_is_suggested(make_napari_viewer, qtbot, synthetic):
    image, _ = synthetic  # nuclei 12-22 px across
    viewer, widget = _widget(make_napari_viewer, image)
    widget.method.value = "classical"
    widget.diameter.value = 16
    widget.crop_size.value = 96
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    assert not widget.crop_hint.native.isHidden()
    assert "crop size 32 would fill it with them" in widget.crop_hint.value
    widget.crop_size.value = 32
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    assert widget.crop_hint.native.isHidden() and widget.crop_hint.value == ""
