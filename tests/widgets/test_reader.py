import shutil

import napari
import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_nucleae.core.explore import outlier_flags
from napari_nucleae.core.ingest import IngestParams, add_to_project, process_image
from napari_nucleae.core.segment import SegmentParams
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.reader import get_reader
from napari_nucleae.widgets._nuclei import Picker
from napari_nucleae.widgets.latent_explorer import LatentExplorerWidget


def test_reader_only_claims_project_folders(tmp_path, analysed):
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "image.tif")) is None
    assert get_reader(str(analysed.path)) is not None
    assert get_reader([str(analysed.path), str(tmp_path)]) is None


def _project_with_analysis(tmp_path, image):
    path = tmp_path / "nuclei.tif"
    tifffile.imwrite(path, image)
    params = IngestParams(
        segment=SegmentParams(method="classical", diameter=16), crop=CropParams(size=32)
    )
    project = Project.create(tmp_path / "project", params.crop)
    result = process_image(image, params, image_id="img", path=str(path))
    add_to_project(project, result)
    rng = np.random.default_rng(0)
    table = project.table()
    project.write_features(
        pd.DataFrame(
            {
                "mse": rng.random(len(project)),
                "cluster": pd.Categorical([1] * len(project)),  # as compute_clusters stores it
                "outlier": outlier_flags(rng.random(len(project)), 10, 10),
                "PC_0": table["centroid_x"],  # a stored projection; centroids stand in for one
                "PC_1": table["centroid_y"],
            }
        )
    )
    return project, result.segmentation.labels


def test_reopened_project_restores_images_labels_and_analysis(
    make_napari_viewer, tmp_path, synthetic, visible_labels
):
    image, _ = synthetic
    image = image.copy()
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image[(yy**2 + (xx - image.shape[1] // 2) ** 2) < 81] = image.max()  # cut by the border
    project, labels = _project_with_analysis(tmp_path, image)
    viewer = make_napari_viewer()
    viewer.open(str(project.path), plugin="napari-nucleae")
    assert [layer.name for layer in viewer.layers] == ["nuclei", "nuclei nuclei"]
    np.testing.assert_array_equal(viewer.layers["nuclei"].data, image)
    nuclei = viewer.layers["nuclei nuclei"]
    assert isinstance(nuclei, napari.layers.Labels)
    np.testing.assert_array_equal(nuclei.data, labels)

    # features: one row per label (row i <-> label i + 1), the project rows placed by label
    table = project.table()
    features = nuclei.features
    assert features["label"].tolist() == list(range(1, labels.max() + 1))
    # napari finds a label's row through `index`: the status bar shows the nucleus's own row
    assert nuclei._label_index == {label: label - 1 for label in features["label"]}
    by_label = features.set_index("label")
    np.testing.assert_allclose(by_label.loc[table["label"], "mse"], table["mse"])
    uncropped = sorted(set(range(1, labels.max() + 1)) - set(table["label"]))
    assert uncropped, "the nucleus cut by the border is segmented but not cropped"
    assert by_label.loc[uncropped, "mse"].isna().all()
    names = nuclei.metadata["nucleae"]["categories"]
    assert names["cropped"] == ["no", "yes"] and names["outlier"] == ["low", "normal", "high"]
    # flags come back as the 0/1 categories the segment widget writes, not as floats
    assert features["touches_border"].dtype == "category"
    assert names["touches_border"] == ["no", "yes"]
    assert (by_label.loc[table["label"], "touches_border"] == 0).all()
    assert (by_label.loc[table["label"], "cropped"] == 1).all()
    outlier = [names["outlier"][c] for c in by_label.loc[table["label"], "outlier"]]
    assert outlier == list(table["outlier"])
    assert nuclei.metadata["nucleae"]["image_id"] == "img"

    # the analysis widgets link the reopened labels: box -> highlighted nuclei, click -> mark
    widget = LatentExplorerWidget(viewer)
    assert widget.columns == ("PC_0", "PC_1")
    rows = widget.plot.select_box(0, 0, 128, 256)
    highlight = viewer.layers["nuclei nuclei [selection]"]
    assert visible_labels(highlight, nuclei) == set(table.loc[rows, "label"])
    row = 4
    pick = Picker.of(viewer).pick_at(table.loc[row, ["centroid_y", "centroid_x"]].to_numpy())
    assert pick.label == table.at[row, "label"]
    np.testing.assert_allclose(np.c_[widget.plot._mark.get_data()], [widget.plot.xy[row]])


def test_projects_without_stored_labels_reopen_as_centroid_points(
    make_napari_viewer, tmp_path, synthetic
):
    image, _ = synthetic
    project, _ = _project_with_analysis(tmp_path, image)
    shutil.rmtree(project.path / "labels")  # a project ingested before labels were stored
    viewer = make_napari_viewer()
    viewer.open(str(project.path), plugin="napari-nucleae")
    points = viewer.layers["nuclei nuclei"]
    assert isinstance(points, napari.layers.Points)
    table = project.table()
    np.testing.assert_allclose(points.data, table[["centroid_y", "centroid_x"]])
    assert points.features["label"].tolist() == table["label"].tolist()
    np.testing.assert_allclose(points.features["mse"], table["mse"])
    assert points.metadata["nucleae"] == {"image_id": "img", "project": str(project.path)}
    widget = LatentExplorerWidget(viewer)
    rows = widget.plot.select_box(0, 0, 128, 256)
    np.testing.assert_allclose(viewer.layers["nuclei nuclei [selection]"].data, points.data[rows])


def test_a_lost_labels_tile_reopens_as_points_with_a_warning_naming_it(
    make_napari_viewer, tmp_path, synthetic
):
    image, _ = synthetic
    project, _ = _project_with_analysis(tmp_path, image)
    tile = next(p for p in (project.labels_path("img") / "c").rglob("*") if p.is_file())
    tile.unlink()
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match=f"{tile} is missing.*shown as points"):
        viewer.open(str(project.path), plugin="napari-nucleae")
    assert isinstance(viewer.layers["nuclei nuclei"], napari.layers.Points)
    assert len(viewer.layers["nuclei nuclei"].data) == len(project)


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
