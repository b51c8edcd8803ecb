"""A labelled project for latent-quality measurements: synthetic nuclei of known phenotypes,
written as TIFFs and ingested through the normal path (segmentation included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from napari_nucleae.core.ingest import IngestParams, ingest
from napari_nucleae.core.segment import SegmentParams
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.sample import phenotype_nuclei

NUCLEI_PER_IMAGE = 24
IMAGE_SHAPE = (256, 256)


def write_images(folder: Path, n_crops: int, seed: int = 0) -> list[Path]:
    """Enough TIFFs (and ground-truth label/phenotype files) for about ``n_crops`` nuclei."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    n_images = max(1, round(n_crops * 1.1 / NUCLEI_PER_IMAGE))
    for i in range(n_images):
        image, labels, kinds = phenotype_nuclei(IMAGE_SHAPE, NUCLEI_PER_IMAGE, seed=seed + i)
        path = folder / f"img{i:05d}.tif"
        tifffile.imwrite(path, (image * 65535).astype(np.uint16))
        np.save(folder / f"img{i:05d}_truth.npy", labels)
        np.save(folder / f"img{i:05d}_kinds.npy", kinds)
        paths.append(path)
    return paths


def phenotype_of_crops(project: Project) -> np.ndarray:
    """Each crop's true phenotype, looked up at its centroid (-1 where it hit background)."""
    table = project.table(with_features=False)
    out = np.full(len(table), -1, np.int64)
    for path, rows in table.groupby("image_path").indices.items():
        stem = Path(path).with_suffix("")
        truth = np.load(f"{stem}_truth.npy")
        kinds = np.load(f"{stem}_kinds.npy")
        part = table.iloc[rows]
        y = part["centroid_y"].round().astype(int).clip(0, truth.shape[0] - 1)
        x = part["centroid_x"].round().astype(int).clip(0, truth.shape[1] - 1)
        label = truth[y, x]
        out[rows] = np.where(label > 0, kinds[np.maximum(label - 1, 0)], -1)
    return out


def labelled_project(
    folder: Path, n_crops: int, crop_size: int, seed: int = 0
) -> tuple[Project, np.ndarray]:
    """A project of about ``n_crops`` crops (classical segmentation) and their phenotypes;
    one made earlier in ``folder`` is reused."""
    path = folder / f"project{crop_size}"
    if path.exists():
        project = Project.open(path)
        return project, phenotype_of_crops(project)
    images = sorted((folder / "images").glob("img*.tif")) or write_images(
        folder / "images", n_crops, seed
    )
    project = Project.create(path, CropParams(size=crop_size))
    params = IngestParams(segment=SegmentParams(method="classical"), crop=CropParams(crop_size))
    ingest(images, project, params)
    return project, phenotype_of_crops(project)
