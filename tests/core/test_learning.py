"""The autoencoder learns with its defaults: its latents separate phenotypes at least as well
as the PCA baseline, collapse is acted on, and the training recipe behaves as documented."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from napari_nucleae.core.embed import embed, read_latents
from napari_nucleae.core.errors import InputError
from napari_nucleae.core.model import ModelConfig, load_model
from napari_nucleae.core.store import Project
from napari_nucleae.core.training import (
    COLLAPSE_RATIO,
    MAX_RESTARTS,
    TrainingError,
    augment,
    auto_latent_dim,
    lr_factor,
    output_spread,
    train,
)

# a tiny network that the seed's plain recipe kills at this learning rate (dead ReLUs)
COLLAPSING = {
    "arch": "reference",
    "lr": 0.3,
    "n_blocks": 2,
    "base_filters": 8,
    "latent_dim": 16,
    "batch_size": 32,
    "min_steps": 300,
    "patience": 0,
}


def knn_accuracy(latents: np.ndarray, labels: np.ndarray) -> float:
    return float(cross_val_score(KNeighborsClassifier(10), latents, labels, cv=5).mean())


def test_the_default_autoencoder_separates_phenotypes_as_well_as_pca(tmp_path, phenotypes):
    project, kinds = phenotypes(tmp_path / "p")
    assert len(np.unique(kinds)) == 3
    scores = {}
    for variant in ("pca", "ae"):
        result = train(project, ModelConfig(variant, 32), 30, name=variant)
        assert result.last is not None
        embed(project, variant)
        scores[variant] = knn_accuracy(np.asarray(read_latents(project, variant)), kinds)
    model = load_model(project.model_dir("ae"), "cpu")
    assert model.config.arch == "norm" and 16 <= model.config.latent_dim <= 512
    crops = project.read_crops(np.arange(len(project)))
    assert output_spread(model.network, crops, model.device) > 3 * COLLAPSE_RATIO
    assert scores["ae"] >= 0.9
    assert scores["ae"] >= scores["pca"] - 0.03, scores


def test_a_collapsing_run_is_found_during_training_and_restarted_at_a_lower_rate(make_project):
    project = make_project(n=160, n_images=2)
    result = None
    with pytest.warns(UserWarning, match="restarted from scratch") as caught:
        try:
            result = train(project, ModelConfig("ae", 32, **COLLAPSING), 3, name="dead")
        except TrainingError as err:  # collapsed on every attempt: refused
            assert f"after {MAX_RESTARTS} restarts" in str(err)
            assert "not kept as the active model" in str(err)
    restarts = [str(w.message) for w in caught if "restarted" in str(w.message)]
    assert "(epoch 2, learning rate 0.3)" in restarts[0]  # during training (of 3 epochs)
    assert "restarted from scratch at learning rate 0.1" in restarts[0]
    if result is None:
        assert len(restarts) == MAX_RESTARTS
        assert Project.open(project.path).meta.active_model is None
    else:  # a restart at a lower rate learnt: that model is kept
        model = load_model(result.last, "cpu")
        crops = project.read_crops(np.arange(0, 160, 2))
        assert output_spread(model.network, crops, model.device) >= COLLAPSE_RATIO
        assert project.meta.active_model == "dead"


def test_collapse_can_stop_at_once_or_only_warn(make_project):
    project = make_project(n=160, n_images=2)
    config = ModelConfig("ae", 32, **COLLAPSING)
    with pytest.raises(TrainingError, match="almost alike.*not kept as the active model"):
        train(project, config, 3, name="stopped", on_collapse="stop")
    assert project.meta.active_model is None
    result = train(project, config, 3, name="kept", on_collapse="warn")
    assert any("almost alike" in note for note in result.notes)
    assert project.meta.active_model == "kept"
    with pytest.raises(InputError, match="on_collapse"):
        train(project, config, 1, name="x", on_collapse="ignore")


def test_a_diverging_loss_stops_training_and_never_becomes_active(make_project, blobs):
    crops = blobs(160).copy()
    crops[7, 3, 3] = np.nan  # a corrupt crop: the loss is no longer finite
    project = make_project(crops=crops, n_images=2, storage_dtype="float32")
    config = ModelConfig("ae", 32, n_blocks=2, base_filters=8, latent_dim=16, min_steps=0)
    with pytest.raises(TrainingError, match="diverged at epoch 1"):
        train(project, config, 2, name="nan")
    assert project.meta.active_model is None
    assert not (project.model_dir("nan") / "last.pt").exists()


def test_small_projects_get_the_minimum_number_of_optimiser_steps(make_project):
    project = make_project(n=160, n_images=2)  # 80 training crops: 3 batches of 32 per pass
    config = ModelConfig(
        "ae", 32, n_blocks=2, base_filters=8, latent_dim=16, batch_size=32, min_steps=60
    )
    totals = []
    result = train(project, config, 2, progress=lambda d, t, m: totals.append(t))
    assert totals[-1] == 60  # 30 steps per epoch: 10 passes over the crops
    assert any("repeats the 80 training crops for 30 optimiser steps" in n for n in result.notes)
    config = ModelConfig(
        "ae", 32, n_blocks=2, base_filters=8, latent_dim=16, batch_size=32, min_steps=6
    )
    totals.clear()
    result = train(project, config, 2, name="big", progress=lambda d, t, m: totals.append(t))
    assert totals[-1] == 2 * 3 and not any("repeats" in n for n in result.notes)
    assert result.history["epoch"].tolist() == [1, 2]


def test_early_stopping_ends_when_validation_stops_improving(make_project):
    project = make_project(n=160, n_images=2)
    config = ModelConfig(
        "ae", 32, n_blocks=2, base_filters=8, latent_dim=16, lr=1.0, min_steps=0, patience=2
    )
    result = train(project, config, 12, on_collapse="warn")
    history = result.history
    assert len(history) < 12
    best = history["val_loss"].idxmin()
    assert len(history) - 1 - best == 2  # exactly `patience` epochs without improvement
    assert any("stopped early" in note for note in result.notes)


def test_auto_latent_size_follows_the_variance_of_the_crops(blobs):
    rng = np.random.default_rng(0)
    rank_two = (rng.uniform(0, 1, (300, 2)) @ rng.uniform(0, 1, (2, 32 * 32))).reshape(-1, 32, 32)
    assert auto_latent_dim(rank_two.astype(np.float32)) == 16  # the smallest size offered
    noise = rng.uniform(0, 1, (600, 32, 32)).astype(np.float32)
    assert auto_latent_dim(noise) == 512  # no structure: as wide as allowed
    size = auto_latent_dim(blobs(400))
    assert 16 <= size <= 512 and math.log2(size).is_integer()


def test_augmentation_keeps_each_crop_up_to_symmetry_and_jitter():
    torch.manual_seed(0)
    batch = torch.rand(64, 1, 16, 16)
    out = augment(batch, jitter=0.0)
    assert out.shape == batch.shape and not torch.equal(out, batch)
    for a, b in zip(batch[:, 0], out[:, 0], strict=True):
        turns = [torch.rot90(v, k) for v in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, t) for t in turns)
    jittered = augment(torch.full((500, 1, 4, 4), 0.5), jitter=0.05)
    assert float(jittered.min()) >= 0.475 - 1e-6 and float(jittered.max()) <= 0.525 + 1e-6
    assert float(jittered.std()) > 0.01


def test_learning_rate_warms_up_then_decays_by_cosine():
    factor = lr_factor(1000, 0.05, "warmup-cosine")
    rates = np.array([factor(step) for step in range(1000)])
    assert rates[0] == pytest.approx(1 / 50) and rates[49] == pytest.approx(1.0)
    assert np.all(np.diff(rates[:50]) > 0) and np.all(np.diff(rates[50:]) <= 0)
    assert rates[-1] == pytest.approx(0.01, abs=1e-3)
    assert {lr_factor(1000, 0.05, "constant")(s) for s in (0, 500, 999)} == {1.0}


def test_an_existing_model_is_never_replaced_silently(make_project):
    project = make_project(n=160, n_images=2)
    config = ModelConfig("ae", 32, n_blocks=2, base_filters=8, latent_dim=16, min_steps=0)
    train(project, config, 1, name="m", on_collapse="warn")
    embed(project, "m")
    before = (project.model_dir("m") / "last.pt").read_bytes()
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        train(project, config, 1, name="m")
    assert (project.model_dir("m") / "last.pt").read_bytes() == before
    assert project.latents_path("m").exists()
    train(project, config, 1, name="m", overwrite=True, on_collapse="warn", seed=5)
    assert (project.model_dir("m") / "last.pt").read_bytes() != before
    assert not project.latents_path("m").exists()  # the old model's latents went with it
    pd.testing.assert_index_equal(
        pd.read_csv(project.model_dir("m") / "history.csv").columns,
        pd.Index(["epoch", "train_loss", "val_loss", "seconds"]),
    )
