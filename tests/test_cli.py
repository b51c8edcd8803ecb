import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_nucleae.cli import main
from napari_nucleae.core.embed import embed
from napari_nucleae.core.model import ModelConfig
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.core.training import train
from napari_nucleae.sample import bbbc007_paths


def test_help_lists_the_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "napari_nucleae.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("ingest", "demo"):
        assert command in out


def test_ingest_writes_a_project_and_prints_a_summary(tmp_path, capsys):
    code = main(
        [
            "ingest",
            str(bbbc007_paths()[0]),
            "--project",
            str(tmp_path / "p"),
            "--method",
            "classical",
            "--crop-size",
            "32",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "1 images added" in out
    project = Project.open(tmp_path / "p")
    assert project.crop_size == 32 and len(project) > 50


def test_ingest_reads_float64_int32_and_uint16_files(tmp_path, capsys, synthetic_dtypes):
    for dtype, image in synthetic_dtypes.items():
        tifffile.imwrite(tmp_path / f"{dtype}.tif", image)
    options = ["--method", "classical", "--diameter", "16", "--crop-size", "32", "--workers", "1"]
    code = main(["ingest", str(tmp_path / "*.tif"), "--project", str(tmp_path / "p"), *options])
    assert code == 0 and "3 images added (72 crops)" in capsys.readouterr().out
    project = Project.open(tmp_path / "p")
    assert sorted(project.images()["dtype"]) == ["float64", "int32", "uint16"]
    crops = project.read_crops(slice(None))
    assert crops.min() >= 0 and crops.max() <= 1
    brightest = pd.Series(crops.max(axis=(1, 2))).groupby(project.table()["image_path"])
    assert brightest.size().tolist() == [24, 24, 24]
    assert (brightest.median() > 0.5).all()  # normalised, neither black nor saturated


def test_ingest_refuses_a_huge_tiff_plane_without_reading_it(tmp_path, capsys):
    huge = tmp_path / "huge.tif"
    tifffile.imwrite(huge, shape=(20_000, 20_000), dtype="uint8")  # sparse: nothing written
    code = main(["ingest", str(huge), "--project", str(tmp_path / "p"), "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 1 and "0 images added" in out  # a failed image: exit status 1
    assert f"failed: {huge}: the image plane is 20000×20000 = 400,000,000 pixels" in out


def test_user_errors_exit_non_zero_without_traceback(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing.tif"), "--project", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "matches no file" in err and "Traceback" not in err
    assert (
        main(
            [
                "ingest",
                str(bbbc007_paths()[0]),
                "--project",
                str(tmp_path / "q"),
                "--crop-size",
                "4",
            ]
        )
        == 1
    )
    assert "crop size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--method", "nonsense"])
    assert exit_info.value.code == 2


@pytest.fixture
def embedded(tmp_path) -> Project:
    """A small project of random crops with a PCA model and its latents."""
    project = Project.create(tmp_path / "project", CropParams(size=16))
    rng = np.random.default_rng(0)
    for image_id in ("a", "b"):
        crops = rng.random((20, 16, 16), dtype=np.float32)
        table = pd.DataFrame({"image_id": image_id, "label": np.arange(1, 21)})
        project.append({"image_id": image_id}, crops, table)
    train(project, ModelConfig("pca", 16, latent_dim=4), 1, device="cpu")
    embed(project, device="cpu")
    return project


def test_represent_export_to_an_unwritable_place_fails_cleanly(
    embedded, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    command = ["represent", "--project", str(embedded.path), "--top", "2", "--export"]
    assert main([*command, str(blocker / "reps")]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot export to {blocker / 'reps'}: {blocker} is a file, not a folder" in err
    assert "Traceback" not in err

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tifffile, "imwrite", refuse)
    assert main([*command, str(tmp_path / "reps")]) == 1
    err = capsys.readouterr().err
    assert "Permission denied; choose a folder you can write to" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "project"]


def test_the_options_page_is_generated_from_the_parser():
    """docs/cli-options.md lists the defaults the command uses (regenerate it with
    ``python scripts/cli_reference.py`` after changing an option)."""
    from napari_nucleae.cli import options_reference

    page = Path(__file__).parents[1] / "docs" / "cli-options.md"
    assert page.read_text(encoding="utf-8") == options_reference()
    assert f"| `--crop-size` | {CropParams.size} |" in page.read_text(encoding="utf-8")
