"""Images that may not fit in memory: NumPy arrays as they are, anything else read lazily.

dask arrays stay lazy; other array-likes with ``shape``, ``dtype`` and indexing (zarr, h5py,
tifffile's zarr stores ...) are wrapped in dask. The pipeline then reads a stack one plane at
a time through :func:`read_plane`.
"""

from __future__ import annotations

from types import EllipsisType
from typing import Any

import numpy as np

from .errors import InputError, NucleaeError

# dask's synchronous scheduler reads in the calling thread, and is safe inside Dask workers
SCHEDULER = "synchronous"


def as_array(image: Any) -> Any:
    """A NumPy array, or a dask array for dask, zarr and other lazy array-likes."""
    if isinstance(image, np.ndarray):
        return image
    import dask.array as da

    if isinstance(image, da.Array):
        return image
    if all(hasattr(image, name) for name in ("shape", "dtype", "ndim", "__getitem__")):
        return da.from_array(image, asarray=True)
    return np.asarray(image)


def read_plane(image: Any, index: int | EllipsisType) -> np.ndarray:
    """``image[index]`` in memory; pixels that cannot be decoded (a truncated or damaged
    file behind a lazy array) raise :class:`InputError`."""
    part = image[index]
    if isinstance(part, np.ndarray):
        return part
    try:
        return np.asarray(part.compute(scheduler=SCHEDULER))
    except (NucleaeError, MemoryError):
        raise
    except Exception as err:  # codecs and stores raise many kinds on damaged data
        where = "" if index is ... else f" (plane {index})"
        raise InputError(
            f"the image's pixels could not be read{where}: {type(err).__name__}: {err}; the "
            "file may be truncated or damaged"
        ) from err


def plane_indices(image: Any) -> range | list[EllipsisType]:
    """Indices that read a 3-D+ image one block of its first axis at a time (2-D: at once)."""
    return range(image.shape[0]) if image.ndim >= 3 else [...]


def pixel_range(planes: Any) -> tuple[bool, float, float]:
    """Whether every pixel of ``planes`` ``(P, Y, X)`` is finite, the minimum and the maximum
    (a lazy stack is read one plane at a time)."""
    lazy = not isinstance(planes, np.ndarray)
    blocks = (read_plane(planes, i) for i in range(len(planes))) if lazy else [planes]
    floating = np.issubdtype(planes.dtype, np.floating)
    finite, lo, hi = True, np.inf, -np.inf
    for block in blocks:
        finite = finite and (not floating or bool(np.isfinite(block).all()))
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return finite, lo, hi
