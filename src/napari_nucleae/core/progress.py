"""The callbacks every long core function takes: ``progress(done, total, message)`` and
``should_stop()`` (polled between units of work)."""

from collections.abc import Callable

Progress = Callable[[int, int, str], None]
ShouldStop = Callable[[], bool]


def never_stop() -> bool:
    """A ``should_stop`` that never asks to stop."""
    return False
