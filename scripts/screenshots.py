"""Screenshots of every dock widget, docked in a viewer with the BBBC007 sample, for the docs.

Builds a small project (a few BBBC007 images, classical segmentation, a small autoencoder
trained for a few epochs on the CPU), then docks each widget, runs it and saves
``docs/images/<widget>.png``. Needs a display:

    xvfb-run -a python scripts/screenshots.py [--images 6] [--epochs 15] [--out docs/images]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "nucleae-numba"))
# the widgets start from their defaults, whatever the user last chose
os.environ["NUCLEAE_SETTINGS"] = os.path.join(tempfile.mkdtemp(), "widgets.json")

import napari  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_nucleae.core.embed import embed  # noqa: E402
from napari_nucleae.core.ingest import IngestParams, add_to_project, process_image  # noqa: E402
from napari_nucleae.core.model import ModelConfig  # noqa: E402
from napari_nucleae.core.segment import SegmentParams  # noqa: E402
from napari_nucleae.core.store import CropParams, Project  # noqa: E402
from napari_nucleae.core.training import train  # noqa: E402
from napari_nucleae.sample import bbbc007_paths  # noqa: E402
from napari_nucleae.widgets._nuclei import Picker  # noqa: E402
from napari_nucleae.widgets.interpolate_search import InterpolateSearchWidget  # noqa: E402
from napari_nucleae.widgets.latent_explorer import LatentExplorerWidget  # noqa: E402
from napari_nucleae.widgets.outliers import OutliersWidget  # noqa: E402
from napari_nucleae.widgets.representatives import RepresentativesWidget  # noqa: E402
from napari_nucleae.widgets.segment import SegmentWidget, features_table  # noqa: E402
from napari_nucleae.widgets.train import TrainWidget  # noqa: E402

PARAMS = IngestParams(
    segment=SegmentParams(method="classical", diameter=17), crop=CropParams(size=32)
)


def build_project(folder: Path, n_images: int, epochs: int) -> list[tuple]:
    """Segment, crop, train and embed; returns (name, image, labels, features, id) per image."""
    project = Project.create(folder, PARAMS.crop)
    shown = []
    for path in bbbc007_paths()[:n_images]:
        image = tifffile.imread(path)
        result = process_image(image, PARAMS, image_id=path.stem, path=str(path))
        added = add_to_project(project, result)
        features = features_table(result, added.start)
        shown.append((path.stem, image, result.segmentation.labels, features, path.stem))
    config = ModelConfig(variant="ae", crop_size=32, n_blocks=2, base_filters=8, latent_dim=16)
    start = time.perf_counter()
    train(project, config, epochs, device="cpu")
    print(f"trained {epochs} epochs in {time.perf_counter() - start:.0f} s")
    embed(project, device="cpu")
    print(f"project: {len(project)} crops from {n_images} images in {folder}")
    return shown


def wait(widget) -> None:
    """Let the widget's worker finish, keeping the event loop running."""
    app = QApplication.instance()
    app.processEvents()
    while widget.jobs.busy:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(5):
        app.processEvents()


