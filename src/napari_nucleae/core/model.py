"""Autoencoder variants (ae, vae, denoising) and a PCA baseline behind one interface.

Every variant is an ``nn.Module`` with ``encode(x) -> z``, ``decode(z) -> x``, ``forward`` and
``loss(batch) -> (total, parts)``, on tensors shaped ``(B, 1, S, S)`` in [0, 1].
:class:`LoadedModel` wraps one for numpy callers.

Checkpoints are dicts of tensors and plain Python containers, written with ``torch.save`` and
read back with ``torch.load(weights_only=True)``: loading one never runs pickled code.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import __version__
from .errors import InputError, NucleaeError
from .store import atomic_write_bytes

VARIANTS = ("ae", "vae", "denoising", "pca")
CHECKPOINT_FORMAT = "napari-nucleae-model"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CheckpointError(NucleaeError):
    """A model checkpoint is missing, corrupted, unsafe or incompatible with the project."""


def check_model_name(name: object) -> str:
    """Model names become folder names: letters, digits, '_', '-' and '.' only."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"model name {name!r} may hold only letters, digits, '_', '-' and '.'")
    return name


ARCHS = ("norm", "reference")
DEVICES = ("auto", "cpu", "cuda", "mps")  # "auto": CUDA, then MPS, then CPU
DEFAULT_VARIANT = VARIANTS[0]
INITS = ("kaiming", "torch")
SCHEDULES = ("warmup-cosine", "constant")
AUTO = 0  # n_blocks / latent_dim: chosen from the crop size / the data
MAX_LATENT = 512  # the reference study's latent size; the auto size never exceeds it
# Settings a checkpoint written before they existed was trained with (the seed's recipe).
LEGACY_SETTINGS = {
    "arch": "reference",
    "init": "torch",
    "schedule": "constant",
    "min_steps": 0,
    "patience": 0,
    "augment": False,
}


