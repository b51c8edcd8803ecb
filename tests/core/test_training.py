import json
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from napari_nucleae.core import store
from napari_nucleae.core.data import ChunkStream, split_crops
from napari_nucleae.core.errors import InputError
from napari_nucleae.core.model import ModelConfig, build_model, load_model, read_checkpoint
from napari_nucleae.core.training import collapse_note
from napari_nucleae.core.training import train as train_handling_collapse

# The mechanics tests train for an epoch or two, too short to learn more than the mean image:
# collapse is only noted there; the handling itself is tested in test_learning.py.
train = partial(train_handling_collapse, on_collapse="warn")

# small and quick: no step minimum, no early stopping (the mechanics, not the learning)
SMALL = {
    "n_blocks": 2,
    "base_filters": 8,
    "latent_dim": 16,
    "batch_size": 32,
    "min_steps": 0,
    "patience": 0,
}


def _config(variant: str = "ae", size: int = 32, **changes) -> ModelConfig:
    return ModelConfig(variant, size, **{**SMALL, **changes})


def test_training_lowers_validation_loss_and_writes_checkpoints(make_project):
    project = make_project()
    calls, epochs_seen = [], []
    result = train(
        project,
        _config(),
        4,
        progress=lambda done, total, message: calls.append((done, total, message)),
        on_epoch=lambda epoch, train_loss, val_loss: epochs_seen.append((epoch, val_loss)),
    )
    history = result.history
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["val_loss"].iloc[-1] < 0.6 * history["val_loss"].iloc[0]
    assert not result.stopped and result.split == "image"
    # at most a collapse warning (four epochs may learn little more than the mean image)
    assert [n for n in result.notes if "almost alike" not in n] == []
    assert [e for e, _ in epochs_seen] == [1, 2, 3, 4]
    assert epochs_seen[-1][1] == pytest.approx(history["val_loss"].iloc[-1])
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    assert calls[-1][0] == calls[-1][1] and calls[-1][2] == "epoch 4/4"
    folder = project.model_dir("default")
    for name in ("last.pt", "best.pt", "config.json", "history.csv"):
        assert (folder / name).is_file()
    assert json.loads((folder / "config.json").read_text())["config"] == _config().to_dict()
    pd.testing.assert_frame_equal(pd.read_csv(folder / "history.csv"), history)
    last = read_checkpoint(folder / "last.pt")
    assert last["epoch"] == 4 and last["optimizer"] is not None
    assert last["crop"]["size"] == 32 and last["version"]
    best = int(history["val_loss"].idxmin()) + 1
    assert read_checkpoint(folder / "best.pt")["epoch"] == best
    assert project.meta.active_model == "default"
    assert store.Project.open(project.path).meta.active_model == "default"


