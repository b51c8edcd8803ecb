"""Encoding at scale: ``embed`` streaming a project vs the same model over crops held in memory.

PYTHONPATH=src:benchmarks python benchmarks/bench_embed.py [--sizes 100000 1000000]
    [--crop-size 64] [--filters 4] [--timeout 3600]

What is measured is the data path of encoding, so both sides run the same network through the
same ``LoadedModel.latents_and_mse`` (latent + reconstruction MSE per crop) with the same
batch size. The network has the reference shape (4 blocks, latent 512) with few filters
(``--filters``) so that a CPU gets through 1M crops; it is trained for one epoch on 2,048 crops
of its own small project, then loaded from its checkpoint folder.

- ours: ``embed(project, checkpoint)``, as ``nucleae embed`` runs it: whole zarr chunks read
  ahead in a thread, latents written to zarr block by block, the MSE stored as a feature;
- baseline: every crop read into memory at once (in its uint16 storage form, converted batch
  by batch), latents collected in a list, concatenated and written to zarr once.

The project of N synthetic crops (``bench_autoencoder``'s textured ellipses) is built once per N
outside the timings. Each run is a fresh process, so ``peak_rss_gb`` is that run's own peak.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from _isolate import isolated
from _report import report
from bench_autoencoder import synthetic_crops
from napari_nucleae.core.embed import default_batch_size, embed
from napari_nucleae.core.model import ModelConfig, load_model
from napari_nucleae.core.store import CropParams, Project, from_storage
from napari_nucleae.core.training import train

BLOCK = 10_000  # crops generated and appended at a time while building a project
MODEL_CROPS = 2048
OURS = "ours: embed (streaming)"
BASELINE = "baseline: all crops in memory"


def build_project(path: Path, n: int, size: int) -> Project:
    """A project of ``n`` synthetic crops, appended ``BLOCK`` at a time (one image each)."""
    project = Project.create(path, CropParams(size=size))
    for i, start in enumerate(range(0, n, BLOCK)):
        crops = synthetic_crops(min(BLOCK, n - start), size, seed=i)
        table = pd.DataFrame({"image_id": f"image{i}", "label": np.arange(1, len(crops) + 1)})
        project.append({"image_id": f"image{i}"}, crops, table)
    return project


def train_model(path: Path, size: int, filters: int) -> Path:
    """Train the benchmark network for one epoch on a small project; its checkpoint folder."""
    project = build_project(path, MODEL_CROPS, size)
    config = ModelConfig(
        "ae",
        crop_size=size,
        base_filters=filters,
        arch="reference",
        n_blocks=4,
        latent_dim=512,
        min_steps=0,
    )
    train(project, config, 1, name="bench", val_fraction=0.0, device="cpu", on_collapse="warn")
    return project.model_dir("bench")


def ours(project_path: Path, model_path: Path) -> dict:
    project = Project.open(project_path)
    start = time.perf_counter()
    result = embed(project, model_path, device="cpu")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "batch_size": result.batch_size,
        "mse_mean": float(result.mse.mean()),
    }


def baseline(project_path: Path, model_path: Path) -> dict:
    project = Project.open(project_path)
    model = load_model(model_path, "cpu", crop_size=project.crop_size)
    batch = default_batch_size(torch.device("cpu"), project.crop_size)
    start = time.perf_counter()
    stored = np.asarray(project.crops[:])
    latents, errors = [], []
    for i in range(0, len(stored), batch):
        z, mse = model.latents_and_mse(from_storage(stored[i : i + batch]))
        latents.append(z)
        errors.append(mse)
    everything = np.concatenate(latents)
    out = zarr.open_array(
        str(project_path / "baseline_latents.zarr"),
        mode="w",
        shape=everything.shape,
        chunks=(int(project.crops.chunks[0]), everything.shape[1]),
        dtype="float32",
    )
    out[:] = everything
    seconds = time.perf_counter() - start
    shutil.rmtree(project_path / "baseline_latents.zarr")
    return {
        "seconds": seconds,
        "batch_size": batch,
        "mse_mean": float(np.concatenate(errors).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--filters", type=int, default=4, help="filters of the first block")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (temp)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "embed.json"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = train_model(Path(tmp) / "model-project", args.crop_size, args.filters)
        for n in args.sizes:
            path = Path(tmp) / f"project-{n}"
            build_project(path, n, args.crop_size)
            for method, func in ((BASELINE, baseline), (OURS, ours)):
                outcome = isolated(func, path, model, timeout=args.timeout)
                row = {"method": method, "n": n, "peak_rss_gb": outcome["peak_rss_gb"]}
                if outcome["stopped"]:
                    row["seconds"] = f"> {args.timeout:.0f} (stopped)"
                else:
                    row.update(
                        seconds=outcome["seconds"],
                        crops_per_s=n / outcome["seconds"],
                        mse_mean=outcome["mse_mean"],
                    )
                rows.append(row)
                print(row, flush=True)
            shutil.rmtree(path)
    extra = {"crop_size": args.crop_size, "filters": args.filters, "device": "cpu"}
    report("embed", rows, args.out, extra)


if __name__ == "__main__":
    main()
