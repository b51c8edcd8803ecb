"""Shared fixtures: seeded synthetic nuclei and the real BBBC007 sample."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "nucleae-numba"))

from napari_nucleae.core.crop import crop_nuclei  # noqa: E402
from napari_nucleae.core.embed import embed  # noqa: E402
from napari_nucleae.core.model import ModelConfig  # noqa: E402
from napari_nucleae.core.store import CropParams, Project  # noqa: E402
from napari_nucleae.core.training import train  # noqa: E402
from napari_nucleae.sample import phenotype_nuclei, synthetic_nuclei  # noqa: E402


@pytest.fixture(scope="session")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """A 256×256 image of 24 separated nuclei and its ground-truth labels."""
    return synthetic_nuclei(shape=(256, 256), n_nuclei=24, seed=3)


@pytest.fixture(scope="session")
def synthetic_dtypes(synthetic) -> dict[str, np.ndarray]:
    """The synthetic image as float64 spanning -500 to 70000, as int32 and as uint16."""
    image, _ = synthetic
    return {
        "float64": -500 + image.astype(np.float64) * 70500,
        "int32": (image * 2e6 - 1e5).astype(np.int32),
        "uint16": (image * 60000).astype(np.uint16),
    }


class RecordedReads:
    """An array-like (like zarr or h5py) that records the shape of every read."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads: list[tuple[int, ...]] = []

    def __getitem__(self, key) -> np.ndarray:
        part = np.asarray(self.array[key])
        self.reads.append(part.shape)
        return part

    @property
    def largest_read(self) -> int:
        return max(int(np.prod(shape)) for shape in self.reads)


@pytest.fixture
def recorded_reads() -> type[RecordedReads]:
    """``recorded_reads(array)``: an array-like that records the shape of every read."""
    return RecordedReads


def random_crop_project(path, n: int, n_images: int) -> Project:
    """A 32-px project of ``n`` random crops of varied brightness from ``n_images`` images."""
    project = Project.create(path, CropParams(size=32))
    rng = np.random.default_rng(0)
    pixels = rng.random((n, 32, 32), dtype=np.float32) * rng.random((n, 1, 1), dtype=np.float32)
    for i, crops in enumerate(np.array_split(pixels, n_images)):
        table = pd.DataFrame({"image_id": f"img{i}", "label": np.arange(1, len(crops) + 1)})
        project.append({"image_id": f"img{i}"}, crops, table)
    return project


@pytest.fixture
def random_project():
    """``random_project(path, n, n_images)``: see :func:`random_crop_project`."""
    return random_crop_project


def phenotype_project(path, n_images: int = 6, size: int = 32) -> tuple[Project, np.ndarray]:
    """Crops of synthetic nuclei of three phenotypes, cropped at their true labels, with their
    measurements and an ``image_path`` per image; returns the project and each crop's kind."""
    project = Project.create(path, CropParams(size=size))
    kinds = []
    for i in range(n_images):
        image, labels, kind = phenotype_nuclei((256, 256), 24, seed=100 + i)
        result = crop_nuclei(image, labels, project.meta.crop)
        table = result.table.assign(image_id=f"img{i}", image_path=f"images/img{i}.tif")
        project.append({"image_id": f"img{i}"}, result.crops, table)
        kinds.append(kind[table["label"].to_numpy() - 1])
    return project, np.concatenate(kinds)


@pytest.fixture(scope="session")
def phenotypes():
    """``phenotypes(path, n_images=6, size=32)``: see :func:`phenotype_project`."""
    return phenotype_project


@pytest.fixture(scope="session")
def labelled_template(tmp_path_factory) -> tuple[Project, np.ndarray]:
    """A phenotype project of six images with a PCA model and its latents, built once."""
    project, kinds = phenotype_project(tmp_path_factory.mktemp("labelled") / "project")
    train(project, ModelConfig("pca", 32, latent_dim=8), 1, device="cpu")
    embed(project, device="cpu")
    return project, kinds


@pytest.fixture
def labelled(labelled_template, tmp_path) -> tuple[Project, np.ndarray]:
    """A private copy of the labelled project (PCA latents) and each crop's true phenotype."""
    project, kinds = labelled_template
    shutil.copytree(project.path, tmp_path / "labelled")
    return Project.open(tmp_path / "labelled"), kinds
