import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_nucleae.cli import main
from napari_nucleae.core import report as report_module
from napari_nucleae.core.centers import geometric_median
from napari_nucleae.core.embed import embed, read_latents
from napari_nucleae.core.export import ExportExistsError, ExportWriteError
from napari_nucleae.core.model import ModelConfig
from napari_nucleae.core.report import ReportOptions, write_report
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.core.training import train

FAST = ReportOptions(projection="pca", n_clusters=3, gallery=4, top_k=3, steps=5)


@pytest.fixture(scope="module")
def embedded_folder(tmp_path_factory, blobs):
    """A project of 240 synthetic crops from 4 images, a 2-epoch autoencoder, embedded."""
    path = tmp_path_factory.mktemp("report") / "project"
    project = Project.create(path, CropParams(size=32))
    for i, crops in enumerate(np.array_split(blobs(240), 4)):
        table = pd.DataFrame({"image_id": f"img{i}", "label": np.arange(1, len(crops) + 1)})
        project.append({"image_id": f"img{i}"}, crops, table)
    config = ModelConfig(
        "ae", 32, n_blocks=2, base_filters=8, latent_dim=8, batch_size=32, min_steps=0
    )
    train(project, config, 2, name="ae", on_collapse="warn")  # the report, not training
    embed(project, "ae")
    return path


@pytest.fixture
def embedded(embedded_folder, tmp_path):
    shutil.copytree(embedded_folder, tmp_path / "project")
    return Project.open(tmp_path / "project")


@pytest.fixture(scope="module")
def written(embedded_folder, tmp_path_factory):
    """One report written on a copy of the project: (project, report folder, progress steps)."""
    root = tmp_path_factory.mktemp("written")
    project = Project.open(shutil.copytree(embedded_folder, root / "project"))
    steps = []
    index = write_report(
        project, root / "report", options=FAST, progress=lambda d, t, m: steps.append(m)
    )
    return project, index.parent, steps


def test_report_folder_links_every_figure_and_stores_the_analysis(written):
    embedded, folder, steps = written
    index = folder / "index.html"
    page = index.read_text()
    linked = set(re.findall(r"(?:src|href)='([^'#]+)'", page))
    pngs = {p.name for p in folder.glob("*.png")}
    assert pngs == {
        "loss.png",
        "latent_histograms.png",
        "projection.png",
        "mse.png",
        "outliers.png",
        "representatives.png",
        "representatives_pixel.png",
        "representatives_per_cluster.png",
        "interpolation.png",
    }
    assert (
        pngs
        | {
            "representatives/representatives.csv",
            "representatives_per_cluster/representatives.csv",
        }
        == linked
    )
    for name in pngs:
        with Image.open(folder / name) as image:
            assert min(image.size) > 100
    assert steps[-1] == "report written" and len(steps) == len(report_module.STEPS) + 1

    record = json.loads((folder / "report.json").read_text())
    assert record["crops"] == 240 and record["model"] == "ae"
    table = embedded.table()
    assert {"PC_0", "PC_1", "report_cluster", "report_outlier"} <= set(table.columns)
    assert (table["report_outlier"] == "high").sum() == round(240 * FAST.outlier_pct / 100)
    assert not {"cluster", "outlier"} & set(table.columns)  # the user's columns stay theirs


def test_the_report_keeps_a_clustering_the_user_made(embedded, tmp_path):
    mine = pd.Categorical(np.arange(len(embedded)) % 5)  # e.g. HDBSCAN from the explorer
    embedded.write_features(pd.DataFrame({"cluster": mine, "outlier": mine}))
    write_report(embedded, tmp_path / "report", options=FAST)
    table = Project.open(embedded.path).table()
    assert (table["cluster"] == mine).all() and (table["outlier"] == mine).all()
    assert table["report_cluster"].nunique() == FAST.n_clusters
    stored = ReportOptions(projection="pca", n_clusters=2, top_k=2, steps=3, store_columns=True)
    write_report(embedded, tmp_path / "again", options=stored)
    table = Project.open(embedded.path).table()
    assert table["cluster"].nunique() == 2 and set(table["outlier"]) <= {"low", "normal", "high"}


