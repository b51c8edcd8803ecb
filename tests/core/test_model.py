import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from napari_nucleae.core.errors import InputError, NucleaeError
from napari_nucleae.core.model import (
    AUTO,
    LEGACY_SETTINGS,
    Autoencoder,
    CheckpointError,
    LoadedModel,
    ModelConfig,
    PCAModel,
    build_model,
    default_blocks,
    load_model,
    make_checkpoint,
    save_checkpoint,
    select_device,
)

SMALL = {"n_blocks": 2, "base_filters": 8, "latent_dim": 16}


def _config(variant: str = "ae", size: int = 32, **changes) -> ModelConfig:
    return ModelConfig(variant, size, **{**SMALL, **changes})


def _save(tmp_path, network, config, name="m"):
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, make_checkpoint(network, config, name=name, crop={}, epoch=1, history={}))
    return path


def test_config_defaults_and_json_round_trip():
    config = ModelConfig("vae", 64)
    assert (config.n_blocks, config.base_filters, config.latent_dim) == (4, 16, AUTO)
    assert (config.lr, config.batch_size, config.arch, config.init) == (
        1e-3,
        64,
        "norm",
        "kaiming",
    )
    assert [default_blocks(s) for s in (16, 32, 64, 128, 256)] == [2, 3, 4, 5, 5]
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_settings_a_checkpoint_predates_take_the_seed_recipe():
    old = {k: v for k, v in ModelConfig("ae", 32, latent_dim=8).to_dict().items()}
    for key in LEGACY_SETTINGS:
        del old[key]
    config = ModelConfig.from_dict(old)
    assert (config.arch, config.schedule, config.min_steps, config.augment) == (
        "reference",
        "constant",
        0,
        False,
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model(config).modules())


@pytest.mark.parametrize(
    "changes",
    [
        {"crop_size": 30},  # not divisible by 2**2
        {"variant": "gan"},
        {"latent_dim": -1},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"lr": 1e6},
        {"arch": "resnet"},
        {"latent_dim": 2**31},
        {"variant": "pca", "latent_dim": 32 * 32 + 1},
    ],
)
def test_invalid_configs_are_refused_with_a_value_error(changes):
    with pytest.raises(ValueError):
        ModelConfig(**{"variant": "ae", "crop_size": 32, **SMALL, **changes})


def test_unknown_settings_are_refused():
    with pytest.raises(InputError, match="unknown"):
        ModelConfig.from_dict({**_config().to_dict(), "dropout": 0.5})


def test_reference_architecture_layers_and_shapes():
    config = ModelConfig("ae", 32, arch="reference", n_blocks=3, base_filters=4, latent_dim=10)
    net = build_model(config)
    convs = [m for m in net.encoder if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.encoder.modules()) == 3
    ups = [m for m in net.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(u.stride, u.kernel_size) for u in ups] == [((2, 2), (2, 2))] * 3
    assert isinstance(net.to_latent, nn.Linear) and isinstance(net.decoder[-1], nn.Sigmoid)
    x = torch.rand(5, 1, 32, 32)
    z = net.encode(x)
    out = net.decode(z)
    assert z.shape == (5, 10) and out.shape == (5, 1, 32, 32)
    assert out.min() >= 0 and out.max() <= 1


def test_vae_loss_adds_a_weighted_positive_kl_and_encodes_the_mean():
    torch.manual_seed(0)
    net = build_model(_config("vae", kl_weight=0.5)).train()
    batch = torch.rand(8, 1, 32, 32)
    total, parts = net.loss(batch)
    assert parts["kl"] > 0
    torch.testing.assert_close(total.detach(), parts["mse"] + 0.5 * parts["kl"])
    torch.testing.assert_close(net.encode(batch), net.encode(batch))  # no sampling
    torch.testing.assert_close(net.encode(batch), net.to_latent(net.encoder(batch)))


def test_denoising_feeds_a_noisy_input_and_compares_with_the_clean_crop():
    torch.manual_seed(0)
    net = build_model(_config("denoising", noise_std=0.2))
    seen = []
    net.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    batch = torch.rand(8, 1, 32, 32) * 0.5 + 0.25
    total, _ = net.train().loss(batch)
    noisy = seen[0]
    assert (noisy - batch).std() == pytest.approx(0.2, rel=0.1)
    with torch.no_grad():
        expected = torch.mean((net.decode(net.to_latent(net.encoder(noisy))) - batch) ** 2)
    torch.testing.assert_close(total.detach(), expected)
    net.eval().loss(batch)
    torch.testing.assert_close(seen[-1], batch)  # no noise outside training


