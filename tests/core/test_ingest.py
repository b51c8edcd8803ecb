import os
import re
from dataclasses import replace

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_nucleae.core.errors import InputError
from napari_nucleae.core.ingest import (
    IngestParams,
    add_to_project,
    array_checksum,
    check_regular_file,
    expand_inputs,
    file_checksum,
    image_identity,
    ingest,
    process_layer,
    read_image,
)
from napari_nucleae.core.segment import SegmentParams, looks_like_channels
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.sample import bbbc007_paths

CLASSICAL = IngestParams(segment=SegmentParams(method="classical"), crop=CropParams(size=32))


def test_ingest_real_images_is_idempotent_and_reports_failures(tmp_path):
    paths = bbbc007_paths()[:3]
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.zeros((64, 64), np.uint8))
    project = Project.create(tmp_path / "p", CLASSICAL.crop)
    seen = []
    summary = ingest(
        [*paths, broken, blank],
        project,
        CLASSICAL,
        workers=2,
        progress=lambda done, total, msg: seen.append((done, total)),
    )
    assert sorted(p for p, _ in summary.added) == sorted(map(str, paths))
    assert {p for p, _ in summary.failed} == {str(broken), str(blank)}
    assert len(project) == summary.n_crops > 200
    assert seen[-1] == (5, 5)
    table = project.table()
    assert set(table["image_path"]) == set(map(str, paths))
    assert (table.groupby("image_id").size().to_numpy() > 30).all()
    again = ingest(paths, project, CLASSICAL)
    assert again.skipped == list(map(str, paths)) and not again.added
    assert len(Project.open(tmp_path / "p")) == summary.n_crops


def test_expand_inputs_handles_folders_globs_and_skips_label_images(tmp_path):
    folder = bbbc007_paths()[0].parent
    found = expand_inputs([folder])
    assert found and all(not p.stem.endswith("_labels") for p in found)
    assert expand_inputs([str(folder / "*.tif")]) == found


def test_process_layer_returns_labels_crops_and_ids(synthetic):
    image, truth = synthetic
    params = IngestParams(
        segment=SegmentParams(method="classical", diameter=16), crop=CropParams(size=32)
    )
    result = process_layer(image, params, name="synthetic")
    assert result.segmentation.labels.shape == image.shape
    assert result.n_crops == truth.max()
    assert result.record["image_id"] == process_layer(image, params, name="x").record["image_id"]
    assert (result.crops.table["image_path"] == "synthetic").all()


def test_ingest_through_a_distributed_scheduler_address(tmp_path):
    from distributed import LocalCluster

    paths = bbbc007_paths()[:2]
    project = Project.create(tmp_path / "p", CLASSICAL.crop)
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        summary = ingest(paths, project, CLASSICAL, scheduler=cluster.scheduler_address)
    assert len(summary.added) == 2 and len(project) == summary.n_crops > 50


@pytest.mark.parametrize("dtype", ["float64", "int32", "uint16"])
@pytest.mark.parametrize("normalize", ["image", "crop"])
def test_any_numeric_range_gives_every_nucleus_and_crops_in_unit_range(
    synthetic, synthetic_dtypes, dtype, normalize
):
    image, truth = synthetic[0], synthetic[1]
    params = IngestParams(
        segment=SegmentParams(method="classical", diameter=16),
        crop=CropParams(size=32, normalize=normalize),
    )
    result = process_layer(synthetic_dtypes[dtype], params, name=dtype)
    assert result.record["dtype"] == dtype
    assert result.segmentation.n_nuclei == result.n_crops == truth.max()
    crops = result.crops.crops
    assert crops.min() >= 0 and crops.max() <= 1
    assert np.median(crops.max(axis=(1, 2))) > 0.5  # normalised, neither black nor squashed
    reference = process_layer(image, params, name="float32").crops.crops
    np.testing.assert_allclose(crops, reference, atol=0.02)


@pytest.mark.parametrize(
    ("dtype", "message"),
    [("float64", "spans -500 to 70000"), ("int32", "not int32"), ("uint16", None)],
)
def test_no_normalisation_refuses_images_it_would_blacken_or_saturate(
    synthetic_dtypes, dtype, message
):
    params = IngestParams(
        segment=SegmentParams(method="classical", diameter=16),
        crop=CropParams(size=32, normalize="none"),
    )
    if message is None:
        crops = process_layer(synthetic_dtypes[dtype], params, name=dtype).crops.crops
        assert crops.max() == pytest.approx(synthetic_dtypes[dtype].max() / 65535, abs=1e-3)
        return
    with pytest.raises(InputError, match=message):
        process_layer(synthetic_dtypes[dtype], params, name=dtype)


