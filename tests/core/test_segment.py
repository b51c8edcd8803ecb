import numpy as np
import pytest
import tifffile

from napari_nucleae.core import segment as seg
from napari_nucleae.core.errors import InputError, WeightsUnavailableError
from napari_nucleae.core.segment import SegmentParams, prepare_planes, segment
from napari_nucleae.sample import bbbc007_paths


def _matched(truth: np.ndarray, found: np.ndarray) -> int:
    """Ground-truth nuclei whose centroid falls inside exactly one found nucleus."""
    hits = 0
    for label in range(1, truth.max() + 1):
        r, c = np.argwhere(truth == label).mean(axis=0).round().astype(int)
        hits += found[r, c] > 0
    return hits


def test_classical_finds_every_synthetic_nucleus(synthetic):
    image, truth = synthetic
    result = segment(image, SegmentParams(method="classical", diameter=16))
    assert result.method == "classical"
    assert result.n_nuclei == truth.max()
    assert _matched(truth, result.labels) == truth.max()
    assert result.labels.shape == image.shape


@pytest.mark.parametrize("path", bbbc007_paths()[::4], ids=lambda p: p.stem)
def test_classical_counts_real_nuclei_close_to_ground_truth(path):
    image = tifffile.imread(path)
    truth = tifffile.imread(str(path).replace(".tif", "_labels.tif"))
    n_truth = len(np.unique(truth)) - 1
    n_found = segment(image, SegmentParams(method="classical")).n_nuclei
    assert abs(n_found - n_truth) <= 0.1 * n_truth


def test_stack_is_segmented_plane_by_plane_with_unique_labels(synthetic):
    image, truth = synthetic
    stack = np.stack([image, image[::-1], image[:, ::-1]])
    result = segment(stack, SegmentParams(method="classical", diameter=16))
    assert result.labels.shape == stack.shape
    per_plane = [set(np.unique(p)) - {0} for p in result.labels]
    assert all(len(p) == truth.max() for p in per_plane)
    assert not (per_plane[0] & per_plane[1]) and not (per_plane[1] & per_plane[2])
    assert result.n_nuclei == 3 * truth.max()


def test_rgb_needs_a_channel_and_works_with_one(synthetic):
    image, truth = synthetic
    rgb = np.stack([np.zeros_like(image), image, np.zeros_like(image)], axis=-1)
    with pytest.raises(InputError, match="choose the nuclear channel"):
        segment(rgb, SegmentParams(method="classical"))
    result = segment(rgb, SegmentParams(method="classical", diameter=16), channel=1)
    assert result.labels.shape == image.shape
    assert result.n_nuclei == truth.max()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64)), "empty"),
        (np.full((64, 64), 7, np.uint16), "empty"),
        (np.where(np.eye(64) > 0, np.nan, 1.0), "NaN"),
        (np.random.default_rng(0).random((2, 2, 32, 32)), "2-D"),
        (np.random.default_rng(0).random((4, 4)), "too small"),
        (np.ones((32, 32), bool), "numeric"),
    ],
    ids=["zeros", "constant", "nan", "4d", "tiny", "bool"],
)
def test_bad_images_give_clear_errors(image, message):
    with pytest.raises(InputError, match=message):
        prepare_planes(image)


def test_missing_custom_model_is_reported_and_auto_falls_back(synthetic, tmp_path):
    image, truth = synthetic
    missing = tmp_path / "no-such-model"
    with pytest.raises(WeightsUnavailableError, match=str(missing)):
        segment(image, SegmentParams(method="cellpose", model=str(missing)))
    result = segment(image, SegmentParams(method="auto", model=str(missing), diameter=16))
    assert result.method == "classical"
    assert "cellpose unavailable" in result.note and str(missing) in result.note
    assert result.n_nuclei == truth.max()


@pytest.fixture(scope="module")
def local_cellpose_model(tmp_path_factory):
    """A randomly initialised cellpose network saved to disk (no download needed)."""
    from cellpose import models

    net = models.CellposeModel(gpu=False, pretrained_model=False, model_type=None, diam_mean=17.0)
    path = tmp_path_factory.mktemp("cellpose") / "random_nuclei_model"
    net.net.save_model(str(path))
    return path


def test_cellpose_custom_model_loads_runs_and_is_cached(synthetic, local_cellpose_model):
    image, _ = synthetic
    params = SegmentParams(
        method="cellpose", model=str(local_cellpose_model), diameter=17, gpu=False
    )
    result = segment(image, params)
    assert result.method == "cellpose"
    assert result.labels.shape == image.shape
    assert np.issubdtype(result.labels.dtype, np.integer)
    assert seg.load_cellpose(str(local_cellpose_model), False) is seg.load_cellpose(
        str(local_cellpose_model), False
    )


def test_cellpose_failure_is_cached_until_weights_appear(tmp_path, local_cellpose_model):
    target = tmp_path / "model_later"
    with pytest.raises(WeightsUnavailableError):
        seg.load_cellpose(str(target), False)
    target.write_bytes(local_cellpose_model.read_bytes())
    assert seg.load_cellpose(str(target), False) is not None


def test_a_broken_cellpose_install_falls_back_with_a_message(synthetic, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cellpose", None)  # importing it now raises ImportError
    image, truth = synthetic
    with pytest.raises(WeightsUnavailableError, match="cannot be imported"):
        seg.load_cellpose("broken-install-check", False)
    result = segment(image, SegmentParams(method="auto", model="broken-install-check", diameter=16))
    assert result.method == "classical" and "cannot be imported" in result.note
    assert result.n_nuclei == truth.max()
