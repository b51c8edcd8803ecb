"""Errors a user can act on; front ends show their message without a traceback."""


class NucleaeError(Exception):
    """Base class of every error napari-nucleae reports to users."""


class InputError(NucleaeError, ValueError):
    """An image, labels array or parameter that cannot be used as given."""


class NoNucleiError(NucleaeError):
    """Segmentation found no nuclei (or none survived the filters)."""


class WeightsUnavailableError(NucleaeError):
    """Model weights are missing locally and could not be downloaded."""


class ProjectError(NucleaeError):
    """A project folder is missing, corrupted or incompatible."""