def test_the_viewer_and_the_cli_give_a_file_one_identity(tmp_path):
    source = bbbc007_paths()[0]
    pixels = tifffile.imread(source)
    assert image_identity(pixels, source) == file_checksum(source)
    assert image_identity(pixels) == image_identity(pixels, tmp_path / "gone.tif")
    assert image_identity(pixels) != file_checksum(source)
    assert image_identity(pixels[:100], source) == image_identity(pixels[:100])  # not the file
    project = Project.create(tmp_path / "p", CLASSICAL.crop)
    layer = process_layer(pixels, CLASSICAL, name="a layer", path=source)  # the widget's way
    assert layer.record["path"] == str(source)
    assert add_to_project(project, layer) == range(0, layer.n_crops)
    summary = ingest([source], project, CLASSICAL)  # the CLI's way
    assert summary.skipped == [str(source)] and not summary.added
    assert add_to_project(project, layer) is None  # already there: nothing written
    assert len(Project.open(project.path)) == layer.n_crops
    assert process_layer(pixels, CLASSICAL, name="x").record["image_id"] == array_checksum(pixels)


def test_non_regular_files_are_refused_before_reading(tmp_path):
    os.mkfifo(tmp_path / "pipe.tif")  # reading it would block forever
    (tmp_path / "dir.tif").mkdir()
    (tmp_path / "dangling.tif").symlink_to(tmp_path / "nothing")
    (tmp_path / "zero.tif").symlink_to("/dev/zero")  # reading it would never end
    expected = {
        "pipe.tif": "is a named pipe (FIFO), not an image file",
        "dir.tif": "is a folder, not an image file",
        "dangling.tif": "is a dangling symbolic link",
        "zero.tif": "is a character device, not an image file",
    }
    for name, message in expected.items():
        with pytest.raises(InputError, match=re.escape(message)):
            check_regular_file(tmp_path / name)
        with pytest.raises(InputError, match=re.escape(message)):
            read_image(tmp_path / name)
    project = Project.create(tmp_path / "p", CLASSICAL.crop)
    summary = ingest(sorted(tmp_path.glob("*.tif")), project, CLASSICAL)
    failed = dict(summary.failed)
    assert sorted(failed) == sorted(str(tmp_path / name) for name in expected)
    for name, message in expected.items():
        assert message in failed[str(tmp_path / name)]
    assert len(project) == 0 and not summary.added


def membrane_channel(truth: np.ndarray) -> np.ndarray:
    """A second stain of the synthetic nuclei: bright rings around them on a dim background."""
    from scipy import ndimage as ndi

    grown = ndi.grey_dilation(truth, size=9)
    ring = (grown > 0) & (truth == 0)
    return ndi.gaussian_filter(0.1 + 0.8 * ring.astype(np.float32), 1.5).astype(np.float32)


def test_channel_first_images_ask_for_a_channel(synthetic):
    image, truth = synthetic
    two_stains = np.stack([image, membrane_channel(truth)])
    params = IngestParams(
        segment=SegmentParams(method="classical", diameter=16), crop=CropParams(size=32)
    )
    with pytest.raises(InputError, match=r"looks like 2 channels on axis 0.*--channel"):
        process_layer(two_stains, params, name="c-first")
    nuclear = process_layer(two_stains, replace(params, channel=0), name="c-first")
    assert nuclear.segmentation.labels.shape == image.shape
    assert nuclear.n_crops == truth.max()
    as_stack = process_layer(two_stains, replace(params, stack=True), name="c-first")
    assert as_stack.segmentation.labels.shape == two_stains.shape


@settings(max_examples=15, deadline=None)
@given(
    sigmas=st.lists(st.floats(0, 2.5), min_size=2, max_size=4),
    gains=st.lists(st.floats(0.5, 2), min_size=4, max_size=4),
    seed=st.integers(0, 100),
)
def test_one_stain_in_focus_and_out_is_a_stack_and_two_stains_are_channels(
    synthetic, sigmas, gains, seed
):
    from scipy import ndimage as ndi

    image, truth = synthetic
    rng = np.random.default_rng(seed)
    planes = [
        gain * ndi.gaussian_filter(image, sigma) + rng.normal(0, 0.02, image.shape)
        for sigma, gain in zip(sigmas, gains, strict=False)
    ]
    assert looks_like_channels(planes) is None
    stains = [planes[0], gains[1] * membrane_channel(truth) + rng.normal(0, 0.02, image.shape)]
    assert looks_like_channels(stains[:: 1 if seed % 2 else -1]) is not None


def test_noise_and_label_images_get_a_warning(synthetic):
    image, truth = synthetic
    noise = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    noisy = process_layer(noise, CLASSICAL, name="noise").segmentation
    assert noisy.n_nuclei > 0 and "like pure noise" in noisy.note
    labels = tifffile.imread(str(bbbc007_paths()[0]).replace(".tif", "_labels.tif"))
    as_image = process_layer(labels, CLASSICAL, name="labels").segmentation
    assert as_image.warnings == [
        "the image looks like a label image (regions of one whole number each), not a nuclear "
        "stain: segment the image itself, or crop with these labels directly"
    ]
    for real in (image, tifffile.imread(bbbc007_paths()[0])):
        assert process_layer(real, CLASSICAL, name="real").segmentation.warnings == []
