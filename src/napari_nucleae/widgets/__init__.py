"""The napari dock widgets. Importing them keeps triton out of a software-OpenGL session
(see :mod:`._triton`)."""

from ._triton import guard_triton

guard_triton()
