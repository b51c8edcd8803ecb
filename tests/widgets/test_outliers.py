import numpy as np
import pandas as pd

from napari_nucleae.core.store import Project
from napari_nucleae.widgets._plots import cut_offs
from napari_nucleae.widgets.outliers import OutliersWidget, extremes


def test_percentiles_flag_the_right_rows_and_show_them(
    make_napari_viewer, analysed, show_project, visible_labels
):
    viewer = make_napari_viewer()
    layers = show_project(viewer, analysed)
    widget = OutliersWidget(viewer)
    viewer.window.add_dock_widget(widget)
    mse = Project.open(analysed.path).table()["mse"].to_numpy(float)
    n = len(mse)
    assert widget.table is not None and widget.histogram.axes.patches  # histogram drawn

    widget.low.value, widget.high.value = 10.0, 20.0
    widget.flag_button.clicked.emit()
    order = np.argsort(mse, kind="stable")
    n_low, n_high = round(n * 0.1), round(n * 0.2)
    expected = np.full(n, "normal", dtype=object)
    expected[order[:n_low]], expected[order[n - n_high :]] = "low", "high"
    stored = Project.open(analysed.path).table()["outlier"].to_numpy()
    np.testing.assert_array_equal(stored, expected)
    assert f"{n_high} high (red) and {n_low} low (blue)" in widget.status.value

    table = Project.open(analysed.path).table()
    for layer in layers:
        image_id = layer.metadata["nucleae"]["image_id"]
        mine = table[table["image_id"] == image_id]
        flagged = set(mine.loc[mine["outlier"] != "normal", "label"])
        features = layer.features.set_index("label")
        # text categories reach the layer as integer codes, named in the metadata
        assert isinstance(features["outlier"].dtype, pd.CategoricalDtype)
        names = layer.metadata["nucleae"]["categories"]["outlier"]
        assert names == ["low", "normal", "high"]
        codes = features.loc[mine["label"], "outlier"].astype(int)
        assert [names[c] for c in codes] == list(mine["outlier"])
        highlight = viewer.layers[f"{layer.name} [outliers]"]
        assert visible_labels(highlight, layer) == flagged
        for label in flagged:
            color = highlight.colormap.map(highlight.data[layer.data == label][:1])[0]
            high = mine.loc[mine["label"] == label, "outlier"].item() == "high"
            assert (color[0] > color[2]) == high  # red for high, blue for low

    top = viewer.layers["MSE gallery: highest"]
    assert top.metadata["crop_index"] == order[::-1][:n_high].tolist()
    assert top.data.shape[1] == min(8, n_high) * 34 - 2
    bottom = viewer.layers["MSE gallery: lowest"]
    assert bottom.metadata["crop_index"] == order[:n_low].tolist()
    assert bottom.translate[1] == top.translate[1]  # under the highest, left-aligned
    assert bottom.translate[0] >= top.translate[0] + top.data.shape[0]

    widget.low.value = 0.0
    widget.flag_button.clicked.emit()
    assert "MSE gallery: lowest" not in viewer.layers


def test_cut_offs_and_extremes():
    mse = np.array([5.0, 1.0, 3.0, np.nan, 9.0, 2.0])
    flags = pd.Categorical(["normal", "low", "normal", "normal", "high", "normal"])
    assert cut_offs(mse, flags) == (1.0, 9.0)
    np.testing.assert_array_equal(extremes(mse, flags, "high", 5), [4])
    np.testing.assert_array_equal(extremes(mse, flags, "low", 0), [])


def test_the_clusters_plotter_colors_by_our_text_categories(
    make_napari_viewer, qtbot, analysed, show_project
):
    from napari_clusters_plotter import PlotterWidget

    viewer = make_napari_viewer()
    layers = show_project(viewer, analysed)
    widget = OutliersWidget(viewer)
    widget.low.value, widget.high.value = 10.0, 10.0
    widget.flag_button.clicked.emit()
    layer = layers[0]
    viewer.layers.selection.active = layer
    plotter = PlotterWidget(viewer)
    viewer.window.add_dock_widget(plotter)
    assert "outlier" in plotter.categorical_columns
    plotter.x_axis, plotter.y_axis, plotter.hue_axis = "mse", "area", "outlier"
    plotter._replot()  # raised inside its plotting library for text categories
    colors = np.asarray(plotter.plotting_widget.active_artist.color_indices)
    flags = layer.features["outlier"]
    assert len(colors) == len(flags)
    for code in range(3):
        assert len(set(colors[np.asarray(flags == code)])) == 1
