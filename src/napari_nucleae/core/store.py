"""The project folder: crops (zarr), provenance tables (parquet), models and latents.

Layout::

    project.json          format version, crop parameters, storage dtype, active model
    crops.zarr            (N, S, S) chunked along N, stored as ``storage_dtype``
    crops.parquet/        one part file per append; row i of the concatenation <-> crops[i]
    images.parquet/       one part file per append (one row per source image)
    features.parquet      derived per-crop columns (mse, projections, clusters...), N rows
    models/<name>/        checkpoints
    latents/<name>.zarr   (N, D) float32
    labels/<image>.zarr   each image's segmentation (so a reopened project shows its nuclei)

The crops part file is the commit point of an append: the crops array is grown and written
first, then the images part, then the crops part is renamed into place. Opening a project
trims crop rows and image parts that no committed crops part accounts for, so the array and
the table always agree in length after any failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from .errors import InputError, ProjectError

FORMAT_VERSION = 1
CHUNK_BYTES = 2 * 1024 * 1024
STORAGE_DTYPES = ("uint8", "uint16", "float32")


@dataclass(frozen=True)
class CropParams:
    """How crops were made; fixed for the lifetime of a project."""

    size: int = 64
    mask_background: bool = True
    skip_border: bool = True
    rescale_large: bool = True
    align: bool = False
    normalize: str = "image"
    percentiles: tuple[float, float] = (1.0, 99.8)
    storage_dtype: str = "uint16"

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 1024:
            raise InputError(f"crop size must be between 8 and 1024 pixels, got {self.size}")
        if self.normalize not in ("image", "crop", "none"):
            raise InputError(f"normalize must be 'image', 'crop' or 'none', got {self.normalize!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise InputError(f"storage_dtype must be one of {STORAGE_DTYPES}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> CropParams:
        data = dict(data)
        data["percentiles"] = tuple(data.get("percentiles", (1.0, 99.8)))
        return cls(**data)


@dataclass
class ProjectMeta:
    """Contents of ``project.json``."""

    crop: CropParams
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: _now())
    updated: str = field(default_factory=lambda: _now())
    active_model: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["crop"]["percentiles"] = list(self.crop.percentiles)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ProjectMeta:
        data = json.loads(text)
        data["crop"] = CropParams.from_dict(data["crop"])
        return cls(**data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    """Write a DataFrame to parquet atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def chunk_rows(crop_size: int, dtype: str) -> int:
    """Crops per zarr chunk: about ``CHUNK_BYTES`` per chunk, a power of two."""
    per_crop = crop_size * crop_size * np.dtype(dtype).itemsize
    rows = max(1, CHUNK_BYTES // per_crop)
    return int(2 ** int(np.log2(rows)))


def to_storage(crops: np.ndarray, dtype: str) -> np.ndarray:
    """Quantise float crops in [0, 1] to the storage dtype."""
    crops = np.clip(np.asarray(crops, dtype=np.float32), 0.0, 1.0)
    if dtype == "float32":
        return crops
    scale = np.iinfo(dtype).max
    return np.round(crops * scale).astype(dtype)


def from_storage(stored: np.ndarray) -> np.ndarray:
    """Stored crops back to float32 in [0, 1]."""
    if stored.dtype == np.float32:
        return stored
    return stored.astype(np.float32) / np.float32(np.iinfo(stored.dtype).max)


def _part_name(index: int) -> str:
    return f"part-{index:08d}.parquet"


class Project:
    """An on-disk napari-nucleae project. Reads are lazy; appends are crash-safe."""

    def __init__(self, path: str | os.PathLike, meta: ProjectMeta):
        self.path = Path(path)
        self.meta = meta
        self._table_cache: pd.DataFrame | None = None
        self._part_rows: dict[str, int] = {}  # committed crops parts never change

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | os.PathLike, crop: CropParams | None = None) -> Project:
        """Create an empty project; fails if ``path`` already holds one."""
        path = Path(path)
        if (path / "project.json").exists():
            raise ProjectError(f"{path} already contains a project; open it instead")
        if path.exists() and any(path.iterdir()):
            raise ProjectError(f"{path} is not empty; choose a new or empty folder for a project")
        crop = crop or CropParams()
        path.mkdir(parents=True, exist_ok=True)
        zarr.open_array(
            str(path / "crops.zarr"),
            mode="w",
            shape=(0, crop.size, crop.size),
            chunks=(chunk_rows(crop.size, crop.storage_dtype), crop.size, crop.size),
            dtype=crop.storage_dtype,
        )
        (path / "crops.parquet").mkdir()
        (path / "images.parquet").mkdir()
        meta = ProjectMeta(crop=crop)
        atomic_write_bytes(path / "project.json", meta.to_json().encode())
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Project:
        """Open an existing project, repairing any interrupted append."""
        path = Path(path)
        meta_file = path / "project.json"
        if not meta_file.exists():
            raise ProjectError(f"{path} is not a napari-nucleae project (no project.json)")
        try:
            meta = ProjectMeta.from_json(meta_file.read_text())
        except (ValueError, KeyError, TypeError) as err:
            raise ProjectError(f"{meta_file} is corrupted: {err}") from err
        if meta.format_version > FORMAT_VERSION:
            raise ProjectError(
                f"{path} was written by a newer napari-nucleae (format {meta.format_version}); "
                "upgrade the plugin to open it"
            )
        for needed in ("crops.zarr", "crops.parquet", "images.parquet"):
            if not (path / needed).exists():
                raise ProjectError(f"{path} is incomplete: {needed} is missing")
        project = cls(path, meta)
        project._repair()
        return project

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, crop: CropParams | None = None) -> Project:
        """Open ``path`` if it holds a project (checking crop parameters), else create one."""
        if (Path(path) / "project.json").exists():
            project = cls.open(path)
            if crop is not None and crop != project.meta.crop:
                raise ProjectError(
                    f"{path} holds crops made with {project.meta.crop}; "
                    f"these settings differ ({crop}). Use the project's settings or a new folder."
                )
            return project
        return cls.create(path, crop)

    # ------------------------------------------------------------------ internals
    def _part_names(self, table: str) -> list[str]:
        """Sorted part file names (plain strings: cheap with thousands of parts)."""
        names = os.listdir(self.path / table)
        return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))

    def _parts(self, table: str) -> list[Path]:
        return [self.path / table / name for name in self._part_names(table)]

    def _repair(self) -> None:
        """Drop whatever an interrupted append left behind."""
        committed = set(self._part_names("crops.parquet"))
        for orphan in set(self._part_names("images.parquet")) - committed:
            (self.path / "images.parquet" / orphan).unlink()
        n = self._count_rows()
        arr = self.crops
        if arr.shape[0] > n:
            arr.resize((n, *arr.shape[1:]))
        elif arr.shape[0] < n:
            raise ProjectError(
                f"{self.path} is corrupted: the table lists {n} crops but crops.zarr holds "
                f"{arr.shape[0]}"
            )

    def _count_rows(self) -> int:
        import pyarrow.parquet as pq

        names = self._part_names("crops.parquet")
        for name in names:
            if name not in self._part_rows:
                path = self.path / "crops.parquet" / name
                self._part_rows[name] = pq.ParquetFile(path).metadata.num_rows
        return sum(self._part_rows[name] for name in names)

    def _touch(self) -> None:
        self.meta.updated = _now()
        atomic_write_bytes(self.path / "project.json", self.meta.to_json().encode())

    # ------------------------------------------------------------------ reading
    @property
    def crop_size(self) -> int:
        return self.meta.crop.size

    @property
    def crops(self) -> zarr.Array:
        """The lazily read crops array (stored dtype)."""
        return zarr.open_array(str(self.path / "crops.zarr"), mode="a")

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    def read_crops(self, index: slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Crops as float32 in [0, 1]; ``index`` is a slice or sorted-or-not integer indices."""
        arr = self.crops
        if isinstance(index, slice):
            return from_storage(np.asarray(arr[index]))
        idx = np.asarray(index, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), *arr.shape[1:]), dtype=np.float32)
        if len(idx):
            out[order] = from_storage(np.asarray(arr.get_orthogonal_selection((idx[order],))))
        return out

    def iter_crops(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, crops)`` batches in storage order."""
        for start in range(0, len(self), batch_size):
            yield start, self.read_crops(slice(start, start + batch_size))

    def table(self, with_features: bool = True) -> pd.DataFrame:
        """The crop table (provenance, plus derived feature columns when present)."""
        if self._table_cache is None:
            parts = self._parts("crops.parquet")
            self._table_cache = (
                pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
                if parts
                else pd.DataFrame({"crop_index": pd.Series(dtype="int64")})
            )
        table = self._table_cache.copy()
        if with_features:
            features = self.features()
            if len(features) == len(table):
                for column in features.columns:
                    table[column] = features[column].array  # keeps categoricals
        return table

    def images(self) -> pd.DataFrame:
        """One row per ingested source image."""
        parts = self._parts("images.parquet")
        if not parts:
            return pd.DataFrame({"image_id": pd.Series(dtype=str)})
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def has_image(self, image_id: str) -> bool:
        images = self.images()
        return bool((images["image_id"] == image_id).any())

    def features(self) -> pd.DataFrame:
        """Derived per-crop columns (empty frame when none were written)."""
        path = self.path / "features.parquet"
        if not path.exists():
            return pd.DataFrame(index=pd.RangeIndex(0))
        import pyarrow.parquet as pq

        stored = pq.read_table(path)
        features = stored.to_pandas()
        for column in stored.schema.pandas_metadata["columns"]:  # pyarrow drops integer ones
            name = column["name"]
            if column["pandas_type"] == "categorical" and features[name].dtype != "category":
                features[name] = pd.Categorical(features[name])
        return features

    # ------------------------------------------------------------------ writing
    def append(self, image: dict, crops: np.ndarray, table: pd.DataFrame) -> range:
        """Append one image's crops and rows; returns the crop indices they received."""
        size = self.crop_size
        crops = np.asarray(crops)
        if crops.ndim != 3 or crops.shape[1:] != (size, size):
            raise ProjectError(
                f"crops of shape {crops.shape[1:]} do not fit this project ({size}x{size})"
            )
        if len(table) != len(crops):
            raise ProjectError(f"{len(crops)} crops but {len(table)} table rows")
        with self._lock():
            self._repair()
            start = len(self)
            stop = start + len(crops)
            arr = self.crops
            if len(crops):
                arr.resize((stop, size, size))
                arr[start:stop] = to_storage(crops, self.meta.crop.storage_dtype)
            part = _part_name(len(self._part_names("crops.parquet")))
            image_row = pd.DataFrame([{**image, "n_crops": len(crops), "first_crop": start}])
            atomic_write_parquet(self.path / "images.parquet" / part, image_row)
            rows = table.reset_index(drop=True).copy()
            rows.insert(0, "crop_index", np.arange(start, stop, dtype=np.int64))
            atomic_write_parquet(self.path / "crops.parquet" / part, rows)
            self._table_cache = None
            self._touch()
        return range(start, stop)

    def write_features(self, columns: pd.DataFrame) -> None:
        """Add or replace derived per-crop columns (one row per crop, in crop order)."""
        if len(columns) != len(self):
            raise ProjectError(f"{len(columns)} feature rows for {len(self)} crops")
        features = self.features()
        if len(features) != len(self):
            features = pd.DataFrame(index=pd.RangeIndex(len(self)))
        for column in columns.columns:
            features[column] = columns[column].array  # keeps categoricals
        atomic_write_parquet(self.path / "features.parquet", features)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive writer lock (a lock file created with O_EXCL)."""
        lock = self.path / ".write.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError as err:
            raise ProjectError(
                f"{self.path} is being written by another process (remove {lock} if none is)"
            ) from err
        try:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            yield
        finally:
            lock.unlink(missing_ok=True)

    # ------------------------------------------------------------------ models and latents
    def model_dir(self, name: str) -> Path:
        return self.path / "models" / name

    def latents_path(self, model: str) -> Path:
        return self.path / "latents" / f"{model}.zarr"

    def set_active_model(self, name: str | None) -> None:
        self.meta.active_model = name
        self._touch()

    # ------------------------------------------------------------------ segmentations
    def labels_path(self, image_id: str) -> Path:
        """Where an image's segmentation is kept (ids that are not plain file names are
        hashed)."""
        name = str(image_id)
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", name):
            name = hashlib.sha1(name.encode()).hexdigest()[:16]
        return self.path / "labels" / f"{name}.zarr"

    def write_labels(self, image_id: str, labels: np.ndarray) -> None:
        """Store an image's label image (compressed, in 1024-pixel tiles per plane), written
        beside its place and renamed in, replacing an earlier one."""
        labels = np.asarray(labels)
        final = self.labels_path(image_id)
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        chunks = (*(1,) * (labels.ndim - 2), *(min(1024, n) for n in labels.shape[-2:]))
        out = zarr.open_array(
            str(tmp), mode="w", shape=labels.shape, chunks=chunks, dtype=labels.dtype
        )
        out[...] = labels
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def read_labels(self, image_id: str) -> zarr.Array | None:
        """An image's stored segmentation (lazy), or None when the project has none."""
        path = self.labels_path(image_id)
        return zarr.open_array(str(path), mode="r") if path.is_dir() else None
