"""The seed's job at its scale: 256x256 crops stored as uint8, the reference network.

Measures side by side in one run, on one device: the loader alone (chunk-decoding worker
processes delivering batches to the device), napari-nucleae's ``train()`` at the seed's batch
size (32) and at ours, a plain fp32 PyTorch loop of the same network fed by the same loader
(the baseline), ``embed()`` over every crop, and the GPU's utilisation while ``train()`` runs
(NVML through ``torch.cuda.utilization``; null on the CPU). Training throughput is the steady
state: steps after ``--warm-steps`` (compilation, cuDNN autotuning) until ``--steps`` more,
``--seconds`` or the end of the epoch. From it follows the projected time of the seed's whole
job: 50 epochs of 1,061,277 crops and one encoding pass.

    PYTHONPATH=src:benchmarks python benchmarks/bench_seed_scale.py [--crops 128]
        [--work DIR] [--workers auto] [--warm-steps 1] [--steps 1] [--seconds 60]
        [--device auto] [--compile auto] [--out benchmarks/results/seed_scale_<cpu|cuda>.json]

The project is built in ``--work`` (kept and reused by the next run with as many crops) or
in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from _report import report
from bench_autoencoder import synthetic_crops
from napari_nucleae.core.data import ChunkStream, default_workers, loader
from napari_nucleae.core.embed import embed
from napari_nucleae.core.model import (
    LEGACY_SETTINGS,
    LoadedModel,
    ModelConfig,
    build_model,
    select_device,
    to_batch,
)
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.core.training import COMPILE_MODES, train

SIZE = 256
SEED_CROPS = 1_061_277  # the seed's project
SEED_EPOCHS = 50
SEED_BATCH = 32
IMAGE_CROPS = 1024  # crops per synthetic source image
BANK = 256  # distinct synthetic nuclei, flipped, turned and rescaled into every image
TARGETS = {"train_crops_per_s": 15_000, "encode_crops_per_s": 10_000, "gpu_busy_fraction": 0.9}


# ---------------------------------------------------------------------------- the project
def image_crops(bank: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` crops from the bank, each flipped, turned and dimmed at random."""
    rng = np.random.default_rng(seed)
    crops = bank[rng.integers(0, len(bank), n)]
    crops = np.where(rng.random((n, 1, 1)) < 0.5, crops[:, :, ::-1], crops)
    turned = np.stack([np.rot90(c, k) for c, k in zip(crops, rng.integers(0, 4, n), strict=True)])
    return turned * rng.uniform(0.6, 1.0, (n, 1, 1)).astype(np.float32)


def seed_project(path: Path, n: int) -> Project:
    """A project of ``n`` synthetic 256x256 crops stored as uint8, as the seed stored them;
    an existing one with ``n`` crops is reused."""
    if (path / "project.json").is_file():
        project = Project.open(path)
        if len(project) == n and project.meta.crop.storage_dtype == "uint8":
            return project
        shutil.rmtree(path)
    project = Project.create(path, CropParams(size=SIZE, storage_dtype="uint8"))
    bank = synthetic_crops(BANK, SIZE)
    for i, start in enumerate(range(0, n, IMAGE_CROPS)):
        crops = image_crops(bank, min(IMAGE_CROPS, n - start), seed=i)
        table = pd.DataFrame({"image_id": f"image{i}", "label": np.arange(1, len(crops) + 1)})
        project.append({"image_id": f"image{i}"}, crops, table)
    return project


