import numpy as np
import pytest

from napari_nucleae.core.analysis import find_representatives
from napari_nucleae.core.store import Project
from napari_nucleae.widgets._nuclei import Picker
from napari_nucleae.widgets._session import Session
from napari_nucleae.widgets.interpolate_search import InterpolateSearchWidget
from napari_nucleae.widgets.representatives import RepresentativesWidget, find

TIMEOUT = 60_000


def _run(qtbot, widget, button):
    button.clicked.emit()
    qtbot.waitUntil(lambda: widget.jobs.busy, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)


def test_representatives_layers_highlights_and_export(
    make_napari_viewer, qtbot, analysed, show_project, visible_labels, tmp_path
):
    viewer = make_napari_viewer()
    layers = show_project(viewer, analysed)
    widget = RepresentativesWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.scope.choices[0] == "all" and "image_id" in widget.scope.choices
    widget.center.value, widget.metric.value, widget.k.value = "median", "cosine", 3
    _run(qtbot, widget, widget.find_button)

    project = Project.open(analysed.path)
    expected = find_representatives(
        project, centers=["median"], metrics=["cosine"], k=3, pixel_baseline=False
    ).latent.table
    chosen = expected["crop_index"].tolist()
    practical = viewer.layers["representatives"]
    assert practical.metadata["title"] == "representatives (median, cosine)"
    assert practical.metadata["crop_index"] == chosen
    assert practical.data.shape == (32, 3 * 34 - 2)
    assert viewer.layers["theoretical images"].data.shape == (32, 32)
    table = project.table()
    for layer in layers:
        mine = table.loc[chosen]
        want = set(mine.loc[mine["image_id"] == layer.metadata["nucleae"]["image_id"], "label"])
        name = f"{layer.name} [representatives]"
        shown_here = visible_labels(viewer.layers[name], layer) if name in viewer.layers else set()
        assert shown_here == want

    # per image: one row of crops per group
    widget.scope.value = "image_id"
    _run(qtbot, widget, widget.find_button)
    assert viewer.layers["representatives"].data.shape == (2 * 34 - 2, 100)
    assert viewer.layers["theoretical images"].data.shape == (2 * 34 - 2, 32)
    assert "2 groups of image_id" in widget.status.value

    out = tmp_path / "export"
    widget.export_folder.value = out
    _run(qtbot, widget, widget.export_button)
    assert (out / "representatives.csv").exists() and (out / "montage.png").exists()
    assert len(list(out.glob("*.tif"))) == 6 + 2  # 2 groups × 3 crops + 2 theoretical
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    _run(qtbot, widget, widget.export_button)
    assert "already contains files" in widget.status.value
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    widget.overwrite.value = True
    _run(qtbot, widget, widget.export_button)
    assert widget.status.value.startswith("exported")


def test_explore_from_clicked_nuclei(
    make_napari_viewer, qtbot, analysed, show_project, visible_labels
):
    viewer = make_napari_viewer()
    layers = show_project(viewer, analysed)
    widget = InterpolateSearchWidget(viewer)
    viewer.window.add_dock_widget(widget)
    table = Project.open(analysed.path).table()
    picker = Picker.of(viewer)
    first, second = 2, len(table) - 3  # one nucleus in each image
    for row in (first, second):
        picker.pick_at(np.round(table.loc[row, ["centroid_y", "centroid_x"]].to_numpy(float)))
    assert (widget.crop_a.value, widget.crop_b.value, widget.query.value) == (
        first,
        second,
        second,
    )

    widget.steps.value = 5
    _run(qtbot, widget, widget.interpolate_button)
    strip = viewer.layers["interpolation"]
    assert strip.data.shape == (32, 5 * 34 - 2)  # one 2-D row: no dims slider
    assert strip.metadata["title"] == f"crop {first} → {second}"

    widget.k.value = 4
    _run(qtbot, widget, widget.search_button)
    similar = viewer.layers["similar nuclei"]
    assert similar.data.shape == (32, 5 * 34 - 2) and similar.metadata["crop_index"][0] == second
    assert similar.metadata["title"] == f"similar to crop {second}"
    shown = table.loc[similar.metadata["crop_index"]]
    for layer in layers:
        image_id = layer.metadata["nucleae"]["image_id"]
        want = set(shown.loc[shown["image_id"] == image_id, "label"])
        name = f"{layer.name} [similar]"
        shown_here = visible_labels(viewer.layers[name], layer) if name in viewer.layers else set()
        assert shown_here == want

    # a new crop image as the query: an image layer holding crop 7 finds crop 7 first
    project = Project.open(analysed.path)
    viewer.add_image(project.read_crops([7])[0], name="my crop")
    widget.reset_choices()
    widget.query_image.value = viewer.layers["my crop"]
    _run(qtbot, widget, widget.search_button)
    similar = viewer.layers["similar nuclei"]
    assert similar.metadata["crop_index"][:2] == [-1, 7]
    np.testing.assert_allclose(similar.data[:, :32], similar.data[:, 34:66])
    assert widget.status.value.startswith("my crop (first) and its 4 nearest")
    viewer.add_image(np.zeros((10, 10)), name="wrong size")
    widget.reset_choices()
    widget.query_image.value = viewer.layers["wrong size"]
    _run(qtbot, widget, widget.search_button)
    assert "must be a 32×32 crop" in widget.status.value


def test_finding_representatives_stops_when_asked(analysed):
    session = Session()
    session.open(analysed.path)
    asked = []

    def stop_at_second_group() -> bool:
        asked.append(True)
        return len(asked) > 2  # two checks per group: the second group is never ranked

    with pytest.raises(InterruptedError, match="stopped"):
        find(
            session,
            center="mean",
            metric="euclidean",
            k=2,
            by="image_id",
            stability=False,
            should_stop=stop_at_second_group,
        )
    assert len(asked) == 3