def test_pca_module_projects_and_reconstructs():
    config = _config("pca", latent_dim=2)
    net = PCAModel(config)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(32 * 32, 2)))[0].T
    mean = np.full(32 * 32, 0.5)
    net.set_components(mean, basis)
    z = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    x = net.decode(z)
    torch.testing.assert_close(net.encode(x), z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["ae", "vae", "denoising", "pca"])
def test_save_then_load_gives_identical_latents(tmp_path, variant, blobs):
    config = _config(variant)
    net = build_model(config).eval()
    if variant == "pca":
        net.set_components(np.full(32 * 32, 0.2), np.eye(16, 32 * 32))
    crops = blobs(20)
    original = LoadedModel(net, config, "m", torch.device("cpu"))
    loaded = load_model(_save(tmp_path, net, config), "cpu")
    assert loaded.config == config and loaded.name == "m"
    np.testing.assert_array_equal(loaded.encode(crops), original.encode(crops))
    latents = loaded.encode(crops, batch_size=7)
    assert latents.shape == (20, 16) and latents.dtype == np.float32
    recon = loaded.reconstruct(crops)
    np.testing.assert_allclose(loaded.decode(latents), recon, atol=1e-6)
    assert recon.shape == crops.shape


def test_model_folder_loads_best_checkpoint(tmp_path):
    config = _config()
    net = build_model(config)
    _save(tmp_path, net, config, name="last")
    assert load_model(tmp_path).path == tmp_path / "last.pt"
    _save(tmp_path, net, config, name="best")
    assert load_model(tmp_path).path == tmp_path / "best.pt"


def test_crops_of_the_wrong_size_are_refused(tmp_path):
    config = _config()
    loaded = load_model(_save(tmp_path, build_model(config), config))
    with pytest.raises(InputError, match="32"):
        loaded.encode(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(CheckpointError, match="64x64"):
        load_model(tmp_path / "m.pt", crop_size=64)


class _Payload:
    """Unpickling this runs code that writes a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    payload = {"format": "napari-nucleae-model", "evil": _Payload(marker)}
    pickle.loads(pickle.dumps(payload))  # the payload really runs when unpickled
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="never run"):
        load_model(path)
    assert not marker.exists()


def test_garbage_corrupted_and_foreign_checkpoints_give_clear_errors(tmp_path):
    config = _config()
    good = _save(tmp_path, build_model(config), config)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path in (garbage, truncated):
        with pytest.raises(CheckpointError, match="cannot be loaded"):
            load_model(path)
    with pytest.raises(CheckpointError, match="not a napari-nucleae"):
        load_model(foreign)
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        load_model(tmp_path / "missing.pt")
    mismatched = make_checkpoint(
        build_model(_config(latent_dim=8)), config, name="x", crop={}, epoch=1, history={}
    )
    save_checkpoint(tmp_path / "mismatched.pt", mismatched)
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "mismatched.pt")
    escaping = make_checkpoint(
        build_model(config), config, name="../../elsewhere", crop={}, epoch=1, history={}
    )
    save_checkpoint(tmp_path / "escaping.pt", escaping)
    with pytest.raises(CheckpointError, match="invalid model name"):
        load_model(tmp_path / "escaping.pt")
    assert issubclass(CheckpointError, NucleaeError)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None) == select_device("auto")
    if not torch.cuda.is_available():
        assert select_device("auto").type in ("cpu", "mps")
        with pytest.raises(InputError, match="CUDA"):
            select_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        select_device("tpu")


@pytest.mark.parametrize("request_", ["cuda", "cuda:0", "CUDA"])
def test_cuda_without_a_gpu_is_refused_and_auto_picks_the_cpu(no_gpu, request_):
    with pytest.raises(InputError, match=r"CUDA was requested but PyTorch sees no CUDA GPU; use"):
        select_device(request_)
    assert select_device("auto") == select_device(None) == torch.device("cpu")


def test_networks_share_one_interface():
    for variant in ("ae", "vae", "denoising"):
        assert isinstance(build_model(_config(variant)), Autoencoder)
    assert isinstance(build_model(_config("pca")), PCAModel)
