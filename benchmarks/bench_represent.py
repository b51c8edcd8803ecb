"""Representatives at scale: geometric median + top-k for both metrics.

PYTHONPATH=src:benchmarks python benchmarks/bench_represent.py [--sizes 10000 100000]
    [--dim 512] [--k 100] [--timeout 900]

Synthetic clustered float32 latents (``--clusters`` Gaussian clusters in a 16-D subspace,
plus noise). Both sides compute the geometric median of all rows and the ``k`` rows nearest
it by Euclidean distance and by cosine similarity:

- ours: ``represent.representatives(x, centers=("geomedian",), metrics=(...), k=k)``, chunked
  Weiszfeld passes in float32 BLAS with exact float64 repair, chunked top-k merges;
- baseline: the textbook Weiszfeld loop on a float64 copy (``norm(x - y)`` per iteration,
  stop when a step is below ``tol`` x the mean distance, ``tol=1e-7``), then ``np.argsort``
  of the full distance and similarity arrays.

Each side runs in a fresh process: ``peak_rss_gb`` is that process's peak, including the input
(``input_gb``); ``above_input_gb`` is the peak minus the resident size once the input was
made. ``objective`` is the sum of distances to the returned median (float64, the same
evaluator for both); ``top_k_overlap`` compares the two rankings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _isolate import GB, current_rss, isolated
from _report import report
from napari_nucleae.core.represent import representatives

BLOCK = 8192  # rows per block when generating and scoring (small: outside the peak)
METRICS = ("euclidean", "cosine")


def make_latents(
    n: int, dim: int, clusters: int, rank: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded float32 latents and their cluster labels: Gaussian clusters of unequal spread in
    a ``rank``-dimensional subspace plus small isotropic noise, made a block at a time."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (clusters, rank)).astype(np.float32)
    scales = rng.uniform(0.2, 1.0, clusters).astype(np.float32)
    basis = rng.normal(0, 1, (rank, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    for start in range(0, n, BLOCK):
        rows = min(BLOCK, n - start)
        label = labels[start : start + rows]
        z = centers[label] + scales[label, None] * rng.standard_normal((rows, rank), np.float32)
        noise = rng.standard_normal((rows, dim), dtype=np.float32)
        x[start : start + rows] = z @ basis + np.float32(0.3) * noise
    return x, labels


def objective(x: np.ndarray, y: np.ndarray) -> float:
    """Sum of Euclidean distances from the rows to ``y``, in float64 blocks."""
    return sum(
        float(np.linalg.norm(x[s : s + BLOCK].astype(np.float64) - y, axis=1).sum())
        for s in range(0, len(x), BLOCK)
    )


def weiszfeld(x: np.ndarray, tol: float = 1e-7, max_iter: int = 1000) -> tuple[np.ndarray, int]:
    """The textbook Weiszfeld iteration from the mean; returns the median and iterations."""
    x = x.astype(np.float64)
    y = x.mean(axis=0)
    for iteration in range(1, max_iter + 1):
        d = np.linalg.norm(x - y, axis=1)
        w = 1 / np.maximum(d, 1e-12)
        new = w @ x / w.sum()
        if np.linalg.norm(new - y) <= tol * d.mean():
            return new, iteration
        y = new
    return y, max_iter


def baseline(n: int, dim: int, clusters: int, k: int) -> dict:
    """Plain Weiszfeld, then full argsorts of the distance and similarity arrays."""
    x, _ = make_latents(n, dim, clusters)
    ready = current_rss()
    start = time.perf_counter()
    y, iterations = weiszfeld(x)
    distance = np.linalg.norm(x - y, axis=1)
    similarity = (x @ y) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y))
    top = {"euclidean": np.argsort(distance)[:k], "cosine": np.argsort(-similarity)[:k]}
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "ready_rss_gb": ready / GB,
        "iterations": iterations,
        "objective": objective(x, y),
        "top": {m: top[m].tolist() for m in METRICS},
    }


def ours(n: int, dim: int, clusters: int, k: int) -> dict:
    """``representatives`` with the geometric median and both metrics."""
    x, _ = make_latents(n, dim, clusters)
    ready = current_rss()
    start = time.perf_counter()
    result = representatives(x, centers=("geomedian",), metrics=METRICS, k=k)
    seconds = time.perf_counter() - start
    table = result.table
    top = {m: table.loc[table["metric"] == m, "crop_index"].tolist() for m in METRICS}
    y = result.centers[("all", "geomedian")]
    return {
        "seconds": seconds,
        "ready_rss_gb": ready / GB,
        "objective": objective(x, y),
        "top": top,
    }


def overlap(a: dict, b: dict) -> str:
    """Shared rows of two top-k lists, per metric."""
    return ", ".join(f"{m} {len(set(a['top'][m]) & set(b['top'][m]))}" for m in METRICS)


def row(name: str, n: int, dim: int, outcome: dict, mine: dict, timeout: float) -> dict:
    """One table row; the baseline's objective and top-k are compared with ours."""
    base = {"method": name, "n": n, "dim": dim, "input_gb": n * dim * 4 / GB}
    if outcome["stopped"]:
        return {
            **base,
            "seconds": f"> {timeout:.0f} (stopped)",
            "peak_rss_gb": outcome["peak_rss_gb"],
        }
    compare = not mine["stopped"] and outcome is not mine
    return {
        **base,
        "seconds": outcome["seconds"],
        "peak_rss_gb": outcome["peak_rss_gb"],
        "above_input_gb": outcome["peak_rss_gb"] - outcome["ready_rss_gb"],
        "iterations": outcome.get("iterations"),
        "objective": outcome["objective"],
        "objective_vs_ours": outcome["objective"] / mine["objective"] - 1 if compare else None,
        "top_k_overlap": overlap(outcome, mine) if compare else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "represent.json"
    )
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        job = (n, args.dim, args.clusters, args.k)
        base = isolated(baseline, *job, timeout=args.timeout)
        mine = isolated(ours, *job, timeout=args.timeout)
        for name, outcome in (("baseline: Weiszfeld loop + argsort", base), ("ours", mine)):
            rows.append(row(name, n, args.dim, outcome, mine, args.timeout))
            print(rows[-1], flush=True)
    report("represent", rows, args.out, {"k": args.k, "clusters": args.clusters})


if __name__ == "__main__":
    main()
