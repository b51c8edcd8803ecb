"""Keep triton out of a napari session drawn by Mesa's software OpenGL.

With a CUDA build of torch (which brings triton), importing triton after napari's canvas is
up segfaults the process when OpenGL is Mesa's llvmpipe (Xvfb, VNC, machines without a GPU
driver): Mesa's own LLVM is already loaded and clashes with the one inside triton. Imported
before the viewer, triton is fine; torch imports it lazily (``torch.compile``, dynamo,
cellpose 4), i.e. after the viewer. While Mesa's LLVM is loaded, :class:`TritonGuard` makes
``import triton`` raise ImportError instead, which torch treats as "no triton": compiled
paths fall back to eager code, and a warning says why.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from pathlib import Path

MAPS = Path("/proc/self/maps")
MESSAGE = (
    "napari-nucleae: triton is not imported in this napari session because OpenGL is Mesa's "
    "software renderer (llvmpipe), whose LLVM crashes triton's; torch runs without "
    "torch.compile/triton kernels. Import triton before starting napari to use it."
)


def mesa_llvm_loaded(maps: Path = MAPS) -> bool:
    """Whether Mesa's LLVM (libLLVM, as llvmpipe / gallium drivers load it) is mapped into
    this process (False where /proc is missing)."""
    try:
        text = maps.read_text()
    except OSError:
        return False
    return "libLLVM" in text


class TritonGuard(importlib.abc.MetaPathFinder):
    """A meta-path finder refusing ``triton`` while Mesa's LLVM is loaded."""

    def __init__(self, maps: Path = MAPS):
        self.maps = maps
        self.warned = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] != "triton" or not mesa_llvm_loaded(self.maps):
            return None
        if not self.warned:
            self.warned = True
            warnings.warn(MESSAGE, RuntimeWarning, stacklevel=2)
        raise ImportError(MESSAGE, name=fullname)


def guard_triton(maps: Path = MAPS) -> TritonGuard | None:
    """Install the guard once, when triton is installed and not imported yet; returns it."""
    for finder in sys.meta_path:
        if isinstance(finder, TritonGuard):
            return finder
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return None
    guard = TritonGuard(maps)
    sys.meta_path.insert(0, guard)
    return guard