def default_blocks(crop_size: int) -> int:
    """Encoder blocks for a crop size: halve down to a 4-pixel side, between 1 and 5 blocks."""
    return max(1, min(5, int(np.log2(crop_size)) - 2))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and optimisation settings; stored with every checkpoint.

    ``n_blocks`` and ``latent_dim`` left at :data:`AUTO` are chosen from the crop size and
    (latent size, when training) from the crops. ``min_steps`` extends a short run on a small
    project to that many optimiser steps; ``patience`` stops after that many epochs without
    a better validation loss (0: never); ``augment`` applies flips, 90° rotations and an
    intensity jitter of ``jitter`` (a fraction) to training batches.
    """

    variant: str
    crop_size: int
    arch: str = "norm"
    n_blocks: int = AUTO
    base_filters: int = 16
    latent_dim: int = AUTO
    lr: float = 1e-3
    batch_size: int = 64
    kl_weight: float = 1e-3
    noise_std: float = 0.1
    init: str = "kaiming"
    schedule: str = "warmup-cosine"
    warmup: float = 0.05
    min_steps: int = 600
    patience: int = 20
    augment: bool = True
    jitter: float = 0.05

    def __post_init__(self) -> None:
        for name, choices in (
            ("variant", VARIANTS),
            ("arch", ARCHS),
            ("init", INITS),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in choices:
                raise InputError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.n_blocks == AUTO:
            object.__setattr__(self, "n_blocks", default_blocks(self.crop_size))
        for name in ("crop_size", "n_blocks", "base_filters", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("latent_dim", "min_steps", "patience"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.latent_dim > 65_536:
            raise InputError(f"latent size {self.latent_dim} is implausibly large (max 65536)")
        if not (0 < self.lr <= 1) or self.kl_weight < 0 or self.noise_std < 0:
            raise InputError(
                f"lr must be in (0, 1] (got {self.lr}); kl_weight and noise_std must not be "
                "negative"
            )
        if not (0 <= self.warmup < 1 and 0 <= self.jitter < 1):
            raise InputError("warmup and jitter are fractions in [0, 1)")
        if self.variant == "pca":
            if self.latent_dim > self.crop_size**2:
                raise InputError(
                    f"PCA cannot have more components ({self.latent_dim}) than pixels per crop "
                    f"({self.crop_size**2})"
                )
        elif self.crop_size % 2**self.n_blocks:
            raise InputError(
                f"crop size {self.crop_size} is not divisible by 2**n_blocks = "
                f"{2**self.n_blocks}; use fewer blocks or a crop size that is a multiple of it"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_latent_dim(self, latent_dim: int) -> ModelConfig:
        """This configuration with a concrete latent size."""
        return replace(self, latent_dim=int(latent_dim))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Settings from a dict; keys a checkpoint predates take the seed's values."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown model settings: {sorted(unknown)}")
        return cls(**{**LEGACY_SETTINGS, **data})


# ---------------------------------------------------------------------------- networks
def _conv_pair(c_in: int, c_out: int, norm: bool) -> list[nn.Module]:
    """Two 3x3 convolutions with ReLU, each batch-normalised when ``norm``."""
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_out), (c_out, c_out)):
        layers.append(nn.Conv2d(a, b, 3, padding=1, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm2d(b))
        layers.append(nn.ReLU(inplace=True))
    return layers


def kaiming_init(module: nn.Module) -> None:
    """He-normal weights for ReLU convolutions and dense layers, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Autoencoder(nn.Module):
    """Convolutional autoencoder after the seed's reference design.

    Encoder: per block two 3x3 conv + ReLU and a 2x2 average pool, then a linear dense layer to
    the latent. Decoder: dense, reshape, per block a stride-2 transposed conv and two 3x3 conv
    + ReLU, then a 1x1 conv and a sigmoid. Filters double per block. ``arch="norm"`` adds batch
    normalisation after every 3x3 conv (the seed's plain network is ``arch="reference"``);
    ``init="kaiming"`` draws He-normal weights instead of PyTorch's defaults.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.latent_dim < 1:
            raise InputError("the latent size must be chosen (a positive integer) before building")
        self.config = config
        norm = config.arch == "norm"
        widths = [config.base_filters * 2**i for i in range(config.n_blocks)]
        layers: list[nn.Module] = []
        c_in = 1
        for width in widths:
            layers += [*_conv_pair(c_in, width, norm), nn.AvgPool2d(2)]
            c_in = width
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        side = config.crop_size // 2**config.n_blocks
        self.bottom = (widths[-1], side, side)
        flat = widths[-1] * side * side
        self.to_latent = nn.Linear(flat, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, flat)
        layers = []
        outs = [*widths[::-1][1:], widths[0]]
        for w_in, w_out in zip(widths[::-1], outs, strict=True):
            layers += [
                nn.ConvTranspose2d(w_in, w_out, 2, stride=2),
                *_conv_pair(w_out, w_out, norm),
            ]
        self.decoder = nn.Sequential(*layers, nn.Conv2d(widths[0], 1, 1), nn.Sigmoid())
        if config.init == "kaiming":
            kaiming_init(self)
            nn.init.xavier_normal_(self.to_latent.weight)  # linear, not followed by a ReLU
            nn.init.xavier_normal_(self.output.weight)

    @property
    def output(self) -> nn.Conv2d:
        """The last (1x1) convolution before the sigmoid."""
        return self.decoder[-2]

    def set_output_level(self, mean: float) -> None:
        """Start the output at the crops' mean intensity instead of the sigmoid's 0.5."""
        level = float(np.clip(mean, 1e-3, 1 - 1e-3))
        with torch.no_grad():
            self.output.bias.fill_(float(np.log(level / (1 - level))))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_latent(z).view(-1, *self.bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = F.mse_loss(self(batch), batch)
        return mse, {"mse": mse.detach()}


class DenoisingAutoencoder(Autoencoder):
    """Trained to reconstruct the clean crop from a noisy copy (noise only while training)."""

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noisy = batch
        if self.training and self.config.noise_std > 0:
            noise = self.config.noise_std * torch.randn_like(batch)
            noisy = (batch + noise).clamp(0.0, 1.0)
        mse = F.mse_loss(self(noisy), batch)
        return mse, {"mse": mse.detach()}


class VariationalAutoencoder(Autoencoder):
    """Mean and log-variance heads; samples the latent while training, ``encode`` is the mean."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.to_logvar = nn.Linear(self.to_latent.in_features, config.latent_dim)

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.encoder(batch)
        mu = self.to_latent(hidden).float()
        logvar = self.to_logvar(hidden).float()
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        mse = F.mse_loss(self.decode(z), batch)
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        total = mse + self.config.kl_weight * kl
        return total, {"mse": mse.detach(), "kl": kl.detach()}


