"""The analysis commands of ``nucleae`` on a small embedded project."""

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from sklearn.decomposition import PCA

from napari_nucleae.cli import main
from napari_nucleae.core.analysis import query_crop
from napari_nucleae.core.embed import embed, read_latents
from napari_nucleae.core.errors import InputError
from napari_nucleae.core.model import ModelConfig
from napari_nucleae.core.store import Project
from napari_nucleae.core.training import train


@pytest.fixture
def project(tmp_path, random_project) -> Project:
    """60 random crops of varied brightness from three images, a PCA model and its latents."""
    project = random_project(tmp_path / "project", 60, 3)
    train(project, ModelConfig("pca", 32, latent_dim=6), 1, device="cpu")
    embed(project, device="cpu")
    return project


def _latents(project: Project) -> np.ndarray:
    return np.asarray(read_latents(Project.open(project.path)))


def test_project_stores_a_pca_map_and_clusters(project, capsys):
    args = ["project", "--project", str(project.path), "--method", "pca", "--clusters", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pca projection of 60 crops stored as PC_0, PC_1" in out
    table = Project.open(project.path).table()
    expected = PCA(2).fit_transform(_latents(project))
    for i in range(2):  # components are defined up to sign
        got = table[f"PC_{i}"].to_numpy()
        assert min(np.abs(got - expected[:, i]).max(), np.abs(got + expected[:, i]).max()) < 1e-3
    assert table["cluster"].nunique() == 3


def test_outliers_flags_both_tails_and_lists_the_extremes(project, capsys):
    args = ["outliers", "--project", str(project.path), "--low", "10", "--high", "10"]
    assert main([*args, "--show", "2"]) == 0
    out = capsys.readouterr().out
    table = Project.open(project.path).table()
    mse = table["mse"].to_numpy()
    order = np.argsort(mse)
    assert set(np.flatnonzero(table["outlier"] == "high")) == set(order[-6:])
    assert set(np.flatnonzero(table["outlier"] == "low")) == set(order[:6])
    assert "high MSE (6 crops)" in out and "low MSE (6 crops)" in out
    high_part = out.split("low MSE")[0]
    assert f"{mse[order[-1]]:.6f}"[:6] in high_part


def test_represent_per_cluster_exports_members_of_each_cluster(project, tmp_path, capsys):
    main(["project", "--project", str(project.path), "--method", "pca", "--clusters", "2"])
    out_dir = tmp_path / "reps"
    args = ["represent", "--project", str(project.path), "--center", "geomedian"]
    args += ["--metric", "cosine", "--by", "cluster", "--top", "3", "--export", str(out_dir)]
    assert main(args) == 0
    assert "exported" in capsys.readouterr().out
    chosen = pd.read_csv(out_dir / "representatives.csv")
    clusters = Project.open(project.path).table()["cluster"].astype(str).to_numpy()
    assert len(chosen) == 6 and set(chosen["metric"]) == {"cosine"}
    assert (clusters[chosen["crop_index"]] == chosen["group"].astype(str)).all()
    assert all((out_dir / name).is_file() for name in chosen["tiff_file"])
    assert main(args) == 1  # the folder is not empty: never overwritten silently
    assert "already contains files" in capsys.readouterr().err


def test_interpolate_writes_a_strip_and_never_overwrites(project, tmp_path, capsys):
    strip = tmp_path / "strip.png"
    args = ["interpolate", "--project", str(project.path), "3", "40"]
    assert main([*args, "--steps", "4", "--out", str(strip)]) == 0
    with Image.open(strip) as image:
        assert image.size == (4 * 32, 32)
    assert main([*args, "--steps", "4", "--out", str(strip)]) == 1
    assert "exists" in capsys.readouterr().err


def test_search_by_index_and_by_image_file(project, tmp_path, capsys):
    assert main(["search", "--project", str(project.path), "5", "-k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    latents = _latents(project)
    distances = np.linalg.norm(latents - latents[5], axis=1)
    distances[5] = np.inf
    nearest = [int(line.split()[0]) for line in printed[1:]]
    assert nearest == list(np.argsort(distances)[:3])

    crop = tmp_path / "crop.tif"
    tifffile.imwrite(crop, Project.open(project.path).read_crops([5])[0])
    assert main(["search", "--project", str(project.path), str(crop), "-k", "1"]) == 0
    assert int(capsys.readouterr().out.splitlines()[1].split()[0]) == 5


def test_query_images_are_normalised_like_crops(project):
    crop = Project.open(project.path).read_crops([5])[0]
    np.testing.assert_array_equal(query_crop(project, crop), crop)  # already in [0, 1]
    raw = (crop * 40_000 + 300).astype(np.uint16)[np.newaxis]  # a 1×S×S uint16 file
    scaled = query_crop(project, raw)
    assert scaled.shape == (32, 32) and scaled.dtype == np.float32
    assert scaled.min() == 0 and scaled.max() == 1
    with pytest.raises(InputError, match="32×32 crop"):
        query_crop(project, np.zeros((16, 16)))
    with pytest.raises(InputError, match="NaN"):
        query_crop(project, np.full((32, 32), np.nan))


def test_project_parallel_runs_umap_unseeded(project, monkeypatch):
    from napari_nucleae.core import analysis

    seen = {}

    def record(project, method, **kwargs):
        seen.update(kwargs, method=method)
        return pd.DataFrame({"UMAP_0": [0.0], "UMAP_1": [0.0]})

    monkeypatch.setattr(analysis, "compute_projection", record)
    assert main(["project", "--project", str(project.path), "--parallel"]) == 0
    assert seen["method"] == "umap" and seen["seed"] is None
    assert main(["project", "--project", str(project.path), "--seed", "4"]) == 0
    assert seen["seed"] == 4 and seen["max_fit"] == 200_000


def test_project_max_fit_places_the_other_crops(project, capsys):
    args = ["project", "--project", str(project.path), "--method", "tsne", "--max-fit", "40"]
    assert main(args) == 0
    assert "placing the remaining points" in capsys.readouterr().err
    coords = Project.open(project.path).features()[["TSNE_0", "TSNE_1"]].to_numpy()
    assert coords.shape == (60, 2) and np.isfinite(coords).all()
    assert main([*args[:-1], "3"]) == 1  # fewer than 4 rows cannot be fitted


def test_report_keeps_its_clusters_apart_unless_asked_to_store_them(project, tmp_path):
    args = ["report", "--project", str(project.path), "--projection", "pca", "--clusters", "2"]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    table = Project.open(project.path).table()
    assert "report_cluster" in table and "cluster" not in table
    assert main([*args, "--out", str(tmp_path / "r2"), "--store-columns"]) == 0
    assert "cluster" in Project.open(project.path).table()
