"""Training: checkpoints each epoch, resume, cancel, collapse handling; the PCA baseline fitted
in one streaming pass. The crops come from :mod:`.data`.

On CUDA the step is the fast path: loader worker processes decoding whole chunks into pinned
memory, bf16 autocast, channels-last, cuDNN autotuning, fused Adam and ``torch.compile`` (with
a fallback to eager mode when compiling fails). Under ``torchrun`` with ``distributed`` the
network trains with DDP, each process on its own share of the chunks (:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA, IncrementalPCA
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import __version__
from .data import ChunkStream, Split, default_workers, loader, split_crops
from .distributed import SINGLE, Ranks, process_group
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
    cudnn_autotune,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
    select_device,
    to_batch,
    uses_channels_last,
)
from .progress import Progress, ShouldStop, never_stop
from .store import Project, atomic_write_bytes

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "seconds")
COLLAPSE_RATIO = 0.1  # output spread across crops below this share of the input spread
CHECK_AFTER = 1 / 3  # share of the planned steps after which a low spread counts as collapse
CHECK_EVERY = 100  # optimiser steps between collapse checks
MIN_CHECK_STEPS = 200  # fewer steps than this are too few to call a model collapsed
PROBE_CROPS = 256
MAX_RESTARTS = 2
COLLAPSE_ACTIONS = ("restart", "stop", "warn")
EPOCHS = 30
VAL_FRACTION = 0.2  # share of the crops (whole source images) held out for validation
MODEL_NAME = "default"
COMPILE_MODES = ("auto", "on", "off")  # torch.compile of the training step; auto: on CUDA
EpochCallback = Callable[[int, float, float], None]


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
    turns = torch.randint(0, 4, (n,), device=batch.device)[:, None, None, None]
    for k in range(1, 4):  # whole-batch selections: no device-to-host wait on a GPU
        out = torch.where(turns == k, torch.rot90(out, k, dims=(-2, -1)), out)
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


class _Objective(nn.Module):
    """A network's training loss as a module's ``forward``, for DDP and ``torch.compile``."""

    def __init__(self, network: Network):
        super().__init__()
        self.network = network

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network.loss(batch)[0]


@dataclass
class _Steps:
    """One optimiser step's machinery: the loss module (compiled, DDP-wrapped), optimiser,
    schedule, precision and augmentation."""

    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: _Precision
    jitter: float | None  # None: no augmentation
    channels_last: bool
    ranks: Ranks = SINGLE


def _train_epoch(
    batches: DataLoader, steps: _Steps, tick: Callable[[], None], should_stop: ShouldStop
) -> float | None:
    """Mean training loss per crop (over all processes), or None when stopped before the
    epoch ended."""
    steps.objective.train()
    precision = steps.precision
    total = torch.zeros((), device=precision.device)
    count = 0
    for crops in batches:
        if should_stop():
            return None
        batch = to_batch(crops, precision.device, steps.channels_last)
        if steps.jitter is not None:
            batch = augment(batch, steps.jitter)
        with precision.autocast():
            loss = steps.objective(batch)
        steps.optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(steps.optimizer)
        precision.scaler.update()
        steps.scheduler.step()
        total += loss.detach().float() * len(batch)
        count += len(batch)
        tick()
    total, count = steps.ranks.total([float(total), count], precision.device)
    return total / max(count, 1)


def _evaluate(
    network: Network,
    batches: DataLoader,
    precision: _Precision,
    should_stop: ShouldStop,
    ranks: Ranks = SINGLE,
) -> float | None:
    """Mean loss per crop in eval mode over all processes (NaN without data), or None when
    stopped."""
    network.eval()
    channels_last = uses_channels_last(network, precision.device)
    total = torch.zeros((), device=precision.device)
    count = 0
    with torch.no_grad():
        for crops in batches:
            if should_stop():
                return None
            batch = to_batch(crops, precision.device, channels_last)
            with precision.autocast():
                loss, _ = network.loss(batch)
            total += loss.float() * len(batch)
            count += len(batch)
    total, count = ranks.total([float(total), count], precision.device)
    return total / count if count else float("nan")


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
    name: str = MODEL_NAME,
    device: str | torch.device | None = None,
    resume: bool = False,
    overwrite: bool = False,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    progress: Progress | None = None,
    on_epoch: EpochCallback | None = None,
    should_stop: ShouldStop | None = None,
    num_workers: int | None = None,
    on_collapse: str = "restart",
    compile: str = COMPILE_MODES[0],
    distributed: bool = False,
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

    ``num_workers`` loader processes (None: :func:`.data.default_workers`) decode the chunks;
    ``compile`` (``"auto"``: on CUDA) runs the training step through ``torch.compile``.
    With ``distributed`` the call is one of the processes started by ``torchrun``: each
    trains on its share of the chunks under DDP and rank 0 alone writes the model.
    """
    check_model_name(name)
    for option, value, choices in (
        ("on_collapse", on_collapse, COLLAPSE_ACTIONS),
        ("compile", compile, COMPILE_MODES),
    ):
        if value not in choices:
            raise InputError(f"{option} must be one of {choices}, got {value!r}")
    checkpoint: dict = {}
    if resume:
        config, checkpoint = _resume_state(project.model_dir(name), config)
    if config is None:
        raise InputError("a model configuration is needed unless resuming")
    _check_inputs(project, config, epochs)
    if distributed and config.variant == "pca":
        raise InputError("PCA is fitted in one pass on one process: train it without --distributed")
    dev = select_device(device)
    groups = process_group(dev) if distributed else contextlib.nullcontext(SINGLE)
    with groups as ranks, cudnn_autotune(dev):
        dev = ranks.device(dev)
        split = split_crops(project.table(with_features=False), val_fraction, seed)
        callbacks = (progress, on_epoch) if ranks.main else (None, None)
        job = _Job(project, name, split, dev, seed, callbacks[0], should_stop or never_stop, ranks)
        if split.note:
            job.notes.warn(split.note)
        if not resume and ranks.main:
            _claim_name(project, name, overwrite)
        if config.latent_dim == AUTO:
            sample = project.read_crops(split.train[sample_rows(len(split.train), 2000, seed)])
            config = config.with_latent_dim(auto_latent_dim(sample))
            job.notes.append(f"latent size {config.latent_dim} chosen from the crops (auto)")
        if ranks.main:
            job.folder.mkdir(parents=True, exist_ok=True)
        ranks.barrier()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed + int(checkpoint.get("epoch", 0)))
            if config.variant == "pca":
                result = _fit_pca(job, config)
            else:
                workers = default_workers(dev, ranks) if num_workers is None else num_workers
                plan = _Plan(epochs, checkpoint, callbacks[1], workers, on_collapse, compile)
                result = _fit_network(job, config, plan)
    if result.last is not None and ranks.main:
        project.set_active_model(name)
    return result


