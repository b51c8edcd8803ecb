""" "Train / load model" dock widget: train an autoencoder with a live loss plot, or load one,
then embed every crop of the project."""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.utils.notifications import show_error, show_info, show_warning

from ..core.embed import EmbedResult, embed
from ..core.errors import NucleaeError
from ..core.model import VARIANTS, ModelConfig, load_model, select_device
from ..core.store import Project
from ..core.train import TrainResult, train
from ._common import add_progress, open_project
from ._settings import remember

DEVICES = ("auto", "cpu", "cuda", "mps")


class LossPlot(FigureCanvasQTAgg):
    """Train and validation loss per epoch, redrawn as epochs end."""

    def __init__(self):
        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        super().__init__(self.figure)
        self.axes = self.figure.add_subplot()
        self.epochs: list[int] = []
        self.train: list[float] = []
        self.val: list[float] = []
        self.setMinimumHeight(180)
        self._plot()  # drawn when first shown; a pending redraw would outlive an unshown widget

    def set_history(self, epochs, train_loss, val_loss) -> None:
        self.epochs, self.train, self.val = list(epochs), list(train_loss), list(val_loss)
        self.redraw()

    def add(self, epoch: int, train_loss: float, val_loss: float) -> None:
        self.epochs.append(epoch)
        self.train.append(train_loss)
        self.val.append(val_loss)
        self.redraw()

    def redraw(self) -> None:
        self._plot()
        self.draw_idle()

    def _plot(self) -> None:
        ax = self.axes
        ax.clear()
        ax.plot(self.epochs, self.train, "o-", label="train")
        ax.plot(self.epochs, self.val, "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        if self.epochs:
            ax.legend(loc="upper right")


class TrainWidget(Container):
    """Train or load an autoencoder for a project and embed its crops."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self.viewer = viewer
        self.project = FileEdit(mode="d", label="project folder")
        self.variant = ComboBox(
            choices=VARIANTS,
            value="ae",
            label="model",
            tooltip="ae: reference autoencoder; vae; denoising; pca baseline",
        )
        self.name = LineEdit(value="default", label="model name")
        self.epochs = SpinBox(value=30, min=1, max=10_000, label="epochs")
        self.latent_dim = SpinBox(value=512, min=2, max=4096, label="latent size")
        self.blocks = SpinBox(value=0, min=0, max=6, label="blocks (0: auto)")
        self.filters = SpinBox(value=16, min=4, max=256, label="base filters")
        self.lr = FloatSpinBox(value=1e-3, min=1e-6, max=1.0, step=1e-4, label="learning rate")
        self.batch_size = SpinBox(value=64, min=1, max=4096, label="batch size")
        self.device = ComboBox(choices=DEVICES, value="auto", label="device")
        self.resume = CheckBox(value=False, text="resume this model's training")
        self.start_button = PushButton(text="Start training")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.checkpoint = FileEdit(mode="r", label="checkpoint", filter="*.pt")
        self.load_button = PushButton(text="Load checkpoint")
        self.embed_button = PushButton(text="Embed all crops")
        self.device_label = Label(value=f"device: {select_device(None)}")
        self.status = Label(value="")
        self.extend(
            [
                self.project,
                self.variant,
                self.name,
                self.epochs,
                self.latent_dim,
                self.blocks,
                self.filters,
                self.lr,
                self.batch_size,
                self.device,
                self.resume,
                self.start_button,
                self.stop_button,
                self.checkpoint,
                self.load_button,
                self.embed_button,
                self.device_label,
                self.status,
            ]
        )
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot)
        self.jobs = add_progress(self)
        self.jobs.epoch_ended.connect(self.plot.add)
        self.loaded_model: str | None = None  # a checkpoint path chosen with "Load"
        self.start_button.changed.connect(self.start_training)
        self.stop_button.changed.connect(self.jobs.cancel)
        self.load_button.changed.connect(self.load_checkpoint)
        self.embed_button.changed.connect(self.start_embedding)
        remember(self, "train", skip=("resume",))

    # ------------------------------------------------------------------ helpers
    def open_project(self) -> Project | None:
        return open_project(self.project)

    def config(self, project: Project) -> ModelConfig:
        blocks = self.blocks.value or max(1, min(4, int(np.log2(project.crop_size)) - 2))
        return ModelConfig(
            variant=self.variant.value,
            crop_size=project.crop_size,
            n_blocks=blocks,
            base_filters=self.filters.value,
            latent_dim=self.latent_dim.value,
            lr=self.lr.value,
            batch_size=self.batch_size.value,
        )

    def _device(self) -> str | None:
        return None if self.device.value == "auto" else self.device.value

    def _busy(self, busy: bool) -> None:
        for button in (self.start_button, self.load_button, self.embed_button):
            button.enabled = not busy
        self.stop_button.enabled = busy

    # ------------------------------------------------------------------ actions
    def start_training(self) -> None:
        project = self.open_project()
        if project is None:
            return
        try:
            config = None if self.resume.value else self.config(project)
        except NucleaeError as err:
            show_error(str(err))
            return
        if self.resume.value:
            history = project.model_dir(self.name.value) / "history.csv"
            if history.exists():
                import pandas as pd

                h = pd.read_csv(history)
                self.plot.set_history(h["epoch"], h["train_loss"], h["val_loss"])
        else:
            self.plot.set_history([], [], [])
        self._busy(True)
        self.jobs.start(
            train,
            project,
            config,
            self.epochs.value,
            name=self.name.value,
            device=self._device(),
            resume=self.resume.value,
            on_epoch=self.jobs.epoch_ended.emit,
            desc="Training",
            on_returned=self._trained,
        )
        self.jobs.worker.finished.connect(lambda: self._busy(False))

    def _trained(self, result: TrainResult) -> None:
        self.loaded_model = None
        state = "stopped" if result.stopped else "finished"
        self.status.value = (
            f"'{result.name}' {state} after {len(result.history)} epochs on {result.device}"
        )
        for note in result.notes:
            show_warning(note)
        show_info(self.status.value)

    def load_checkpoint(self) -> None:
        project = self.open_project()
        if project is None:
            return
        path = Path(str(self.checkpoint.value))
        try:
            model = load_model(path, "cpu", crop_size=project.crop_size)
        except NucleaeError as err:
            self.status.value = str(err)[:200]
            show_error(str(err))
            return
        self.loaded_model = str(path)
        self.status.value = (
            f"loaded '{model.name}' ({model.config.variant}, latent "
            f"{model.config.latent_dim}, epoch {model.epoch})"
        )
        show_info(self.status.value)

    def start_embedding(self) -> None:
        project = self.open_project()
        if project is None:
            return
        model = self.loaded_model or project.meta.active_model
        if model is None:
            show_error("Train a model or load a checkpoint first.")
            return
        self._busy(True)
        self.jobs.start(
            embed,
            project,
            model,
            device=self._device(),
            desc="Embedding",
            on_returned=lambda result: self._embedded(result, project),
        )
        self.jobs.worker.finished.connect(lambda: self._busy(False))

    def _embedded(self, result: EmbedResult, project: Project) -> None:
        if result.stopped:
            self.status.value = "embedding cancelled; previous latents kept"
            return
        write_mse_to_layers(self.viewer, project, result.mse)
        self.status.value = (
            f"embedded {result.n_crops} crops ({result.latent_dim}-D); "
            f"median MSE {np.median(result.mse):.5f}"
        )
        show_info(self.status.value)


def write_mse_to_layers(viewer: napari.viewer.Viewer, project: Project, mse: np.ndarray) -> None:
    """Add an ``mse`` column to the features of this project's Labels layers."""
    for layer in viewer.layers:
        info = layer.metadata.get("nucleae", {}) if isinstance(layer, napari.layers.Labels) else {}
        if Path(info.get("project") or "/nonexistent") != project.path:
            continue
        features = layer.features.copy()
        index = features["crop_index"].to_numpy()
        values = np.full(len(features), np.nan)
        kept = ~np.isnan(index)
        values[kept] = mse[index[kept].astype(int)]
        features["mse"] = values
        layer.features = features
