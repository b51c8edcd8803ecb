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
    .write.lock           the writer lock (an advisory lock on the file; the holder's PID inside)
    .append.pending       present while an append is under way (or was interrupted)

The crops part file is the commit point of an append: under the writer lock ``.append.pending``
is written, the crops array is grown and written, then the images part, then the crops part is
renamed into place and ``.append.pending`` removed. Nothing ever deletes committed data:
readers see the committed rows only (crop rows past them and an images part without its crops
part are the unfinished append that ``.append.pending`` announces), and the next append
overwrites them. A state no unfinished append explains (a table part or chunk gone) is
reported as an error naming the file, and left as it is.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from .errors import InputError, ProjectError
from .staging import staged

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EVERY_TILE = "every_tile_stored"  # labels attribute: all-background tiles are on disk too
NORMALIZATIONS = ("image", "crop", "none")  # percentile normalisation per image, per crop
# outside each nucleus: zeros, the nucleus's own interior mean, or the image as it is
BACKGROUNDS = ("zero", "mean", "keep")
CHUNK_BYTES = 2 * 1024 * 1024
STORAGE_DTYPES = ("uint8", "uint16", "float32")
LOCK_TIMEOUT = 60.0  # seconds a writer waits for another writer to finish
FEATURES = "features.parquet"
# feature columns the user made (not derived): kept when crops are appended, new crops missing
ANNOTATION = "annotation"  # the user's class annotations (see core.classify)
USER_COLUMNS = (ANNOTATION,)
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # as core.model.check_model_name


@dataclass(frozen=True)
class CropParams:
    """How crops were made; fixed for the lifetime of a project."""

    size: int = 64
    background: str = "zero"  # one of BACKGROUNDS
    skip_border: bool = True
    rescale_large: bool = True
    align: bool = False
    normalize: str = "image"
    percentiles: tuple[float, float] = (1.0, 99.8)
    storage_dtype: str = "uint16"

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 1024:
            raise InputError(f"crop size must be between 8 and 1024 pixels, got {self.size}")
        if self.background not in BACKGROUNDS:
            raise InputError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.normalize not in NORMALIZATIONS:
            raise InputError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise InputError(f"storage_dtype must be one of {STORAGE_DTYPES}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> CropParams:
        """Parameters from ``project.json``; projects written before ``background`` existed
        stored ``mask_background`` (True: zeros, False: kept)."""
        data = dict(data)
        data["percentiles"] = tuple(data.get("percentiles", (1.0, 99.8)))
        if "mask_background" in data:
            masked = data.pop("mask_background")
            data.setdefault("background", "zero" if masked else "keep")
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
        meta = cls(**data)
        check_active_model(meta.active_model)
        return meta


def check_active_model(name: object) -> None:
    """``active_model`` is None or a plain model name (never a path)."""
    if name is not None and not (isinstance(name, str) and MODEL_NAME.fullmatch(name)):
        raise ValueError(f"active_model must be a model name, not {name!r}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files only their owner may read
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
        os.chmod(tmp, 0o666 & ~_umask())
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


def _try_lock(fd: int) -> bool:
    """Take the advisory writer lock on ``fd`` without waiting; False while another holds it.

    The operating system releases it when its holder ends, however it ends (``kill -9``)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    """The PID written in a lock file ('' when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 32).decode(errors="replace").strip()
    except OSError:
        return ""


def _set_holder(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())


class Project:
    """An on-disk napari-nucleae project. Reads are lazy and see committed rows only; appends
    are crash-safe and serialised by the writer lock."""

    def __init__(self, path: str | os.PathLike, meta: ProjectMeta):
        self.path = Path(path)
        self.meta = meta
        self.notes: list[str] = []  # e.g. a stale writer lock taken over
        self._table_cache: pd.DataFrame | None = None
        self._part_rows: dict[str, int] = {}  # committed parts never change: read once
        self._image_rows: dict[str, pd.DataFrame] = {}
        self._image_ids: dict[str, frozenset] = {}
        self._committed: list[str] | None = None  # committed part names, read on first use
        self._n_rows = 0
        self._lock_depth = 0

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | os.PathLike, crop: CropParams | None = None) -> Project:
        """Create an empty project; fails if ``path`` already holds one. The project is built
        beside ``path`` and renamed into place, so a concurrent creator never sees half."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ProjectError(f"{path} is a file, not a folder; choose a folder for the project")
        if (path / "project.json").exists():
            raise ProjectError(f"{path} already contains a project; open it instead")
        if path.exists() and any(path.iterdir()):
            raise ProjectError(f"{path} is not empty; choose a new or empty folder for a project")
        crop = crop or CropParams()
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.creating-"))
        try:
            zarr.create_array(
                str(staging / "crops.zarr"),
                shape=(0, crop.size, crop.size),
                chunks=(chunk_rows(crop.size, crop.storage_dtype), crop.size, crop.size),
                dtype=crop.storage_dtype,
                compressors=zarr.codecs.ZstdCodec(level=0, checksum=True),
            )
            (staging / "crops.parquet").mkdir()
            (staging / "images.parquet").mkdir()
            meta = ProjectMeta(crop=crop)
            atomic_write_bytes(staging / "project.json", meta.to_json().encode())
            os.chmod(staging, 0o777 & ~_umask())
            if path.is_dir():
                path.rmdir()  # empty (checked above); fails if a concurrent creator filled it
            os.rename(staging, path)  # fails if a concurrent creator was quicker
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ProjectError(f"{path} already contains a project; open it instead") from err
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Project:
        """Open an existing project (read only: nothing on disk changes)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ProjectError(f"{path} is a file, not a napari-nucleae project folder")
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
        project.refresh()
        return project

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, crop: CropParams | None = None) -> Project:
        """Open ``path`` if it holds a project (checking crop parameters), else create one."""
        if not (Path(path) / "project.json").exists():
            try:
                return cls.create(path, crop)
            except ProjectError:
                if not (Path(path) / "project.json").exists():
                    raise  # not a concurrent creator that was quicker
        project = cls.open(path)
        if crop is not None and crop != project.meta.crop:
            raise ProjectError(
                f"{path} holds crops made with {project.meta.crop}; "
                f"these settings differ ({crop}). Use the project's settings or a new folder."
            )
        return project

    # ------------------------------------------------------------------ committed state
    def refresh(self) -> None:
        """Read which rows are committed, checking that every committed file is there.

        A listing taken while another process appends can look inconsistent for a moment;
        it is read again. A state no unfinished append explains raises :class:`ProjectError`
        naming the missing file; nothing is changed."""
        problem = None
        for _ in range(5):
            problem = self._read_committed()
            if problem is None:
                return
        raise ProjectError(f"{problem}; nothing was changed. Restore it from a backup")

    def _read_committed(self) -> str | None:
        """Take the committed parts, or say what is wrong with them (None when nothing)."""
        parts = self._part_names("crops.parquet")
        expected = [_part_name(i) for i in range(len(parts))]
        if parts != expected:
            missing = next(e for e, p in zip(expected, parts, strict=True) if e != p)
            return f"{self.path / 'crops.parquet' / missing} is missing (a crop table part)"
        images = set(self._part_names("images.parquet"))
        lost = next((name for name in parts if name not in images), None)
        if lost is not None:
            return f"{self.path / 'images.parquet' / lost} is missing (an image table part)"
        n_rows = self._count_rows(parts)
        stored = int(self.crops.shape[0])
        if stored < n_rows:
            return f"{self.path / 'crops.zarr'} holds {stored} crops but the table lists {n_rows}"
        extra = sorted(images - set(parts))
        if (extra or stored > n_rows) and not (self.path / ".append.pending").exists():
            if extra:
                return (
                    f"{self.path / 'crops.parquet' / extra[0]} is missing: images.parquet/"
                    f"{extra[0]} records an image whose crop table is gone"
                )
            return (
                f"{self.path / 'crops.zarr'} holds {stored} crops but the table lists only "
                f"{n_rows}: the last crops.parquet and images.parquet parts are missing"
            )
        self._committed, self._n_rows, self._table_cache = parts, n_rows, None
        return None

    def _committed_parts(self) -> list[str]:
        if self._committed is None:
            self.refresh()
        return list(self._committed)

    def _part_names(self, table: str) -> list[str]:
        """Sorted part file names (plain strings: cheap with thousands of parts)."""
        names = os.listdir(self.path / table)
        return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))

    def _count_rows(self, names: list[str]) -> int:
        import pyarrow.parquet as pq

        for name in names:
            if name not in self._part_rows:
                path = self.path / "crops.parquet" / name
                self._part_rows[name] = _checked(
                    path, lambda p: pq.ParquetFile(p).metadata.num_rows
                )
        return sum(self._part_rows[name] for name in names)

    def _inside(self, *parts: str) -> Path:
        """``path / parts``, refusing '..' or a symbolic link that leads out of the project."""
        target = self.path.joinpath(*parts)
        root, resolved = self.path.resolve(), target.resolve()
        if resolved != root and root not in resolved.parents:
            raise ProjectError(
                f"{target} leads outside the project folder (to {resolved}); a project writes "
                "only inside its folder: replace the link with a real folder"
            )
        return target

    # ------------------------------------------------------------------ reading
    @property
    def crop_size(self) -> int:
        return self.meta.crop.size

    @property
    def crops(self) -> zarr.Array:
        """The lazily read crops array (stored dtype; rows past ``len(self)`` are an
        unfinished append)."""
        path = self.path / "crops.zarr"
        return _checked(path, lambda p: zarr.open_array(str(p), mode="r"))

    def __len__(self) -> int:
        self._committed_parts()
        return self._n_rows

    def read_crops(
        self, index: slice | Sequence[int] | np.ndarray, *, stored: bool = False
    ) -> np.ndarray:
        """Crops as float32 in [0, 1] (with ``stored``: as stored, e.g. uint8 not yet
        scaled); ``index`` is a slice or sorted-or-not integer indices of committed rows. A
        missing or corrupted chunk file raises :class:`ProjectError`."""
        n, arr = len(self), self.crops
        decode = np.asarray if stored else from_storage
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                rows = range(start, max(start, stop))
                return decode(self._read(arr, rows, lambda: arr[rows.start : rows.stop]))
            index = np.arange(start, stop, step)
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"crop index out of range: the project holds {n} crops")
        idx = np.where(idx < 0, idx + n, idx)
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), *arr.shape[1:]), dtype=arr.dtype if stored else np.float32)
        if len(idx):
            sel = idx[order]
            out[order] = decode(self._read(arr, sel, lambda: arr.get_orthogonal_selection((sel,))))
        return out

    def _read(
        self, arr: zarr.Array, rows: range | np.ndarray, read: Callable[[], Any]
    ) -> np.ndarray:
        """``read()`` after checking that the chunk files of ``rows`` exist (zarr would fill
        a missing one with zeros); a chunk that cannot be decoded is named."""
        step = arr.chunks[0]
        chunks = (
            range(rows.start // step, (rows.stop - 1) // step + 1)
            if isinstance(rows, range)
            else np.unique(rows // step)
        )
        if not len(rows):
            chunks = range(0)
        self._require_chunks(arr, chunks)
        try:
            return np.asarray(read())
        except Exception as err:  # zarr and its codecs raise many kinds on damaged chunks
            bad = next((int(c) for c in chunks if not _decodes(arr, int(c))), None)
            where = self.path / "crops.zarr" if bad is None else self._chunk_file(arr, bad)
            raise ProjectError(
                f"{where} is corrupted ({type(err).__name__}: {err}). Restore it from a backup"
            ) from err

    def _require_chunks(self, arr: zarr.Array, chunks: Iterable[int]) -> None:
        """Refuse when a chunk file of ``chunks`` is missing (zarr would read it as zeros)."""
        step = arr.chunks[0]
        for chunk in chunks:
            file = self._chunk_file(arr, int(chunk))
            if not file.is_file():
                raise ProjectError(
                    f"{file} is missing: crops {chunk * step}-{(chunk + 1) * step - 1} cannot "
                    "be read (they would read as blank crops). Restore the file from a backup"
                )

    def _chunk_file(self, arr: zarr.Array, chunk: int) -> Path:
        key = arr.metadata.encode_chunk_key((chunk, *(0,) * (arr.ndim - 1)))
        return self.path / "crops.zarr" / key

    def iter_crops(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, crops)`` batches in storage order."""
        for start in range(0, len(self), batch_size):
            yield start, self.read_crops(slice(start, start + batch_size))

    def table(self, with_features: bool = True) -> pd.DataFrame:
        """The crop table (provenance, plus derived feature columns when present)."""
        if self._table_cache is None:
            parts = [self.path / "crops.parquet" / n for n in self._committed_parts()]
            self._table_cache = (
                pd.concat([_checked(p, pd.read_parquet) for p in parts], ignore_index=True)
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
        """One row per ingested source image (committed appends only)."""
        parts = self._image_parts()
        if not parts:
            return pd.DataFrame({"image_id": pd.Series(dtype=str)})
        return pd.concat(parts, ignore_index=True)

    def has_image(self, image_id: str) -> bool:
        """Whether a committed append holds ``image_id``."""
        self._image_parts()
        return any(image_id in ids for ids in self._image_ids.values())

    def _image_parts(self) -> list[pd.DataFrame]:
        """The committed images parts (each read once: committed parts never change)."""
        names = self._committed_parts()
        for name in names:
            if name not in self._image_rows:
                frame = _checked(self.path / "images.parquet" / name, pd.read_parquet)
                self._image_rows[name] = frame
                self._image_ids[name] = frozenset(frame["image_id"])
        return [self._image_rows[name] for name in names]

    def features(self) -> pd.DataFrame:
        """Derived per-crop columns (empty frame when none were written). After an append
        only the :data:`USER_COLUMNS` are kept (the new crops' values missing)."""
        path = self.path / "features.parquet"
        if not path.exists():
            return pd.DataFrame(index=pd.RangeIndex(0))
        import pyarrow.parquet as pq

        stored = _checked(path, pq.read_table)
        features = stored.to_pandas()
        for column in (stored.schema.pandas_metadata or {}).get("columns", []):
            name = column["name"]  # pyarrow drops integer categoricals; restore them
            if column["pandas_type"] == "categorical" and features[name].dtype != "category":
                features[name] = pd.Categorical(features[name])
        if len(features) < len(self):  # crops appended since: derived columns are stale
            kept = features[[c for c in USER_COLUMNS if c in features]]
            features = kept.reindex(pd.RangeIndex(len(self)))
        return features

    # ------------------------------------------------------------------ writing
    def append(self, image: dict, crops: np.ndarray, table: pd.DataFrame) -> range:
        """Append one image's crops and rows; returns the crop indices they received."""
        crops = self._check_batch(crops, table)
        with self._lock():
            return self._append_locked(image, crops, table)

    def append_new(
        self,
        image: dict,
        crops: np.ndarray,
        table: pd.DataFrame,
        labels: np.ndarray | None = None,
    ) -> range | None:
        """:meth:`append` (with the image's ``labels`` stored too) unless the project already
        holds ``image["image_id"]``; then nothing is written and None is returned. The
        check and the write are one step under the writer lock."""
        crops = self._check_batch(crops, table)
        with self._lock():
            self.refresh()
            if self.has_image(image["image_id"]):
                return None
            if labels is not None:
                self.write_labels(image["image_id"], labels)
            return self._append_locked(image, crops, table)

    def _check_batch(self, crops: np.ndarray, table: pd.DataFrame) -> np.ndarray:
        size = self.crop_size
        crops = np.asarray(crops)
        if crops.ndim != 3 or crops.shape[1:] != (size, size):
            raise ProjectError(
                f"crops of shape {crops.shape[1:]} do not fit this project ({size}x{size})"
            )
        if len(table) != len(crops):
            raise ProjectError(f"{len(crops)} crops but {len(table)} table rows")
        return crops

    def _append_locked(self, image: dict, crops: np.ndarray, table: pd.DataFrame) -> range:
        """The append itself (the caller holds the writer lock); see the module docstring."""
        self.refresh()
        size, parts = self.crop_size, self._committed_parts()
        start, stop = len(self), len(self) + len(crops)
        part = _part_name(len(parts))
        arr = zarr.open_array(
            str(self._inside("crops.zarr")), mode="r+", config={"write_empty_chunks": True}
        )
        self._inside("crops.zarr", "c")  # where the chunks go: refused if it leads out
        self._require_chunks(arr, range(-(-start // arr.chunks[0])))  # nothing lost so far
        shared = range(start - start % arr.chunks[0], start)  # committed rows in the first chunk
        self._read(arr, shared, lambda: arr[shared.start : shared.stop])  # rewritten: must be sound
        pending = self._inside(".append.pending")
        atomic_write_bytes(pending, part.encode())
        if arr.shape[0] != stop:
            arr.resize((stop, size, size))
        if len(crops):
            arr[start:stop] = to_storage(crops, self.meta.crop.storage_dtype)
        image_row = pd.DataFrame([{**image, "n_crops": len(crops), "first_crop": start}])
        atomic_write_parquet(self._inside("images.parquet", part), image_row)
        rows = table.reset_index(drop=True).copy()
        rows.insert(0, "crop_index", np.arange(start, stop, dtype=np.int64))
        self._update_meta()
        atomic_write_parquet(self._inside("crops.parquet", part), rows)  # the commit
        pending.unlink()
        self._committed, self._n_rows, self._table_cache = [*parts, part], stop, None
        self._part_rows[part] = len(rows)
        return range(start, stop)

    def write_features(self, columns: pd.DataFrame) -> None:
        """Add or replace derived per-crop columns (one row per crop, in crop order)."""
        with self._lock():
            self.refresh()
            if len(columns) != len(self):
                raise ProjectError(f"{len(columns)} feature rows for {len(self)} crops")
            features = self.features()
            if len(features) != len(self):
                features = pd.DataFrame(index=pd.RangeIndex(len(self)))
            for column in columns.columns:
                features[column] = columns[column].array  # keeps categoricals
            atomic_write_parquet(self._inside("features.parquet"), features)

    def _update_meta(self, **changes: object) -> None:
        """Rewrite project.json from its current contents plus ``changes`` (writer lock held),
        so that two processes never undo each other's changes."""
        meta_file = self._inside("project.json")
        try:
            meta = ProjectMeta.from_json(meta_file.read_text())
        except (ValueError, KeyError, TypeError) as err:
            raise ProjectError(f"{meta_file} is corrupted: {err}") from err
        for name, value in changes.items():
            setattr(meta, name, value)
        meta.updated = _now()
        atomic_write_bytes(meta_file, meta.to_json().encode())
        self.meta = meta

    @contextmanager
    def _lock(self, timeout: float | None = None) -> Iterator[None]:
        """The exclusive writer lock (re-entrant). Another live writer is waited for up to
        ``timeout`` seconds (default :data:`LOCK_TIMEOUT`); a lock whose holder ended
        without releasing it is taken over, with a note."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        lock = self._inside(".write.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise ProjectError(f"cannot take the writer lock {lock}: {err.strerror}") from err
        try:
            self._wait_for_lock(fd, LOCK_TIMEOUT if timeout is None else timeout)
            stale = _holder(fd)
            if stale:
                note = (
                    f"took over the writer lock of process {stale}, which ended without "
                    "releasing it; its unfinished append was left out"
                )
                self.notes.append(note)
                log.warning(note)
            _set_holder(fd, f"{os.getpid()}\n")
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                _set_holder(fd, "")
        finally:
            os.close(fd)

    def _wait_for_lock(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                holder = _holder(fd) or "unknown"
                raise ProjectError(
                    f"{self.path} is being written by another process (PID {holder}); waited "
                    f"{timeout:g} s for it to finish. Try again when it has finished"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------ models and latents
    def model_dir(self, name: str) -> Path:
        """``models/<name>`` for a model name (kept inside the project); anything else is
        returned as it is, for callers that accept a checkpoint path too."""
        if not MODEL_NAME.fullmatch(name):
            return self.path / "models" / name
        return self._inside("models", name)

    def latents_path(self, model: str) -> Path:
        """``latents/<model>.zarr`` (kept inside the project)."""
        return self._inside("latents", f"{model}.zarr")

    def set_active_model(self, name: str | None) -> None:
        """Make ``name`` (a model name, or None) the active model."""
        try:
            check_active_model(name)
        except ValueError as err:
            raise InputError(str(err)) from err
        with self._lock():
            self._update_meta(active_model=name)

    # ------------------------------------------------------------------ segmentations
    def labels_path(self, image_id: str) -> Path:
        """Where an image's segmentation is kept (ids that are not plain file names are
        hashed)."""
        name = str(image_id)
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", name):
            name = hashlib.sha1(name.encode()).hexdigest()[:16]
        return self._inside("labels", f"{name}.zarr")

    def write_labels(self, image_id: str, labels: np.ndarray) -> None:
        """Store an image's label image (compressed, in 1024-pixel tiles per plane, every
        tile on disk even when all background, so that a lost one is noticed), written beside
        its place and renamed in, replacing an earlier one (writer lock held)."""
        labels = np.asarray(labels)
        with self._lock():
            chunks = (*(1,) * (labels.ndim - 2), *(min(1024, n) for n in labels.shape[-2:]))
            with staged(self.labels_path(image_id)) as staging:
                out = zarr.open_array(
                    str(staging),
                    mode="w",
                    shape=labels.shape,
                    chunks=chunks,
                    dtype=labels.dtype,
                    config={"write_empty_chunks": True},
                )
                out[...] = labels
                out.attrs[EVERY_TILE] = True

    def read_labels(self, image_id: str) -> zarr.Array | None:
        """An image's stored segmentation (lazy), or None when the project has none; a
        lost tile raises :class:`ProjectError` (segmentations stored before tiles were
        all kept cannot tell a lost tile from background)."""
        path = self.labels_path(image_id)
        if not path.is_dir():
            return None
        labels = zarr.open_array(str(path), mode="r")
        lost = missing_chunk(labels, path) if labels.attrs.get(EVERY_TILE) else None
        if lost is not None:
            raise ProjectError(
                f"{lost[1]} is missing: part of the segmentation of image {image_id} cannot be "
                "read (it would read as background); segment the image again"
            )
        return labels


def missing_chunk(array: zarr.Array, path: Path) -> tuple[tuple[int, ...], Path] | None:
    """The grid index and file of the first chunk of ``array`` (stored at ``path``) that is
    not on disk, or None."""
    grid = (range(-(-size // step)) for size, step in zip(array.shape, array.chunks, strict=True))
    for index in itertools.product(*grid):
        key = path / array.metadata.encode_chunk_key(index)
        if not key.is_file():
            return index, key
    return None


def _umask() -> int:
    """The process umask (mkdtemp makes 0700 folders; a project gets the usual mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _checked(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, a damaged or unreadable file raising :class:`ProjectError` naming it."""
    try:
        return read(path)
    except FileNotFoundError as err:
        raise ProjectError(f"{path} is missing; restore it from a backup") from err
    except Exception as err:  # pyarrow and zarr raise many kinds on damaged files
        hint = " (or delete it: it holds derived columns only)" if path.name == FEATURES else ""
        raise ProjectError(
            f"{path} cannot be read ({type(err).__name__}: {err}); restore it from a backup{hint}"
        ) from err


def _decodes(arr: zarr.Array, chunk: int) -> bool:
    """Whether chunk ``chunk`` (along the first axis) of ``arr`` decodes."""
    step = arr.chunks[0]
    try:
        arr[chunk * step : (chunk + 1) * step]
    except Exception:  # see Project._read
        return False
    return True
