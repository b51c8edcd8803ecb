"""Faults a project store must survive without losing data: readers in other processes while
appends run, two writers, writers killed with SIGKILL, files and chunks gone or damaged, and
links that lead out of the project folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from napari_nucleae.core import store
from napari_nucleae.core.errors import InputError, ProjectError
from napari_nucleae.core.store import CropParams, Project

PARAMS = CropParams(size=64, storage_dtype="float32")  # 128 crops per chunk
BATCHES = textwrap.dedent(
    """
    import numpy as np
    import pandas as pd

    def batch(i):
        rng = np.random.default_rng(i)
        n = int(rng.integers(0, 12))
        crops = rng.random((n, 64, 64), dtype=np.float32)
        return crops, pd.DataFrame({"label": np.arange(1, n + 1), "image_id": f"img{i}"})
    """
)
namespace: dict = {}
exec(BATCHES, namespace)
batch = namespace["batch"]


def run_script(body: str, *args: object) -> subprocess.Popen:
    """Start ``body`` (with ``batch`` defined) in a new Python process; stdout is a pipe."""
    source = BATCHES + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", source, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    """Wait until ``path`` exists (a bounded wait: the test fails if ``proc`` dies first)."""
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the other process ended first: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: no sign from the other process in 120 s")
        time.sleep(0.01)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_same_project(a: Project, b: Project) -> None:
    """Two projects hold the same committed crops, crop table and image table."""
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.read_crops(slice(None)), b.read_crops(slice(None)))
    pd.testing.assert_frame_equal(a.table(), b.table())
    pd.testing.assert_frame_equal(a.images(), b.images())


def filled(path: Path, n_batches: int) -> Project:
    project = Project.create(path, PARAMS)
    for i in range(n_batches):
        project.append({"image_id": f"img{i}"}, *batch(i))
    return project


READER = """
    import json, sys
    from pathlib import Path
    from napari_nucleae.core.store import Project

    path, signals = Path(sys.argv[1]), Path(sys.argv[2])
    seen = set()
    while True:
        done = (signals / "done").exists()
        project = Project.open(path)
        n = len(project)
        table, images = project.table(), project.images()
        assert table["crop_index"].tolist() == list(range(n))
        if len(images):
            assert images["first_crop"].tolist() == [0, *images["n_crops"].cumsum()[:-1]]
        expected = [batch(int(i[3:]))[0] for i in images["image_id"]]
        np.testing.assert_array_equal(
            project.read_crops(slice(None)), np.concatenate([np.zeros((0, 64, 64)), *expected])
        )
        seen.add(len(images))
        (signals / f"seen-{len(images)}").touch()
        if done:
            break
    print(json.dumps(sorted(seen)))
"""


def test_a_reader_in_another_process_during_appends_changes_nothing(tmp_path):
    path, signals = tmp_path / "p", tmp_path / "signals"
    signals.mkdir()
    project = Project.create(path, PARAMS)
    reader = run_script(READER, path, signals)
    wait_for(signals / "seen-0", reader, "reader start")
    for i in range(60):
        project.append({"image_id": f"img{i}"}, *batch(i))
        if i % 15 == 14:  # the reader must have read this state at least once
            wait_for(signals / f"seen-{i + 1}", reader, f"reader at {i + 1} images")
    (signals / "done").touch()
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err
    assert {15, 30, 45, 60} <= set(json.loads(out))
    assert_same_project(Project.open(path), filled(tmp_path / "clean", 60))
    assert Project.open(path).crops.shape[0] == len(project)


WRITER = """
    import sys
    from napari_nucleae.core.store import Project

    project = Project.open(sys.argv[1])
    for i in map(int, sys.argv[2:]):
        crops, table = batch(i)
        project.append_new({"image_id": f"img{i}"}, crops, table)
"""


def test_two_processes_adding_the_same_images_add_each_once(tmp_path):
    path = tmp_path / "p"
    Project.create(path, PARAMS)
    order = list(range(30))
    writers = [run_script(WRITER, path, *order), run_script(WRITER, path, *order[::-1])]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
    project = Project.open(path)
    ids = project.images()["image_id"]
    assert sorted(ids) == sorted(f"img{i}" for i in order) and ids.is_unique
    assert len(project) == sum(len(batch(i)[0]) for i in order)
    for image in project.images().itertuples():
        rows = slice(image.first_crop, image.first_crop + image.n_crops)
        np.testing.assert_array_equal(project.read_crops(rows), batch(int(image.image_id[3:]))[0])


HOLDER = """
    import sys, time
    from pathlib import Path
    from napari_nucleae.core import store
    from napari_nucleae.core.store import Project

    project = Project.open(sys.argv[1])
    if sys.argv[2] == "append":  # stall an append just before its commit
        real = store.atomic_write_parquet

        def stall(path, df):
            if path.parent.name == "crops.parquet":
                Path(sys.argv[3]).touch()
                time.sleep(600)
            real(path, df)

        store.atomic_write_parquet = stall
        project.append({"image_id": "killed"}, *batch(99))
    with project._lock():
        Path(sys.argv[3]).touch()
        time.sleep(600)