def test_resume_continues_epochs_history_and_optimiser(make_project):
    project = make_project()
    first = train(project, _config(), 2, name="m")
    resumed = train(project, None, 2, name="m", resume=True)
    assert resumed.history["epoch"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(resumed.history.iloc[:2], first.history)
    checkpoint = read_checkpoint(resumed.last)
    assert checkpoint["epoch"] == 4 and checkpoint["history"]["epoch"] == [1, 2, 3, 4]
    assert load_model(resumed.last).epoch == 4
    with pytest.raises(InputError, match="latent_dim"):
        train(project, _config(latent_dim=8), 1, name="m", resume=True)
    with pytest.raises(InputError, match="nothing to resume"):
        train(project, _config(), 1, name="other", resume=True)


def test_cancel_keeps_the_last_complete_epoch(make_project):
    project = make_project()
    per_epoch = ChunkStream(project, split_crops(project.table(), 0.2).train, 32, shuffle=True)
    polls = iter(range(10_000))
    result = train(
        project, _config(), 5, should_stop=lambda: next(polls) >= per_epoch.n_batches() + 3
    )
    assert result.stopped
    assert result.history["epoch"].tolist() == [1]
    loaded = load_model(result.last)
    assert loaded.epoch == 1
    assert loaded.encode(project.read_crops(slice(0, 4))).shape == (4, 16)
    assert project.meta.active_model == "default"

    resumed = train(project, None, 3, resume=True, should_stop=lambda: True)
    assert resumed.stopped and resumed.history["epoch"].tolist() == [1]
    assert load_model(resumed.last).epoch == 1


def test_cancel_before_any_epoch_leaves_no_model(make_project):
    project = make_project()
    result = train(project, _config(), 2, should_stop=lambda: True)
    assert result.stopped and result.last is None and result.best is None
    assert project.meta.active_model is None


@pytest.mark.parametrize("variant", ["vae", "denoising"])
def test_variants_train_and_load(make_project, variant):
    project = make_project(n=160)
    result = train(project, _config(variant), 1, name=variant)
    loaded = load_model(result.best)
    assert loaded.config.variant == variant
    assert np.isfinite(result.history[["train_loss", "val_loss"]].to_numpy()).all()


def test_pca_reconstructs_a_rank_three_set_almost_perfectly(make_project):
    rng = np.random.default_rng(1)
    basis = rng.uniform(0, 1, (3, 32 * 32)) / 3
    crops = (rng.uniform(0, 1, (300, 3)) @ basis).reshape(-1, 32, 32).astype(np.float32)
    project = make_project(crops=crops, n_images=3, storage_dtype="float32")
    result = train(project, _config("pca", latent_dim=8, batch_size=16), 1, name="pca")
    assert result.history["val_loss"].iloc[0] < 1e-6
    loaded = load_model(project.model_dir("pca"))
    assert loaded.config.variant == "pca" and loaded.encode(crops).shape == (300, 8)
    assert np.mean((loaded.reconstruct(crops) - crops) ** 2) < 1e-6
    assert project.meta.active_model == "pca"


def test_pca_components_are_limited_by_the_number_of_crops(make_project):
    project = make_project(n=40, n_images=2)
    result = train(project, _config("pca", latent_dim=64), 1, val_fraction=0.5)
    assert "20 components" in result.notes[0]
    assert load_model(result.last).config.latent_dim == 20


def test_training_on_cuda_without_a_gpu_is_refused_before_writing(make_project, no_gpu):
    project = make_project(n=40, n_images=2)
    with pytest.raises(InputError, match="CUDA was requested but PyTorch sees no CUDA GPU"):
        train(project, _config(), 1, name="gpu", device="cuda")
    assert not project.model_dir("gpu").exists()
    assert train(project, _config(), 1, name="auto", device="auto").device == "cpu"


def test_single_image_falls_back_to_a_crop_split_with_a_warning(make_project):
    project = make_project(n=100, n_images=1)
    with pytest.warns(UserWarning, match="one source image"):
        result = train(project, _config(), 1)
    assert result.split == "crop" and "one source image" in result.notes[0]


def test_incompatible_inputs_are_refused(make_project):
    project = make_project(n=20, n_images=1)
    with pytest.raises(InputError, match="32x32"):
        train(project, _config(size=16), 1)
    with pytest.raises(InputError, match="model name"):
        train(project, _config(), 1, name="../escape")
    with pytest.raises(InputError, match="val_fraction"):
        train(project, _config(), 1, val_fraction=1.0)


def test_a_collapsed_model_is_flagged_and_a_working_one_is_not(make_project):
    project = make_project(n=120)
    crops = project.read_crops(np.arange(0, 120, 2))
    network = build_model(_config())
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()  # every output pixel is sigmoid(0) = 0.5, whatever the crop
    note = collapse_note(network, crops, torch.device("cpu"))
    assert "reconstructs every crop almost alike" in note

    result = train(project, ModelConfig("pca", 32, latent_dim=16), 1, name="pca")
    fitted = load_model(result.last, "cpu").network
    assert collapse_note(fitted, crops, torch.device("cpu")) == ""
    assert collapse_note(fitted, crops[:1], torch.device("cpu")) == ""


def test_compiled_steps_save_the_plain_network(make_project, monkeypatch):
    """compile="on" trains through torch.compile (the eager backend here, for speed); the
    checkpoint holds the network's own keys and loads."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(module):
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    project = make_project(n=160, storage_dtype="uint8")  # batches reach the step as uint8
    result = train(project, _config(), 1, compile="on")
    assert len(compiled) == 1 and not any("torch.compile" in n for n in result.notes)
    state = read_checkpoint(result.last)["state_dict"]
    assert state.keys() == build_model(_config()).state_dict().keys()
    assert load_model(result.last).encode(project.read_crops(slice(0, 2))).shape == (2, 16)


def test_a_failing_compiler_falls_back_to_eager_steps(make_project, monkeypatch):
    def broken(module):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    project = make_project(n=160)
    result = train(project, _config(), 2, compile="on")
    assert "torch.compile failed (RuntimeError): training without it" in result.notes
    assert result.history["epoch"].tolist() == [1, 2]
    on_cpu = train(project, _config(), 1, name="auto")  # compile="auto": eager on the CPU
    assert not any("torch.compile" in note for note in on_cpu.notes)
    with pytest.raises(InputError, match="compile"):
        train(project, _config(), 1, name="x", compile="sometimes")
