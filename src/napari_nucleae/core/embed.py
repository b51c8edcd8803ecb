"""Latents and reconstruction error for every crop, in one streaming pass.

Crops are read in storage order, one block of whole zarr chunks at a time (the next block is
read in a background thread while the current one runs through the model). Latents go to a
temporary zarr array that replaces ``latents/<model>.zarr`` only once complete, so a cancelled
or failed run leaves the previous latents untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from .data import COMPACT_DTYPES, read_ahead
from .errors import NucleaeError, ProjectError
from .model import CheckpointError, LoadedModel, cudnn_autotune, load_model
from .progress import Progress, ShouldStop
from .staging import staged
from .store import Project, missing_chunk


@dataclass
class EmbedResult:
    """Where the latents went, and each crop's reconstruction MSE (None when stopped)."""

    name: str
    path: Path
    n_crops: int
    latent_dim: int
    mse: np.ndarray | None
    stopped: bool
    batch_size: int


def default_batch_size(device: torch.device, crop_size: int) -> int:
    """Crops per forward pass: about 1M pixels on CPU, 16M on CUDA, 4M on MPS."""
    pixels = {"cuda": 2**24, "mps": 2**22}.get(device.type, 2**20)
    return int(np.clip(pixels // crop_size**2, 1, 16384))


def resolve_model(
    project: Project, model: str | Path | LoadedModel | None, device: str | torch.device | None
) -> LoadedModel:
    """A model name in the project, a checkpoint path, a loaded model, or the active model."""
    if isinstance(model, LoadedModel):
        size = model.config.crop_size
        if size != project.crop_size:
            raise CheckpointError(
                f"model {model.name!r} was trained on {size}x{size} crops; "
                f"this project's crops are {project.crop_size}x{project.crop_size}"
            )
        return model.to(device) if device is not None else model
    if model is None:
        model = project.meta.active_model
        if model is None:
            raise ProjectError("the project has no active model yet; train or load one first")
    folder = project.model_dir(str(model))
    path = folder if isinstance(model, str) and folder.is_dir() else Path(model)
    if not path.exists():
        raise ProjectError(f"no model named {str(model)!r} in the project and no such file")
    return load_model(path, device, crop_size=project.crop_size)


def _run_block(
    model: LoadedModel, crops: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Latents and MSE of a block; on CUDA out-of-memory the batch size halves and retries
    (down to one crop, then a :class:`NucleaeError` says what to do)."""
    latents, errors, start = [], [], 0
    while start < len(crops):
        try:
            z, mse = model.latents_and_mse(crops[start : start + batch_size])
        except torch.cuda.OutOfMemoryError as err:
            if model.device.type != "cuda":
                raise
            if batch_size == 1:
                raise NucleaeError(
                    "embedding ran out of GPU memory even with one crop per batch; free GPU "
                    "memory (other programs, other napari layers) or embed on the CPU"
                ) from err
            torch.cuda.empty_cache()
            batch_size //= 2
            continue
        latents.append(z)
        errors.append(mse)
        start += len(z)
    return np.concatenate(latents), np.concatenate(errors), batch_size


def embed(
    project: Project,
    model: str | Path | LoadedModel | None = None,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> EmbedResult:
    """Encode every crop: latents to ``latents/<model>.zarr``, MSE to the ``mse`` feature."""
    loaded = resolve_model(project, model, device)
    n, dim = len(project), loaded.config.latent_dim
    if n == 0:
        raise ProjectError("the project holds no crops yet; add images before embedding")
    batch_size = batch_size or default_batch_size(loaded.device, project.crop_size)
    chunk = int(project.crops.chunks[0])  # latents are chunked like the crops
    rows = chunk * -(-batch_size // chunk)  # whole chunks, at least one batch
    final = project.latents_path(loaded.name)
    mse = np.empty(n, np.float32)
    try:
        with staged(final) as staging, cudnn_autotune(loaded.device):
            out = zarr.open_array(
                str(staging),
                mode="w",
                shape=(n, dim),
                chunks=(chunk, dim),
                dtype="float32",
                config={"write_empty_chunks": True},  # every chunk on disk: a lost one is noticed
            )
            stored = project.meta.crop.storage_dtype in COMPACT_DTYPES  # scaled on the device
            blocks = read_ahead(
                lambda start: (
                    start,
                    project.read_crops(slice(start, start + rows), stored=stored),
                ),
                range(0, n, rows),
            )
            for start, crops in blocks:
                if should_stop is not None and should_stop():
                    raise _Stopped
                latents, errors, batch_size = _run_block(loaded, crops, batch_size)
                out[start : start + len(crops)] = latents
                mse[start : start + len(crops)] = errors
                if progress is not None:
                    progress(start + len(crops), n, f"embedding with {loaded.name}")
            out.attrs.update({"model": loaded.name, "epoch": loaded.epoch, "n_crops": n})
    except _Stopped:
        return EmbedResult(loaded.name, final, n, dim, None, True, batch_size)
    project.write_features(pd.DataFrame({"mse": mse}))
    return EmbedResult(loaded.name, final, n, dim, mse, False, batch_size)


class _Stopped(Exception):
    """Embedding was stopped: the staged latents are dropped, the previous ones kept."""


def read_latents(project: Project, name: str | None = None) -> zarr.Array:
    """The latents ``(N, D)`` of model ``name`` (default: the active model), read lazily."""
    name = name or project.meta.active_model
    if name is None:
        raise ProjectError("the project has no active model; train or load one first")
    path = project.latents_path(name)
    if not path.exists():
        raise ProjectError(f"no latents for model {name!r} yet; run embed first")
    latents = zarr.open_array(str(path), mode="r")
    if latents.shape[0] != len(project):
        raise ProjectError(
            f"latents of {name!r} cover {latents.shape[0]} crops but the project holds "
            f"{len(project)}; run embed again"
        )
    check_chunks(latents, path, "latents")
    return latents


def check_chunks(array: zarr.Array, path: Path, what: str) -> None:
    """Refuse an array with a chunk file missing (it would read as zeros)."""
    lost = missing_chunk(array, path)
    if lost is not None:
        (chunk, *_), key = lost
        step = array.chunks[0]
        raise ProjectError(
            f"{key} is missing: the {what} of crops {chunk * step}-"
            f"{min(array.shape[0], (chunk + 1) * step) - 1} cannot be read (they would read "
            "as zeros); run embed again"
        )
