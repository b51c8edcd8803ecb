"""Latents → 2-D projections (UMAP, t-SNE, PCA) and cluster labels.

Cosine metric: rows are L2-normalised first; on unit vectors the Euclidean distance
``sqrt(2 - 2 cos)`` is a monotone function of the cosine distance, so neighbourhoods are the
same and the PCA pre-reduction stays valid.

Large N (UMAP, t-SNE): above ``max_fit`` rows the method is fitted on a seeded random
subsample of ``max_fit`` rows and every other row is placed in chunks against the fitted
embedding (``UMAP.transform``; openTSNE's ``TSNEEmbedding.transform``, which optimises each new
point among its nearest fitted neighbours). This bounds the nearest-neighbour graph and
optimisation to the subsample (memory and time grow linearly in N afterwards); the placed
points do not move the fitted ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from .errors import InputError
from .explore import check_metric, l2_normalize, sample_rows
from .progress import Progress

ProjectionMethod = Literal["umap", "tsne", "pca"]
PREFIXES = {"umap": "UMAP", "tsne": "TSNE", "pca": "PC"}
PROJECTIONS: tuple[str, ...] = tuple(PREFIXES)
PROJECTION_NAMES = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}  # as shown to users
CLUSTER_METHODS: tuple[str, ...] = ("kmeans", "hdbscan")
CLUSTER_NAMES = {"kmeans": "k-means", "hdbscan": "HDBSCAN"}
MAX_FIT = 200_000  # UMAP / t-SNE: rows fitted; the others are placed on the fitted map
MINIBATCH_ABOVE = 50_000
TRANSFORM_CHUNK = 50_000


def projection_columns(
    method: ProjectionMethod, components: tuple[int, int] = (0, 1)
) -> tuple[str, str]:
    """Feature-table column names: ``UMAP_0, UMAP_1`` / ``TSNE_0, TSNE_1`` / ``PC_i, PC_j``."""
    if method not in PREFIXES:
        raise InputError(f"projection method must be one of {tuple(PREFIXES)}, got {method!r}")
    i, j = components if method == "pca" else (0, 1)
    return f"{PREFIXES[method]}_{i}", f"{PREFIXES[method]}_{j}"


def project_latents(
    latents: np.ndarray,
    method: ProjectionMethod = "umap",
    *,
    metric: str = "euclidean",
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    perplexity: float = 30.0,
    components: tuple[int, int] = (0, 1),
    pca_first: int | None = 50,
    seed: int | None = 0,
    max_fit: int = MAX_FIT,
    n_jobs: int | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """2-D coordinates ``(N, 2)`` float32 of the latents.

    ``pca``: the ``components`` pair of principal components. ``umap`` / ``tsne``: when
    D > ``pca_first`` and N > ``pca_first`` the latents are first reduced to ``pca_first``
    principal components (``None`` disables this). Seeded, hence deterministic for a given
    input. t-SNE uses openTSNE with ``n_jobs`` threads (results are reproducible for a fixed
    thread count; by default one thread when seeded, every core when ``seed`` is None), or
    scikit-learn (on every row) when openTSNE is not installed; its perplexity is capped at
    (N - 1) / 3. Past ``max_fit`` rows UMAP and openTSNE are fitted on a seeded subsample and
    the other rows placed against it. A seeded UMAP runs single-threaded (umap-learn
    disables its parallelism for reproducibility); ``seed=None`` runs it on all cores,
    several times faster on a many-core machine, with layouts that differ slightly from run
    to run.
    """
    projection_columns(method, components)
    check_metric(metric)
    x = _as_matrix(latents, minimum=4 if method != "pca" else 2)
    if method != "pca" and max_fit < 4:
        raise InputError(f"max_fit must be at least 4, got {max_fit}")
    report = progress or (lambda done, total, message: None)
    if metric == "cosine":
        x = l2_normalize(x)
    if method == "pca":
        report(0, 1, "PCA")
        out = _pca(x, components, seed)
    else:
        if pca_first and x.shape[1] > pca_first and len(x) > pca_first:
            report(0, 2, f"PCA to {pca_first} dimensions")
            x = _pca(x, tuple(range(pca_first)), seed)
        report(1, 2, method.upper())
        if method == "umap":
            out = _umap(x, n_neighbors, min_dist, seed, max_fit, report)
        else:
            threads = n_jobs if n_jobs is not None else _threads(seed)
            out = _tsne(x, perplexity, seed, threads, max_fit, report)
    report(1, 1, "done")
    return np.ascontiguousarray(out, dtype=np.float32)


def _as_matrix(latents: np.ndarray, minimum: int) -> np.ndarray:
    x = np.asarray(latents)
    if x.ndim != 2:
        raise InputError(f"latents must be a 2-D (N, D) array, got shape {x.shape}")
    if len(x) < minimum:
        raise InputError(f"at least {minimum} latents are needed, got {len(x)}")
    if not np.isfinite(x).all():
        raise InputError("latents contain NaN or infinite values")
    return x.astype(np.float32, copy=False)


def _pca(x: np.ndarray, components: Sequence[int], seed: int | None) -> np.ndarray:
    from sklearn.decomposition import PCA

    n_components = max(components) + 1
    if min(components) < 0 or n_components > min(x.shape):
        raise InputError(
            f"principal components {tuple(components)} need 0 <= component < {min(x.shape)}"
        )
    scores = PCA(n_components=n_components, random_state=seed).fit_transform(x)
    return scores[:, list(components)]


def _threads(seed: int | None) -> int:
    """One thread for a seeded (reproducible) run, every core (-1) for an unseeded one."""
    return 1 if seed is not None else -1


Placer = Callable[[np.ndarray], np.ndarray]


def _fit_and_place(
    x: np.ndarray,
    fit: Callable[[np.ndarray], tuple[np.ndarray, Placer]],
    max_fit: int,
    seed: int | None,
    report: Progress,
) -> np.ndarray:
    """``fit`` all rows, or past ``max_fit`` rows a seeded subsample and place the rest."""
    if len(x) <= max_fit:
        return fit(x)[0]
    rows = sample_rows(len(x), max_fit, seed)
    rest = np.setdiff1d(np.arange(len(x)), rows)
    out = np.empty((len(x), 2), dtype=np.float32)
    out[rows], place = fit(x[rows])
    for done in range(0, len(rest), TRANSFORM_CHUNK):
        report(done, len(rest), "placing the remaining points")
        chunk = rest[done : done + TRANSFORM_CHUNK]
        out[chunk] = place(x[chunk])
    return out


def _umap(
    x: np.ndarray,
    n_neighbors: int,
    min_dist: float,
    seed: int | None,
    max_fit: int,
    report: Progress,
) -> np.ndarray:
    import umap

    model = umap.UMAP(
        n_neighbors=max(2, min(n_neighbors, min(len(x), max_fit) - 1)),
        min_dist=min_dist,
        n_components=2,
        random_state=seed,
        n_jobs=_threads(seed),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*")
        return _fit_and_place(
            x, lambda rows: (model.fit_transform(rows), model.transform), max_fit, seed, report
        )


def _tsne(
    x: np.ndarray,
    perplexity: float,
    seed: int | None,
    n_jobs: int,
    max_fit: int,
    report: Progress,
) -> np.ndarray:
    """openTSNE (fit a subsample past ``max_fit``); scikit-learn on every row without it."""
    perplexity = min(perplexity, (min(len(x), max_fit) - 1) / 3)
    try:
        from openTSNE import TSNE
    except ImportError:
        from sklearn.manifold import TSNE as SkTSNE
        from threadpoolctl import threadpool_limits

        model = SkTSNE(perplexity=perplexity, random_state=seed, init="pca", n_jobs=n_jobs)
        with threadpool_limits(limits=n_jobs if n_jobs > 0 else None, user_api="openmp"):
            return model.fit_transform(x)

    def fit(rows: np.ndarray) -> tuple[np.ndarray, Placer]:
        embedding = TSNE(perplexity=perplexity, random_state=seed, n_jobs=n_jobs).fit(rows)
        return np.asarray(embedding), lambda new: np.asarray(embedding.transform(new))

    return _fit_and_place(x, fit, max_fit, seed, report)


def cluster_latents(
    latents: np.ndarray,
    method: Literal["kmeans", "hdbscan"] = "kmeans",
    *,
    n_clusters: int = 8,
    min_cluster_size: int = 15,
    metric: str = "euclidean",
    seed: int = 0,
) -> np.ndarray:
    """Integer cluster labels ``(N,)``; HDBSCAN marks noise as -1.

    k-means (MiniBatchKMeans above 50 000 rows) or scikit-learn's HDBSCAN. HDBSCAN costs
    roughly O(N^2) in high dimensions: for large N cluster the 2-D projection instead.
    """
    check_metric(metric)
    x = _as_matrix(latents, minimum=2)
    if metric == "cosine":
        x = l2_normalize(x)
    if method == "kmeans":
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if not 1 <= n_clusters <= len(x):
            raise InputError(f"n_clusters must be between 1 and {len(x)}, got {n_clusters}")
        model = (
            MiniBatchKMeans(n_clusters, random_state=seed, batch_size=4096, n_init="auto")
            if len(x) > MINIBATCH_ABOVE
            else KMeans(n_clusters, random_state=seed, n_init="auto")
        )
        return model.fit_predict(x).astype(np.int64)
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        if min_cluster_size < 2:
            raise InputError(f"min_cluster_size must be at least 2, got {min_cluster_size}")
        model = HDBSCAN(min_cluster_size=min(min_cluster_size, len(x)), copy=True)
        return model.fit_predict(x).astype(np.int64)
    raise InputError(f"clustering method must be one of {CLUSTER_METHODS}, got {method!r}")


def as_feature_columns(
    projection: np.ndarray | None = None,
    method: ProjectionMethod = "umap",
    components: tuple[int, int] = (0, 1),
    clusters: np.ndarray | None = None,
) -> pd.DataFrame:
    """Feature-table columns: float projection columns and a categorical ``cluster``."""
    columns: dict[str, object] = {}
    if projection is not None:
        projection = np.asarray(projection, dtype=np.float64)
        for name, values in zip(projection_columns(method, components), projection.T, strict=True):
            columns[name] = values
    if clusters is not None:
        columns["cluster"] = pd.Categorical(np.asarray(clusters))
    return pd.DataFrame(columns)
