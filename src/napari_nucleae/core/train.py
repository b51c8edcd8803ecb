"""Training: crops streamed chunk by chunk from the project, checkpoints each epoch, resume, cancel.

Crops are read as contiguous zarr chunks in shuffled chunk order and shuffled within a buffer
of several chunks, so training never loads the whole project and never does per-crop random
reads. Validation holds out whole source images (``image_id``), so the validation loss measures
generalisation to new images rather than to neighbours of training crops.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA, IncrementalPCA
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import __version__
from .errors import InputError, NucleaeError
from .explore import sample_rows
from .model import (
    AUTO,
    MAX_LATENT,
    Autoencoder,
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
CHECK_AFTER = 1 / 3  # share of the planned steps after which a low spread counts as collapse
CHECK_EVERY = 100  # optimiser steps between collapse checks
MIN_CHECK_STEPS = 200  # fewer steps than this are too few to call a model collapsed
PROBE_CROPS = 256
MAX_RESTARTS = 2
COLLAPSE_ACTIONS = ("restart", "stop", "warn")

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


class Notes(list):
    """Notes on a training run; the ones that need the user's attention are also
    :attr:`warnings` (and issued as ``UserWarning``)."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []

    def warn(self, note: str) -> None:
        self.append(note)
        self.warnings.append(note)
        warnings.warn(note, UserWarning, stacklevel=4)

    def merge(self, other: Notes) -> None:
        self.extend(other)
        self.warnings.extend(other.warnings)


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
    warnings: list[str] = field(default_factory=list)  # the notes that need attention


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
    An epoch is one pass over the rows, or, with ``min_batches``, as many passes as it takes to
    yield that many batches (small projects).
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
        self.min_batches = 0  # batches per epoch at least (repeating the rows; all workers)
        chunk = int(project.crops.chunks[0])
        self.buffer_rows = max(batch_size, buffer_chunks * chunk)
        rows = np.asarray(rows, dtype=np.int64)
        edges = np.searchsorted(rows, np.arange(0, len(project) + chunk, chunk))
        self.blocks = [rows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    def _shards(self, n_workers: int) -> list[list[np.ndarray]]:
        return [self.blocks[w::n_workers] for w in range(n_workers)]

    def n_batches(self, n_workers: int = 0) -> int:
        """Batches per epoch (each worker ends each pass with one partial batch)."""
        shards = self._shards(max(1, n_workers))
        return sum(self._worker_batches(s, len(shards)) for s in shards)

    def _worker_batches(self, shard: list[np.ndarray], n_workers: int) -> int:
        """Batches one worker yields per epoch."""
        per_pass = math.ceil(sum(map(len, shard)) / self.batch_size)
        return max(per_pass, math.ceil(self.min_batches / n_workers)) if per_pass else 0

    def _read(self, rows: np.ndarray) -> np.ndarray:
        first = int(rows[0])
        crops = self.project.read_crops(slice(first, int(rows[-1]) + 1))
        return crops if len(crops) == len(rows) else crops[rows - first]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        shard = self._shards(n_workers)[worker]
        wanted = self._worker_batches(shard, n_workers)
        passes = itertools.count()
        while wanted > 0:
            for batch in itertools.islice(self._pass(shard, [worker, next(passes)]), wanted):
                wanted -= 1
                yield batch

    def _pass(self, blocks: list[np.ndarray], key: list[int]) -> Iterator[torch.Tensor]:
        """One pass over ``blocks`` in batches, shuffled with a seed made of ``key``."""
        rng = np.random.default_rng([self.seed, self.epoch, *key])
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
def augment(batch: torch.Tensor, jitter: float) -> torch.Tensor:
    """Random flips, 90° rotations and an intensity scale of ±``jitter`` per crop (nuclei
    have no preferred orientation or handedness, and stains vary in brightness)."""
    n = len(batch)
    flip = torch.rand(n, device=batch.device) < 0.5
    out = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    turns = torch.randint(0, 4, (n,), device=batch.device)
    for k in range(1, 4):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
    if jitter > 0:
        scale = 1 + jitter * (2 * torch.rand(n, 1, 1, 1, device=batch.device) - 1)
        out = (out * scale).clamp(0.0, 1.0)
    return out


def lr_factor(total_steps: int, warmup: float, schedule: str) -> Callable[[int], float]:
    """The learning-rate multiplier per optimiser step: linear warm-up over ``warmup`` of the
    steps, then (``"warmup-cosine"``) a cosine decay to 1 % of the rate."""
    warm = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

    return factor


@dataclass
class _Steps:
    """One optimiser step's machinery: optimiser, schedule, precision and augmentation."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: _Precision
    jitter: float | None  # None: no augmentation


def _train_epoch(
    network: Network,
    loader: DataLoader,
    steps: _Steps,
    tick: Callable[[], None],
    should_stop: Callable[[], bool],
) -> float | None:
    """Mean training loss per crop, or None when stopped before the epoch ended."""
    network.train()
    precision = steps.precision
    channels_last = uses_channels_last(network, precision.device)
    total = torch.zeros((), device=precision.device)
    count = 0
    for crops in loader:
        if should_stop():
            return None
        batch = to_batch(crops, precision.device, channels_last)
        if steps.jitter is not None:
            batch = augment(batch, steps.jitter)
        with precision.autocast():
            loss, _ = network.loss(batch)
        steps.optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(steps.optimizer)
        precision.scaler.update()
        steps.scheduler.step()
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
    if config is not None:
        given = config.to_dict()
        if given["latent_dim"] == AUTO:
            given["latent_dim"] = stored.latent_dim
        changed = sorted(k for k, v in given.items() if stored.to_dict()[k] != v)
        if changed:
            raise InputError(f"cannot resume with different settings ({', '.join(changed)})")
    if stored.variant == "pca":
        raise InputError("a PCA model has no epochs to resume; train it again instead")
    return stored, checkpoint


def _claim_name(project: Project, name: str, overwrite: bool) -> None:
    """Refuse to replace a trained model unless ``overwrite``; with it, drop the old model's
    checkpoints and latents (they belong to the model being replaced)."""
    folder = project.model_dir(name)
    trained = [folder / f for f in ("last.pt", "best.pt") if (folder / f).is_file()]
    if not trained:
        return
    if not overwrite:
        raise InputError(
            f"model {name!r} already exists in this project; choose another name, resume it, "
            "or overwrite it (--resume / --overwrite)"
        )
    for file in trained:
        file.unlink()
    shutil.rmtree(project.latents_path(name), ignore_errors=True)


def auto_latent_dim(crops: np.ndarray) -> int:
    """A latent size from the data: the principal components that hold 95 % of the crops'
    variance, rounded up to a power of two between 16 and :data:`MAX_LATENT`."""
    flat = crops.reshape(len(crops), -1).astype(np.float32)
    k = min(MAX_LATENT, len(flat) - 1, flat.shape[1])
    if k < 2 or not flat.var(axis=0).sum() > 0:
        return 16
    pca = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(flat)
    needed = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), 0.95)) + 1
    return int(np.clip(2 ** math.ceil(math.log2(max(needed, 1))), 16, MAX_LATENT))


def train(
    project: Project,
    config: ModelConfig | None,
    epochs: int,
    *,
    name: str = "default",
    device: str | torch.device | None = None,
    resume: bool = False,
    overwrite: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: Progress | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    num_workers: int = 0,
    on_collapse: str = "restart",
) -> TrainResult:
    """Train (or with ``resume`` continue) model ``name`` of ``project`` for ``epochs`` epochs.

    ``config`` may be None when resuming. Epoch numbers and history continue across resumes.
    An existing model is replaced only with ``overwrite``. ``should_stop`` is polled between
    batches: an interrupted epoch is discarded and the last complete epoch's checkpoint stays
    loadable. A PCA model is fitted in one streaming pass. A model that collapses (gives every
    crop the same output) is, by ``on_collapse``, retrained from a fresh start at a lower
    learning rate (``"restart"``), stopped (``"stop"``) or kept with a note (``"warn"``); one
    that still collapses, or whose loss stops being finite, raises :class:`TrainingError` and
    does not become the active model.
    """
    check_model_name(name)
    if on_collapse not in COLLAPSE_ACTIONS:
        raise InputError(f"on_collapse must be one of {COLLAPSE_ACTIONS}, got {on_collapse!r}")
    folder = project.model_dir(name)
    checkpoint: dict = {}
    if resume:
        config, checkpoint = _resume_state(folder, config)
    if config is None:
        raise InputError("a model configuration is needed unless resuming")
    _check_inputs(project, config, epochs)
    dev = select_device(device)
    split = split_crops(project.table(with_features=False), val_fraction, seed)
    notes = Notes()
    if split.note:
        notes.warn(split.note)
    if not resume:
        _claim_name(project, name, overwrite)
    if config.latent_dim == AUTO:
        sample = project.read_crops(split.train[sample_rows(len(split.train), 2000, seed)])
        config = config.with_latent_dim(auto_latent_dim(sample))
        notes.append(f"latent size {config.latent_dim} chosen from the crops (auto)")
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
                on_collapse=on_collapse,
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


def steps_per_epoch(batches_per_pass: int, epochs: int, min_steps: int) -> int:
    """Optimiser steps per epoch: one pass over the training crops, or more (repeating them)
    so that ``epochs`` epochs make at least ``min_steps`` steps."""
    return max(batches_per_pass, math.ceil(min_steps / max(1, epochs)))


def output_spread(network: Network, crops: np.ndarray, device: torch.device) -> float:
    """How much the reconstructions of ``crops`` differ from each other, as a share of how
    much the crops do (about 1 for a good model, near 0 for a collapsed one; 1 without
    spread in the crops)."""
    spread_in = float(crops.std(axis=0).mean())
    if len(crops) < 2 or spread_in == 0:
        return 1.0
    network.eval()
    with torch.inference_mode():
        batch = to_batch(crops, device, uses_channels_last(network, device))
        out = network.decode(network.encode(batch)).float()[:, 0].cpu().numpy()
    return float(out.std(axis=0).mean()) / spread_in


def collapse_note(network: torch.nn.Module, crops: np.ndarray, device: torch.device) -> str:
    """A warning when the model gives nearly the same output for every crop (a collapsed
    autoencoder: its latents then carry no information), else ''."""
    ratio = output_spread(network, crops, device)
    if ratio >= COLLAPSE_RATIO:
        return ""
    return (
        f"the model reconstructs every crop almost alike (output spread {ratio:.3f} of the "
        "crops' spread): its latents will not separate nuclei"
    )


class _Collapsed(Exception):
    """Raised inside a run whose model collapsed (handled by :func:`_fit_network`)."""

    def __init__(self, epoch: int, note: str):
        super().__init__(note)
        self.epoch = epoch
        self.note = note


class TrainingError(NucleaeError):
    """Training gave no usable model: the loss diverged or the model collapsed."""


@dataclass
class _Run:
    """One attempt at training a network: its state, loaders and callbacks."""

    project: Project
    config: ModelConfig
    name: str
    split: Split
    device: torch.device
    seed: int
    checkpoint: dict
    progress: Progress | None
    on_epoch: Callable[[int, float, float], None] | None
    should_stop: Callable[[], bool]
    num_workers: int
    probe: np.ndarray  # crops whose output spread tells a collapse
    on_collapse: str = "restart"
    notes: Notes = field(default_factory=Notes)

    def __post_init__(self) -> None:
        config, device = self.config, self.device
        self.network = build_model(config).to(device)
        if uses_channels_last(self.network, device):
            self.network.to(memory_format=torch.channels_last)
        self.train_stream = ChunkStream(
            self.project, self.split.train, config.batch_size, shuffle=True, seed=self.seed
        )
        self.val_stream = ChunkStream(
            self.project, self.split.val, 2 * config.batch_size, shuffle=False
        )
        self.history = _history_frame(self.checkpoint.get("history"))

    def steps(self, epochs: int) -> _Steps:
        """Optimiser and schedule for ``epochs`` epochs (restored when resuming)."""
        config = self.config
        optimizer = torch.optim.Adam(self.network.parameters(), lr=config.lr)
        if self.checkpoint:
            self.network.load_state_dict(self.checkpoint["state_dict"])
            optimizer.load_state_dict(self.checkpoint["optimizer"])
            for group in optimizer.param_groups:  # a resumed run warms up again
                group["initial_lr"] = config.lr
        elif isinstance(self.network, Autoencoder) and len(self.probe):
            self.network.set_output_level(float(self.probe.mean()))
        total = self.train_stream.n_batches(self.num_workers) * epochs
        factor = lr_factor(total, config.warmup, config.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        jitter = config.jitter if config.augment else None
        return _Steps(optimizer, scheduler, _Precision.for_device(self.device), jitter)

    def fit(self, epochs: int) -> bool:
        """Train for up to ``epochs`` epochs; True when stopped by ``should_stop``."""
        config = self.config
        self._repeat_small(epochs)
        steps = self.steps(epochs)
        train_loader = _loader(self.train_stream, self.num_workers, self.device)
        val_loader = _loader(self.val_stream, self.num_workers, self.device)
        per_epoch = self.train_stream.n_batches(self.num_workers)
        first = int(self.checkpoint.get("epoch", 0)) + 1
        final = first + epochs - 1
        scored = "val_loss" if len(self.split.val) else "train_loss"
        best = float(self.history[scored].min()) if len(self.history) else math.inf
        since_best = 0
        done = 0
        message = ""

        def tick() -> None:
            nonlocal done
            done += 1
            if self.progress is not None:
                self.progress(done, per_epoch * epochs, message)

        for epoch in range(first, final + 1):
            started = time.perf_counter()
            self.train_stream.epoch = epoch
            message = f"epoch {epoch}/{final}"
            train_loss = _train_epoch(self.network, train_loader, steps, tick, self.should_stop)
            val_loss = None
            if train_loss is not None:
                val_loss = _evaluate(self.network, val_loader, steps.precision, self.should_stop)
            if val_loss is None:
                return True
            self._check(epoch, train_loss, val_loss, done, per_epoch * epochs)
            score = val_loss if len(self.split.val) else train_loss
            improved = score < best
            best, since_best = (score, 0) if improved else (best, since_best + 1)
            self._save(epoch, train_loss, val_loss, started, steps, improved)
            if config.patience and since_best >= config.patience:
                self.notes.append(
                    f"stopped early at epoch {epoch}: no better validation loss for "
                    f"{config.patience} epochs"
                )
                break
        final_note = collapse_note(self.network, self.probe, self.device)
        if final_note and done < MIN_CHECK_STEPS:
            self.notes.warn(f"{final_note}; {done} optimiser steps are too few: train longer")
        elif final_note and self.on_collapse == "warn":
            self.notes.warn(final_note)
        elif final_note:
            raise _Collapsed(int(self.history["epoch"].iloc[-1]), final_note)
        return False

    def _repeat_small(self, epochs: int) -> None:
        """Make each epoch long enough for the run to reach ``min_steps`` optimiser steps."""
        stream = self.train_stream
        stream.min_batches = 0
        natural = stream.n_batches(self.num_workers)
        stream.min_batches = steps_per_epoch(natural, epochs, self.config.min_steps)
        if stream.min_batches > natural:
            passes = stream.min_batches / natural
            self.notes.append(
                f"a small project: each epoch repeats the {len(self.split.train)} training "
                f"crops for {stream.min_batches} optimiser steps ({passes:.1f} passes), so "
                f"that training takes at least {self.config.min_steps} steps"
            )

    def _check(self, epoch: int, train_loss: float, val_loss: float, done: int, total: int) -> None:
        """Refuse a diverged loss; after a third of the steps (and at least
        :data:`MIN_CHECK_STEPS`), a collapsed model."""
        if not (math.isfinite(train_loss) and (math.isfinite(val_loss) or not self.split.val.size)):
            raise TrainingError(
                f"training diverged at epoch {epoch} (loss {train_loss}); the model was not "
                f"kept as the active model. Lower the learning rate (now {self.config.lr:g})"
            )
        late = done >= max(MIN_CHECK_STEPS, CHECK_AFTER * total)
        if self.on_collapse != "warn" and late and self._due(epoch):
            note = collapse_note(self.network, self.probe, self.device)
            if note:
                raise _Collapsed(epoch, note)

    def _due(self, epoch: int) -> bool:
        """Collapse checks about every :data:`CHECK_EVERY` optimiser steps."""
        per_epoch = max(1, self.train_stream.n_batches(self.num_workers))
        return epoch % max(1, CHECK_EVERY // per_epoch) == 0

    def _save(
        self,
        epoch: int,
        train_loss: float,
        val_loss: float,
        started: float,
        steps: _Steps,
        improved: bool,
    ) -> None:
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "seconds": time.perf_counter() - started,
        }
        self.history = _history_frame({c: [*self.history[c], row[c]] for c in HISTORY_COLUMNS})
        state = make_checkpoint(
            self.network,
            self.config,
            name=self.name,
            crop=_crop_dict(self.project),
            epoch=epoch,
            history=_history_dict(self.history),
            optimizer=steps.optimizer.state_dict(),
            extra={"split": self.split.by},
        )
        _write_outputs(
            self.project.model_dir(self.name),
            state,
            self.history,
            improved=improved,
            info=_info(self.config, self.project, self.name, self.split, epoch),
        )
        if self.on_epoch is not None:
            self.on_epoch(epoch, train_loss, val_loss)


def _probe(project: Project, split: Split, seed: int) -> np.ndarray:
    """Up to :data:`PROBE_CROPS` held-out crops (training crops without a validation set)."""
    rows = split.val if len(split.val) >= 2 else split.train
    return project.read_crops(rows[sample_rows(len(rows), PROBE_CROPS, seed)])


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
    notes: Notes,
    on_collapse: str,
) -> TrainResult:
    """Train; after a collapse restart from scratch at a third of the learning rate (up to
    :data:`MAX_RESTARTS` times; never a resumed run), stop, or only warn (``on_collapse``)."""
    probe = _probe(project, split, seed)
    folder = project.model_dir(name)
    for attempt in range(MAX_RESTARTS + 1):
        run = _Run(
            project=project,
            config=config,
            name=name,
            split=split,
            device=device,
            seed=seed + attempt,
            checkpoint=checkpoint,
            progress=progress,
            on_epoch=on_epoch,
            should_stop=should_stop,
            num_workers=num_workers,
            probe=probe,
            on_collapse=on_collapse,
        )
        try:
            stopped = run.fit(epochs)
        except _Collapsed as collapsed:
            message = f"{collapsed.note} (epoch {collapsed.epoch}, learning rate {config.lr:g})"
            if checkpoint or on_collapse == "stop" or attempt == MAX_RESTARTS:
                again = f" after {attempt} restarts from scratch at lower rates" if attempt else ""
                raise TrainingError(
                    f"{message}{again}; it was not kept as the active model. Try smaller crops "
                    "(nuclei should fill a good part of each), --arch norm, or a lower --lr"
                ) from None
            config = replace(config, lr=config.lr / 3)
            notes.warn(f"{message}: restarted from scratch at learning rate {config.lr:g}")
            if progress is not None:
                progress(0, 1, "collapsed: restarting at a lower learning rate")
            continue
        notes.merge(run.notes)
        return _result(name, folder, run.history, stopped, split, device, notes)
    raise AssertionError("unreachable")


def _result(
    name: str,
    folder: Path,
    history: pd.DataFrame,
    stopped: bool,
    split: Split,
    device: torch.device,
    notes: Notes,
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
        notes=list(notes),
        warnings=list(notes.warnings),
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
    notes: Notes,
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
