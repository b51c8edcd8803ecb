"""The napari dock widgets. They import torch: triton is guarded first (see
:mod:`napari_nucleae._triton`)."""

from .._triton import guard_triton

guard_triton()
