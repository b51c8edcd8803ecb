""" "Train / load model" dock widget: train an autoencoder with a live loss plot, or load one,
then embed every crop of the project."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    PushButton,
    SpinBox,
)
from magicgui.widgets.bases import ValueWidget
from napari.utils.notifications import show_error, show_info, show_warning

from ..core.embed import EmbedResult, embed
from ..core.errors import NucleaeError
from ..core.model import (
    ARCHS,
    DEFAULT_VARIANT,
    DEVICES,
    INITS,
    SCHEDULES,
    VARIANTS,
    LoadedModel,
    ModelConfig,
    load_model,
    select_device,
)
from ..core.training import EPOCHS, MODEL_NAME, TrainingError, TrainResult, train
from ._common import (
    Dock,
    StatusLabel,
    add_progress,
    bind_project,
    compact,
    never_widen,
    require_project,
)
from ._plots import LossPlot
from ._session import Session, follow
from ._settings import remember

NOT_SETTINGS = ("variant", "crop_size")  # ModelConfig fields the widget does not offer
BASIC = ("latent_dim", "n_blocks", "base_filters", "lr", "batch_size")  # always shown
CHOICES = {"arch": ARCHS, "init": INITS, "schedule": SCHEDULES}
LABELS = {
    "latent_dim": "latent size (0: auto)",
    "n_blocks": "blocks (0: auto)",
    "base_filters": "base filters",
    "lr": "learning rate",
    "batch_size": "batch size",
    "kl_weight": "KL weight (vae)",
    "noise_std": "input noise (denoising)",
    "warmup": "warm-up (fraction of steps)",
    "min_steps": "at least this many steps",
    "patience": "patience (epochs, 0: none)",
    "augment": "augment training crops",
    "jitter": "intensity jitter (fraction)",
}


def setting_widget(field: dataclasses.Field) -> ValueWidget | None:
    """An input for one ``ModelConfig`` field, starting at its default (None when the field
    has no plain default the widget can edit)."""
    default, name = field.default, field.name
    label = LABELS.get(name, name.replace("_", " "))
    if name in CHOICES:
        return ComboBox(choices=CHOICES[name], value=default, label=label)
    if isinstance(default, bool):
        return CheckBox(value=default, text=label)
    if isinstance(default, int):
        return SpinBox(value=default, min=0, max=10**7, label=label)
    if isinstance(default, float):
        step = default / 10 if default > 0 else 0.01
        return FloatSpinBox(value=default, min=0.0, max=10.0**6, step=step, label=label)
    return None


def model_settings() -> dict[str, ValueWidget]:
    """Inputs for every editable ``ModelConfig`` field, by field name."""
    found = {}
    for field in dataclasses.fields(ModelConfig):
        widget = None if field.name in NOT_SETTINGS else setting_widget(field)
        if widget is not None:
            found[field.name] = widget
    return found


class TrainWidget(Dock):
    """Train or load an autoencoder for a project and embed its crops.

    The model settings are the fields of ``ModelConfig`` (defaults included): the ones in
    :data:`BASIC` are always shown, the others with "all settings".
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.session = Session.of(viewer)
        self.project = bind_project(self, self.session, lambda: None)
        self.variant = ComboBox(
            choices=VARIANTS,
            value=DEFAULT_VARIANT,
            label="model",
            tooltip="ae: reference autoencoder; vae; denoising; pca baseline",
        )
        self.name = LineEdit(value=MODEL_NAME, label="model name")
        self.epochs = SpinBox(value=EPOCHS, min=1, max=10_000, label="epochs")
        self.settings = model_settings()
        for name, widget in self.settings.items():
            setattr(self, name, widget)
        self.all_settings = CheckBox(value=False, text="all settings")
        self.device = ComboBox(choices=DEVICES, value=DEVICES[0], label="device")
        self.resume = CheckBox(value=False, text="resume training")
        self.overwrite = CheckBox(
            value=False,
            text="replace an existing model",
            tooltip="a model of this name is otherwise never replaced",
        )
        self.start_button = PushButton(text="Start training")
        self.stop_button = PushButton(text="Stop")
        self.checkpoint = FileEdit(mode="r", label="checkpoint", filter="*.pt")
        self.load_button = PushButton(text="Load checkpoint")
        self.embed_button = PushButton(text="Embed all crops")
        self.device_label = StatusLabel(f"device: {select_device(None)}")
        self.status = StatusLabel()
        self.warning = StatusLabel()  # training warnings stay until the next training starts
        self.warning.native.setStyleSheet("color: #e0a030")
        self.extend(
            [
                self.project,
                self.variant,
                self.name,
                self.epochs,
                *self.settings.values(),
                self.all_settings,
                self.device,
                self.resume,
                self.overwrite,
                self.start_button,
                self.stop_button,
                self.checkpoint,
                self.load_button,
                self.embed_button,
                self.device_label,
                self.status,
                self.warning,
            ]
        )
        self.plot = LossPlot()
        self.inner.layout().addWidget(self.plot)
        never_widen(self.plot)
        compact(self.checkpoint)
        self.jobs = add_progress(self)
        self.jobs.bind([self.start_button, self.load_button, self.embed_button], self.stop_button)
        self.jobs.epoch_ended.connect(self.plot.add)
        self.all_settings.changed.connect(self._show_settings)
        self.start_button.changed.connect(self.start_training)
        self.load_button.changed.connect(self.load_checkpoint)
        self.embed_button.changed.connect(self.start_embedding)
        follow(self, self.session.project_changed, self._project_changed)
        remember(self, "train", skip=("resume", "overwrite"))
        self._show_settings(self.all_settings.value)

    # ------------------------------------------------------------------ helpers
    def config(self, crop_size: int) -> ModelConfig:
        """The model settings for crops of ``crop_size`` (``ModelConfig`` checks them)."""
        values = {name: widget.value for name, widget in self.settings.items()}
        return ModelConfig(variant=self.variant.value, crop_size=crop_size, **values)

    def _device(self) -> str | None:
        return None if self.device.value == "auto" else self.device.value

    def _show_settings(self, everything: bool) -> None:
        for name, widget in self.settings.items():
            widget.visible = everything or name in BASIC

    def _project_changed(self, project) -> None:
        if project is not None:
            model = project.meta.active_model
            self.status.value = f"{len(project)} crops; model: {model or 'none yet'}"

    # ------------------------------------------------------------------ actions
    def start_training(self) -> None:
        project = require_project(self.session)
        if project is None:
            return
        try:
            config = None if self.resume.value else self.config(project.crop_size)
        except NucleaeError as err:
            show_error(str(err))
            self.status.value = str(err)
            return
        history = project.model_dir(self.name.value) / "history.csv"
        if self.resume.value and history.exists():
            h = pd.read_csv(history)
            self.plot.set_history(h["epoch"], h["train_loss"], h["val_loss"])
        else:
            self.plot.set_history([], [], [])
        self.warning.value = ""
        self.jobs.start(
            train,
            project,
            config,
            self.epochs.value,
            name=self.name.value,
            device=self._device(),
            resume=self.resume.value,
            overwrite=self.overwrite.value,
            on_epoch=self.jobs.epoch_ended.emit,
            desc="Training",
            on_returned=self._trained,
            on_errored=self._failed,
            cancellable=True,
        )

    def _trained(self, result: TrainResult) -> None:
        state = "stopped" if result.stopped else "finished"
        self.status.value = (
            f"'{result.name}' {state} after {len(result.history)} epochs on {result.device}"
        )
        self.warning.value = "\n".join(f"Warning: {note}" for note in result.warnings)
        for note in result.warnings:
            show_warning(note)
        show_info(self.status.value)
        self.session.use_model(None)  # the trained model is now the project's active model

    def load_checkpoint(self) -> None:
        project = require_project(self.session)
        if project is None:
            return
        path = Path(str(self.checkpoint.value))
        try:
            model = load_model(path, "cpu", crop_size=project.crop_size)
        except NucleaeError as err:
            self._failed(err)
            return
        self.session.use_model(str(path), model)
        self.status.value = (
            f"loaded '{model.name}' ({model.config.variant}, latent "
            f"{model.config.latent_dim}, epoch {model.epoch})"
        )
        show_info(self.status.value)

    def start_embedding(self) -> None:
        project = require_project(self.session)
        if project is None:
            return
        if self.session.model is None and project.meta.active_model is None:
            show_error("Train a model or load a checkpoint first.")
            return
        self.jobs.start(
            embed_with,
            self.session,
            device=self._device(),
            desc="Embedding",
            on_returned=self._embedded,
            on_errored=self._failed,
            cancellable=True,
        )

    def _embedded(self, result: EmbedResult) -> None:
        if result.stopped:
            self.status.value = "embedding cancelled; previous latents kept"
            return
        self.status.value = (
            f"embedded {result.n_crops} crops ({result.latent_dim}-D); "
            f"median MSE {np.median(result.mse):.5f}"
        )
        show_info(self.status.value)
        self.session.refresh()  # mse and latents: every widget and layer follows

    def _failed(self, err: BaseException) -> None:
        self.jobs.report_error(err)
        self.status.value = str(err)
        if isinstance(err, TrainingError):
            self.warning.value = f"Warning: {err}"


def embed_with(
    session: Session, *, device: str | None, progress=None, should_stop=None
) -> EmbedResult:
    """Worker body: embed every crop with the session's model (its checkpoint read once)."""
    model: LoadedModel = session.loaded_model(device)
    return embed(session.project, model, device=device, progress=progress, should_stop=should_stop)
