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
    FileEdit,
    FloatSpinBox,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.utils.notifications import show_error, show_info, show_warning

from ..core.analysis import LAYER_KEY, layer_features
from ..core.crop import crop_size_note
from ..core.errors import NoNucleiError, NucleaeError, WeightsUnavailableError
from ..core.ingest import ImageResult, IngestParams, add_to_project, process_layer
from ..core.segment import CELLPOSE_MODELS, METHODS, SegmentParams
from ..core.store import BACKGROUNDS, NORMALIZATIONS, CropParams, Project
from ._common import Dock, StatusLabel, add_progress, compact, folder_of
from ._jobs import user_message
from ._session import Session, follow
from ._settings import remember

MODEL_CHOICES = (*CELLPOSE_MODELS, "custom file…")
SEGMENT, CROP = SegmentParams(), CropParams()  # the defaults
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


def layer_path(layer: napari.layers.Layer) -> str | None:
    """The file a layer was read from (its ``metadata["path"]``, as the samples set it, or
    napari's ``source.path``), or None."""
    path = layer.metadata.get("path") or layer.source.path
    return str(path) if path and Path(path).is_file() else None


def segment_and_store(
    image: Any,
    params: IngestParams,
    *,
    name: str,
    path: str | None,
    project_dir: Path | None,
    progress=None,
    should_stop=None,
) -> SegmentOutcome:
    """Worker body: segment + crop a layer's data (a dask or zarr stack is read one plane at a
    time), then append it to a project if given. A layer read from the file ``path`` gets the
    id ``nucleae ingest`` gives that file, and the project records the file's path."""
    result = process_layer(
        image, params, name=name, path=path, progress=progress, should_stop=should_stop
    )
    if result.crops is None:
        raise NoNucleiError(
            f"no nuclei found in '{name}' ({result.segmentation.method} segmentation); "
            "check the channel, the diameter or the method"
        )
    if should_stop is not None and should_stop():
        raise InterruptedError(f"segmentation of '{name}' stopped; nothing was saved")
    if project_dir is None:
        return SegmentOutcome(result, "")
    project = Project.open_or_create(project_dir, params.crop)
    added = add_to_project(project, result)  # None: present already (checked under the lock)
    notes = "".join(f" ({note})" for note in project.notes)  # e.g. a stale lock taken over
    if added is None:
        return SegmentOutcome(result, f"'{name}' is already in {project.path}; not added again")
    saved = f"saved {len(added)} crops to {project.path}{notes}"
    return SegmentOutcome(result, saved, added.start)


