"""Shared fixtures: seeded synthetic nuclei and the real BBBC007 sample."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "nucleae-numba"))

from napari_nucleae.sample import synthetic_nuclei  # noqa: E402


@pytest.fixture(scope="session")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """A 256×256 image of 24 separated nuclei and its ground-truth labels."""
    return synthetic_nuclei(shape=(256, 256), n_nuclei=24, seed=3)