@dataclass
class _Job:
    """What every attempt at training one model shares: where, on what, and the callbacks."""

    project: Project
    name: str
    split: Split
    device: torch.device
    seed: int
    progress: Progress | None
    should_stop: ShouldStop
    ranks: Ranks = SINGLE
    notes: Notes = field(default_factory=lambda: Notes())

    @property
    def folder(self) -> Path:
        return self.project.model_dir(self.name)

    def info(self, config: ModelConfig, epoch: int) -> dict:
        """The model folder's config.json."""
        return {
            "name": self.name,
            "config": config.to_dict(),
            "crop": _crop_dict(self.project),
            "epoch": epoch,
            "split": self.split.by,
            "version": __version__,
        }

    def checkpoint(
        self, network: Network, config: ModelConfig, history: pd.DataFrame, optimizer: dict | None
    ) -> dict:
        """A checkpoint of ``network`` after the last epoch of ``history``."""
        return make_checkpoint(
            network,
            config,
            name=self.name,
            crop=_crop_dict(self.project),
            epoch=int(history["epoch"].iloc[-1]),
            history=_history_dict(history),
            optimizer=optimizer,
            extra={"split": self.split.by},
        )

    def result(self, history: pd.DataFrame, stopped: bool) -> TrainResult:
        self.ranks.barrier()  # rank 0 has written the model's files
        last, best = self.folder / "last.pt", self.folder / "best.pt"
        return TrainResult(
            name=self.name,
            model_dir=self.folder,
            last=last if last.is_file() else None,
            best=best if best.is_file() else None,
            history=history,
            stopped=stopped,
            split=self.split.by,
            device=str(self.device),
            notes=list(self.notes),
            warnings=list(self.notes.warnings),
        )