class PCAModel(nn.Module):
    """Linear baseline: principal components stored as buffers (fitted in ``train``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        pixels = config.crop_size**2
        self.register_buffer("mean", torch.zeros(pixels))
        self.register_buffer("components", torch.zeros(config.latent_dim, pixels))

    def set_components(self, mean: np.ndarray, components: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.components.copy_(torch.as_tensor(components, dtype=torch.float32))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) @ self.components.T

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        size = self.config.crop_size
        return (z @ self.components + self.mean).clamp(0.0, 1.0).view(-1, 1, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = F.mse_loss(self(batch), batch)
        return mse, {"mse": mse.detach()}


Network = Autoencoder | PCAModel

_NETWORKS: dict[str, type[Network]] = {
    "ae": Autoencoder,
    "vae": VariationalAutoencoder,
    "denoising": DenoisingAutoencoder,
    "pca": PCAModel,
}


def build_model(config: ModelConfig) -> Network:
    """A freshly initialised network for ``config``."""
    return _NETWORKS[config.variant](config)


# ---------------------------------------------------------------------------- devices
def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(preference: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None picks CUDA, then MPS, then CPU; an explicit device must be available."""
    choice = "auto" if preference is None else str(preference).lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {preference!r}; use 'auto', 'cpu', 'cuda' or 'mps'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"{device} does not exist ({torch.cuda.device_count()} CUDA GPU(s))")
    if device.type == "mps" and not _mps_available():
        raise InputError("MPS was requested but is not available; use 'auto' or 'cpu'")
    return device


def cudnn_autotune(device: torch.device) -> contextlib.AbstractContextManager:
    """cuDNN picks the fastest convolution algorithms on CUDA (the crops' shape is fixed)."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled,
        benchmark=cudnn.benchmark or device.type == "cuda",
        deterministic=cudnn.deterministic,
        allow_tf32=cudnn.allow_tf32,
    )


def uses_channels_last(network: nn.Module, device: torch.device) -> bool:
    """Convolutional networks on CUDA run in channels-last memory format."""
    return device.type == "cuda" and isinstance(network, Autoencoder)


def to_batch(
    crops: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """``(B, S, S)`` numpy crops or ``(B, 1, S, S)`` tensors onto ``device`` as a float batch
    in [0, 1]; uint8 crops (as stored) are scaled there as :func:`.store.from_storage` does."""
    if isinstance(crops, np.ndarray):
        kept = crops.dtype if crops.dtype == np.uint8 else np.float32
        crops = torch.from_numpy(np.ascontiguousarray(crops, dtype=kept))[:, None]
    batch = crops.to(device, non_blocking=True)
    if not batch.is_floating_point():
        batch = batch.float() / torch.iinfo(crops.dtype).max
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


# ---------------------------------------------------------------------------- checkpoints
def make_checkpoint(
    network: Network,
    config: ModelConfig,
    *,
    name: str,
    crop: dict[str, Any],
    epoch: int,
    history: dict[str, list],
    optimizer: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict: tensors and plain containers only (``weights_only`` loadable)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "version": __version__,
        "name": name,
        "config": config.to_dict(),
        "crop": crop,
        "epoch": int(epoch),
        "history": history,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "optimizer": optimizer,
        **(extra or {}),
    }


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a model folder's ``best.pt`` (falling back to ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        best, last = path / "best.pt", path / "last.pt"
        path = best if best.is_file() else last
    if not path.is_file():
        raise CheckpointError(f"no model checkpoint at {path}")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely; anything but tensors and plain data is refused."""
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; all mean the same here
        raise CheckpointError(
            f"{path} cannot be loaded as a model checkpoint: it is corrupted, not a checkpoint, "
            "or holds objects other than tensors and plain data (those are never run)"
        ) from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a napari-nucleae model checkpoint")
    if checkpoint.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer napari-nucleae; upgrade the plugin to load it"
        )
    return checkpoint


