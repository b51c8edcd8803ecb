"""Fixtures for the model, training and embedding tests: small projects of synthetic crops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit

from napari_nucleae.core.store import CropParams, Project


def blob_crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Soft bright ellipses of varied size, elongation, orientation and brightness."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    major = rng.uniform(0.15, 0.35, (n, 1, 1)) * size
    minor = major * rng.uniform(0.45, 1.0, (n, 1, 1))
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    shift = rng.uniform(-2, 2, (n, 2, 1, 1))
    x, y = xx - shift[:, 0], yy - shift[:, 1]
    u = (x * np.cos(theta) + y * np.sin(theta)) / major
    v = (-x * np.sin(theta) + y * np.cos(theta)) / minor
    brightness = rng.uniform(0.5, 1.0, (n, 1, 1))
    return (brightness * expit(8 * (1 - u**2 - v**2))).astype(np.float32)


def fill_project(project: Project, crops: np.ndarray, n_images: int) -> Project:
    """Append ``crops`` as ``n_images`` source images of (nearly) equal size."""
    for i, part in enumerate(np.array_split(crops, n_images)):
        table = pd.DataFrame({"image_id": f"img{i}", "label": np.arange(1, len(part) + 1)})
        project.append({"image_id": f"img{i}"}, part, table)
    return project


MakeProject = Callable[..., Project]


@pytest.fixture
def make_project(tmp_path: Path) -> MakeProject:
    """``make_project(n=480, n_images=4, size=32, crops=None, storage_dtype="uint16")``."""
    counter = iter(range(1000))

    def make(
        n: int = 480,
        n_images: int = 4,
        size: int = 32,
        crops: np.ndarray | None = None,
        storage_dtype: str = "uint16",
        seed: int = 0,
    ) -> Project:
        crops = blob_crops(n, size, seed) if crops is None else crops
        params = CropParams(size=size, storage_dtype=storage_dtype)
        project = Project.create(tmp_path / f"project{next(counter)}", params)
        return fill_project(project, crops, n_images)

    return make


@pytest.fixture(scope="session")
def blobs() -> Callable[..., np.ndarray]:
    """``blobs(n, size=32, seed=0)``: synthetic crops without a project."""
    return blob_crops


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch sees neither a CUDA GPU nor Apple's MPS."""
    from napari_nucleae.core import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(model, "_mps_available", lambda: False)