@dataclass(frozen=True)
class _Plan:
    """How a network is trained: epochs, the checkpoint resumed from, loaders, callbacks."""

    epochs: int
    checkpoint: dict
    on_epoch: EpochCallback | None
    num_workers: int
    on_collapse: str
    compile: str = COMPILE_MODES[0]


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


def collapse_note(
    network: torch.nn.Module, crops: np.ndarray, device: torch.device, ranks: Ranks = SINGLE
) -> str:
    """A warning when the model gives nearly the same output for every crop (a collapsed
    autoencoder: its latents then carry no information), else ''. Under DDP the spread is
    averaged over the processes, so that all of them decide alike."""
    ratio = ranks.mean([output_spread(network, crops, device)], device)[0]
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

    job: _Job
    config: ModelConfig
    plan: _Plan
    probe: np.ndarray  # crops whose output spread tells a collapse
    seed: int
    notes: Notes = field(default_factory=Notes)

    def __post_init__(self) -> None:
        config, job = self.config, self.job
        self.network = build_model(config).to(job.device)
        self.channels_last = uses_channels_last(self.network, job.device)
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.train_stream = ChunkStream(
            job.project,
            job.split.train,
            config.batch_size,
            shuffle=True,
            seed=self.seed,
            ranks=job.ranks,
            even=job.ranks.distributed,
            compact=True,
        )
        self.val_stream = ChunkStream(
            job.project,
            job.split.val,
            2 * config.batch_size,
            shuffle=False,
            ranks=job.ranks,
            compact=True,
        )
        self.workers = min(self.plan.num_workers, self.train_stream.max_workers())
        self.history = _history_frame(self.plan.checkpoint.get("history"))

    def steps(self, epochs: int) -> _Steps:
        """Optimiser and schedule for ``epochs`` epochs (restored when resuming)."""
        config, checkpoint, device = self.config, self.plan.checkpoint, self.job.device
        fused = device.type == "cuda"  # one kernel for the whole update
        optimizer = torch.optim.Adam(self.network.parameters(), lr=config.lr, fused=fused)
        if checkpoint:
            self.network.load_state_dict(checkpoint["state_dict"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            for group in optimizer.param_groups:  # a resumed run warms up again
                group["initial_lr"] = config.lr
        elif isinstance(self.network, Autoencoder) and len(self.probe):
            self.network.set_output_level(float(self.probe.mean()))
        total = self.train_stream.n_batches(self.workers) * epochs
        factor = lr_factor(total, config.warmup, config.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        jitter = config.jitter if config.augment else None
        precision = _Precision.for_device(device)
        objective = self._objective(precision)
        ranks = self.job.ranks
        return _Steps(objective, optimizer, scheduler, precision, jitter, self.channels_last, ranks)

    def _objective(self, precision: _Precision) -> nn.Module:
        """The loss module the steps run: DDP-wrapped under torchrun, compiled when asked
        (``"auto"``: on CUDA) and a trial step through it works, else eager."""
        job = self.job
        objective: nn.Module = _Objective(self.network)
        if job.ranks.distributed:
            ids = [job.device.index] if job.device.type == "cuda" else None
            objective = DistributedDataParallel(objective, device_ids=ids)
        wanted = self.plan.compile == "on" or (
            self.plan.compile == "auto" and job.device.type == "cuda"
        )
        if not wanted:
            return objective
        size = self.config.crop_size
        trial = to_batch(
            torch.full((self.config.batch_size, 1, size, size), 0.5), job.device, self.channels_last
        )
        saved = {k: v.clone() for k, v in self.network.state_dict().items()}
        devices = [job.device] if job.device.type == "cuda" else []
        try:
            compiled = torch.compile(objective)
            with torch.random.fork_rng(devices=devices):  # training draws the same numbers
                with precision.autocast():
                    loss = compiled(trial)
                loss.backward()
        except Exception as err:  # any compiler failure: the eager step is the same maths
            self.notes.append(f"torch.compile failed ({type(err).__name__}): training without it")
            return objective
        finally:
            self.network.load_state_dict(saved)  # the trial changed batch-norm statistics
            self.network.zero_grad(set_to_none=True)
        return compiled

    def fit(self) -> bool:
        """Train for up to the plan's epochs; True when stopped by ``should_stop``."""
        config, job, epochs = self.config, self.job, self.plan.epochs
        self._repeat_small(epochs)
        steps = self.steps(epochs)
        train_loader = loader(self.train_stream, self.workers, job.device)
        val_workers = min(self.plan.num_workers, self.val_stream.max_workers())
        val_loader = loader(self.val_stream, val_workers, job.device)
        per_epoch = self.train_stream.n_batches(self.workers)
        first = int(self.plan.checkpoint.get("epoch", 0)) + 1
        final = first + epochs - 1
        scored = "val_loss" if len(job.split.val) else "train_loss"
        best = float(self.history[scored].min()) if len(self.history) else math.inf
        since_best = 0
        done = 0
        message = ""

        def tick() -> None:
            nonlocal done
            done += 1
            if job.progress is not None:
                job.progress(done, per_epoch * epochs, message)

        for epoch in range(first, final + 1):
            started = time.perf_counter()
            self.train_stream.epoch = epoch
            message = f"epoch {epoch}/{final}"
            train_loss = _train_epoch(train_loader, steps, tick, job.should_stop)
            val_loss = None
            if train_loss is not None:
                val_loss = _evaluate(
                    self.network, val_loader, steps.precision, job.should_stop, job.ranks
                )
            if val_loss is None:
                return True
            self._check(epoch, train_loss, val_loss, done, per_epoch * epochs)
            score = val_loss if len(job.split.val) else train_loss
            improved = score < best
            best, since_best = (score, 0) if improved else (best, since_best + 1)
            self._save(epoch, train_loss, val_loss, started, steps, improved)
            if config.patience and since_best >= config.patience:
                self.notes.append(
                    f"stopped early at epoch {epoch}: no better validation loss for "
                    f"{config.patience} epochs"
                )
                break
        final_note = collapse_note(self.network, self.probe, job.device, job.ranks)
        if final_note and done < MIN_CHECK_STEPS:
            self.notes.warn(f"{final_note}; {done} optimiser steps are too few: train longer")
        elif final_note and self.plan.on_collapse == "warn":
            self.notes.warn(final_note)
        elif final_note:
            raise _Collapsed(int(self.history["epoch"].iloc[-1]), final_note)
        return False

    def _repeat_small(self, epochs: int) -> None:
        """Make each epoch long enough for the run to reach ``min_steps`` optimiser steps."""
        stream = self.train_stream
        stream.min_batches = 0
        natural = stream.n_batches(self.workers)
        stream.min_batches = steps_per_epoch(natural, epochs, self.config.min_steps)
        if stream.min_batches > natural:
            passes = stream.min_batches / natural
            self.notes.append(
                f"a small project: each epoch repeats the {len(self.job.split.train)} training "
                f"crops for {stream.min_batches} optimiser steps ({passes:.1f} passes), so "
                f"that training takes at least {self.config.min_steps} steps"
            )

    def _check(self, epoch: int, train_loss: float, val_loss: float, done: int, total: int) -> None:
        """Refuse a diverged loss; after a third of the steps (and at least
        :data:`MIN_CHECK_STEPS`), a collapsed model."""
        has_val = bool(self.job.split.val.size)
        if not (math.isfinite(train_loss) and (math.isfinite(val_loss) or not has_val)):
            raise TrainingError(
                f"training diverged at epoch {epoch} (loss {train_loss}); the model was not "
                f"kept as the active model. Lower the learning rate (now {self.config.lr:g})"
            )
        late = done >= max(MIN_CHECK_STEPS, CHECK_AFTER * total)
        if self.plan.on_collapse != "warn" and late and self._due(epoch):
            note = collapse_note(self.network, self.probe, self.job.device, self.job.ranks)
            if note:
                raise _Collapsed(epoch, note)

    def _due(self, epoch: int) -> bool:
        """Collapse checks about every :data:`CHECK_EVERY` optimiser steps."""
        per_epoch = max(1, self.train_stream.n_batches(self.workers))
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
        job = self.job
        if job.ranks.main:
            state = job.checkpoint(
                self.network, self.config, self.history, steps.optimizer.state_dict()
            )
            info = job.info(self.config, epoch)
            _write_outputs(job.folder, state, self.history, improved=improved, info=info)
        if self.plan.on_epoch is not None:
            self.plan.on_epoch(epoch, train_loss, val_loss)


def _probe(job: _Job) -> np.ndarray:
    """Up to :data:`PROBE_CROPS` held-out crops (training crops without a validation set)."""
    split = job.split
    rows = split.val if len(split.val) >= 2 else split.train
    return job.project.read_crops(rows[sample_rows(len(rows), PROBE_CROPS, job.seed)])


def _fit_network(job: _Job, config: ModelConfig, plan: _Plan) -> TrainResult:
    """Train; after a collapse restart from scratch at a third of the learning rate (up to
    :data:`MAX_RESTARTS` times; never a resumed run), stop, or only warn (``on_collapse``)."""
    probe = _probe(job)
    for attempt in range(MAX_RESTARTS + 1):
        run = _Run(job, config, plan, probe, seed=job.seed + attempt)
        try:
            stopped = run.fit()
        except _Collapsed as collapsed:
            message = f"{collapsed.note} (epoch {collapsed.epoch}, learning rate {config.lr:g})"
            if plan.checkpoint or plan.on_collapse == "stop" or attempt == MAX_RESTARTS:
                again = f" after {attempt} restarts from scratch at lower rates" if attempt else ""
                raise TrainingError(
                    f"{message}{again}; it was not kept as the active model. Try smaller crops "
                    "(nuclei should fill a good part of each), --arch norm, or a lower --lr"
                ) from None
            config = replace(config, lr=config.lr / 3)
            job.notes.warn(f"{message}: restarted from scratch at learning rate {config.lr:g}")
            if job.progress is not None:
                job.progress(0, 1, "collapsed: restarting at a lower learning rate")
            continue
        job.notes.merge(run.notes)
        return job.result(run.history, stopped)
    raise AssertionError("unreachable")


def _fit_pca(job: _Job, config: ModelConfig) -> TrainResult:
    """Fit IncrementalPCA in one streaming pass; saved in the same checkpoint format."""
    project, split, device = job.project, job.split, job.device
    started = time.perf_counter()
    n_components = min(config.latent_dim, len(split.train))
    if n_components < config.latent_dim:
        job.notes.append(f"PCA limited to {n_components} components by the number of crops")
        config = ModelConfig.from_dict({**config.to_dict(), "latent_dim": n_components})
    rows = max(config.batch_size, n_components)
    stream = ChunkStream(project, split.train, rows, shuffle=True, seed=job.seed)
    total = stream.n_batches()
    pca = IncrementalPCA(n_components=n_components)
    pending: np.ndarray | None = None
    for done, batch in enumerate(stream, start=1):
        if job.should_stop():
            return job.result(_history_frame(None), True)
        flat = batch.numpy().reshape(len(batch), -1)
        # each partial_fit needs >= n_components rows: a short last batch joins the one before
        if pending is not None and len(flat) < n_components:
            flat = np.concatenate([pending, flat])
        elif pending is not None:
            pca.partial_fit(pending)
        pending = flat
        if job.progress is not None:
            job.progress(done, total, "fitting PCA")
    pca.partial_fit(pending)
    network = PCAModel(config)
    network.set_components(pca.mean_, pca.components_)
    network.to(device)
    precision = _Precision.fp32(device)

    def loss_of(rows: np.ndarray) -> float:
        batches = loader(ChunkStream(project, rows, 1024, shuffle=False), 0, device)
        return _evaluate(network, batches, precision, never_stop)

    history = _history_frame(
        {
            "epoch": [1],
            "train_loss": [loss_of(split.train)],
            "val_loss": [loss_of(split.val)],
            "seconds": [time.perf_counter() - started],
        }
    )
    state = job.checkpoint(network, config, history, None)
    _write_outputs(job.folder, state, history, improved=True, info=job.info(config, 1))
    return job.result(history, False)
