"""Crops streamed from the project: splits by source image, contiguous chunk reads in a
shuffled order with a shuffle buffer, a background read-ahead and the DataLoader over them.

Training never loads the whole project and never does per-crop random reads. Validation holds
out whole source images (``image_id``), so the validation loss measures generalisation to new
images rather than to neighbours of training crops.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .distributed import SINGLE, Ranks
from .errors import InputError
from .store import Project

BUFFER_CHUNKS = 8
CUDA_WORKERS = 8  # loader processes per GPU: enough to decode chunks as fast as it trains
COMPACT_DTYPES = ("uint8",)  # storage dtypes sent to the device as stored (see ChunkStream)

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


def shard(items: Sequence[T], rank: int, world: int, worker: int, workers: int) -> list[T]:
    """The share of ``items`` that loader worker ``worker`` of process ``rank`` reads: every
    ``world``-th item from ``rank`` on (DistributedSampler's split), then every ``workers``-th
    of those. Over all ranks and workers the shares are disjoint and cover ``items``."""
    return list(items[rank::world][worker::workers])


class ChunkStream(IterableDataset):
    """Batches ``(B, 1, S, S)`` of selected crops, read one contiguous zarr chunk at a time.

    Chunks are visited in a seeded order that changes with ``epoch`` and shuffled within a
    buffer of ``buffer_chunks`` chunks. Each training process (``ranks``) and each of its
    loader worker processes reads a fixed :func:`shard` of the chunks. An epoch is one pass
    over the rows, or, with ``min_batches``, as many passes as it takes to yield that many
    batches (small projects). With ``even``, every shard yields as many batches as the
    largest one (repeating some crops, as DistributedSampler pads), so that every DDP
    process takes the same number of steps. With ``compact``, crops stored as uint8 stay
    uint8 through the workers, pinned memory and the bus (a quarter of float32's bytes);
    :func:`.model.to_batch` scales them on the device.
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
        ranks: Ranks = SINGLE,
        even: bool = False,
        compact: bool = False,
    ):
        self.project = Project(project.path, project.meta)  # no cached table to pickle
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.min_batches = 0  # batches per epoch at least (repeating the rows; all workers)
        self.ranks = ranks
        self.even = even
        self.stored = compact and project.meta.crop.storage_dtype in COMPACT_DTYPES
        chunk = int(project.crops.chunks[0])
        self.buffer_rows = max(batch_size, buffer_chunks * chunk)
        rows = np.asarray(rows, dtype=np.int64)
        edges = np.searchsorted(rows, np.arange(0, len(project) + chunk, chunk))
        self.blocks = [rows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
        if even and len(self.blocks) < ranks.world:
            raise InputError(
                f"{len(self.blocks)} chunks of crops cannot be shared by {ranks.world} training "
                "processes: use fewer processes"
            )

    def max_workers(self) -> int:
        """Loader workers that each get at least one chunk on every process."""
        return len(self.blocks) // self.ranks.world

    def _shards(self, n_workers: int, rank: int) -> list[list[np.ndarray]]:
        world = self.ranks.world
        return [shard(self.blocks, rank, world, w, n_workers) for w in range(n_workers)]

    def n_batches(self, n_workers: int = 0) -> int:
        """Batches per epoch of this process (each worker ends each pass with one partial
        batch)."""
        n_workers = max(1, n_workers)
        shards = self._shards(n_workers, self.ranks.rank)
        return sum(self._worker_batches(s, n_workers) for s in shards)

    def _worker_batches(self, shard: list[np.ndarray], n_workers: int) -> int:
        """Batches one worker yields per epoch."""
        if not shard:
            return 0
        if self.even:
            every = range(self.ranks.world)
            largest = max(sum(map(len, s)) for r in every for s in self._shards(n_workers, r))
            return max(
                math.ceil(largest / self.batch_size), math.ceil(self.min_batches / n_workers)
            )
        per_pass = math.ceil(sum(map(len, shard)) / self.batch_size)
        return max(per_pass, math.ceil(self.min_batches / n_workers))

    def _read(self, rows: np.ndarray) -> np.ndarray:
        first = int(rows[0])
        crops = self.project.read_crops(slice(first, int(rows[-1]) + 1), stored=self.stored)
        return crops if len(crops) == len(rows) else crops[rows - first]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        blocks = self._shards(n_workers, self.ranks.rank)[worker]
        wanted = self._worker_batches(blocks, n_workers)
        passes = itertools.count()
        index = self.ranks.rank * n_workers + worker  # the shard's place among all shards
        while wanted > 0:
            for batch in itertools.islice(self._pass(blocks, [index, next(passes)]), wanted):
                wanted -= 1
                yield batch

    def _pass(self, blocks: list[np.ndarray], key: list[int]) -> Iterator[torch.Tensor]:
        """One pass over ``blocks`` in batches, shuffled with a seed made of ``key``."""
        rng = np.random.default_rng([self.seed, self.epoch, *key])
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        size, dtype = self.project.crop_size, self.project.meta.crop.storage_dtype
        carry = np.empty((0, size, size), dtype if self.stored else np.float32)
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


def default_workers(device: torch.device, ranks: Ranks = SINGLE) -> int:
    """Loader worker processes per training process: on CUDA up to :data:`CUDA_WORKERS`
    (sharing the CPUs among the processes), else none (the CPU is busy training)."""
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(CUDA_WORKERS, (cpus or 1) // ranks.world - 1))


def loader(stream: ChunkStream, num_workers: int, device: torch.device) -> DataLoader:
    """A DataLoader of ``stream``'s batches (pinned memory on CUDA)."""
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
