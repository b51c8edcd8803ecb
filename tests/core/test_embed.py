import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from napari_nucleae.core import embed as embed_module
from napari_nucleae.core import store
from napari_nucleae.core.embed import default_batch_size, embed, read_latents
from napari_nucleae.core.errors import InputError, NucleaeError, ProjectError
from napari_nucleae.core.model import CheckpointError, ModelConfig, load_model
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.core.training import train

SMALL = {"n_blocks": 2, "base_filters": 8, "latent_dim": 16, "batch_size": 32, "min_steps": 0}


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory, blobs):
    """A project in 16-crop chunks (so embedding takes several blocks) with a trained model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "chunk_rows", lambda size, dtype: 16)
        path = tmp_path_factory.mktemp("embed") / "project"
        project = Project.create(path, CropParams(size=32))
    for i, crops in enumerate(np.array_split(blobs(150), 3)):
        table = pd.DataFrame({"image_id": f"img{i}", "label": np.arange(len(crops))})
        project.append({"image_id": f"img{i}"}, crops, table)
    train(project, ModelConfig("ae", 32, **SMALL), 1, name="ae", on_collapse="warn")
    return path


@pytest.fixture
def trained(trained_folder, tmp_path):
    """A fresh copy of the trained project for each test."""
    shutil.copytree(trained_folder, tmp_path / "trained")
    return Project.open(tmp_path / "trained")


def test_embed_writes_latents_and_mse_matching_a_direct_computation(trained):
    calls = []
    result = embed(trained, batch_size=20, progress=lambda *args: calls.append(args))
    assert result.name == "ae" and not result.stopped
    latents = read_latents(trained)
    assert latents.shape == (150, 16) and latents.dtype == np.float32
    assert latents.chunks == (16, 16)
    model = load_model(trained.model_dir("ae"))
    crops = trained.read_crops(slice(None))
    # GPU kernels may differ with batch composition at ~1e-5; latents are ~0.1 in size
    np.testing.assert_allclose(latents[:], model.encode(crops), rtol=1e-4, atol=1e-4)
    direct = ((model.reconstruct(crops) - crops) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(trained.table()["mse"], direct, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.mse, direct, rtol=1e-4, atol=1e-7)
    assert [c[0] for c in calls] == [32, 64, 96, 128, 150] and calls[-1][1] == 150
    assert read_latents(trained, "ae").attrs["model"] == "ae"


def test_embed_accepts_a_name_a_path_or_a_loaded_model(trained):
    reference = embed(trained).mse
    by_name = embed(trained, "ae").mse
    by_path = embed(trained, trained.model_dir("ae") / "last.pt").mse
    by_model = embed(trained, load_model(trained.model_dir("ae")), batch_size=7).mse
    for mse in (by_name, by_path, by_model):
        np.testing.assert_allclose(mse, reference, rtol=1e-5, atol=1e-8)


def test_cancelled_embed_leaves_the_previous_latents(trained):
    embed(trained)
    before = read_latents(trained)[:]
    train(trained, None, 1, name="ae", resume=True)
    polls = iter(range(100))
    result = embed(trained, batch_size=20, should_stop=lambda: next(polls) >= 2)
    assert result.stopped and result.mse is None
    np.testing.assert_array_equal(read_latents(trained)[:], before)
    assert [p.name for p in trained.latents_path("ae").parent.iterdir()] == ["ae.zarr"]
    after = embed(trained)
    assert not np.array_equal(read_latents(trained)[:], before)
    assert after.path == trained.latents_path("ae")


def test_a_model_for_another_crop_size_is_refused(trained, make_project):
    other = make_project(n=20, n_images=1, size=16)
    with pytest.raises(CheckpointError, match="32x32"):
        embed(other, trained.model_dir("ae"))
    with pytest.raises(CheckpointError, match="32x32"):
        embed(other, load_model(trained.model_dir("ae")))


def test_missing_models_and_stale_latents_are_reported(trained, make_project):
    with pytest.raises(ProjectError, match="no active model"):
        embed(make_project(n=10, n_images=1))
    with pytest.raises(ProjectError, match="no model named"):
        embed(trained, "nope")
    with pytest.raises(ProjectError, match="run embed first"):
        read_latents(trained)
    embed(trained)
    crops = trained.read_crops(slice(0, 5))
    table = trained.table(with_features=False).iloc[:5].drop(columns="crop_index")
    trained.append({"image_id": "new"}, crops, table)
    with pytest.raises(ProjectError, match="run embed again"):
        read_latents(trained)


class _SmallGPU:
    """Stands in for a model on a GPU that runs out of memory above 10 crops per batch."""

    device = torch.device("cuda")

    def latents_and_mse(self, crops):
        if len(crops) > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return crops.reshape(len(crops), -1)[:, :3], crops.mean(axis=(1, 2))

    def out_of_memory(self, crops):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_halves_the_batch(blobs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    crops = blobs(45)
    latents, mse, batch_size = embed_module._run_block(_SmallGPU(), crops, 40)
    assert batch_size == 10
    np.testing.assert_array_equal(latents, crops.reshape(45, -1)[:, :3])
    np.testing.assert_array_equal(mse, crops.mean(axis=(1, 2)))


def test_out_of_memory_with_one_crop_per_batch_is_a_clear_error(blobs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(_SmallGPU, "latents_and_mse", _SmallGPU.out_of_memory)
    with pytest.raises(NucleaeError, match="ran out of GPU memory even with one crop per batch"):
        embed_module._run_block(_SmallGPU(), blobs(4), 4)


def test_embedding_on_cuda_without_a_gpu_is_refused_and_keeps_latents(trained, no_gpu):
    first = embed(trained, device="auto")
    with pytest.raises(InputError, match="CUDA was requested but PyTorch sees no CUDA GPU"):
        embed(trained, device="cuda")
    np.testing.assert_array_equal(read_latents(trained), np.asarray(zarr.open_array(first.path)))


def test_default_batch_size_is_larger_on_gpus():
    cpu = default_batch_size(torch.device("cpu"), 64)
    assert cpu == 256 and default_batch_size(torch.device("cuda"), 64) > cpu


def test_a_lost_latents_chunk_is_named_never_read_as_zeros(trained):
    embed(trained, "ae")
    path = trained.latents_path("ae")
    chunk_files = sorted(p for p in path.rglob("*") if p.is_file() and "zarr.json" not in p.name)
    assert len(chunk_files) == 10  # 150 crops in chunks of 16: every chunk is on disk
    lost = chunk_files[3]
    lost.unlink()
    with pytest.raises(ProjectError, match=f"{re.escape(str(lost))} is missing.*embed again"):
        read_latents(trained, "ae")
    embed(trained, "ae")
    assert np.isfinite(read_latents(trained, "ae")[:]).all()


def test_uint8_crops_are_embedded_as_their_float_values(make_project):
    from napari_nucleae.core.model import LoadedModel, build_model

    project = make_project(n=40, n_images=2, storage_dtype="uint8")  # read as stored, scaled later
    config = ModelConfig("ae", 32, **SMALL)
    model = LoadedModel(build_model(config).eval(), config, "fresh", torch.device("cpu"))
    result = embed(project, model, batch_size=16)
    crops = project.read_crops(slice(None))
    np.testing.assert_allclose(read_latents(project, "fresh")[:], model.encode(crops), atol=1e-6)
    direct = ((model.reconstruct(crops) - crops) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(result.mse, direct, rtol=1e-5, atol=1e-8)
