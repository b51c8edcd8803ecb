"""Headless core of napari-nucleae: no Qt, no napari imports."""