def features_table(
    result: ImageResult, first_crop: int | None = None
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The Labels-layer ``features`` of a segmentation (see
    :func:`~napari_nucleae.core.analysis.layer_features`) and the names of their codes.

    ``crop_index`` is the row of each cropped nucleus in the project (NaN when not stored).
    """
    rows = result.crops.measurements.copy()
    crop_index = np.full(len(rows), np.nan)
    if first_crop is not None:
        kept = rows["cropped"].to_numpy(bool)
        crop_index[kept] = first_crop + np.arange(kept.sum())
    rows["crop_index"] = crop_index
    return layer_features(rows, int(result.segmentation.labels.max(initial=0)))


def oversized(crop_size: int, image: Any, rgb: bool) -> str | None:
    """Why a crop size cannot be used on an image (larger than its smaller side), or None."""
    shape = np.shape(image)[:-1] if rgb else np.shape(image)
    side = min(shape[-2:])
    if crop_size > side:
        return (
            f"crop size {crop_size} is larger than the image ({side} px on its smaller side); "
            "choose a crop size a little larger than the nuclei"
        )
    return None


class SegmentWidget(Dock):
    """Segment nuclei in an image layer, add a Labels layer and save crops to a project."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
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
            value=SEGMENT.method,
            label="method",
            tooltip="auto: cellpose, or the classical method (announced) "
            "when cellpose weights are missing",
        )
        self.model = ComboBox(choices=MODEL_CHOICES, value=SEGMENT.model, label="cellpose model")
        self.model_file = FileEdit(mode="r", label="model file", visible=False)
        self.diameter = FloatSpinBox(value=0.0, min=0.0, max=1000.0, label="diameter (0: auto)")
        self.gpu = ComboBox(choices=list(GPU_CHOICES), value="auto", label="GPU")
        self.crop_size = SpinBox(value=CROP.size, min=16, max=512, step=8, label="crop size")
        self.background = ComboBox(
            choices=BACKGROUNDS,
            value=CROP.background,
            label="background",
            tooltip="outside each nucleus: zeros, the nucleus's interior mean, or the image kept",
        )
        self.skip_border = CheckBox(
            value=CROP.skip_border,
            text="skip border nuclei",
            tooltip="skip nuclei touching the border",
        )
        self.rescale = CheckBox(
            value=CROP.rescale_large,
            text="shrink large nuclei",
            tooltip="shrink nuclei larger than the crop",
        )
        self.align = CheckBox(value=CROP.align, text="align major axis")
        self.normalize = ComboBox(choices=NORMALIZATIONS, value=CROP.normalize, label="normalise")
        self.project = FileEdit(
            mode="d",
            label="project folder",
            value=str(self.session.path or ""),
            tooltip="where crops are saved (a new folder becomes a project; empty: do not save)",
        )
        self.run_button = PushButton(text="Segment and crop")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.crop_hint = StatusLabel()  # a crop size the measured nuclei would fill
        self.crop_hint.visible = False
        self.status = StatusLabel()
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
                self.crop_hint,
                self.background,
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
        compact(self.model_file)
        compact(self.project)
        self.jobs = add_progress(self)
        self.jobs.bind([self.run_button], self.cancel_button)
        self.model.changed.connect(
            lambda value: setattr(self.model_file, "visible", value == "custom file…")
        )
        self.run_button.changed.connect(self.run)
        follow(self, self.session.project_changed, self._project_opened)
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
                background=self.background.value,
                skip_border=self.skip_border.value,
                rescale_large=self.rescale.value,
                align=self.align.value,
                normalize=self.normalize.value,
            ),
            channel=None if self.channel.value < 0 else self.channel.value,
        )

    def project_dir(self) -> Path | None:
        return folder_of(self.project)

    def _project_opened(self, _project) -> None:
        if self.session.path is not None:
            self.project.value = self.session.path

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
        image = full_resolution(layer)
        refused = oversized(params.crop.size, image, layer.rgb)
        if refused is not None:
            self.status.value = refused
            show_error(refused)
            return
        project_dir = self.project_dir()
        self.jobs.start(
            segment_and_store,
            image,
            params,
            name=layer.name,
            path=layer_path(layer),
            project_dir=project_dir,
            desc=f"Segmenting {layer.name}",
            on_returned=lambda outcome: self._show(outcome, layer, project_dir),
            on_errored=self._on_error,
            cancellable=True,
        )

    def show_crop_size_hint(self, result: ImageResult) -> None:
        """Suggest a crop size from the nuclei just measured (nothing when it fits)."""
        table = result.crops.table if result.crops is not None else None
        note = None if table is None else crop_size_note(table, self.crop_size.value)
        self.crop_hint.value = note or ""
        self.crop_hint.visible = bool(note)

    def _on_error(self, err: BaseException) -> None:
        message = user_message(err)
        if isinstance(err, WeightsUnavailableError):
            self.method.value = "classical"
            message += " — switched the method to 'classical' (scikit-image); press Run again."
        self.status.value = message
        show_error(message)

    def _show(
        self, outcome: SegmentOutcome, image_layer: napari.layers.Image, project_dir: Path | None
    ) -> None:
        """Show the Labels layer with per-nucleus features (replacing this image's previous
        one) and share the project with the other widgets."""
        result = outcome.result
        features, names = features_table(result, outcome.first_crop)
        labels = result.segmentation.labels
        metadata = {
            LAYER_KEY: {
                "image_id": result.record["image_id"],
                "project": str(project_dir or ""),
                "categories": names,
            }
        }
        name = f"{image_layer.name} nuclei"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = self.viewer.add_labels(
            labels,
            name=name,
            scale=image_layer.scale[-labels.ndim :],
            translate=image_layer.translate[-labels.ndim :],
            features=features,
            metadata=metadata,
        )
        method = result.segmentation.method
        self.status.value = (
            f"{result.segmentation.n_nuclei} nuclei ({method}), {result.n_crops} cropped"
        )
        self.show_crop_size_hint(result)
        if result.segmentation.note:
            show_warning(result.segmentation.note)
        show_info(f"{layer.name}: {self.status.value}. {outcome.saved}".strip())
        if project_dir is not None:
            self.session.open(project_dir, quiet=True)
            self.session.refresh()
