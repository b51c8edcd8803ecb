"""2-D projections at scale: ``project_latents`` vs the same library with its defaults.

PYTHONPATH=src:benchmarks python benchmarks/bench_projection.py [--sizes 10000 100000]
    [--methods umap tsne pca] [--dim 512] [--tsne-jobs 1] [--timeout 1200]

Synthetic clustered float32 latents (as in ``bench_represent.py``):

- ours: ``project.project_latents(x, method, seed=0)`` as ``nucleae project`` calls it: PCA to
  50 dimensions first (UMAP, t-SNE); UMAP seeded (single-threaded); t-SNE through openTSNE
  with ``--tsne-jobs`` threads; above 200,000 rows both are fitted on a 200,000-row subsample
  with every other row placed by ``UMAP.transform`` / ``TSNEEmbedding.transform``;
  for UMAP also "ours, parallel"
  (``seed=None``, ``nucleae project --parallel``): the same path on all cores;
- baseline: the library on the raw latents with its defaults: ``umap.UMAP().fit_transform``
  (unseeded, so parallel), ``openTSNE.TSNE(n_jobs=--tsne-jobs).fit``,
  ``sklearn PCA(n_components=2).fit_transform``.

Each run is a fresh process that first calls the same function on 6,000 rows (untimed), so
imports and numba compilation are not in the timings. A run past ``--timeout`` is stopped
and reported as such. ``knn_accuracy``: a 10-nearest-neighbour classifier of the true cluster
in the 2-D embedding (half of a 20,000-point sample fits, half is scored), a check that the
faster path keeps the clusters apart.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _isolate import isolated
from _report import report
from bench_represent import make_latents
from napari_nucleae.core.projection import project_latents

WARMUP_ROWS = 6000  # above 4096, where UMAP switches to (numba-compiled) NN-descent
CHECK_ROWS = 20_000
PARALLEL = "ours, parallel"  # seed=None: UMAP on all cores (nucleae project --parallel)


def ours_runner(method: str, jobs: int, seed: int | None = 0) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        return project_latents(x, method, seed=seed, n_jobs=jobs)

    return run


def baseline_runner(method: str, jobs: int) -> Callable[[np.ndarray], np.ndarray]:
    if method == "umap":
        import umap

        return lambda x: umap.UMAP().fit_transform(x)
    if method == "tsne":
        from openTSNE import TSNE

        return lambda x: np.asarray(TSNE(n_jobs=jobs).fit(x))
    from sklearn.decomposition import PCA

    return lambda x: PCA(n_components=2).fit_transform(x)


def knn_accuracy(embedding: np.ndarray, labels: np.ndarray) -> float:
    """10-NN accuracy of the true cluster in 2-D on a seeded sample (half fit, half scored)."""
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    sample = rng.permutation(len(labels))[:CHECK_ROWS]
    fit, test = sample[::2], sample[1::2]
    model = KNeighborsClassifier(10).fit(embedding[fit], labels[fit])
    return float(model.score(embedding[test], labels[test]))


def measure(side: str, method: str, n: int, dim: int, clusters: int, jobs: int) -> dict:
    """Time one projection after an untimed warm-up on the first rows."""
    x, labels = make_latents(n, dim, clusters)
    if side == "baseline":
        run = baseline_runner(method, jobs)
    else:
        run = ours_runner(method, jobs, None if side == PARALLEL else 0)
    warm = x[:WARMUP_ROWS]
    if side != "baseline" and method == "umap":  # also compile the transform path
        project_latents(warm, "umap", seed=0, max_fit=WARMUP_ROWS - 1000)
    else:
        run(warm)
    start = time.perf_counter()
    embedding = run(x)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "knn_accuracy": knn_accuracy(embedding, labels)}


def row(side: str, method: str, n: int, outcome: dict, timeout: float) -> dict:
    base = {"method": method, "side": side, "n": n}
    if outcome["stopped"]:
        return {**base, "seconds": f"> {timeout:.0f} (stopped)"}
    return {
        **base,
        "seconds": outcome["seconds"],
        "points_per_s": n / outcome["seconds"],
        "knn_accuracy": outcome["knn_accuracy"],
        "peak_rss_gb": outcome["peak_rss_gb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--methods", nargs="+", default=["pca", "umap", "tsne"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--tsne-jobs", type=int, default=1, help="openTSNE threads, both sides")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument(
        "--sides",
        nargs="+",
        default=["baseline", "ours", "parallel"],
        choices=["baseline", "ours", "parallel"],
        help="which runs to make (parallel: UMAP only)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "projection.json"
    )
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nucleae-numba"))
    rows = []
    for method in args.methods:
        for n in args.sizes:
            names = {"baseline": "baseline", "ours": "ours", "parallel": PARALLEL}
            sides = [names[s] for s in args.sides if s != "parallel" or method == "umap"]
            for side in sides:
                job = (side, method, n, args.dim, args.clusters, args.tsne_jobs)
                rows.append(
                    row(
                        side, method, n, isolated(measure, *job, timeout=args.timeout), args.timeout
                    )
                )
                print(rows[-1], flush=True)
    extra = {"dim": args.dim, "clusters": args.clusters, "tsne_jobs": args.tsne_jobs}
    report("projection", rows, args.out, extra)


if __name__ == "__main__":
    main()
