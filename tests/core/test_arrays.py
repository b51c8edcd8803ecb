"""Huge and lazy (dask, zarr) images: a clear limit before any read, one plane at a time."""

import tracemalloc

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_nucleae.core.errors import InputError
from napari_nucleae.core.ingest import IngestParams, array_checksum, process_layer
from napari_nucleae.core.segment import MAX_PIXELS_ENV, SegmentParams, segment
from napari_nucleae.core.store import CropParams

PARAMS = IngestParams(
    segment=SegmentParams(method="classical", diameter=16), crop=CropParams(size=32)
)


@pytest.fixture(scope="module")
def stack(synthetic) -> np.ndarray:
    image, _ = synthetic
    return np.stack([image, image[::-1], image[:, ::-1]])


@pytest.mark.parametrize(
    "huge",
    [
        lambda: np.broadcast_to(np.float32(1), (20_000, 20_000)),
        lambda: da.zeros((2, 20_000, 20_000), dtype=np.uint16, chunks=(1, 4096, 4096)),
        lambda: zarr.create_array({}, shape=(20_000, 20_000), chunks=(4096, 4096), dtype="u1"),
    ],
    ids=["numpy-view", "dask", "zarr"],
)
def test_huge_planes_are_refused_before_anything_is_read(huge):
    image = huge()
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            process_layer(image, PARAMS, name="huge")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "20000×20000 = 400,000,000 pixels, above the limit of 268,435,456" in message
    assert "Tile the image or crop a region" in message and MAX_PIXELS_ENV in message
    assert peak < 20 * 2**20  # nothing near a plane (400 MB and more) was allocated


def test_the_plane_limit_is_a_setting_and_an_environment_variable(synthetic, monkeypatch):
    image, truth = synthetic
    with pytest.raises(InputError, match="above the limit of 10,000 pixels"):
        segment(image, SegmentParams(method="classical", max_plane_pixels=10_000))
    monkeypatch.setenv(MAX_PIXELS_ENV, "10000")
    with pytest.raises(InputError, match="256×256 = 65,536 pixels, above the limit of 10,000"):
        segment(image, SegmentParams(method="classical"))
    allowed = SegmentParams(method="classical", diameter=16, max_plane_pixels=65_536)
    assert segment(image, allowed).n_nuclei == truth.max()  # the setting wins
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match="not a whole number of pixels"):
        segment(image, SegmentParams(method="classical"))
    with pytest.raises(InputError, match="max_plane_pixels must be at least"):
        SegmentParams(max_plane_pixels=0)


def test_a_zarr_stack_is_read_one_plane_at_a_time(stack, recorded_reads):
    stored = zarr.create_array({}, shape=stack.shape, chunks=(3, 128, 128), dtype=stack.dtype)
    stored[:] = stack
    recorded = recorded_reads(stored)
    result = process_layer(recorded, PARAMS, name="zarr stack")
    assert recorded.largest_read == stack[0].size
    expected = process_layer(stack, PARAMS, name="numpy stack")
    assert result.record["image_id"] == expected.record["image_id"] == array_checksum(stored)
    np.testing.assert_array_equal(result.segmentation.labels, expected.segmentation.labels)
    np.testing.assert_array_equal(result.crops.crops, expected.crops.crops)
    assert result.n_crops == 3 * 24


def test_a_dask_image_with_channels_reads_one_plane_at_a_time(stack, recorded_reads):
    rgb = np.stack([np.zeros_like(stack), stack, np.zeros_like(stack)], axis=-1)
    recorded = recorded_reads(rgb)
    image = da.from_array(recorded, chunks=rgb.shape)  # one chunk: slicing decides the reads
    params = IngestParams(segment=PARAMS.segment, crop=PARAMS.crop, channel=1)
    result = process_layer(image, params, name="dask rgb")
    assert recorded.largest_read <= rgb[0].size
    assert result.segmentation.labels.shape == stack.shape and result.n_crops == 3 * 24
