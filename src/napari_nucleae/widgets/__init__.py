"""Dock widgets: thin front ends that move data between napari layers and ``core``."""
