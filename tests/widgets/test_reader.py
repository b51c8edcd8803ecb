import numpy as np
import pandas as pd
import tifffile

from napari_nucleae.core.ingest import IngestParams, add_to_project, process_image
from napari_nucleae.core.segment import SegmentParams
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.reader import get_reader
from napari_nucleae.widgets._nuclei import Picker
from napari_nucleae.widgets.explorer import ExplorerWidget


def test_reader_only_claims_project_folders(tmp_path, analysed):
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "image.tif")) is None
    assert get_reader(str(analysed.path)) is not None
    assert get_reader([str(analysed.path), str(tmp_path)]) is None


def test_reopened_project_shows_images_and_linked_nuclei(make_napari_viewer, tmp_path, synthetic):
    image, _ = synthetic
    path = tmp_path / "nuclei.tif"
    tifffile.imwrite(path, image)
    params = IngestParams(
        segment=SegmentParams(method="classical", diameter=16), crop=CropParams(size=32)
    )
    project = Project.create(tmp_path / "project", params.crop)
    add_to_project(project, process_image(image, params, image_id="img", path=str(path)))
    rng = np.random.default_rng(0)
    clusters = pd.Categorical([1] * len(project))  # as analysis.compute_clusters stores it
    project.write_features(pd.DataFrame({"mse": rng.random(len(project)), "cluster": clusters}))

    viewer = make_napari_viewer()
    viewer.open(str(project.path), plugin="napari-nucleae")
    assert [layer.name for layer in viewer.layers] == ["nuclei", "nuclei nuclei"]
    np.testing.assert_array_equal(viewer.layers["nuclei"].data, image)
    points = viewer.layers["nuclei nuclei"]
    table = project.table()
    np.testing.assert_allclose(points.data, table[["centroid_y", "centroid_x"]])
    assert points.features["label"].tolist() == table["label"].tolist()
    np.testing.assert_allclose(points.features["mse"], table["mse"])
    assert points.features["cluster"].dtype == "category"
    assert points.metadata["nucleae"] == {"image_id": "img", "project": str(project.path)}

    # the analysis widgets link the reopened points: box → rings, click → plot mark
    # (a stored projection is enough for the explorer; here the centroids stand in for one)
    project.write_features(pd.DataFrame({"PC_0": table["centroid_x"], "PC_1": table["centroid_y"]}))
    widget = ExplorerWidget(viewer)
    assert widget.columns == ("PC_0", "PC_1")
    rows = widget.plot.select_box(0, 0, 128, 256)
    highlight = viewer.layers["nuclei nuclei [selection]"]
    np.testing.assert_allclose(highlight.data, points.data[rows])
    row = 4
    pick = Picker.of(viewer).pick_at(points.data[row])
    assert pick.label == table.at[row, "label"]
    np.testing.assert_allclose(np.c_[widget.plot._mark.get_data()], [widget.plot.xy[row]])


def test_manifest_registers_the_viewer_widgets_and_the_reader():
    from npe2 import PluginManifest

    contributions = PluginManifest.from_distribution("napari-nucleae").contributions
    widgets = {w.command for w in contributions.widgets}
    new = {f"napari-nucleae.{name}_widget" for name in ("explorer", "outliers", "represent")}
    assert new | {"napari-nucleae.explore_widget", "napari-nucleae.segment_widget"} <= widgets
    menus = {key: {item.command for item in items} for key, items in contributions.menus.items()}
    assert "napari-nucleae.explorer_widget" in menus["napari/layers/visualize"]
    assert "napari-nucleae.represent_widget" in menus["napari/layers/classify"]
    (reader,) = contributions.readers
    assert reader.command == "napari-nucleae.get_reader" and reader.accepts_directories
