"""Latent quality: do nuclei close in latent space look alike? Each variant with its defaults
against the PCA baseline on the same crops, side by side in one run.

A labelled set: synthetic nuclei of three phenotypes that differ in size, shape and texture,
mixed 60/30/10, written as TIFFs and ingested through the normal path (classical
segmentation, crops of each size). Every variant is trained with its defaults (``nucleae
train --variant V``) and embedded; the seed's recipe (``--arch reference`` with its plain
optimisation) is measured beside them. Per crop size × number of crops × variant: 10-NN
phenotype accuracy (5-fold cross-validated), k-means ARI (k = 3), validation loss, output
spread (near 0: collapsed), training time. The real BBBC007 images (no labels) give
validation loss and output spread only. The validation loss is the reconstruction MSE on
held-out images (plus the weighted KL term for the VAE).

    python benchmarks/bench_latent_quality.py [--sizes 32 64 128] [--counts 100 1000 10000]
        [--variants ae vae denoising pca reference] [--bbbc007] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from _labelled import labelled_project
from _report import report
from napari_nucleae.core.embed import embed, read_latents
from napari_nucleae.core.ingest import IngestParams, ingest
from napari_nucleae.core.model import LEGACY_SETTINGS, ModelConfig, load_model
from napari_nucleae.core.segment import SegmentParams
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.core.training import PROBE_CROPS, TrainingError, output_spread, train
from napari_nucleae.sample import bbbc007_paths

EPOCHS = 30  # the `nucleae train` default
REFERENCE = {**LEGACY_SETTINGS, "latent_dim": 512}  # the seed's network and recipe


def config_for(variant: str, size: int) -> ModelConfig:
    """The defaults a user gets for ``variant`` (``reference``: the seed's recipe)."""
    if variant == "reference":
        return ModelConfig("ae", size, **REFERENCE)
    return ModelConfig(variant, size)


def separation(latents: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """10-NN label accuracy (5-fold CV) and k-means ARI of latents with known labels."""
    keep = labels >= 0
    z, y = latents[keep], labels[keep]
    folds = int(min(5, np.bincount(y).min()))
    accuracy = cross_val_score(KNeighborsClassifier(10), z, y, cv=folds).mean()
    found = KMeans(len(np.unique(y)), n_init=10, random_state=0).fit_predict(z)
    return float(accuracy), float(adjusted_rand_score(y, found))


def measure(project: Project, variant: str, labels: np.ndarray | None) -> dict:
    """Train ``variant`` with its defaults, embed, and score the latents."""
    config = config_for(variant, project.crop_size)
    name = f"bench-{variant}"
    row: dict = {"variant": variant, "size": project.crop_size, "crops": len(project)}
    started = time.perf_counter()
    try:
        result = train(project, config, EPOCHS, name=name, overwrite=True)
    except TrainingError as err:
        return {**row, "train_s": time.perf_counter() - started, "error": str(err)[:120]}
    row["train_s"] = time.perf_counter() - started
    row["epochs"] = len(result.history)
    row["val_loss"] = float(result.history["val_loss"].min())
    model = load_model(project.model_dir(name), "cpu")
    row["latent"] = model.config.latent_dim
    crops = project.read_crops(np.arange(min(len(project), PROBE_CROPS)))
    row["spread"] = output_spread(model.network, crops, model.device)
    row["restarts"] = sum("restarted" in note for note in result.notes)
    if labels is not None:
        embed(project, name)
        row["knn_acc"], row["kmeans_ari"] = separation(
            np.asarray(read_latents(project, name)), labels
        )
    return row


def bbbc007_project(folder: Path, size: int) -> Project:
    """The 14 real BBBC007 images ingested at crop size ``size`` (reused when there)."""
    path = folder / f"bbbc007-{size}"
    if path.exists():
        return Project.open(path)
    project = Project.create(path, CropParams(size=size))
    params = IngestParams(segment=SegmentParams(method="classical"), crop=CropParams(size))
    ingest(bbbc007_paths(), project, params)
    return project


def keep(rows: list[dict], out: Path) -> None:
    """Print the newest row and keep the rows so far next to ``out`` (a long run may be cut)."""
    print(rows[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument(
        "--variants", nargs="+", default=["reference", "ae", "vae", "denoising", "pca"]
    )
    parser.add_argument("--bbbc007", action="store_true", help="also the real BBBC007 images")
    parser.add_argument("--work", type=Path, default=None, help="keep projects here (reused)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latent_quality.json"))
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for count in args.counts:
            for size in args.sizes:
                folder = work / f"synthetic-{count}"
                project, labels = labelled_project(folder, count, size)
                for variant in args.variants:
                    rows.append({"data": "synthetic", **measure(project, variant, labels)})
                    keep(rows, args.out)
        if args.bbbc007:
            for size in args.sizes:
                project = bbbc007_project(work, size)
                for variant in args.variants:
                    rows.append({"data": "BBBC007", **measure(project, variant, None)})
                    keep(rows, args.out)
    report(
        "latent_quality",
        rows,
        args.out,
        {
            "epochs": EPOCHS,
            "phenotypes": "small round / large elongated / speckled, mixed 60/30/10",
            "metrics": "knn_acc: 10-NN phenotype accuracy, 5-fold CV; kmeans_ari: k-means "
            "(k=3) adjusted Rand index; val_loss: best validation loss (MSE, + KL for vae); "
            "spread: output spread / crop spread (0: collapsed)",
        },
    )


if __name__ == "__main__":
    main()
