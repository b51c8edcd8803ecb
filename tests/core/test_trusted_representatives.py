"""Representatives a reviewer can trust, on a labelled synthetic set: per-class picks, the
quality-checked pool, typicality in measured units, the spectrum and the provenance."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_nucleae.core import analysis
from napari_nucleae.core.embed import embed
from napari_nucleae.core.errors import InputError
from napari_nucleae.core.export import tiff_pixel_size
from napari_nucleae.core.model import checkpoint_file
from napari_nucleae.core.represent import TYPICALITY_MEASURES, typicality
from napari_nucleae.core.store import Project

NAMES = np.array(["small", "large", "speckled"])
BLANK = 3  # blank crops added to the labelled set


@pytest.fixture
def classified(labelled) -> tuple[Project, np.ndarray]:
    """The labelled set plus three blank crops, embedded, 10 crops per class annotated and
    every crop classified."""
    project, kinds = labelled
    size = project.crop_size
    rows = pd.DataFrame(
        {
            "image_id": "blank",
            "image_path": "images/blank.tif",
            "label": np.arange(1, BLANK + 1),
            "area": 50.0,
            "touches_border": False,
        }
    )
    project.append({"image_id": "blank"}, np.zeros((BLANK, size, size), np.float32), rows)
    embed(project, device="cpu")
    for k, name in enumerate(NAMES):
        analysis.annotate(project, np.flatnonzero(kinds == k)[:10], name)
    analysis.classify_crops(project)
    return project, kinds


def test_per_class_picks_come_from_their_class(classified):
    project, kinds = classified
    found = analysis.find_representatives(project, by="class", k=4, pixel_baseline=False)
    table, classes = found.latent.table, project.table()["class"].astype(str).to_numpy()
    assert set(table["group"]) == set(NAMES)
    assert (classes[table["crop_index"]] == table["group"].astype(str)).all()
    truth = np.concatenate([NAMES[kinds], ["blank"] * BLANK])
    assert (truth[table["crop_index"]] == table["group"].astype(str)).mean() >= 0.9


def test_the_qc_pool_never_returns_a_flagged_crop(classified):
    project, _ = classified
    wide = analysis.find_representatives(
        project, by="class", k=30, pool="all", pixel_baseline=False, centers=["mean"]
    )
    # the crops nearest every class centre touch the border now: the pool must skip them
    border = np.zeros(len(project), bool)
    border[wide.latent.table.groupby("group")["crop_index"].head(3).to_numpy()] = True
    project.write_features(pd.DataFrame({"touches_border": border}))
    table = project.table()
    mse = table["mse"].to_numpy()
    n_tail = round(len(mse) * 0.01)
    order = np.argsort(mse, kind="stable")
    flagged = {None: border.copy()}
    flagged[None][order[:n_tail]] = flagged[None][order[len(mse) - n_tail :]] = True
    flagged[None][-BLANK:] = True  # the blank crops
    far = table["class_probability"].to_numpy() < analysis.MIN_CLASS_PROBABILITY
    assert far.any() and border.sum() == 9  # every check has crops to leave out
    flagged["class"] = flagged[None] | far
    for by in ("class", None):
        found = analysis.find_representatives(
            project, by=by, k=30, pool="qc", pixel_baseline=False, centers=["mean", "median"]
        )
        picks = found.latent.table["crop_index"].to_numpy()
        assert len(picks) and set(found.latent.table["metric"]) == {"euclidean", "cosine"}
        assert not flagged[by][picks].any()
        assert found.excluded["border"] == border.sum() and found.excluded["contrast"] == BLANK
        assert found.excluded.get("class", 0) == (far.sum() if by else 0)
    assert flagged["class"][wide.latent.table["crop_index"]].any()  # the all pool picks some
    assert analysis.pool_line(found).startswith("pool: qc")
    assert set(analysis.qc_flags(project, "class", ["border"]).columns) == {"border"}
    with pytest.raises(InputError, match="pool must be one of"):
        analysis.find_representatives(project, pool="best")


def test_percentile_columns_agree_with_pandas_ranks_per_group(classified):
    project, _ = classified
    found = analysis.find_representatives(project, by="class", k=5, pixel_baseline=False)
    picks, table = found.latent.table, project.table()
    everyone = analysis.find_representatives(project, k=5, pixel_baseline=False).latent.table
    for measure in TYPICALITY_MEASURES:
        expected = table.groupby("class", observed=True)[measure].rank(pct=True) * 100
        np.testing.assert_allclose(
            picks[f"{measure}_percentile"], expected.to_numpy()[picks["crop_index"]]
        )
        overall = table[measure].rank(pct=True).to_numpy() * 100  # scope: all crops
        np.testing.assert_allclose(
            everyone[f"{measure}_percentile"], overall[everyone["crop_index"]]
        )
    np.testing.assert_allclose(
        picks["typicality"],
        1 - (picks[[f"{m}_percentile" for m in TYPICALITY_MEASURES]] - 50).abs().mean(axis=1) / 50,
    )
    assert picks["typicality_vs_random"].between(0, 1).all()


def test_typicality_against_random_picks_averages_one_half():
    rng = np.random.default_rng(0)
    measures = pd.DataFrame({m: rng.permutation(101) for m in TYPICALITY_MEASURES})
    measures.iloc[50] = 50  # crop 50 is the median of every measure: as typical as can be
    every = pd.DataFrame({"crop_index": np.arange(101)})
    scored = typicality(every, measures.astype(float))  # one group: all crops
    assert scored["typicality_vs_random"].mean() == pytest.approx(0.5)
    assert scored["typicality"].idxmax() == 50
    assert scored["typicality"].iat[50] > 0.98 and scored["typicality_vs_random"].iat[50] > 0.99
    assert scored["typicality"].between(0, 1).all()


def test_the_spectrum_runs_from_most_to_least_typical(classified):
    project, _ = classified
    found = analysis.find_representatives(
        project, by="class", k=1, centers=["mean"], pixel_baseline=False
    )
    spectrum = analysis.find_spectrum(project, found, 6, center="mean")
    for group, rows in spectrum.groupby("group"):
        assert len(rows) == 6 and rows["rank"].tolist() == list(range(1, 7))
        assert rows["score"].is_monotonic_increasing
        top = found.latent.table.query("group == @group")["crop_index"].iat[0]
        assert rows["crop_index"].iat[0] == top
        members = np.flatnonzero(
            (project.table()["class"].astype(str) == group).to_numpy() & found.candidates
        )
        latents = analysis.latents_of(project)
        center = latents[np.flatnonzero(project.table()["class"].astype(str) == group)].mean(0)
        far = members[np.argmax(np.linalg.norm(latents[members] - center, axis=1))]
        assert rows["crop_index"].iat[-1] == far
    assert "typicality" in spectrum


def test_an_export_records_its_provenance_and_draws_a_figure(classified, tmp_path):
    project, _ = classified
    found = analysis.find_representatives(
        project, by="class", k=3, centers=["geomedian"], metrics=["euclidean"], pixel_baseline=False
    )
    spectrum = analysis.find_spectrum(project, found, 4)
    out = tmp_path / "export"
    analysis.export(project, found, out, pixel_size=0.5, spectrum_table=spectrum)
    record = json.loads((out / "provenance.json").read_text())
    checkpoint = checkpoint_file(project.model_dir(project.meta.active_model))  # best.pt
    assert record["checkpoint"] == str(checkpoint)
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["pool"] == "qc" and record["group"] == "class" and record["seed"] == 0
    assert record["crop"]["size"] == 32 and record["normalisation"]["normalize"] == "image"
    assert record["center"] == ["geomedian"] and record["metric"] == ["euclidean"]
    assert record["version"] and record["date"]
    assert record["pixel_size_um"] == 0.5 and record["pixel_size_from"] == "given"
    csv = pd.read_csv(out / "representatives.csv")
    assert (csv["pool"] == "qc").all()
    assert {f"{m}_percentile" for m in TYPICALITY_MEASURES} <= set(csv.columns)
    assert (out / "figure.png").is_file() and (out / "montage.png").is_file()
    spectrum_csv = pd.read_csv(out / "spectrum" / "representatives.csv")
    assert len(spectrum_csv) == 12
    assert json.loads((out / "spectrum" / "provenance.json").read_text())["spectrum"] == 4


def test_the_pixel_size_is_read_from_tiff_metadata(tmp_path):
    image = np.zeros((8, 8), np.uint16)
    tifffile.imwrite(tmp_path / "cm.tif", image, resolution=(20_000, 20_000), resolutionunit=3)
    tifffile.imwrite(
        tmp_path / "ij.tif", image, imagej=True, resolution=(2, 2), metadata={"unit": "um"}
    )
    tifffile.imwrite(tmp_path / "none.tif", image)
    assert tiff_pixel_size(tmp_path / "cm.tif") == pytest.approx(0.5)
    assert tiff_pixel_size(tmp_path / "ij.tif") == pytest.approx(0.5)
    assert tiff_pixel_size(tmp_path / "none.tif") is None
    assert tiff_pixel_size(tmp_path / "missing.tif") is None
