"""Image files → segmentation → crops → project, one image at a time or many through Dask."""

from __future__ import annotations

import glob
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .arrays import as_array, plane_indices, read_plane
from .crop import CropResult, crop_nuclei
from .errors import InputError, NoNucleiError, NucleaeError
from .progress import Progress, ShouldStop
from .segment import Segmentation, SegmentParams, prepare_planes, segment_planes
from .store import CropParams, Project

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class IngestParams:
    """Everything that turns one image into crops."""

    segment: SegmentParams = field(default_factory=SegmentParams)
    crop: CropParams = field(default_factory=CropParams)
    channel: int | None = None
    channel_axis: int | None = None
    stack: bool = False  # a 3-D image is a stack even if its planes differ like channels


@dataclass
class ImageResult:
    """One processed image: its record for ``images.parquet``, labels and crops."""

    record: dict
    segmentation: Segmentation
    crops: CropResult | None  # None when no nucleus was found

    @property
    def n_crops(self) -> int:
        return 0 if self.crops is None else len(self.crops.crops)


@dataclass(frozen=True)
class Failure:
    """An image that could not be processed, and why (returned, not raised, by workers)."""

    message: str


@dataclass
class IngestSummary:
    """What an ingest run did, image by image."""

    added: list[tuple[str, int]] = field(default_factory=list)  # (path, crops)
    skipped: list[str] = field(default_factory=list)  # already in the project
    empty: list[str] = field(default_factory=list)  # no nuclei found
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, message)
    notes: list[str] = field(default_factory=list)

    @property
    def n_crops(self) -> int:
        return sum(n for _, n in self.added)


# ---------------------------------------------------------------------------- files
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a regular file (links followed); a folder, FIFO, device, socket or
    dangling link raises :class:`InputError` before anything is read from it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        kind = "a dangling symbolic link" if path.is_symlink() else "missing"
        raise InputError(f"{path} is {kind}: there is no image file to read") from None
    except OSError as err:
        raise InputError(f"{path} cannot be read: {err.strerror or err}") from err
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise InputError(f"{path} is {kind}, not an image file")
    return path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (TIFF through tifffile, other formats through scikit-image)."""
    path = check_regular_file(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from skimage.io import imread

        return imread(path)
    except Exception as err:
        raise InputError(f"could not read {path}: {err}") from err


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Any]:
    """An image file as an array: TIFFs lazily through zarr (so that only the planes being
    processed are in memory), other formats read whole."""
    path = check_regular_file(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        yield read_image(path)
        return
    import tifffile
    import zarr

    try:
        store = tifffile.imread(path, aszarr=True, level=0)
    except Exception as err:
        raise InputError(f"could not read {path}: {err}") from err
    try:
        try:
            image = zarr.open_array(store, mode="r")
        except Exception as err:
            raise InputError(f"could not read {path}: {err}") from err
        yield image
    finally:
        store.close()


def file_checksum(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes (the id of an image file in a project)."""
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def array_checksum(image: Any) -> str:
    """SHA-1 of an array's shape, dtype and pixels (the id of an in-memory image), read one
    plane at a time when the array is lazy."""
    image = as_array(image)
    digest = hashlib.sha1(f"{tuple(image.shape)}{image.dtype}".encode())
    for index in plane_indices(image):
        digest.update(np.ascontiguousarray(read_plane(image, index)).data)
    return digest.hexdigest()[:16]


def image_identity(image: Any, path: str | os.PathLike | None = None) -> str:
    """The id of an image in a project, the same from the CLI and the viewer: the checksum of
    the file at ``path`` when it is a regular file holding ``image`` (same shape and dtype:
    not, say, one channel split off it), else the checksum of the pixels."""
    if path is not None:
        try:
            with open_image(check_regular_file(path)) as stored:
                same = tuple(stored.shape) == tuple(image.shape) and stored.dtype == image.dtype
        except InputError:
            same = False
        if same:
            return file_checksum(path)
    return array_checksum(image)


