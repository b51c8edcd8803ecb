import numpy as np
import pandas as pd
import pytest

from napari_nucleae.core.store import Project
from napari_nucleae.widgets._nuclei import NucleusIndex, Picker
from napari_nucleae.widgets._plots import LatentPlot, drawn_rows, rows_in_box, rows_in_polygon
from napari_nucleae.widgets.latent_explorer import (
    LatentExplorerWidget,
    projection_pairs,
    thumbnail_cells,
)

TIMEOUT = 60_000


def _computed(make_napari_viewer, qtbot, analysed, show_project):
    viewer = make_napari_viewer()
    layers = show_project(viewer, analysed)
    widget = LatentExplorerWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert str(widget.project.value) == str(analysed.path)  # prefilled from the layers
    widget.projection.value = "PCA"
    widget.clusters.value = 3
    widget.compute_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.table is not None, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    widget.reset_choices()  # napari does this whenever layers change
    assert widget.color_by.value == "cluster" and "mse" in widget.color_by.choices
    return viewer, layers, widget


def test_lasso_in_plot_highlights_labels_and_click_marks_point(
    make_napari_viewer, qtbot, analysed, show_project, visible_labels
):
    viewer, layers, widget = _computed(make_napari_viewer, qtbot, analysed, show_project)
    table = Project.open(analysed.path).table()
    assert widget.columns == ("PC_0", "PC_1")
    xy = table[["PC_0", "PC_1"]].to_numpy()
    np.testing.assert_allclose(widget.plot.xy, xy)

    # a lasso around the right half of the points, drawn the way LassoSelector reports it
    mid = np.median(xy[:, 0])
    lo, hi = xy.min(axis=0) - 1, xy.max(axis=0) + 1
    lasso = [(mid, lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (mid, hi[1])]
    widget.plot.selector.onselect(lasso)
    expected = np.flatnonzero(xy[:, 0] >= mid)
    np.testing.assert_array_equal(widget.selection, expected)
    for layer in layers:
        image_id = layer.metadata["nucleae"]["image_id"]
        want = set(table.loc[expected][table.loc[expected, "image_id"] == image_id]["label"])
        highlight = viewer.layers[f"{layer.name} [selection]"]
        assert visible_labels(highlight, layer) == want
        assert highlight.data.dtype == np.uint8
    # the user's active layer is not replaced by the highlight layers
    assert viewer.layers.selection.active is layers[-1]

    # a box selection replaces it; the plot rings exactly the selected points
    rows = widget.plot.select_box(lo[0], lo[1], mid, hi[1])
    np.testing.assert_array_equal(rows, np.flatnonzero(xy[:, 0] <= mid))
    np.testing.assert_allclose(np.c_[widget.plot._selection.get_data()], xy[rows])

    # click a nucleus in the viewer: its point is marked in the plot
    second = layers[1]
    row = table.index[(table["image_id"] == second.metadata["nucleae"]["image_id"])][3]
    label = int(table.at[row, "label"])
    centroid = table.loc[row, ["centroid_y", "centroid_x"]].to_numpy(float)
    pick = Picker.of(viewer).pick_at(np.round(centroid))
    assert (pick.label, pick.layer) == (label, second.name)
    np.testing.assert_allclose(np.c_[widget.plot._mark.get_data()], xy[[row]])
    assert f"crop {row}" in widget.status.value


def test_features_reach_layers_and_the_clusters_plotter(
    make_napari_viewer, qtbot, analysed, show_project
):
    from napari_clusters_plotter import PlotterWidget
    from napari_clusters_plotter._new_plotter_widget import _focus_object

    viewer, layers, widget = _computed(make_napari_viewer, qtbot, analysed, show_project)
    table = Project.open(analysed.path).table()
    for layer in layers:
        features = layer.features
        assert features["label"].tolist() == list(range(1, len(features) + 1))
        assert features["PC_0"].dtype == float and features["mse"].dtype == float
        assert isinstance(features["cluster"].dtype, pd.CategoricalDtype)
        mine = table[table["image_id"] == layer.metadata["nucleae"]["image_id"]]
        by_label = features.set_index("label")
        np.testing.assert_allclose(by_label.loc[mine["label"], "PC_1"], mine["PC_1"])
        assert list(by_label.loc[mine["label"], "cluster"]) == list(mine["cluster"])

    layer = layers[0]
    viewer.layers.selection.active = layer
    plotter = PlotterWidget(viewer)
    viewer.window.add_dock_widget(plotter)
    assert {"PC_0", "PC_1", "mse"} <= set(plotter.common_columns)
    assert "cluster" in plotter.categorical_columns
    plotter.x_axis, plotter.y_axis, plotter.hue_axis = "PC_0", "PC_1", "cluster"
    plotted = plotter._get_features()
    np.testing.assert_allclose(plotted["PC_0"], layer.features["PC_0"])
    plotter._replot()  # integer cluster categories (NaN for uncropped nuclei) can be drawn
    assert len(plotter.plotting_widget.active_artist.color_indices) == len(layer.features)
    # the plotter maps row i to label i + 1: our rows agree
    row = 5
    chosen = np.zeros(len(layer.features), dtype=bool)
    chosen[row] = True
    _focus_object(layer, chosen)
    assert layer.selected_label == layer.features["label"].iat[row] == row + 1


def test_thumbnail_map_and_reopen(make_napari_viewer, qtbot, analysed, show_project):
    viewer, _, widget = _computed(make_napari_viewer, qtbot, analysed, show_project)
    widget.thumbnails_button.clicked.emit()
    qtbot.waitUntil(lambda: "thumbnail map" in viewer.layers, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    assert viewer.layers["thumbnail map"].metadata["title"] == "thumbnail map (PC_0, PC_1)"
    canvas = viewer.layers["thumbnail map"].data
    n = len(widget.table)
    side = int(np.ceil(np.sqrt(n)))
    assert canvas.shape == (side * 32, side * 32) and canvas.max() > 0

    # a new explorer on the same folder shows the stored projection without computing
    again = LatentExplorerWidget(viewer)
    assert again.columns == ("PC_0", "PC_1") and len(again.table) == n


def test_selection_helpers():
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [np.nan, 1.0]])
    square = [(0.5, 0.5), (2.5, 0.5), (2.5, 2.5), (0.5, 2.5)]
    np.testing.assert_array_equal(rows_in_polygon(xy, square), [1, 2])
    np.testing.assert_array_equal(rows_in_polygon(xy, square[:2]), [])
    np.testing.assert_array_equal(rows_in_box(xy, 0.5, 0.5, -0.5, -0.5), [0])
    assert len(drawn_rows(10, 50)) == 10
    sub = drawn_rows(100_000, 50_000)
    assert len(np.unique(sub)) == 50_000 and np.all(np.diff(sub) > 0)
    assert projection_pairs(["PC_0", "PC_1", "UMAP_0", "UMAP_1", "mse", "PC_x"]) == [
        ("UMAP_0", "UMAP_1"),
        ("PC_0", "PC_1"),
    ]
    rows, cells, side = thumbnail_cells(np.random.default_rng(0).normal(size=(500, 2)), 100)
    assert side == 10 and len(rows) == len(np.unique(cells, axis=0)) <= 100


