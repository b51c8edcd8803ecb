"""The ``nucleae`` command under bad inputs and a hostile environment: one line per problem,
exit status 1 (2 for usage errors), never a traceback, and the good images still added."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_nucleae.cli import main
from napari_nucleae.core import store
from napari_nucleae.core.embed import embed
from napari_nucleae.core.errors import describe_os_error
from napari_nucleae.core.export import FORMULA_STARTS, spreadsheet_safe
from napari_nucleae.core.model import ModelConfig
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.core.training import train
from napari_nucleae.sample import bbbc007_paths

INGEST = ["--method", "classical", "--crop-size", "32", "--workers", "2"]


def nucleae(*args: object) -> subprocess.CompletedProcess:
    """Run the command in a new process (so that every log line it prints is seen)."""
    return subprocess.run(
        [sys.executable, "-m", "napari_nucleae.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def broken_files(folder: Path) -> dict[str, str]:
    """Files named like images that are not usable ones; name -> expected message."""
    folder.mkdir()
    pixels = tifffile.imread(bbbc007_paths()[1])
    tifffile.imwrite(folder / "whole.tif", pixels, compression="zlib", tile=(64, 64))
    data = (folder / "whole.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    (folder / "whole.tif").unlink()
    (folder / "dangling.tif").symlink_to(folder / "gone.tif")
    (folder / "folder.tif").mkdir()
    os.mkfifo(folder / "fifo.tif")
    (folder / "zero.tif").symlink_to("/dev/zero")
    return {
        "truncated.tif": "the image's pixels could not be read",
        "dangling.tif": "is a dangling symbolic link: there is no image file to read",
        "folder.tif": "is a folder, not an image file",
        "fifo.tif": "is a named pipe (FIFO), not an image file",
        "zero.tif": "is a character device, not an image file",
    }


def test_ingest_goes_on_past_broken_files_and_lists_each_in_one_line(tmp_path):
    images = tmp_path / "images"
    expected = broken_files(images)
    shutil.copy(bbbc007_paths()[0], images / "good.tif")
    run = nucleae("ingest", images, "--project", tmp_path / "p", *INGEST)
    assert run.returncode == 1
    failed = [line for line in run.stdout.splitlines() if line.startswith("failed: ")]
    assert len(failed) == len(expected)
    for name, message in expected.items():
        assert any(
            line.startswith(f"failed: {images / name}: ") and message in line for line in failed
        )
    assert "1 images added" in run.stdout and "5 failed" in run.stdout
    assert "nucleae ingest: 5 images failed" in run.stderr
    for noise in ("Traceback", "Compute Failed", "Task exception"):
        assert noise not in run.stdout + run.stderr
    project = Project.open(tmp_path / "p")
    assert project.images()["path"].tolist() == [str(images / "good.tif")]
    assert len(project) > 50


def test_the_cellpose_fallback_is_announced_once(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in bbbc007_paths()[:3]:
        shutil.copy(path, images / Path(path).name.replace(" ", "_"))
    missing = tmp_path / "no-such-model"
    run = nucleae(
        "ingest", images, "--project", tmp_path / "p", "--model", missing, "--workers", "2"
    )
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert output.count("cellpose unavailable") == 1 and "note: cellpose unavailable" in output
    assert str(missing) in output


def test_an_all_bad_batch_exits_1(tmp_path, capsys):
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    assert main(["ingest", str(tmp_path / "bad.tif"), "--project", str(tmp_path / "p")]) == 1
    out = capsys.readouterr().out
    assert f"failed: {tmp_path / 'bad.tif'}: could not read" in out and "0 images added" in out


def test_two_ingests_of_the_same_images_at_once_add_each_once(tmp_path):
    paths = bbbc007_paths()[:3]
    command = [sys.executable, "-m", "napari_nucleae.cli", "ingest", *map(str, paths)]
    command += ["--project", str(tmp_path / "p"), *INGEST]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        run.communicate(timeout=600)
        assert run.returncode == 0
    project = Project.open(tmp_path / "p")
    assert sorted(project.images()["path"]) == sorted(map(str, paths))
    assert project.table().groupby("image_id").size().min() > 30
    clean = tmp_path / "clean"
    assert main(["ingest", *map(str, paths), "--project", str(clean), *INGEST]) == 0
    assert len(project) == len(Project.open(clean))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "x.tif", "--project", "p", "--workers", "-2"], "--workers: must be a whole"),
        (["ingest", "x.tif", "--project", "p", "--diameter", "nan"], "must be a finite number"),
        (["ingest", "x.tif", "--project", "p", "--diameter", "-3"], "must be a number above 0"),
        (["embed", "--project", "p", "--batch-size", "-5"], "--batch-size: must be a whole"),
        (["represent", "--project", "p", "--top", "0"], "--top: must be a whole number above"),
        (["search", "--project", "p", "3", "-k", "0"], "-k: must be a whole number above 0"),
        (["outliers", "--project", "p", "--high", "nan"], "--high: must be a finite number"),
        (["outliers", "--project", "p", "--low", "120"], "must be a percentage from 0 to 100"),
        (["project", "--project", "p", "--clusters", "-1"], "--clusters: must be a whole number"),
    ],
)
def test_bad_numbers_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_full_disk_while_ingesting_is_one_line(tmp_path, capsys, monkeypatch):
    def full(path: Path, df: pd.DataFrame) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store, "atomic_write_parquet", full)
    code = main(["ingest", str(bbbc007_paths()[0]), "--project", str(tmp_path / "p"), *INGEST])
    assert code == 1
    err = capsys.readouterr().err
    assert "nucleae ingest: error: no space left on the device (" in err
    assert "; free some space or use another disk" in err and "Traceback" not in err
    monkeypatch.undo()
    assert len(Project.open(tmp_path / "p")) == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_keeps_what_was_committed(small_disk, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(bbbc007_paths()[:14]):
        shutil.copy(path, images / f"{i:02d}.tif")
    run = nucleae("ingest", images, "--project", small_disk / "p", *INGEST, "--crop-size", "128")
    assert run.returncode == 1
    errors = run.stderr.strip().splitlines()[-1]
    assert errors.startswith("nucleae ingest: error: no space left on the device")
    assert "Traceback" not in run.stderr
    project = Project.open(small_disk / "p")  # still readable: the committed images only
    assert 0 < len(project.images()) < 14
    assert len(project.read_crops(slice(None))) == len(project.table()) == len(project)


@pytest.fixture
def embedded(tmp_path) -> Project:
    """A project of random crops (4 chunks) with a PCA model and its latents."""
    project = Project.create(tmp_path / "project", CropParams(size=64, storage_dtype="float32"))
    rng = np.random.default_rng(0)
    for image_id in ("a", "b"):
        crops = rng.random((200, 64, 64), dtype=np.float32)
        path = f'=HYPERLINK("{image_id}")'  # a hostile file name
        table = pd.DataFrame({"image_id": image_id, "image_path": path, "label": range(1, 201)})
        project.append({"image_id": image_id}, crops, table)
    train(project, ModelConfig("pca", 64, latent_dim=4), 1, device="cpu")
    embed(project, device="cpu")
    return project


def test_damaged_or_lost_chunks_are_named(embedded, capsys):
    chunk = embedded.path / "crops.zarr" / "c" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert main(["embed", "--project", str(embedded.path)]) == 1
    err = capsys.readouterr().err
    assert f"nucleae embed: error: {chunk} is corrupted" in err and "Traceback" not in err
    chunk.unlink()
    assert main(["embed", "--project", str(embedded.path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {chunk} is missing: crops 256-383 cannot be read" in err


def test_bad_features_and_a_file_as_project_are_one_line(embedded, tmp_path, capsys):
    (embedded.path / "features.parquet").write_text("garbage")
    assert main(["outliers", "--project", str(embedded.path)]) == 1
    err = capsys.readouterr().err
    assert "features.parquet cannot be read" in err and "Traceback" not in err
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    assert main(["outliers", "--project", str(blocker)]) == 1
    assert f"error: {blocker} is a file, not a napari-nucleae project folder" in (
        capsys.readouterr().err
    )
    assert main(["ingest", str(bbbc007_paths()[0]), "--project", str(blocker)]) == 1
    assert f"error: {blocker} is a file, not a folder" in capsys.readouterr().err


def test_exported_csv_cells_never_run_as_formulas(embedded, tmp_path):
    out = tmp_path / "reps"
    assert main(["represent", "--project", str(embedded.path), "--export", str(out)]) == 0
    with open(out / "representatives.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {row["image_path"] for row in rows} <= {
        '\'=HYPERLINK("a")',
        '\'=HYPERLINK("b")',
    }


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (
            errno.ENOSPC,
            "no space left on the device (/data/x); free some space or use another disk",
        ),
        (errno.EACCES, "permission denied (/data/x); choose a folder you can write to"),
        (errno.EROFS, "the file system is read-only (/data/x); choose a folder you can write to"),
    ],
)
def test_environment_faults_read_as_actions(code, expected):
    assert describe_os_error(OSError(code, os.strerror(code), "/data/x")).startswith(expected)


@settings(max_examples=200, deadline=None)
@given(cells=st.lists(st.text(max_size=12), min_size=1, max_size=8))
def test_no_escaped_cell_starts_a_formula_and_none_loses_text(cells):
    frame = pd.DataFrame({"image_path": cells, "crop_index": range(len(cells))})
    safe = spreadsheet_safe(frame)
    assert safe["crop_index"].tolist() == list(range(len(cells)))
    for original, cell in zip(cells, safe["image_path"], strict=True):
        assert not cell.startswith(FORMULA_STARTS)
        assert cell in (original, f"'{original}")


def test_a_channel_first_file_asks_for_its_channel_and_a_label_image_gets_a_note(tmp_path, capsys):
    nuclei = tifffile.imread(bbbc007_paths()[0])
    other = np.full_like(nuclei, 40)
    other[::16] = 250  # a second stain: bright stripes
    tifffile.imwrite(tmp_path / "two.tif", np.stack([nuclei, other]))
    command = ["ingest", str(tmp_path / "two.tif"), "--project", str(tmp_path / "p"), *INGEST]
    assert main(command) == 1
    out = capsys.readouterr().out
    shape = (2, *nuclei.shape)
    assert f"failed: {tmp_path / 'two.tif'}: the image of shape {shape} looks like 2" in out
    assert "Choose the nuclear channel (0–1; --channel in the command line)" in out
    assert main([*command, "--channel", "0"]) == 0
    assert "1 images added" in capsys.readouterr().out
    labels = str(bbbc007_paths()[1]).replace(".tif", "_labels.tif")
    shutil.copy(labels, tmp_path / "labels_as_image.tif")
    command[1] = str(tmp_path / "labels_as_image.tif")
    main(command)
    assert (
        f"note: {tmp_path / 'labels_as_image.tif'}: the image looks like a label image"
        in capsys.readouterr().out
    )


def test_an_image_that_exhausts_memory_fails_alone(tmp_path, capsys, monkeypatch):
    from napari_nucleae.core import ingest

    real = ingest.process_image

    def process(image, params, *, path, **kwargs):
        if path.endswith("big.tif"):
            raise MemoryError
        return real(image, params, path=path, **kwargs)

    monkeypatch.setattr(ingest, "process_image", process)
    shutil.copy(bbbc007_paths()[0], tmp_path / "big.tif")
    shutil.copy(bbbc007_paths()[1], tmp_path / "small.tif")
    code = main(["ingest", str(tmp_path / "*.tif"), "--project", str(tmp_path / "p"), *INGEST])
    assert code == 1
    out = capsys.readouterr().out
    assert f"failed: {tmp_path / 'big.tif'}: ran out of memory on this image" in out
    assert "1 images added" in out
