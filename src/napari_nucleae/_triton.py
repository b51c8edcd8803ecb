"""Keep triton from crashing a napari session drawn by Mesa's software OpenGL.

With a CUDA build of torch (which brings triton), importing triton after napari's canvas is
up segfaults the process when OpenGL is Mesa's llvmpipe (Xvfb, VNC, machines without a GPU
driver): Mesa's own LLVM is already loaded and clashes with the one inside triton. torch
imports triton lazily (``import torch`` itself checks it in torch 2.14; ``torch.compile``,
dynamo and cellpose 4 use it), so the first import of torch in the viewer would crash it.

:func:`guard_triton` runs before the plugin imports torch (widgets and reader): while no
Mesa LLVM is loaded it imports triton at once (that is safe); once it is loaded it hides
triton (``sys.modules["triton"] = None``: ``find_spec`` says "absent", ``import`` raises
ImportError), torch runs without triton kernels, and a warning says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Literal

MAPS = Path("/proc/self/maps")
MESSAGE = (
    "napari-nucleae: triton is not used in this napari session because OpenGL is Mesa's "
    "software renderer (llvmpipe), whose LLVM crashes triton's; torch runs without "
    "torch.compile/triton kernels. Import triton before starting napari to use it."
)
Outcome = Literal["absent", "present", "imported", "hidden"]


def mesa_llvm_loaded(maps: Path = MAPS) -> bool:
    """Whether Mesa's LLVM (libLLVM, as llvmpipe and gallium drivers load it) is mapped into
    this process (False where /proc is missing)."""
    try:
        text = maps.read_text()
    except OSError:
        return False
    return "libLLVM" in text


def guard_triton(maps: Path = MAPS) -> Outcome:
    """Import triton now, or hide it when that would crash; returns what was done."""
    if "triton" in sys.modules:
        return "hidden" if sys.modules["triton"] is None else "present"
    if importlib.util.find_spec("triton") is None:
        return "absent"
    if mesa_llvm_loaded(maps):
        sys.modules["triton"] = None
        warnings.warn(MESSAGE, RuntimeWarning, stacklevel=2)
        return "hidden"
    importlib.import_module("triton")
    return "imported"
