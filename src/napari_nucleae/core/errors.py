"""Errors a user can act on; front ends show their message without a traceback."""

import errno


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


def describe_os_error(err: OSError) -> str:
    """One actionable line for an environment fault (a full disk, no permission ...)."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free some space or use another disk"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; choose a folder you can write to (and read from)"
    if err.errno == errno.EROFS:
        return f"the file system is read-only{where}; choose a folder you can write to"
    return f"{err.strerror or err}{where}"