def expand_inputs(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns → image paths."""
    paths: list[Path] = []
    for item in items:
        item = Path(item).expanduser()
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found = [item]
        else:
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            if not found:
                raise InputError(f"{item} matches no file or folder")
        paths.extend(p for p in found if not p.stem.endswith("_labels"))
    return list(dict.fromkeys(paths))


# ---------------------------------------------------------------------------- one image
def process_image(
    image: Any,
    params: IngestParams,
    *,
    image_id: str | None = None,
    path: str = "",
    file: str | os.PathLike | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> ImageResult:
    """Segment and crop one image (2-D, a stack, or multichannel with a channel choice).

    A dask or zarr ``image`` is read one plane at a time. ``image_id`` defaults to
    :func:`image_identity` of the image and the ``file`` it came from (computed once the
    image passed the checks).
    """
    image = as_array(image)
    planes, is_stack = prepare_planes(
        image,
        params.channel,
        params.channel_axis,
        params.segment.max_plane_pixels,
        params.stack,
    )
    image_id = image_id or image_identity(image, file)
    seg = segment_planes(planes, params.segment, progress=progress, should_stop=should_stop)
    if not is_stack:
        planes, seg.labels = planes[0], seg.labels[0]
    record = {
        "image_id": image_id,
        "path": path,
        "shape": str(tuple(image.shape)),
        "dtype": str(image.dtype),
        "method": seg.method,
        "n_nuclei": seg.n_nuclei,
    }
    try:
        crops = crop_nuclei(planes, seg.labels, params.crop)
    except NoNucleiError:
        return ImageResult(record, seg, None)
    crops.table.insert(0, "image_id", image_id)
    crops.table.insert(1, "image_path", path)
    return ImageResult(record, seg, crops)


def process_file(path: str, params: IngestParams, image_id: str) -> ImageResult | Failure:
    """Read and process one image file (the unit of work sent to Dask workers). A file that
    cannot be used comes back as a :class:`Failure`: raised, Dask would log it as a crash."""
    try:
        with open_image(path) as image:
            return process_image(image, params, image_id=image_id, path=path)
    except NucleaeError as err:
        return Failure(str(err))
    except MemoryError:
        return Failure("ran out of memory on this image; process fewer images at a time")


def add_to_project(project: Project, result: ImageResult) -> range | None:
    """Store one processed image's segmentation and crops in the project (an image with no
    nuclei adds no crops); None, and nothing written, when the project already holds the
    image (the check and the write are one step under the project's writer lock)."""
    labels = result.segmentation.labels
    if result.crops is None:
        empty = np.zeros((0, project.crop_size, project.crop_size))
        return project.append_new(result.record, empty, pd.DataFrame(), labels)
    return project.append_new(result.record, result.crops.crops, result.crops.table, labels)


# ---------------------------------------------------------------------------- many images
def ingest(
    paths: Iterable[str | os.PathLike],
    project: Project,
    params: IngestParams,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> IngestSummary:
    """Process image files in parallel through Dask and append them to ``project``.

    Images already in the project (same file checksum) are skipped, so re-runs, and
    other processes ingesting the same files at the same time, add nothing twice. A file
    that cannot be used (not a regular file, unreadable, no usable pixels) is listed in
    ``failed`` and the others go on. ``scheduler`` is a ``dask.distributed`` address; by
    default a local in-process cluster is used. Only the calling process writes to the
    project.
    """
    summary = IngestSummary()
    todo = _plan(paths, project, summary)
    if todo:
        _run(todo, project, params, summary, scheduler, workers, progress, should_stop)
    summary.notes.extend(note for note in project.notes if note not in summary.notes)
    return summary


def _plan(
    paths: Iterable[str | os.PathLike], project: Project, summary: IngestSummary
) -> list[tuple[str, str]]:
    """The ``(path, image_id)`` pairs to process: regular files not yet in the project."""
    todo: list[tuple[str, str]] = []
    known = set(project.images()["image_id"])
    for path in map(str, paths):
        try:
            image_id = file_checksum(check_regular_file(path))
        except InputError as err:
            summary.failed.append((path, str(err)))
            continue
        except OSError as err:  # e.g. no permission to read it
            summary.failed.append((path, f"cannot be read: {err.strerror or err}"))
            continue
        if image_id in known:
            summary.skipped.append(path)
        else:
            known.add(image_id)
            todo.append((path, image_id))
    return todo


def _run(
    todo: list[tuple[str, str]],
    project: Project,
    params: IngestParams,
    summary: IngestSummary,
    scheduler: str | None,
    workers: int | None,
    progress: Progress | None,
    should_stop: ShouldStop | None,
) -> None:
    """Process ``todo`` through Dask, writing each image to the project as it finishes."""
    from distributed import Client, LocalCluster, as_completed

    workers = workers or min(4, os.cpu_count() or 1)
    cluster = (
        None
        if scheduler
        else LocalCluster(
            n_workers=1, threads_per_worker=workers, processes=False, dashboard_address=None
        )
    )
    try:
        with Client(scheduler or cluster) as client:
            pending = iter(todo)
            running = as_completed()
            futures: dict = {}

            def submit_next() -> None:
                item = next(pending, None)
                if item is not None:
                    future = client.submit(process_file, item[0], params, item[1], pure=False)
                    futures[future] = item[0]
                    running.add(future)

            for _ in range(2 * workers):
                submit_next()
            for done, future in enumerate(running, start=1):
                path = futures.pop(future)
                _collect(project, path, future, summary)
                if progress is not None:
                    progress(done, len(todo), f"{Path(path).name}: {summary_line(summary)}")
                if should_stop is not None and should_stop():
                    for other in futures:
                        other.cancel()
                    summary.notes.append("cancelled: the remaining images were not processed")
                    break
                submit_next()
    finally:  # a failed write (a full disk) ends the run
        if cluster is not None:
            cluster.close()


def _collect(project: Project, path: str, future, summary: IngestSummary) -> None:
    """Write one finished image to the project and record the outcome."""
    result: ImageResult | Failure = future.result()
    if isinstance(result, Failure):
        summary.failed.append((path, result.message))
        return
    method_note = result.segmentation.method_note
    if method_note and method_note not in summary.notes:
        summary.notes.append(method_note)
    summary.notes.extend(f"{path}: {warning}" for warning in result.segmentation.warnings)
    if add_to_project(project, result) is None:
        summary.skipped.append(path)  # another process added it meanwhile
    elif result.crops is None:
        summary.empty.append(path)
    else:
        summary.added.append((path, result.n_crops))


def summary_line(summary: IngestSummary) -> str:
    """A one-line count of an ingest summary."""
    return (
        f"{len(summary.added)} images added ({summary.n_crops} crops), "
        f"{len(summary.skipped)} already present, {len(summary.empty)} without nuclei, "
        f"{len(summary.failed)} failed"
    )


def process_layer(
    image: Any,
    params: IngestParams,
    *,
    name: str,
    path: str | os.PathLike | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> ImageResult:
    """Process a napari layer's data (NumPy, dask or zarr). ``path`` is the file the layer was
    opened from, if any: see :func:`image_identity` (the id the CLI gives that file)."""
    return process_image(
        image,
        params,
        path=str(path) if path is not None else name,
        file=path,
        progress=progress,
        should_stop=should_stop,
    )