# ---------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Busy:
    """The GPU's mean utilisation (NVML) sampled in a thread while the block runs."""

    def __init__(self, device: torch.device, every: float = 0.1):
        self.device, self.every = device, every
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(torch.cuda.utilization(self.device) / 100)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        thread = None
        if self.device.type == "cuda" and self.available():
            thread = threading.Thread(target=self._sample, daemon=True)
            thread.start()
        try:
            yield
        finally:
            self._stop.set()
            if thread is not None:
                thread.join()

    def available(self) -> bool:
        try:
            torch.cuda.utilization(self.device)
        except Exception:  # no NVML (pynvml) or no driver support
            return False
        return True

    @property
    def fraction(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


class Window:
    """Steady-state throughput: the time from step ``warm`` to step ``warm + steps`` (or
    ``seconds`` later, or the last step), the device synchronised at both ends."""

    def __init__(self, device: torch.device, warm: int, steps: int, seconds: float):
        self.device, self.warm, self.steps, self.seconds = device, max(1, warm), steps, seconds
        self.busy = Busy(device)
        self._measuring: contextlib.ExitStack | None = None
        self.started = self.ended = 0.0
        self.done = self.measured = 0

    def step(self, done: int, total: int) -> None:
        """Call after every optimiser step ``done`` of ``total`` (from 1)."""
        self.done = done
        if done == self.warm:
            sync(self.device)
            self.started = time.perf_counter()
            self._measuring = contextlib.ExitStack()
            self._measuring.enter_context(self.busy.measuring())
        elif done > self.warm and not self.over:
            late = time.perf_counter() - self.started >= self.seconds
            if late or done >= self.warm + self.steps or done == total:
                sync(self.device)
                self.ended = time.perf_counter()
                self.measured = done - self.warm
                self._measuring.close()

    @property
    def over(self) -> bool:
        return self.measured > 0

    def crops_per_s(self, batch_size: int) -> float:
        if not self.over:
            raise RuntimeError(f"only {self.done} steps ran: fewer than --warm-steps + 1")
        return self.measured * batch_size / (self.ended - self.started)


def seed_config(batch_size: int) -> ModelConfig:
    """The seed's network: reference blocks, 4 of them, 16 to 128 filters, latent 512."""
    settings = {**LEGACY_SETTINGS, "n_blocks": 4, "base_filters": 16, "latent_dim": 512}
    return ModelConfig("ae", SIZE, **settings, batch_size=batch_size)


def time_loader(project: Project, workers: int, device: torch.device, batch_size: int) -> float:
    """Crops per second the loader delivers onto ``device`` over one epoch."""
    stream = ChunkStream(project, np.arange(len(project)), batch_size, shuffle=True, compact=True)
    batches = loader(stream, workers, device)
    started, count = time.perf_counter(), 0
    for crops in batches:
        to_batch(crops, device, channels_last=False)
        count += len(crops)
    sync(device)
    return count / (time.perf_counter() - started)


def time_train(project: Project, config: ModelConfig, window: Window, args, device) -> float:
    """Steady-state crops per second of napari-nucleae's ``train()``."""
    result = train(
        project,
        config,
        1,
        name=f"seed{config.batch_size}",
        overwrite=True,
        device=device,
        val_fraction=0.0,
        num_workers=args.workers,
        compile=args.compile,
        progress=lambda done, total, message: window.step(done, total),
        should_stop=lambda: window.over,
        on_collapse="warn",
    )
    print(f"train() batch {config.batch_size}: {'; '.join(result.notes) or 'no notes'}")
    return window.crops_per_s(config.batch_size)


def time_plain(project: Project, config: ModelConfig, window: Window, workers: int, device):
    """Steady-state crops per second of a plain fp32 loop of the same network and loader."""
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rows = np.arange(len(project))
    stream = ChunkStream(project, rows, config.batch_size, shuffle=True, compact=True)
    total = stream.n_batches(workers)
    for done, crops in enumerate(loader(stream, workers, device), start=1):
        batch = to_batch(crops, device, channels_last=False)
        loss = F.mse_loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.step(done, total)
        if window.over:
            break
    return window.crops_per_s(config.batch_size)


def time_embed(project: Project, device: torch.device) -> tuple[float, int]:
    """Crops per second of ``embed()`` over every crop, and the batch size it chose."""
    config = seed_config(SEED_BATCH)
    model = LoadedModel(build_model(config).eval(), config, "seed_embed", torch.device("cpu"))
    model.to(device)
    sync(device)
    started = time.perf_counter()
    result = embed(project, model)
    sync(device)
    return len(project) / (time.perf_counter() - started), result.batch_size


# ---------------------------------------------------------------------------- the run
def run(project: Project, args, device: torch.device) -> tuple[list[dict], dict]:
    workers = default_workers(device) if args.workers is None else args.workers
    ours = ModelConfig("ae", SIZE).batch_size

    def window() -> Window:
        return Window(device, args.warm_steps, args.steps, args.seconds)

    loader_rate = time_loader(project, workers, device, SEED_BATCH)
    plain = window()
    plain_rate = time_plain(project, seed_config(SEED_BATCH), plain, workers, device)
    rows = [
        {
            "path": f"loader alone ({workers} workers)",
            "batch": SEED_BATCH,
            "crops_per_s": loader_rate,
        },
        {
            "path": "plain fp32 loop (same network and loader)",
            "batch": SEED_BATCH,
            "crops_per_s": plain_rate,
            "gpu_busy": plain.busy.fraction,
        },
    ]
    trained = {}
    for batch_size in dict.fromkeys([SEED_BATCH, ours]):
        measured = window()
        rate = time_train(project, seed_config(batch_size), measured, args, device)
        trained[batch_size] = (rate, measured.busy.fraction)
        rows.append(
            {
                "path": "napari-nucleae train()",
                "batch": batch_size,
                "crops_per_s": rate,
                "gpu_busy": measured.busy.fraction,
            }
        )
    encode_rate, encode_batch = time_embed(project, device)
    rows.append(
        {"path": "napari-nucleae embed()", "batch": encode_batch, "crops_per_s": encode_rate}
    )
    for row in rows[1:-1]:
        row["vs_plain"] = row["crops_per_s"] / plain_rate
    best = max(trained, key=lambda b: trained[b][0])
    train_rate, busy = trained[best]
    job_s = SEED_EPOCHS * SEED_CROPS / train_rate + SEED_CROPS / encode_rate
    summary = {
        "train_crops_per_s": train_rate,
        "train_batch_size": best,
        "encode_crops_per_s": encode_rate,
        "loader_crops_per_s": loader_rate,
        "gpu_busy_fraction": busy,
        "plain_fp32_crops_per_s": plain_rate,
        "speedup_vs_plain": train_rate / plain_rate,
        "seed_job": f"{SEED_EPOCHS} epochs x {SEED_CROPS:,} crops + one encoding pass",
        "projected_seed_job_s": job_s,
        "projected_seed_job_h": job_s / 3600,
        "targets": TARGETS,
        "loader_workers": workers,
    }
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=128, help="crops in the project")
    parser.add_argument("--work", type=Path, default=None, help="keep (and reuse) the project here")
    parser.add_argument(
        "--workers",
        type=lambda t: None if t == "auto" else int(t),
        default=None,
        help="loader worker processes (auto: train()'s default for the device)",
    )
    parser.add_argument("--warm-steps", type=int, default=1, help="steps before measuring")
    parser.add_argument("--steps", type=int, default=1, help="steps measured at most")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds measured at most")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=COMPILE_MODES[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = select_device(args.device)
    out = args.out or Path(f"benchmarks/results/seed_scale_{device.type}.json")
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        started = time.perf_counter()
        project = seed_project(work / f"seed_scale_{args.crops}", args.crops)
        build_s = time.perf_counter() - started
        rows, summary = run(project, args, device)
    extra = {
        "device": str(device),
        "crops": args.crops,
        "crop_size": SIZE,
        "storage_dtype": "uint8",
        "project_build_s": build_s,
        "warm_steps": args.warm_steps,
        "steps": args.steps,
        "seconds": args.seconds,
        "compile": args.compile,
        "config": seed_config(SEED_BATCH).to_dict(),
        **summary,
    }
    report("seed_scale", rows, out, extra)
    print(
        f"train {summary['train_crops_per_s']:.4g} crops/s (batch {summary['train_batch_size']}, "
        f"{summary['speedup_vs_plain']:.3g}x the plain loop), encode "
        f"{summary['encode_crops_per_s']:.4g} crops/s; the seed's job: "
        f"{summary['projected_seed_job_h']:.3g} h"
    )


if __name__ == "__main__":
    main()