"""


@pytest.mark.parametrize("when", ["holding the lock", "in the middle of an append"])
def test_a_writer_killed_by_sigkill_loses_nothing(tmp_path, when):
    path = tmp_path / "p"
    filled(path, 3)
    mode = "append" if when == "in the middle of an append" else "lock"
    holder = run_script(HOLDER, path, mode, tmp_path / "ready")
    wait_for(tmp_path / "ready", holder, "lock holder")
    holder.kill()  # SIGKILL: no cleanup runs
    holder.wait()
    before = files_of(path)
    reader = Project.open(path)
    assert_same_project(reader, filled(tmp_path / "before", 3))
    assert files_of(path) == before  # opening and reading changed nothing
    reader.append({"image_id": "img3"}, *batch(3))
    assert reader.notes == [
        f"took over the writer lock of process {holder.pid}, which ended without releasing "
        "it; its unfinished append was left out"
    ]
    assert_same_project(Project.open(path), filled(tmp_path / "clean", 4))
    assert reader.crops.shape[0] == len(reader)  # the unfinished rows were overwritten
    assert not (path / ".append.pending").exists()


def test_a_live_writer_is_waited_for_then_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / "p"
    filled(path, 2)
    holder = run_script(HOLDER, path, "lock", tmp_path / "ready")
    try:
        wait_for(tmp_path / "ready", holder, "lock holder")
        monkeypatch.setattr(store, "LOCK_TIMEOUT", 0.3)
        before = files_of(path)
        with pytest.raises(ProjectError) as refused:
            Project.open(path).append({"image_id": "img2"}, *batch(2))
        assert str(refused.value) == (
            f"{path} is being written by another process (PID {holder.pid}); waited 0.3 s "
            "for it to finish. Try again when it has finished"
        )
        assert files_of(path) == before
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- lost files
def committed_files(path: Path) -> list[str]:
    """The files a committed project cannot do without (table parts and crop chunks)."""
    names = [f"crops.parquet/{n}" for n in os.listdir(path / "crops.parquet")]
    names += [f"images.parquet/{n}" for n in os.listdir(path / "images.parquet")]
    names += [str(p.relative_to(path)) for p in (path / "crops.zarr" / "c").rglob("*")]
    return sorted(n for n in names if (path / n).is_file())


def read_everything(path: Path) -> None:
    project = Project.open(path)
    project.table(), project.images(), project.read_crops(slice(None))


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(n_batches=st.integers(1, 40), pick=st.floats(0, 1, exclude_max=True))
@example(n_batches=18, pick=0.484375)  # a chunk in the middle: an append must refuse too
def test_any_lost_file_is_named_and_nothing_is_deleted(tmp_path_factory, n_batches, pick):
    path = tmp_path_factory.mktemp("lost") / "p"
    project = filled(path, n_batches)
    candidates = committed_files(path)
    lost = candidates[int(pick * len(candidates))]
    (path / lost).unlink()
    before = files_of(path)
    for attempt in (
        lambda: read_everything(path),
        lambda: project.append({"image_id": "new"}, *batch(1000)),
    ):
        with pytest.raises(ProjectError, match="missing") as error:
            attempt()
        assert str(path / lost) in str(error.value)
        assert files_of(path) == before  # no "repair" deleted anything


def test_a_lost_background_tile_of_a_segmentation_is_named(tmp_path):
    project = Project.create(tmp_path / "p", CropParams(size=16))
    labels = np.zeros((2048, 1100), np.uint16)  # 2 x 2 tiles of 1024 px
    labels[10:20, 10:20] = 1  # only the first tile holds a nucleus
    project.write_labels("img", labels)
    np.testing.assert_array_equal(project.read_labels("img")[...], labels)
    tiles = sorted(p for p in (project.labels_path("img") / "c").rglob("*") if p.is_file())
    assert len(tiles) == 4  # the all-background tiles are on disk too
    tiles[-1].unlink()
    before = files_of(tmp_path / "p")
    with pytest.raises(ProjectError, match=f"{tiles[-1]} is missing.*segment the image again"):
        Project.open(tmp_path / "p").read_labels("img")
    assert files_of(tmp_path / "p") == before


def test_a_damaged_chunk_is_named_not_read_as_zeros(tmp_path):
    path = tmp_path / "p"
    project = filled(path, 60)
    assert len(project) > 2 * project.crops.chunks[0]
    first_chunk = project.read_crops(slice(0, 128))
    chunk = path / "crops.zarr" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    chunk.write_bytes(bytes(data))
    reopened = Project.open(path)
    np.testing.assert_array_equal(reopened.read_crops(slice(0, 128)), first_chunk)
    with pytest.raises(ProjectError, match=f"{chunk} is corrupted"):
        reopened.read_crops(slice(100, 300))
    with pytest.raises(ProjectError, match=f"{chunk} is corrupted"):
        reopened.read_crops([5, 200])
    chunk.write_bytes(b"")
    with pytest.raises(ProjectError, match=f"{chunk} is corrupted"):
        list(reopened.iter_crops(64))


def test_features_that_cannot_be_read_are_named(tmp_path):
    project = filled(tmp_path / "p", 3)
    (project.path / "features.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ProjectError, match="features.parquet cannot be read .*or delete it"):
        project.table()


# ---------------------------------------------------------------------------- hostile folders
@pytest.mark.parametrize(
    ("link", "write"),
    [
        ("labels", lambda p: p.write_labels("img", np.ones((16, 16), np.uint16))),
        ("crops.parquet", lambda p: p.append({"image_id": "x"}, *batch(1))),
        ("crops.zarr", lambda p: p.append({"image_id": "x"}, *batch(1))),
        ("models/default", lambda p: p.model_dir("default")),
        ("latents", lambda p: p.latents_path("default")),
        (".write.lock", lambda p: p.write_features(pd.DataFrame(index=range(len(p))))),
    ],
)
def test_links_out_of_the_project_are_refused_for_writes(tmp_path, link, write):
    project = filled(tmp_path / "p", 2)
    outside = tmp_path / "elsewhere"
    target = project.path / link
    if target.exists():
        target.rename(outside)
    else:
        outside.mkdir()
    target.parent.mkdir(exist_ok=True)
    target.symlink_to(outside)
    before = files_of(outside) if outside.is_dir() else outside.read_bytes()
    with pytest.raises(ProjectError, match="leads outside the project folder"):
        write(project)
    assert (files_of(outside) if outside.is_dir() else outside.read_bytes()) == before


def test_links_that_stay_inside_the_project_are_followed(tmp_path):
    project = filled(tmp_path / "p", 1)
    (project.path / "stash").mkdir()
    (project.path / "models").mkdir()
    (project.path / "models" / "default").symlink_to(project.path / "stash")
    assert project.model_dir("default").resolve() == (project.path / "stash").resolve()


@pytest.mark.parametrize("name", ["/etc", "../elsewhere", "a/b", ""])
def test_the_active_model_must_be_a_plain_name(tmp_path, name):
    project = filled(tmp_path / "p", 1)
    with pytest.raises(InputError, match="must be a model name"):
        project.set_active_model(name)
    meta = json.loads((project.path / "project.json").read_text())
    meta["active_model"] = name
    (project.path / "project.json").write_text(json.dumps(meta))
    with pytest.raises(ProjectError, match="project.json is corrupted: active_model must be"):
        Project.open(project.path)


def test_a_project_path_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    for attempt in (Project.open, Project.create, Project.open_or_create):
        with pytest.raises(ProjectError, match="is a file"):
            attempt(blocker)
    assert blocker.read_text() == "x"


def test_concurrent_settings_changes_are_not_undone(tmp_path):
    first = filled(tmp_path / "p", 1)
    second = Project.open(first.path)
    first.set_active_model("ae")
    second.append({"image_id": "img1"}, *batch(1))  # its meta predates set_active_model
    assert Project.open(first.path).meta.active_model == "ae"


def test_a_reader_thread_during_appends_sees_committed_rows_only(tmp_path):
    """As in the viewer: a widget opens and reads the project while Segment appends."""
    path = tmp_path / "p"
    project = Project.create(path, PARAMS)
    done, seen, problems = threading.Event(), set(), []

    def read_in_a_loop() -> None:
        try:
            while not done.is_set():
                reader = Project.open(path)
                images = reader.images()
                expected = [batch(int(i[3:]))[0] for i in images["image_id"]]
                crops = reader.read_crops(slice(None))
                np.testing.assert_array_equal(
                    crops, np.concatenate([np.zeros((0, 64, 64)), *expected])
                )
                assert len(reader.table()) == len(crops)
                seen.add(len(images))
        except Exception as err:  # reported below, in the test's thread
            problems.append(err)

    thread = threading.Thread(target=read_in_a_loop)
    thread.start()
    for i in range(40):
        project.append({"image_id": f"img{i}"}, *batch(i))
        deadline = time.monotonic() + 120
        while i % 10 == 9 and i + 1 not in seen and not problems:  # let it read this state
            assert time.monotonic() < deadline, "the reader thread read nothing in 120 s"
            time.sleep(0.01)
    done.set()
    thread.join()
    assert not problems
    assert {10, 20, 30, 40} <= seen
    assert_same_project(Project.open(path), filled(tmp_path / "clean", 40))


@pytest.mark.parametrize("damage", ["lost", "damaged"])
def test_an_append_never_rewrites_a_lost_or_damaged_chunk_as_zeros(tmp_path, damage):
    project = filled(tmp_path / "p", 30)
    step = project.crops.chunks[0]
    assert len(project) % step  # the last chunk is shared with the next append
    chunk = project.path / "crops.zarr" / "c" / str(len(project) // step) / "0" / "0"
    if damage == "lost":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:-9])
    before = files_of(project.path)
    with pytest.raises(ProjectError, match=f"{chunk} is (missing|corrupted)"):
        project.append({"image_id": "new"}, *batch(1000))
    assert files_of(project.path) == before