@pytest.mark.parametrize("n_images", [1, 3])
def test_nucleus_index_round_trip(n_images):
    table = pd.DataFrame(
        {
            "image_id": np.repeat([f"im{i}" for i in range(n_images)], 4),
            "label": np.tile([2, 5, 7, 9], n_images),
        }
    )
    index = NucleusIndex.from_table(table)
    for row in range(len(table)):
        assert index.row_of(table.at[row, "image_id"], table.at[row, "label"]) == row
    assert index.row_of("im0", 3) is None and index.row_of("other", 2) is None
    rows = np.array([len(table) - 1, 0, 1])
    parts = {k: index.label_of[rows[v]].tolist() for k, v in index.split(rows).items()}
    last = f"im{n_images - 1}"
    assert parts == ({last: [9, 2, 5]} if n_images == 1 else {last: [9], "im0": [2, 5]})
    assert index.split(np.empty(0, dtype=np.int64)) == {}


def test_large_maps_draw_a_subsample_but_select_every_point(qtbot):
    plot = LatentPlot()
    qtbot.addWidget(plot)
    xy = np.random.default_rng(1).normal(size=(60_000, 2))
    plot.show_points(xy, pd.Series(xy[:, 0], name="x"), ("a", "b"), "UMAP of the latents")
    assert "random 50,000 of 60,000 points drawn" in plot.axes.get_title()
    assert len(plot.axes.collections[0].get_offsets()) == 50_000
    emitted = []
    plot.selected.connect(emitted.append)
    rows = plot.select_box(0, 0, 10, 10)
    np.testing.assert_array_equal(rows, np.flatnonzero((xy >= 0).all(axis=1)))
    np.testing.assert_array_equal(emitted[0], rows)
    plot.show_selection(rows)
    assert len(plot._selection.get_xdata()) == min(len(rows), 50_000)