def test_per_cluster_representatives_belong_to_their_cluster(written):
    embedded, folder, _ = written
    chosen = pd.read_csv(folder / "representatives_per_cluster" / "representatives.csv")
    clusters = embedded.table()["report_cluster"].astype(str).to_numpy()
    assert sorted(chosen["group"].astype(str).unique()) == sorted(set(clusters))
    assert (clusters[chosen["crop_index"]] == chosen["group"].astype(str)).all()
    assert chosen["stability"].between(0, 1).all()

    overall = pd.read_csv(folder / "representatives" / "representatives.csv")
    assert len(overall) == len(FAST.centers) * len(FAST.metrics) * FAST.top_k
    assert set(overall["group"]) == {"all"}


def test_interpolation_joins_the_two_most_distant_clusters(written):
    embedded, folder, _ = written
    chosen = pd.read_csv(folder / "representatives_per_cluster" / "representatives.csv")
    table = embedded.table()
    latents = np.asarray(read_latents(embedded, "ae"))
    groups = sorted(table["report_cluster"].astype(str).unique())
    in_group = [table["report_cluster"].astype(str).to_numpy() == g for g in groups]
    centers = np.stack([geometric_median(latents[m]) for m in in_group])
    gaps = np.linalg.norm(centers[:, None] - centers[None], axis=-1)
    far = {groups[i] for i in np.unravel_index(np.argmax(gaps), gaps.shape)}
    firsts = chosen[chosen["rank"] == 1].astype({"group": str}).set_index("group")["crop_index"]
    a, b = sorted(int(firsts[g]) for g in far)
    record = json.loads((folder / "report.json").read_text())
    caption = next(s["caption"] for s in record["sections"] if s["figure"] == "interpolation.png")
    ends = re.search(r"from crop (\d+) to crop (\d+)", caption).groups()
    assert sorted(map(int, ends)) == [a, b]


def test_a_previous_report_is_replaced_and_other_folders_are_refused(embedded, tmp_path):
    target = tmp_path / "report"
    write_report(embedded, target, options=FAST)
    (target / "stale.txt").write_text("left from before")
    write_report(embedded, target, options=FAST)
    assert not (target / "stale.txt").exists() and (target / "index.html").is_file()

    other = tmp_path / "results"
    other.mkdir()
    (other / "mine.csv").write_text("precious")
    with pytest.raises(ExportExistsError, match="not a napari-nucleae report"):
        write_report(embedded, other, options=FAST)
    assert [p.name for p in other.iterdir()] == ["mine.csv"]


def test_a_failing_step_leaves_neither_a_report_nor_a_staging_folder(
    embedded, tmp_path, monkeypatch
):
    def broken(run):
        raise RuntimeError("disk full")

    steps = [*report_module.STEPS[:-1], ("interpolation", broken)]
    monkeypatch.setattr(report_module, "STEPS", steps)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(embedded, tmp_path / "out" / "report", options=FAST)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_project_without_latents_is_refused(make_project, tmp_path):
    project = make_project(n=20, n_images=2)
    with pytest.raises(Exception, match="no active model"):
        write_report(project, tmp_path / "report", options=FAST)
    assert not (tmp_path / "report").exists()


def test_cli_report_prints_where_the_index_is(embedded, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["report", "--project", str(embedded.path), "--out", str(out), "--projection", "pca"]
    assert main([*argv, "--clusters", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {(out / 'index.html').resolve()}" in printed
    assert np.unique(Project.open(embedded.path).table()["report_cluster"]).size == 2


def test_an_unwritable_report_folder_is_a_clear_error(embedded, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    with pytest.raises(ExportWriteError, match="notes.txt is a file, not a folder"):
        write_report(embedded, blocker / "report", options=FAST)
    argv = ["report", "--project", str(embedded.path), "--projection", "pca"]
    assert main([*argv, "--out", str(blocker / "report")]) == 1
    err = capsys.readouterr().err
    assert "choose a folder you can write to" in err and "Traceback" not in err

    def refuse(fig, run, name):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(report_module, "_save", refuse)  # a figure cannot be written
    with pytest.raises(ExportWriteError, match="Permission denied"):
        write_report(embedded, tmp_path / "out" / "report", options=FAST)
    assert list((tmp_path / "out").iterdir()) == []  # no half report, no staging folder


def test_the_report_reads_the_latents_and_loads_the_model_once(embedded, tmp_path, monkeypatch):
    from napari_nucleae.core import analysis, embed

    calls = {"latents": 0, "model": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(analysis, "read_latents", counting("latents", analysis.read_latents))
    monkeypatch.setattr(embed, "load_model", counting("model", embed.load_model))
    write_report(embedded, tmp_path / "report", options=FAST)
    assert calls == {"latents": 1, "model": 1}
