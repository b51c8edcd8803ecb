"""Training: crops streamed chunk by chunk from the project, checkpoints each epoch, resume, cancel.

Crops are read as contiguous zarr chunks in shuffled chunk order and shuffled within a buffer
of several chunks, so training never loads the whole project and never does per-crop random
reads. Validation holds out whole source images (``image_id``), so the validation loss measures
generalisation to new images rather than to neighbours of training crops.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import IncrementalPCA
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import __version__
from .errors import InputError
from .explore import sample_rows
from .model import (
    ModelConfig,
    Network,
    PCAModel,
    build_model,
    check_model_name,
    checkpoint_config,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
    select_device,
    to_batch,
    uses_channels_last,
)
from .store import Project, atomic_write_bytes

BUFFER_CHUNKS = 8
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "seconds")
COLLAPSE_RATIO = 0.1  # output spread across crops below this share of the input spread

Progress = Callable[[int, int, str], None]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Split:
    """Crop indices (sorted) for training and validation, and how they were chosen."""

    train: np.ndarray
    val: np.ndarray
    by: str
    note: str | None = None


@dataclass
class TrainResult:
    """What a call to :func:`train` produced."""

    name: str
    model_dir: Path
    last: Path | None
    best: Path | None
    history: pd.DataFrame
    stopped: bool
    split: str
    device: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- data
def read_ahead(read: Callable[[T], R], keys: Iterable[T]) -> Iterator[R]:
    """``read(key)`` for each key in turn, the next one read in a background thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for key in keys:
            following = pool.submit(read, key)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


