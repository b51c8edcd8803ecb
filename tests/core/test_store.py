import json

import numpy as np
import pandas as pd
import pytest

from napari_nucleae.core import store
from napari_nucleae.core.errors import InputError, ProjectError
from napari_nucleae.core.store import CropParams, Project


def _batch(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return rng.random((n, size, size), dtype=np.float32), pd.DataFrame(
        {"label": np.arange(1, n + 1)}
    )


def test_append_and_reopen_round_trip(tmp_path):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    a, ta = _batch(5, seed=1)
    b, tb = _batch(3, seed=2)
    assert project.append({"image_id": "a"}, a, ta) == range(0, 5)
    assert project.append({"image_id": "b"}, b, tb) == range(5, 8)
    reopened = Project.open(tmp_path / "p")
    assert len(reopened) == 8
    np.testing.assert_allclose(reopened.read_crops(slice(None)), np.concatenate([a, b]), atol=1e-4)
    np.testing.assert_allclose(
        reopened.read_crops([6, 0, 3]), np.concatenate([a, b])[[6, 0, 3]], atol=1e-4
    )
    table = reopened.table()
    assert table["crop_index"].tolist() == list(range(8))
    assert table["label"].tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
    assert reopened.images()["image_id"].tolist() == ["a", "b"]
    assert reopened.has_image("b") and not reopened.has_image("c")
    assert reopened.meta.crop == CropParams(size=16)


def test_projects_written_before_the_background_choice_still_open(tmp_path):
    for masked, background in ((True, "zero"), (False, "keep")):
        path = tmp_path / f"old{masked}"
        project = Project.create(path, CropParams(size=16))
        meta = json.loads((path / "project.json").read_text())
        del meta["crop"]["background"]
        meta["crop"]["mask_background"] = masked  # as written by earlier versions
        (path / "project.json").write_text(json.dumps(meta))
        assert Project.open(path).meta.crop == CropParams(size=16, background=background)
        assert project.meta.crop.background == "zero"


def test_storage_dtype_float32_is_exact(tmp_path):
    project = Project.create(tmp_path / "p", CropParams(size=16, storage_dtype="float32"))
    crops, table = _batch(4)
    project.append({"image_id": "a"}, crops, table)
    np.testing.assert_array_equal(project.read_crops(slice(None)), crops)


def test_chunks_hold_about_two_megabytes():
    assert store.chunk_rows(64, "uint16") == 256
    assert store.chunk_rows(256, "uint16") == 16
    assert store.chunk_rows(256, "float32") == 8


def test_interrupted_append_leaves_the_previous_state(tmp_path, monkeypatch):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    crops, table = _batch(5)
    project.append({"image_id": "a"}, crops, table)
    real_write = store.atomic_write_parquet

    def fail_on_crop_table(path, df):
        if path.parent.name == "crops.parquet":
            raise OSError("disk full")
        real_write(path, df)

    monkeypatch.setattr(store, "atomic_write_parquet", fail_on_crop_table)
    with pytest.raises(OSError, match="disk full"):
        project.append({"image_id": "b"}, *_batch(7, seed=1))
    monkeypatch.undo()
    reopened = Project.open(tmp_path / "p")
    assert reopened.crops.shape[0] == 12  # the array grew before the failure...
    assert len(reopened) == 5 and len(reopened.table()) == 5  # ...but only 5 rows are committed
    assert reopened.images()["image_id"].tolist() == ["a"]
    np.testing.assert_allclose(reopened.read_crops(slice(None)), crops, atol=1e-4)
    assert (tmp_path / "p" / ".write.lock").read_text() == ""  # released
    reopened.append({"image_id": "b"}, *_batch(2, seed=3))  # overwrites the unfinished rows
    again = Project.open(tmp_path / "p")
    assert len(again) == again.crops.shape[0] == 7
    assert again.images()["image_id"].tolist() == ["a", "b"]
    assert not (tmp_path / "p" / ".append.pending").exists()


def test_features_join_the_table(tmp_path):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    project.append({"image_id": "a"}, *_batch(4))
    project.write_features(pd.DataFrame({"mse": [0.1, 0.2, 0.3, 0.4]}))
    project.write_features(pd.DataFrame({"cluster": [1, 1, 2, 2]}))
    table = Project.open(tmp_path / "p").table()
    assert table["mse"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert table["cluster"].tolist() == [1, 1, 2, 2]
    with pytest.raises(ProjectError, match="3 feature rows for 4 crops"):
        project.write_features(pd.DataFrame({"mse": [1.0, 2.0, 3.0]}))


def test_misuse_gives_clear_errors(tmp_path):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    with pytest.raises(ProjectError, match="already contains a project"):
        Project.create(tmp_path / "p")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(ProjectError, match="not empty"):
        Project.create(tmp_path / "other")
    with pytest.raises(ProjectError, match="not a napari-nucleae project"):
        Project.open(tmp_path / "other")
    with pytest.raises(ProjectError, match="settings differ"):
        Project.open_or_create(tmp_path / "p", CropParams(size=32))
    with pytest.raises(ProjectError, match="do not fit"):
        project.append({"image_id": "x"}, np.zeros((2, 8, 8)), pd.DataFrame({"label": [1, 2]}))
    with pytest.raises(InputError, match="crop size"):
        CropParams(size=4)
    (tmp_path / "p" / "project.json").write_text("{not json")
    with pytest.raises(ProjectError, match="corrupted"):
        Project.open(tmp_path / "p")


def test_a_second_writer_is_refused_after_waiting(tmp_path, monkeypatch):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    monkeypatch.setattr(store, "LOCK_TIMEOUT", 0.2)
    other = Project.open(tmp_path / "p")
    with project._lock(), pytest.raises(ProjectError, match=r"another process \(PID \d+\)"):
        other.append({"image_id": "a"}, *_batch(1))
    with project._lock():  # re-entrant for its holder
        project.append({"image_id": "a"}, *_batch(1))
    assert len(Project.open(tmp_path / "p")) == 1


def test_categorical_features_stay_categorical(tmp_path):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    project.append({"image_id": "a"}, *_batch(3))
    flags = pd.Categorical(["low", "normal", "high"], categories=["low", "normal", "high"])
    project.write_features(pd.DataFrame({"outlier": flags, "cluster": pd.Categorical([2, 0, 2])}))
    table = Project.open(tmp_path / "p").table()
    assert isinstance(table["outlier"].dtype, pd.CategoricalDtype)
    assert list(table["outlier"].cat.categories) == ["low", "normal", "high"]
    assert table["cluster"].tolist() == [2, 0, 2]
    assert isinstance(table["cluster"].dtype, pd.CategoricalDtype)


def test_segmentations_are_stored_per_image_and_replaced(tmp_path):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    labels = np.zeros((2, 1500, 40), dtype=np.uint32)
    labels[1, 1200:1210, 5:9] = 70_000
    project.write_labels("abc123", labels)
    stored = project.read_labels("abc123")
    np.testing.assert_array_equal(stored[...], labels)
    assert stored.chunks == (1, 1024, 40)
    assert project.read_labels("other") is None

    project.write_labels("abc123", labels[:1])  # a re-ingest replaces it
    assert project.read_labels("abc123").shape == (1, 1500, 40)
    odd = "folder/../name with spaces"  # never a path outside labels/
    project.write_labels(odd, labels[0, :10])
    assert project.labels_path(odd).parent == project.path / "labels"
    np.testing.assert_array_equal(project.read_labels(odd)[...], labels[0, :10])
    assert sorted(p.name.startswith(".") for p in (project.path / "labels").iterdir()) == [
        False,
        False,
    ]