def snap(viewer: napari.Viewer, out: Path, name: str) -> None:
    """Fit the view to the laid-out canvas, close notification toasts, save a screenshot."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    app = QApplication.instance()
    for _ in range(5):
        app.processEvents()
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    viewer.reset_view()
    for _ in range(5):
        app.processEvents()
    viewer.screenshot(str(out / f"{name}.png"), canvas_only=False, flash=False)
    print(f"wrote {out / name}.png")


def centroid(widget, label_row: int) -> np.ndarray:
    return widget.table.loc[label_row, ["centroid_y", "centroid_x"]].to_numpy(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="nucleae-screens-")) / "project"
    shown = build_project(folder, args.images, args.epochs)

    viewer = napari.Viewer()
    viewer.window.resize(1500, 950)
    segment_screenshot(viewer, args.out, folder.parent / "segmented")
    name, image, labels, features, image_id = shown[0]
    viewer.add_image(image, name=name)
    viewer.add_labels(
        labels,
        name=f"{name} nuclei",
        features=features,
        opacity=0.35,
        metadata={"nucleae": {"image_id": image_id, "project": str(folder)}},
    )
    first = np.flatnonzero(features["crop_index"].notna())

    def dock(widget, title: str):
        return viewer.window.add_dock_widget(widget, name=title, area="right")

    # Latent explorer: UMAP coloured by cluster, a box selection, a clicked nucleus
    explorer = LatentExplorerWidget(viewer)
    handle = dock(explorer, "Latent explorer")
    explorer.clusters.value = 6
    explorer.compute_button.clicked.emit()
    wait(explorer)
    xy = explorer.plot.xy
    (x0, y0), (x1, y1) = np.percentile(xy, 5, axis=0), np.median(xy, axis=0)
    explorer.plot.select_box(x0, y0, x1, y1)
    row = int(features["crop_index"].iat[first[len(first) // 2]])
    Picker.of(viewer).pick_at(centroid(explorer, row))
    snap(viewer, args.out, "explorer")
    explorer.thumbnails_button.clicked.emit()
    wait(explorer)
    snap(viewer, args.out, "explorer_thumbnail_map")
    viewer.layers.remove(next(layer for layer in viewer.layers if "thumbnail" in layer.name))
    viewer.window.remove_dock_widget(handle)

    # Outliers: 2 % tails
    outliers = OutliersWidget(viewer)
    handle = dock(outliers, "Outliers")
    outliers.low.value = outliers.high.value = 2.0
    outliers.flag_button.clicked.emit()
    viewer.layers[f"{name} nuclei [selection]"].visible = False
    snap(viewer, args.out, "outliers")
    viewer.window.remove_dock_widget(handle)

    # Representatives per cluster
    represent = RepresentativesWidget(viewer)
    handle = dock(represent, "Representatives")
    represent.scope.value = "cluster"
    represent.find_button.clicked.emit()
    wait(represent)
    for layer in viewer.layers:
        layer.visible = not layer.name.startswith(("MSE gallery", f"{name} nuclei ["))
        if layer.name.endswith("[representatives]"):
            layer.visible = True
    snap(viewer, args.out, "representatives")
    viewer.window.remove_dock_widget(handle)

    # Explore: two clicked nuclei, interpolation and reverse search
    explore = InterpolateSearchWidget(viewer)
    handle = dock(explore, "Interpolate & search")
    for i in (first[3], first[-4]):
        Picker.of(viewer).pick_at(centroid(explorer, int(features["crop_index"].iat[i])))
    explore.interpolate_button.clicked.emit()
    wait(explore)
    explore.search_button.clicked.emit()
    wait(explore)
    for layer in viewer.layers:
        layer.visible = layer.name in (name, f"{name} nuclei") or "similar" in layer.name
    viewer.dims.set_current_step(0, 0)
    snap(viewer, args.out, "explore")
    viewer.window.remove_dock_widget(handle)
    for layer in viewer.layers:
        layer.visible = layer.name in (name, f"{name} nuclei")
    train_screenshot(viewer, args.out, folder, args.epochs)
    viewer.close()


def segment_screenshot(viewer: napari.Viewer, out: Path, folder: Path) -> None:
    """Segment one image into its own project with the classical method."""
    path = bbbc007_paths()[-1]
    layer = viewer.add_image(tifffile.imread(path), name=path.stem)
    widget = SegmentWidget(viewer)
    handle = viewer.window.add_dock_widget(widget, name="Segment & crop nuclei", area="right")
    widget.image.value = layer
    widget.method.value = "classical"
    widget.diameter.value = 17.0
    widget.crop_size.value = 32
    widget.project.value = folder
    widget.run_button.clicked.emit()
    wait(widget)
    snap(viewer, out, "segment")
    viewer.window.remove_dock_widget(handle)
    viewer.layers.clear()


def train_screenshot(viewer: napari.Viewer, out: Path, folder: Path, epochs: int) -> None:
    """Train a second model on the project with the live loss plot."""
    widget = TrainWidget(viewer)
    handle = viewer.window.add_dock_widget(widget, name="Train / load model", area="right")
    widget.project.value = folder
    widget.name.value = "screenshot"
    widget.latent_dim.value = 16
    widget.n_blocks.value = 2
    widget.base_filters.value = 8
    widget.epochs.value = epochs
    widget.start_button.clicked.emit()
    wait(widget)
    snap(viewer, out, "train")
    viewer.window.remove_dock_widget(handle)


if __name__ == "__main__":
    main()
