"""Autoencoder training and encoding: napari-nucleae's train()/embed() vs a plain PyTorch loop.

Both use the reference architecture on the same synthetic project and device. The baseline is
the common recipe: a map-style Dataset reading one crop per zarr access, a default DataLoader,
fp32 and no channels-last. Ours streams whole chunks, uses AMP and channels-last on CUDA and
writes checkpoints, latents and the MSE column as it goes.

    python benchmarks/bench_autoencoder.py [--n 1024] [--size 64] [--epochs 1] [--repeats 2]
        [--device auto] [--out benchmarks/results/autoencoder.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from _report import report
from napari_nucleae.core.embed import embed
from napari_nucleae.core.model import LEGACY_SETTINGS, ModelConfig, build_model, select_device
from napari_nucleae.core.store import CropParams, Project, from_storage
from napari_nucleae.core.training import train

N_IMAGES = 8


def synthetic_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Textured bright ellipses of varied size, shape, orientation and brightness."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    major = rng.uniform(0.15, 0.35, (n, 1, 1)) * size
    minor = major * rng.uniform(0.45, 1.0, (n, 1, 1))
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / major
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / minor
    inside = 1 / (1 + np.exp(np.clip(8 * (u**2 + v**2 - 1), -50, 50)))
    texture = 1 + 0.2 * rng.standard_normal((n, size, size))
    return np.clip(rng.uniform(0.4, 1.0, (n, 1, 1)) * inside * texture, 0, 1).astype(np.float32)


def make_project(path: Path, n: int, size: int) -> Project:
    project = Project.create(path, CropParams(size=size))
    for i, crops in enumerate(np.array_split(synthetic_crops(n, size), N_IMAGES)):
        table = pd.DataFrame({"image_id": f"image{i}", "label": np.arange(1, len(crops) + 1)})
        project.append({"image_id": f"image{i}"}, crops, table)
    return project


class PerCropDataset(Dataset):
    """The usual map-style dataset: one zarr read per crop."""

    def __init__(self, project: Project):
        self.crops = project.crops

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(from_storage(np.asarray(self.crops[index])))[None]


def baseline_train(
    project: Project, config: ModelConfig, epochs: int, device: torch.device
) -> tuple[torch.nn.Module, float]:
    """Plain fp32 loop; returns the model and the last epoch's mean loss."""
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = DataLoader(PerCropDataset(project), batch_size=config.batch_size, shuffle=True)
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            batch = batch.to(device)
            loss = F.mse_loss(model(batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
    return model, total / count


def baseline_encode(project: Project, model: torch.nn.Module, device: torch.device) -> np.ndarray:
    model.eval()
    loader = DataLoader(PerCropDataset(project), batch_size=64)
    with torch.no_grad():
        return np.concatenate([model.encode(b.to(device)).cpu().numpy() for b in loader])


def warm_up(config: ModelConfig, device: torch.device) -> None:
    """One step outside the timings, so one-time library set-up is charged to neither side."""
    model = build_model(config).to(device)
    batch = torch.rand(config.batch_size, 1, config.crop_size, config.crop_size, device=device)
    model.loss(batch)[0].backward()
    torch.optim.Adam(model.parameters()).step()


def timed(on: torch.device, func, *args, **kwargs):
    """Seconds taken by ``func(*args, **kwargs)`` (GPU work included) and its result."""
    if on.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = func(*args, **kwargs)
    if on.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_once(project: Project, config: ModelConfig, epochs: int, device, name: str) -> dict:
    """Seconds and final training loss of each path (baseline first, then ours)."""
    t_base, (model, base_loss) = timed(device, baseline_train, project, config, epochs, device)
    t_base_enc, base_latents = timed(device, baseline_encode, project, model, device)
    t_ours, result = timed(
        device, train, project, config, epochs, name=name, val_fraction=0.0, device=device
    )
    t_ours_enc, embedded = timed(device, embed, project, name, device=device)
    assert base_latents.shape == (embedded.n_crops, embedded.latent_dim)
    return {
        "baseline": (t_base, t_base_enc, base_loss),
        "ours": (t_ours, t_ours_enc, float(result.history["train_loss"].iloc[-1])),
        "embed_batch_size": embedded.batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1024, help="number of crops")
    parser.add_argument("--size", type=int, default=64, help="crop size in pixels")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/autoencoder.json"))
    args = parser.parse_args()
    device = select_device(args.device)
    # the seed's network and recipe (throughput, not learning: see bench_latent_quality.py)
    config = ModelConfig("ae", args.size, **{**LEGACY_SETTINGS, "latent_dim": 512, "n_blocks": 4})
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project", args.n, args.size)
        warm_up(config, device)
        runs = [
            run_once(project, config, args.epochs, device, f"r{r}") for r in range(args.repeats)
        ]
    rows = []
    for key, method in (
        ("baseline", "plain PyTorch loop (per-crop reads, fp32)"),
        ("ours", "napari-nucleae train()/embed()"),
    ):
        t_train = min(run[key][0] for run in runs)
        t_encode = min(run[key][1] for run in runs)
        rows.append(
            {
                "method": method,
                "train_s": t_train,
                "train_crops_per_s": args.n * args.epochs / t_train,
                "encode_s": t_encode,
                "encode_crops_per_s": args.n / t_encode,
                "final_loss": runs[-1][key][2],
            }
        )
    for row in rows:
        row["train_speedup"] = rows[0]["train_s"] / row["train_s"]
        row["encode_speedup"] = rows[0]["encode_s"] / row["encode_s"]
    report(
        "autoencoder",
        rows,
        args.out,
        {
            "n": args.n,
            "crop_size": args.size,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "timing": "best of repeats; raw seconds (train, encode, loss) in runs",
            "device": str(device),
            "config": config.to_dict(),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
