"""Write a folder in full beside its place, then swap it in: a reader sees the old folder or
the new one, never a half-written one, and a failure leaves the old one as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def hidden_sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name beside ``target`` (``.<name>.<kind>-<random>``)."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def staged(target: Path, *, merge: bool = False) -> Iterator[Path]:
    """A hidden staging folder beside ``target`` to write into; when the block ends without
    an error, the staging folder replaces ``target`` (the old one is removed only after the
    swap) or, with ``merge``, its files are moved into ``target`` one by one (other files
    there are left alone). The staging folder is removed whatever happens."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(target, "partial")
    staging.mkdir()
    try:
        yield staging
        if merge and target.exists():
            for name in sorted(p.name for p in staging.iterdir()):
                os.replace(staging / name, target / name)
        else:
            swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and removed
    after the rename."""
    old = hidden_sibling(target, "old")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