def test_a_click_picks_but_a_drag_does_not(make_napari_viewer, analysed, show_project):
    from types import SimpleNamespace

    viewer = make_napari_viewer()
    show_project(viewer, analysed)
    picker = Picker.of(viewer)
    assert Picker.of(viewer) is picker and picker in viewer.mouse_drag_callbacks
    picks = []
    picker.picked.connect(picks.append)
    labels = analysed.images[0].labels
    position = np.argwhere(labels == 1).mean(axis=0).round()

    def gesture(*moves: str) -> None:
        event = SimpleNamespace(
            button=1,
            type="mouse_press",
            position=position,
            view_direction=None,
            dims_displayed=(0, 1),
        )
        steps = picker(viewer, event)
        next(steps)
        for kind in (*moves, "mouse_release"):
            event.type = kind
            next(steps, None)

    gesture()
    gesture("mouse_move", "mouse_move")
    assert [(p.label, p.layer) for p in picks] == [(1, "nuclei 3 nuclei")]


def test_hovering_a_point_shows_its_crop(make_napari_viewer, qtbot, analysed, show_project):
    from matplotlib.backend_bases import MouseEvent

    from napari_nucleae.widgets._plots import nearest_point

    assert nearest_point(np.array([[0.0, 0.0], [10.0, 0.0]]), 9.0, 1.0, radius=3) == 1
    assert nearest_point(np.array([[0.0, 0.0]]), 9.0, 1.0, radius=3) is None
    _, _, widget = _computed(make_napari_viewer, qtbot, analysed, show_project)
    plot = widget.plot
    plot.draw()
    row = int(plot.drawn[3])
    x, y = plot.axes.transData.transform(plot.xy[row])
    with qtbot.waitSignal(plot.hovered) as hovered:
        plot.callbacks.process("motion_notify_event", MouseEvent("motion_notify_event", plot, x, y))
    assert hovered.args == [row]
    shown = plot._hover.offsetbox.get_data()
    expected = Project.open(analysed.path).read_crops([row])[0]
    np.testing.assert_allclose(shown, expected)


def test_hdbscan_clusters_match_scikit_learn_and_reach_the_layers(
    make_napari_viewer, qtbot, analysed, show_project
):
    viewer = make_napari_viewer()
    layers = show_project(viewer, analysed)
    widget = LatentExplorerWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.projection.value = "PCA"
    widget.cluster_method.value = "HDBSCAN"
    assert widget.clusters.native.isHidden() and not widget.min_cluster_size.native.isHidden()
    widget.min_cluster_size.value = 5
    widget.compute_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.table is not None, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)

    from sklearn.cluster import HDBSCAN

    from napari_nucleae.core.embed import read_latents

    project = Project.open(analysed.path)
    expected = HDBSCAN(min_cluster_size=5).fit_predict(np.asarray(read_latents(project)))
    stored = project.table()["cluster"]
    np.testing.assert_array_equal(stored.astype(int), expected)
    cropped = layers[0].features.dropna(subset=["crop_index"])
    mine = stored.to_numpy()[cropped["crop_index"].astype(int)]
    np.testing.assert_array_equal(cropped["cluster"].astype(int), mine)

    widget.cluster_method.value = "none"
    widget.compute_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=TIMEOUT)
    np.testing.assert_array_equal(Project.open(analysed.path).table()["cluster"], stored)
