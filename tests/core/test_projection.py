import importlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from napari_nucleae.core.errors import InputError
from napari_nucleae.core.projection import (
    as_feature_columns,
    cluster_latents,
    project_latents,
    projection_columns,
)

# numba compiles UMAP on first use; a persistent cache makes later runs fast
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nucleae-numba"))


@pytest.fixture(scope="module")
def separated_blobs() -> tuple[np.ndarray, np.ndarray]:
    x, labels = make_blobs(
        n_samples=240,
        n_features=16,
        centers=4,
        cluster_std=0.5,
        center_box=(-10, 10),
        random_state=0,
    )
    return x.astype(np.float32), labels


def test_projection_column_names():
    assert projection_columns("umap") == ("UMAP_0", "UMAP_1")
    assert projection_columns("tsne", (3, 4)) == ("TSNE_0", "TSNE_1")
    assert projection_columns("pca", (1, 2)) == ("PC_1", "PC_2")
    with pytest.raises(InputError):
        projection_columns("mds")


def test_pca_pair_matches_sklearn_components_up_to_sign(separated_blobs):
    x, _ = separated_blobs
    coords = project_latents(x, "pca", components=(1, 2))
    reference = PCA(n_components=3).fit_transform(x)[:, 1:3]
    assert coords.shape == (len(x), 2) and coords.dtype == np.float32
    for j in range(2):
        sign = np.sign(coords[:, j] @ reference[:, j])
        np.testing.assert_allclose(sign * coords[:, j], reference[:, j], rtol=1e-3, atol=1e-3)
    with pytest.raises(InputError):
        project_latents(x, "pca", components=(0, 16))


def test_pca_cosine_ignores_row_scale(separated_blobs):
    x, _ = separated_blobs
    scaled = x * np.random.default_rng(0).uniform(0.5, 3, size=(len(x), 1)).astype(np.float32)
    np.testing.assert_allclose(
        project_latents(x, "pca", metric="cosine"),
        project_latents(scaled, "pca", metric="cosine"),
        atol=1e-4,
    )


def test_tsne_is_finite_and_deterministic(separated_blobs):
    x, labels = separated_blobs
    first = project_latents(x[:120], "tsne", perplexity=20, seed=3)
    again = project_latents(x[:120], "tsne", perplexity=20, seed=3)
    assert first.shape == (120, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    clusters = cluster_latents(first, n_clusters=4)
    assert adjusted_rand_score(labels[:120], clusters) > 0.9


def test_tsne_falls_back_to_sklearn_without_opentsne(separated_blobs, monkeypatch):
    monkeypatch.setitem(sys.modules, "openTSNE", None)  # makes the import fail
    x, labels = separated_blobs
    coords = project_latents(x[:80], "tsne", perplexity=10)
    assert coords.shape == (80, 2) and np.isfinite(coords).all()
    assert adjusted_rand_score(labels[:80], cluster_latents(coords, n_clusters=4)) > 0.9


LIBRARY_OPTIONS = {"umap": {"n_neighbors": 10}, "tsne": {"perplexity": 20}}


@pytest.mark.parametrize("method", ["umap", "tsne"])
def test_projection_places_points_beyond_the_fit_sample_deterministically(separated_blobs, method):
    x, labels = separated_blobs
    options = LIBRARY_OPTIONS[method]
    steps = []
    first = project_latents(
        x,
        method,
        seed=1,
        max_fit=160,
        progress=lambda done, total, message: steps.append(message),
        **options,
    )
    again = project_latents(x, method, seed=1, max_fit=160, **options)
    assert first.shape == (len(x), 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert "placing the remaining points" in steps
    assert adjusted_rand_score(labels, cluster_latents(first, n_clusters=4)) > 0.9


@pytest.mark.parametrize(("method", "library"), [("umap", "umap.UMAP"), ("tsne", "openTSNE.TSNE")])
def test_unseeded_projections_run_on_all_cores_and_still_separate_clusters(
    separated_blobs, monkeypatch, method, library
):
    module, name = library.split(".")
    cls = getattr(importlib.import_module(module), name)
    made = []
    original = cls.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", spy)
    x, labels = separated_blobs
    out = project_latents(x, method, seed=None, **LIBRARY_OPTIONS[method])
    assert made[-1]["random_state"] is None and made[-1]["n_jobs"] == -1
    assert adjusted_rand_score(labels, cluster_latents(out, n_clusters=4)) > 0.9
    project_latents(x[:120], method, seed=3, **LIBRARY_OPTIONS[method])
    assert made[-1]["random_state"] == 3 and made[-1]["n_jobs"] == 1


def test_projection_rejects_bad_latents():
    with pytest.raises(InputError):
        project_latents(np.zeros(10), "pca")
    with pytest.raises(InputError):
        project_latents(np.full((10, 3), np.nan), "pca")
    with pytest.raises(InputError):
        project_latents(np.zeros((3, 3)), "umap")
    with pytest.raises(InputError):
        project_latents(np.zeros((10, 3)), "pca", metric="manhattan")


@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
def test_clustering_recovers_separated_blobs(separated_blobs, method):
    x, labels = separated_blobs
    found = cluster_latents(x, method, n_clusters=4, min_cluster_size=20)
    assert found.dtype == np.int64 and found.shape == labels.shape
    assert adjusted_rand_score(labels, found) > 0.9


def test_clustering_cosine_and_bad_arguments(separated_blobs):
    x, labels = separated_blobs
    found = cluster_latents(x, n_clusters=4, metric="cosine", seed=2)
    assert adjusted_rand_score(labels, found) > 0.9
    with pytest.raises(InputError):
        cluster_latents(x, n_clusters=0)
    with pytest.raises(InputError):
        cluster_latents(x, "spectral")


def test_as_feature_columns():
    frame = as_feature_columns(np.ones((3, 2)), "pca", (0, 2), clusters=np.array([0, -1, 0]))
    assert list(frame.columns) == ["PC_0", "PC_2", "cluster"]
    assert frame["PC_0"].dtype == np.float64
    assert isinstance(frame["cluster"].dtype, pd.CategoricalDtype)
