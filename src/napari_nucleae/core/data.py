"""Crops streamed from the project: splits by source image, contiguous chunk reads in a
shuffled order with a shuffle buffer, a background read-ahead and the DataLoader over them.

Training never loads the whole project and never does per-crop random reads. Validation holds
out whole source images (``image_id``), so the validation loss measures generalisation to new
images rather than to neighbours of training crops.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import InputError
from .store import Project

BUFFER_CHUNKS = 8

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Split:
    """Crop indices (sorted) for training and validation, and how they were chosen."""

    train: np.ndarray
    val: np.ndarray
    by: str
    note: str | None = None


def read_ahead(read: Callable[[T], R], keys: Iterable[T]) -> Iterator[R]:
    """``read(key)`` for each key in turn, the next one read in a background thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for key in keys:
            following = pool.submit(read, key)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


def split_crops(table: pd.DataFrame, val_fraction: float, seed: int = 0) -> Split:
    """Hold out whole source images (seeded); with one image, a seeded random crop subset."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(table)
    everything, nothing = np.arange(n), np.arange(0)
    if val_fraction == 0:
        return Split(everything, nothing, "none")
    rng = np.random.default_rng(seed)
    ids = table["image_id"].astype(str) if "image_id" in table else None
    if ids is not None and ids.nunique() >= 2:
        counts = ids.value_counts()
        images = rng.permutation(sorted(counts.index))
        held, n_held = [], 0
        for image in images[:-1]:  # at least one image stays for training
            if n_held >= val_fraction * n:
                break
            held.append(image)
            n_held += counts[image]
        is_val = ids.isin(held).to_numpy()
        return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), "image")
    if n < 2:
        return Split(everything, nothing, "none", "a single crop: no validation set")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    is_val = np.zeros(n, bool)
    is_val[rng.choice(n, n_val, replace=False)] = True
    note = (
        "all crops come from one source image: validation uses a random subset of its crops, "
        "so the validation loss is optimistic"
    )
    return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), "crop", note)


class ChunkStream(IterableDataset):
    """Batches ``(B, 1, S, S)`` of selected crops, read one contiguous zarr chunk at a time.

    Chunks are visited in a seeded order that changes with ``epoch`` and shuffled within a
    buffer of ``buffer_chunks`` chunks. Worker processes each take a fixed share of the chunks.
    An epoch is one pass over the rows, or, with ``min_batches``, as many passes as it takes to
    yield that many batches (small projects).
    """

    def __init__(
        self,
        project: Project,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        buffer_chunks: int = BUFFER_CHUNKS,
    ):
        self.project = Project(project.path, project.meta)  # no cached table to pickle
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.min_batches = 0  # batches per epoch at least (repeating the rows; all workers)
        chunk = int(project.crops.chunks[0])
        self.buffer_rows = max(batch_size, buffer_chunks * chunk)
        rows = np.asarray(rows, dtype=np.int64)
        edges = np.searchsorted(rows, np.arange(0, len(project) + chunk, chunk))
        self.blocks = [rows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    def _shards(self, n_workers: int) -> list[list[np.ndarray]]:
        return [self.blocks[w::n_workers] for w in range(n_workers)]

    def n_batches(self, n_workers: int = 0) -> int:
        """Batches per epoch (each worker ends each pass with one partial batch)."""
        shards = self._shards(max(1, n_workers))
        return sum(self._worker_batches(s, len(shards)) for s in shards)

    def _worker_batches(self, shard: list[np.ndarray], n_workers: int) -> int:
        """Batches one worker yields per epoch."""
        per_pass = math.ceil(sum(map(len, shard)) / self.batch_size)
        return max(per_pass, math.ceil(self.min_batches / n_workers)) if per_pass else 0

    def _read(self, rows: np.ndarray) -> np.ndarray:
        first = int(rows[0])
        crops = self.project.read_crops(slice(first, int(rows[-1]) + 1))
        return crops if len(crops) == len(rows) else crops[rows - first]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        shard = self._shards(n_workers)[worker]
        wanted = self._worker_batches(shard, n_workers)
        passes = itertools.count()
        while wanted > 0:
            for batch in itertools.islice(self._pass(shard, [worker, next(passes)]), wanted):
                wanted -= 1
                yield batch

    def _pass(self, blocks: list[np.ndarray], key: list[int]) -> Iterator[torch.Tensor]:
        """One pass over ``blocks`` in batches, shuffled with a seed made of ``key``."""
        rng = np.random.default_rng([self.seed, self.epoch, *key])
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        size = self.project.crop_size
        carry = np.empty((0, size, size), np.float32)
        group: list[np.ndarray] = []
        n_group = 0
        for i, crops in enumerate(read_ahead(self._read, blocks)):
            group.append(crops)
            n_group += len(crops)
            last = i == len(blocks) - 1
            if not last and n_group < self.buffer_rows:
                continue
            data = np.concatenate([carry, *group])
            group, n_group = [], 0
            if self.shuffle:
                data = data[rng.permutation(len(data))]
            stop = len(data) if last else len(data) // self.batch_size * self.batch_size
            for start in range(0, stop, self.batch_size):
                yield torch.from_numpy(data[start : start + self.batch_size])[:, None]
            carry = data[stop:]


def loader(stream: ChunkStream, num_workers: int, device: torch.device) -> DataLoader:
    """A DataLoader of ``stream``'s batches (pinned memory on CUDA)."""
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