def checkpoint_config(checkpoint: dict[str, Any], path: Path) -> ModelConfig:
    """The model settings stored in a checkpoint read from ``path``."""
    try:
        return ModelConfig.from_dict(checkpoint["config"])
    except (KeyError, TypeError, InputError) as err:
        raise CheckpointError(f"{path} holds invalid model settings: {err}") from err


# ---------------------------------------------------------------------------- numpy handle
@dataclass(eq=False)
class LoadedModel:
    """A trained network ready for numpy crops ``(N, S, S)`` in [0, 1]."""

    network: Network
    config: ModelConfig
    name: str
    device: torch.device
    epoch: int = 0
    path: Path | None = None

    def to(self, device: str | torch.device | None) -> LoadedModel:
        """Move to ``device`` (see :func:`select_device`) in place."""
        self.device = select_device(device)
        self.network.to(self.device)
        if uses_channels_last(self.network, self.device):
            self.network.to(memory_format=torch.channels_last)
        return self

    def _crops(self, crops: np.ndarray) -> torch.Tensor:
        crops = np.asarray(crops)
        size = self.config.crop_size
        if crops.ndim != 3 or crops.shape[1:] != (size, size):
            raise InputError(
                f"model {self.name!r} takes (N, {size}, {size}) crops, got {crops.shape}"
            )
        return to_batch(crops, self.device, uses_channels_last(self.network, self.device))

    def _batched(
        self, func: Callable[[np.ndarray], np.ndarray], data: np.ndarray, batch_size: int
    ) -> np.ndarray:
        with torch.inference_mode():
            parts = [func(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
        return np.concatenate(parts) if parts else np.empty((0,), np.float32)

    def encode(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Latents ``(N, D)`` float32."""
        out = self._batched(
            lambda c: self.network.encode(self._crops(c)).float().cpu().numpy(), crops, batch_size
        )
        return out.reshape(len(crops), self.config.latent_dim)

    def decode(self, latents: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Images ``(N, S, S)`` float32 from latents ``(N, D)``."""
        latents = np.asarray(latents, dtype=np.float32)
        if latents.ndim != 2 or latents.shape[1] != self.config.latent_dim:
            raise InputError(
                f"model {self.name!r} takes (N, {self.config.latent_dim}) latents, "
                f"got {latents.shape}"
            )

        def run(z: np.ndarray) -> np.ndarray:
            out = self.network.decode(torch.from_numpy(z).to(self.device))
            return out.float()[:, 0].cpu().numpy()

        size = self.config.crop_size
        return self._batched(run, latents, batch_size).reshape(len(latents), size, size)

    def reconstruct(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Decoded encodings ``(N, S, S)`` float32."""
        out = self._batched(
            lambda c: self.network(self._crops(c)).float()[:, 0].cpu().numpy(), crops, batch_size
        )
        return out.reshape(np.shape(crops))

    def latents_and_mse(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latents and per-crop reconstruction MSE of one batch, in a single forward pass."""
        with torch.inference_mode():
            batch = self._crops(crops)
            z = self.network.encode(batch)
            mse = (self.network.decode(z).float() - batch).pow(2).flatten(1).mean(1)
            return z.float().cpu().numpy(), mse.cpu().numpy()


def load_model(
    path: str | Path, device: str | torch.device | None = None, *, crop_size: int | None = None
) -> LoadedModel:
    """Load a checkpoint file or model folder; ``crop_size`` checks it fits a project."""
    file = checkpoint_file(path)
    checkpoint = read_checkpoint(file)
    config = checkpoint_config(checkpoint, file)
    if crop_size is not None and config.crop_size != crop_size:
        raise CheckpointError(
            f"model {file} was trained on {config.crop_size}x{config.crop_size} crops; "
            f"this project's crops are {crop_size}x{crop_size}"
        )
    network = build_model(config)
    try:
        network.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{file} does not match its model settings: {err}") from err
    network.eval()
    name = checkpoint.get("name") or file.parent.name
    try:
        check_model_name(name)
    except InputError as err:
        raise CheckpointError(f"{file} holds an invalid model name: {err}") from err
    epoch = int(checkpoint.get("epoch", 0))
    return LoadedModel(network, config, name, torch.device("cpu"), epoch, file).to(device)
