"""Ingest at scale: crops appended image by image to a project vs held in memory, then written.

PYTHONPATH=src:benchmarks python benchmarks/bench_ingest.py [--sizes 10000 100000]
    [--crop-sizes 64] [--max-gb 20] [--timeout 1800]

What is measured is **crop + store**, the part of ingest after segmentation: every image goes
through ``crop_nuclei`` (measurements, normalisation, masking) and into the project.
Segmentation is left out on purpose (it is per image, independent of N, and would dominate):
a few synthetic images (``--images``, ``--side`` x ``--side`` pixels, ``--nuclei`` nuclei,
ground-truth labels) are generated once and reused until N crops are reached.

- ours: ``Project.append`` per image, as ``nucleae ingest`` does (zarr rows + one parquet
  part per image, crash-safe), then one sequential pass reading every crop back in chunks;
- naive: the same crops (already quantised to the storage dtype) kept in a Python list,
  ``np.concatenate``-d and written once to a zarr array of the same chunking, with one
  parquet table.

Each (method, N, crop size) runs in a fresh process, so ``peak_rss_gb`` is that run's own
peak (Linux VmHWM) and includes the ~0.1 GB of reused images and the imported libraries.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from _isolate import GB, isolated
from _report import report
from napari_nucleae.core.crop import crop_nuclei
from napari_nucleae.core.store import CropParams, Project, chunk_rows, to_storage
from napari_nucleae.sample import synthetic_nuclei

NAIVE = "naive: list + stack + one write"
OURS = "ours: Project.append per image"


def make_images(path: Path, count: int, side: int, nuclei: int) -> Path:
    """Generate ``count`` seeded synthetic images with labels and save them to ``path``."""
    pairs = [synthetic_nuclei((side, side), nuclei, radius=(5, 9), seed=s) for s in range(count)]
    np.savez(path, images=np.stack([p[0] for p in pairs]), labels=np.stack([p[1] for p in pairs]))
    return path


def image_crops(
    images_file: Path, n: int, params: CropParams
) -> Iterator[tuple[dict, np.ndarray, pd.DataFrame, float]]:
    """Per image until ``n`` crops: its record, crops, table rows and crop seconds."""
    data = np.load(images_file)
    images, labels = data["images"], data["labels"]
    done = 0
    for i in itertools.count():
        start = time.perf_counter()
        result = crop_nuclei(images[i % len(images)], labels[i % len(images)], params)
        take = min(len(result.crops), n - done)
        table = result.table.iloc[:take].copy()
        table.insert(0, "image_id", f"image{i:07d}")
        table.insert(1, "image_path", f"synthetic/image{i:07d}.tif")
        crops = result.crops[:take]
        seconds = time.perf_counter() - start
        yield {"image_id": f"image{i:07d}", "path": "", "n_nuclei": take}, crops, table, seconds
        done += take
        if done == n:
            return


def folder_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GB


def ours(images_file: Path, n: int, size: int, workdir: Path) -> dict:
    """Append image by image to a project, then read every crop back in chunk order."""
    params = CropParams(size=size)
    folder = workdir / f"ours-{n}-{size}"
    project = Project.create(folder, params)
    crop_s = store_s = 0.0
    for record, crops, table, seconds in image_crops(images_file, n, params):
        crop_s += seconds
        start = time.perf_counter()
        project.append(record, crops, table)
        store_s += time.perf_counter() - start
    assert len(project) == n == project.images()["n_crops"].sum()  # not the O(N) table
    start = time.perf_counter()
    total = 0
    for _, block in project.iter_crops(chunk_rows(size, params.storage_dtype)):
        total += len(block)
    read_s = time.perf_counter() - start
    assert total == n
    disk = folder_gb(folder)
    shutil.rmtree(folder)
    return {"crop_s": crop_s, "store_s": store_s, "read_s": read_s, "disk_gb": disk}


def naive(images_file: Path, n: int, size: int, workdir: Path) -> dict:
    """Keep every crop in a list, stack, and write the array and table once."""
    params = CropParams(size=size)
    folder = workdir / f"naive-{n}-{size}"
    crop_s = store_s = 0.0
    stored, tables = [], []
    for _, crops, table, seconds in image_crops(images_file, n, params):
        crop_s += seconds
        start = time.perf_counter()
        stored.append(to_storage(crops, params.storage_dtype))
        tables.append(table)
        store_s += time.perf_counter() - start
    start = time.perf_counter()
    everything = np.concatenate(stored)
    del stored
    array = zarr.open_array(
        str(folder / "crops.zarr"),
        mode="w",
        shape=everything.shape,
        chunks=(chunk_rows(size, params.storage_dtype), size, size),
        dtype=params.storage_dtype,
    )
    array[:] = everything
    pd.concat(tables, ignore_index=True).to_parquet(folder / "crops.parquet")
    store_s += time.perf_counter() - start
    disk = folder_gb(folder)
    shutil.rmtree(folder)
    return {"crop_s": crop_s, "store_s": store_s, "disk_gb": disk}


def row(method: str, n: int, size: int, outcome: dict, timeout: float) -> dict:
    """One table row; a stopped run reports its time limit and the memory it had reached."""
    base = {"method": method, "crop_size": size, "n": n}
    if outcome["stopped"]:
        return {
            **base,
            "seconds": f"> {timeout:.0f} (stopped)",
            "peak_rss_gb": outcome["peak_rss_gb"],
        }
    seconds = outcome["crop_s"] + outcome["store_s"]
    read = outcome.get("read_s")
    return {
        **base,
        "seconds": seconds,
        "crops_per_s": n / seconds,
        "crop_s": outcome["crop_s"],
        "store_s": outcome["store_s"],
        "peak_rss_gb": outcome["peak_rss_gb"],
        "read_crops_per_s": None if read is None else n / read,
        "disk_gb": outcome["disk_gb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--images", type=int, default=4, help="distinct synthetic images")
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--nuclei", type=int, default=2000, help="nuclei per image")
    parser.add_argument(
        "--max-gb",
        type=float,
        default=20.0,
        help="skip the naive path (it holds every crop in memory) above this uint16 size",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (temp)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ingest.json"
    )
    args = parser.parse_args()
    rows: list[dict] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        images = make_images(workdir / "images.npz", args.images, args.side, args.nuclei)
        for size in args.crop_sizes:
            for n in args.sizes:
                gb = n * size * size * 2 / GB
                runs = [(NAIVE, naive), (OURS, ours)]
                if gb > args.max_gb:
                    skipped.append(f"naive {n} x {size}x{size} ({gb:.0f} GB as uint16 > --max-gb)")
                    runs = runs[1:]
                for method, func in runs:
                    outcome = isolated(func, images, n, size, workdir, timeout=args.timeout)
                    rows.append(row(method, n, size, outcome, args.timeout))
                    print(rows[-1], flush=True)
    extra = {
        "measured": "crop + store (no segmentation); each run in a fresh process",
        "images": args.images,
        "side": args.side,
        "nuclei_per_image": args.nuclei,
        "skipped": skipped,
    }
    report("ingest", rows, args.out, extra)


if __name__ == "__main__":
    main()