def split_crops(table: pd.DataFrame, val_fraction: float, seed: int = 0) -> Split:
    """Hold out whole source images (seeded); with one image, a seeded random crop subset."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(table)
    everything, nothing = np.arange(n), np.arange(0)
    if val_fraction == 0:
        return Split(everything, nothing, "none")
    rng = np.random.default_rng(seed)
    ids = table["image_id"].astype(str) if "image_id" in table else None
    if ids is not None and ids.nunique() >= 2:
        counts = ids.value_counts()
        images = rng.permutation(sorted(counts.index))
        held, n_held = [], 0
        for image in images[:-1]:  # at least one image stays for training
            if n_held >= val_fraction * n:
                break
            held.append(image)
            n_held += counts[image]
        is_val = ids.isin(held).to_numpy()
        return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), "image")
    if n < 2:
        return Split(everything, nothing, "none", "a single crop: no validation set")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    is_val = np.zeros(n, bool)
    is_val[rng.choice(n, n_val, replace=False)] = True
    note = (
        "all crops come from one source image: validation uses a random subset of its crops, "
        "so the validation loss is optimistic"
    )
    return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), "crop", note)


class ChunkStream(IterableDataset):
    """Batches ``(B, 1, S, S)`` of selected crops, read one contiguous zarr chunk at a time.

    Chunks are visited in a seeded order that changes with ``epoch`` and shuffled within a
    buffer of ``buffer_chunks`` chunks. Worker processes each take a fixed share of the chunks.
    """

    def __init__(
        self,
        project: Project,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        buffer_chunks: int = BUFFER_CHUNKS,
    ):
        self.project = Project(project.path, project.meta)  # no cached table to pickle
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        chunk = int(project.crops.chunks[0])
        self.buffer_rows = max(batch_size, buffer_chunks * chunk)
        rows = np.asarray(rows, dtype=np.int64)
        edges = np.searchsorted(rows, np.arange(0, len(project) + chunk, chunk))
        self.blocks = [rows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    def _shards(self, n_workers: int) -> list[list[np.ndarray]]:
        return [self.blocks[w::n_workers] for w in range(n_workers)]

    def n_batches(self, n_workers: int = 0) -> int:
        """Batches per epoch (each worker ends with one partial batch)."""
        shards = self._shards(max(1, n_workers))
        return sum(math.ceil(sum(map(len, s)) / self.batch_size) for s in shards)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        first = int(rows[0])
        crops = self.project.read_crops(slice(first, int(rows[-1]) + 1))
        return crops if len(crops) == len(rows) else crops[rows - first]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        blocks = self._shards(n_workers)[worker]
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        size = self.project.crop_size
        carry = np.empty((0, size, size), np.float32)
        group: list[np.ndarray] = []
        n_group = 0
        for i, crops in enumerate(read_ahead(self._read, blocks)):
            group.append(crops)
            n_group += len(crops)
            last = i == len(blocks) - 1
            if not last and n_group < self.buffer_rows:
                continue
            data = np.concatenate([carry, *group])
            group, n_group = [], 0
            if self.shuffle:
                data = data[rng.permutation(len(data))]
            stop = len(data) if last else len(data) // self.batch_size * self.batch_size
            for start in range(0, stop, self.batch_size):
                yield torch.from_numpy(data[start : start + self.batch_size])[:, None]
            carry = data[stop:]


# ---------------------------------------------------------------------------- precision
@dataclass
class _Precision:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def for_device(cls, device: torch.device) -> _Precision:
        dtype = None
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        enabled = dtype == torch.float16
        return cls(device, dtype, torch.amp.GradScaler(device.type, enabled=enabled))

    @classmethod
    def fp32(cls, device: torch.device) -> _Precision:
        return cls(device, None, torch.amp.GradScaler(device.type, enabled=False))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


# ---------------------------------------------------------------------------- loops
def _train_epoch(
    network: Network,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    precision: _Precision,
    tick: Callable[[], None],
    should_stop: Callable[[], bool],
) -> float | None:
    """Mean training loss per crop, or None when stopped before the epoch ended."""
    network.train()
    channels_last = uses_channels_last(network, precision.device)
    total = torch.zeros((), device=precision.device)
    count = 0
    for crops in loader:
        if should_stop():
            return None
        batch = to_batch(crops, precision.device, channels_last)
        with precision.autocast():
            loss, _ = network.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        total += loss.detach().float() * len(batch)
        count += len(batch)
        tick()
    return float(total) / max(count, 1)


def _evaluate(
    network: Network, loader: DataLoader, precision: _Precision, should_stop: Callable[[], bool]
) -> float | None:
    """Mean loss per crop in eval mode (NaN without data), or None when stopped."""
    network.eval()
    channels_last = uses_channels_last(network, precision.device)
    total = torch.zeros((), device=precision.device)
    count = 0
    with torch.no_grad():
        for crops in loader:
            if should_stop():
                return None
            batch = to_batch(crops, precision.device, channels_last)
            with precision.autocast():
                loss, _ = network.loss(batch)
            total += loss.float() * len(batch)
            count += len(batch)
    return float(total) / count if count else float("nan")


def _loader(stream: ChunkStream, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda"
    )


# ---------------------------------------------------------------------------- checkpoints
def _write_outputs(
    folder: Path, checkpoint: dict, history: pd.DataFrame, *, improved: bool, info: dict
) -> None:
    """best.pt (when improved), last.pt, history.csv and config.json, each atomically."""
    if improved:
        save_checkpoint(folder / "best.pt", {**checkpoint, "optimizer": None})
    save_checkpoint(folder / "last.pt", checkpoint)
    atomic_write_bytes(folder / "history.csv", history.to_csv(index=False).encode())
    atomic_write_bytes(folder / "config.json", json.dumps(info, indent=2).encode())


def _history_dict(history: pd.DataFrame) -> dict[str, list]:
    return {c: [float(v) for v in history[c]] for c in history.columns}


def _history_frame(data: dict[str, list] | None) -> pd.DataFrame:
    frame = pd.DataFrame({c: (data or {}).get(c, []) for c in HISTORY_COLUMNS}, dtype=float)
    return frame.astype({"epoch": int})


def _check_inputs(project: Project, config: ModelConfig, epochs: int) -> None:
    if epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    if len(project) == 0:
        raise InputError("the project holds no crops yet; add images before training")
    if config.crop_size != project.crop_size:
        raise InputError(
            f"the model is set up for {config.crop_size}x{config.crop_size} crops; "
            f"this project's crops are {project.crop_size}x{project.crop_size}"
        )


def _resume_state(folder: Path, config: ModelConfig | None) -> tuple[ModelConfig, dict]:
    """The stored config and last.pt contents; a given config must match the stored one."""
    last = folder / "last.pt"
    if not last.is_file():
        raise InputError(f"nothing to resume: {last} does not exist")
    checkpoint = read_checkpoint(last)
    stored = checkpoint_config(checkpoint, last)
    if config is not None and config != stored:
        changed = {k for k, v in config.to_dict().items() if stored.to_dict()[k] != v}
        raise InputError(f"cannot resume with different settings ({sorted(changed)})")
    if stored.variant == "pca":
        raise InputError("a PCA model has no epochs to resume; train it again instead")
    return stored, checkpoint


def train(
    project: Project,
    config: ModelConfig | None,
    epochs: int,
    *,
    name: str = "default",
    device: str | torch.device | None = None,
    resume: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: Progress | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    num_workers: int = 0,
) -> TrainResult:
    """Train (or with ``resume`` continue) model ``name`` of ``project`` for ``epochs`` epochs.

    ``config`` may be None when resuming. Epoch numbers and history continue across resumes.
    ``should_stop`` is polled between batches: an interrupted epoch is discarded and the last
    complete epoch's checkpoint stays loadable. A PCA model is fitted in one streaming pass.
    """
    check_model_name(name)
    folder = project.model_dir(name)
    checkpoint: dict = {}
    if resume:
        config, checkpoint = _resume_state(folder, config)
    if config is None:
        raise InputError("a model configuration is needed unless resuming")
    _check_inputs(project, config, epochs)
    dev = select_device(device)
    split = split_crops(project.table(with_features=False), val_fraction, seed)
    notes = [split.note] if split.note else []
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(
        project=project,
        name=name,
        split=split,
        device=dev,
        seed=seed,
        progress=progress,
        should_stop=should_stop or (lambda: False),
        notes=notes,
    )
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + int(checkpoint.get("epoch", 0)))
        if config.variant == "pca":
            result = _fit_pca(config=config, **common)
        else:
            result = _fit_network(
                config=config,
                epochs=epochs,
                checkpoint=checkpoint,
                on_epoch=on_epoch,
                num_workers=num_workers,
                **common,
            )
    if result.last is not None:
        project.set_active_model(name)
    return result


def _info(config: ModelConfig, project: Project, name: str, split: Split, epoch: int) -> dict:
    return {
        "name": name,
        "config": config.to_dict(),
        "crop": _crop_dict(project),
        "epoch": epoch,
        "split": split.by,
        "version": __version__,
    }


def _crop_dict(project: Project) -> dict:
    crop = asdict(project.meta.crop)
    crop["percentiles"] = list(crop["percentiles"])
    return crop


def _fit_network(
    *,
    project: Project,
    config: ModelConfig,
    epochs: int,
    name: str,
    split: Split,
    device: torch.device,
    seed: int,
    checkpoint: dict,
    progress: Progress | None,
    on_epoch: Callable[[int, float, float], None] | None,
    should_stop: Callable[[], bool],
    num_workers: int,
    notes: list[str],
) -> TrainResult:
    folder = project.model_dir(name)
    network = build_model(config).to(device)
    if uses_channels_last(network, device):
        network.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    history = _history_frame(checkpoint.get("history"))
    if checkpoint:
        network.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    precision = _Precision.for_device(device)
    train_stream = ChunkStream(project, split.train, config.batch_size, shuffle=True, seed=seed)
    val_stream = ChunkStream(project, split.val, 2 * config.batch_size, shuffle=False)
    train_loader = _loader(train_stream, num_workers, device)
    val_loader = _loader(val_stream, num_workers, device)
    first = int(checkpoint.get("epoch", 0)) + 1
    final = first + epochs - 1
    per_epoch = train_stream.n_batches(num_workers)
    done = 0
    column = "val_loss" if len(split.val) else "train_loss"
    previous = history[column].min() if len(history) else math.nan
    best = math.inf if pd.isna(previous) else float(previous)
    stopped = False
    message = ""

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, per_epoch * epochs, message)

    for epoch in range(first, final + 1):
        started = time.perf_counter()
        train_stream.epoch = epoch
        message = f"epoch {epoch}/{final}"
        train_loss = _train_epoch(network, train_loader, optimizer, precision, tick, should_stop)
        val_loss = None
        if train_loss is not None:
            val_loss = _evaluate(network, val_loader, precision, should_stop)
        if val_loss is None:
            stopped = True
            break
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "seconds": time.perf_counter() - started,
        }
        history = _history_frame({c: [*history[c], row[c]] for c in HISTORY_COLUMNS})
        score = val_loss if len(split.val) else train_loss
        improved = score < best
        best = min(best, score)
        state = make_checkpoint(
            network,
            config,
            name=name,
            crop=_crop_dict(project),
            epoch=epoch,
            history=_history_dict(history),
            optimizer=optimizer.state_dict(),
            extra={"split": split.by},
        )
        _write_outputs(
            folder,
            state,
            history,
            improved=improved,
            info=_info(config, project, name, split, epoch),
        )
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
    if len(history) and not stopped:
        rows = split.val if len(split.val) else split.train
        checked = project.read_crops(rows[sample_rows(len(rows), 256, seed)])
        note = collapse_note(network, checked, device)
        if note:
            notes.append(note)
            warnings.warn(note, UserWarning, stacklevel=3)
    return _result(name, folder, history, stopped, split, device, notes)


def collapse_note(network: torch.nn.Module, crops: np.ndarray, device: torch.device) -> str:
    """A warning when the model gives nearly the same output for every crop (a collapsed
    autoencoder: its latents then carry no information), else ''."""
    if len(crops) < 2:
        return ""
    network.eval()
    with torch.inference_mode():
        batch = to_batch(crops, device, uses_channels_last(network, device))
        out = network.decode(network.encode(batch)).float()[:, 0].cpu().numpy()
    spread_in = float(crops.std(axis=0).mean())
    spread_out = float(out.std(axis=0).mean())
    if spread_in == 0 or spread_out >= COLLAPSE_RATIO * spread_in:
        return ""
    return (
        f"the model reconstructs every crop almost alike (output spread {spread_out:.4f} vs "
        f"{spread_in:.4f} in the crops): its latents will not separate nuclei. Try smaller "
        "crops (nuclei should fill a good part of each), fewer blocks, or a lower learning rate."
    )


def _result(
    name: str,
    folder: Path,
    history: pd.DataFrame,
    stopped: bool,
    split: Split,
    device: torch.device,
    notes: list[str],
) -> TrainResult:
    last, best = folder / "last.pt", folder / "best.pt"
    return TrainResult(
        name=name,
        model_dir=folder,
        last=last if last.is_file() else None,
        best=best if best.is_file() else None,
        history=history,
        stopped=stopped,
        split=split.by,
        device=str(device),
        notes=notes,
    )


def _fit_pca(
    *,
    project: Project,
    config: ModelConfig,
    name: str,
    split: Split,
    device: torch.device,
    seed: int,
    progress: Progress | None,
    should_stop: Callable[[], bool],
    notes: list[str],
) -> TrainResult:
    """Fit IncrementalPCA in one streaming pass; saved in the same checkpoint format."""
    folder = project.model_dir(name)
    started = time.perf_counter()
    n_components = min(config.latent_dim, len(split.train))
    if n_components < config.latent_dim:
        notes.append(f"PCA limited to {n_components} components by the number of crops")
        config = ModelConfig.from_dict({**config.to_dict(), "latent_dim": n_components})
    rows = max(config.batch_size, n_components)
    stream = ChunkStream(project, split.train, rows, shuffle=True, seed=seed)
    total = stream.n_batches()
    pca = IncrementalPCA(n_components=n_components)
    pending: np.ndarray | None = None
    for done, batch in enumerate(stream, start=1):
        if should_stop():
            return _result(name, folder, _history_frame(None), True, split, device, notes)
        flat = batch.numpy().reshape(len(batch), -1)
        # each partial_fit needs >= n_components rows: a short last batch joins the one before
        if pending is not None and len(flat) < n_components:
            flat = np.concatenate([pending, flat])
        elif pending is not None:
            pca.partial_fit(pending)
        pending = flat
        if progress is not None:
            progress(done, total, "fitting PCA")
    pca.partial_fit(pending)
    network = PCAModel(config)
    network.set_components(pca.mean_, pca.components_)
    network.to(device)
    precision = _Precision.fp32(device)

    def loss_of(rows: np.ndarray) -> float:
        loader = _loader(ChunkStream(project, rows, 1024, shuffle=False), 0, device)
        return _evaluate(network, loader, precision, lambda: False)

    history = _history_frame(
        {
            "epoch": [1],
            "train_loss": [loss_of(split.train)],
            "val_loss": [loss_of(split.val)],
            "seconds": [time.perf_counter() - started],
        }
    )
    state = make_checkpoint(
        network,
        config,
        name=name,
        crop=_crop_dict(project),
        epoch=1,
        history=_history_dict(history),
        extra={"split": split.by},
    )
    _write_outputs(
        folder, state, history, improved=True, info=_info(config, project, name, split, 1)
    )
    return _result(name, folder, history, False, split, device, notes)
