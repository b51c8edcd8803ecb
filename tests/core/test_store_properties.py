"""Property-based tests of appends: any sequence of batches (some interrupted by a simulated
full disk) gives the concatenation of the completed ones, before and after reopening."""

import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_nucleae.core import store
from napari_nucleae.core.store import CropParams, Project

SIZE = 8
STAGES = (None, "array", "images.parquet", "crops.parquet")  # where an append fails, if at all


@contextmanager
def disk_full_at(stage: str | None):
    """Make the append fail at ``stage``: while writing the crops array or a table part."""
    if stage is None:
        yield
        return
    real_write = store.atomic_write_parquet

    def write(path: Path, df: pd.DataFrame) -> None:
        if path.parent.name == stage:
            raise OSError("disk full")
        real_write(path, df)

    def to_storage(crops: np.ndarray, dtype: str) -> np.ndarray:
        raise OSError("disk full")

    with (
        mock.patch.object(store, "atomic_write_parquet", write),
        mock.patch.object(
            store, "to_storage", to_storage if stage == "array" else store.to_storage
        ),
    ):
        yield


def check_state(project: Project, crops: list[np.ndarray], ids: list[str], atol: float) -> None:
    """The project holds exactly the completed batches, in order."""
    expected = np.concatenate([np.zeros((0, SIZE, SIZE), np.float32), *crops])
    assert len(project) == len(expected)
    np.testing.assert_allclose(project.read_crops(slice(None)), expected, atol=atol)
    table = project.table()
    assert table["crop_index"].tolist() == list(range(len(expected)))
    assert table.get("image_id", pd.Series(dtype=object)).tolist() == [
        image_id for image_id, part in zip(ids, crops, strict=True) for _ in range(len(part))
    ]
    assert table.get("label", pd.Series(dtype=object)).tolist() == [
        label for part in crops for label in range(1, len(part) + 1)
    ]
    images = project.images()
    assert images["image_id"].tolist() == ids
    if ids:
        assert images["n_crops"].tolist() == [len(part) for part in crops]
        assert images["first_crop"].tolist() == np.cumsum([0, *map(len, crops)])[:-1].tolist()


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@settings(max_examples=30, deadline=None, database=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 9), st.sampled_from(STAGES)), min_size=1, max_size=6),
    storage_dtype=st.sampled_from(store.STORAGE_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_appends_equal_the_concatenation_of_the_completed_batches(steps, storage_dtype, seed):
    rng = np.random.default_rng(seed)
    atol = 0 if storage_dtype == "float32" else 0.5 / np.iinfo(storage_dtype).max + 1e-7
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p"
        project = Project.create(path, CropParams(size=SIZE, storage_dtype=storage_dtype))
        done_crops: list[np.ndarray] = []
        done_ids: list[str] = []
        for i, (n, stage) in enumerate(steps):
            crops = rng.random((n, SIZE, SIZE), dtype=np.float32)
            table = pd.DataFrame({"image_id": [f"img{i}"] * n, "label": np.arange(1, n + 1)})
            fails = stage is not None and (stage != "array" or n > 0)
            with disk_full_at(stage):
                if fails:
                    with pytest.raises(OSError, match="disk full"):
                        project.append({"image_id": f"img{i}"}, crops, table)
                else:
                    added = project.append({"image_id": f"img{i}"}, crops, table)
                    assert added == range(len(project) - n, len(project))
                    done_crops.append(crops)
                    done_ids.append(f"img{i}")
            assert (path / ".write.lock").read_text() == ""  # released
            before = files_of(path)
            check_state(Project.open(path), done_crops, done_ids, atol)
            assert files_of(path) == before  # reading changed nothing
        check_state(project, done_crops, done_ids, atol)
