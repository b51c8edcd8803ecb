import numpy as np
import pandas as pd
import pytest
from skimage.draw import ellipse
from skimage.measure import regionprops_table

from napari_nucleae.core.crop import (
    crop_nuclei,
    crop_size_note,
    gather_windows,
    measure_plane,
    plane_percentiles,
    suggest_crop_size,
)
from napari_nucleae.core.errors import InputError, NoNucleiError
from napari_nucleae.core.store import CropParams


def _mask_centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_measurements_match_regionprops_on_non_sequential_labels(synthetic):
    image, labels = synthetic
    labels = np.where(labels > 0, labels * 7 + 1000, 0)  # non-sequential, large ids
    ours = measure_plane(image, labels)
    ref = pd.DataFrame(
        regionprops_table(
            labels,
            image,
            properties=[
                "label",
                "centroid",
                "bbox",
                "area",
                "intensity_mean",
                "eccentricity",
                "orientation",
                "axis_major_length",
            ],
        )
    )
    np.testing.assert_array_equal(ours["label"], ref["label"])
    np.testing.assert_allclose(ours["centroid_y"], ref["centroid-0"])
    np.testing.assert_allclose(ours["centroid_x"], ref["centroid-1"])
    np.testing.assert_array_equal(
        ours[["bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]],
        ref[["bbox-0", "bbox-1", "bbox-2", "bbox-3"]],
    )
    np.testing.assert_allclose(ours["area"], ref["area"])
    np.testing.assert_allclose(ours["mean_intensity"], ref["intensity_mean"], rtol=1e-5)
    np.testing.assert_allclose(ours["eccentricity"], ref["eccentricity"], atol=1e-9)
    np.testing.assert_allclose(ours["orientation"], ref["orientation"], atol=1e-9)
    np.testing.assert_allclose(ours["major_axis_length"], ref["axis_major_length"], rtol=1e-9)


def test_crops_are_sized_centerd_masked_and_match_the_table(synthetic):
    image, labels = synthetic
    result = crop_nuclei(image, labels, CropParams(size=48))
    assert result.crops.shape == (labels.max(), 48, 48)
    assert result.crops.dtype == np.float32
    assert result.crops.min() >= 0 and result.crops.max() <= 1
    assert list(result.table["label"]) == list(range(1, labels.max() + 1))
    for crop, row in zip(result.crops, result.table.itertuples(), strict=True):
        nucleus = labels == row.label
        assert (crop > 0).sum() <= row.area  # background masked to 0
        assert row.area == nucleus.sum()
        np.testing.assert_allclose(_mask_centroid(crop > 0), [24, 24], atol=1.0)


def test_unmasked_crops_keep_background_and_border_nuclei_can_be_kept():
    labels = np.zeros((80, 80), np.int32)
    labels[30:40, 30:40] = 1
    labels[0:8, 60:70] = 2  # touches the border
    image = np.where(labels > 0, 0.8, 0.2).astype(np.float32)
    skipped = crop_nuclei(image, labels, CropParams(size=32, background="keep", normalize="none"))
    assert list(skipped.table["label"]) == [1]
    assert skipped.measurements["cropped"].tolist() == [True, False]
    assert (skipped.crops[0] > 0).mean() > 0.9  # background kept
    kept = crop_nuclei(image, labels, CropParams(size=32, skip_border=False))
    assert list(kept.table["label"]) == [1, 2]
    assert kept.crops[1][:8].sum() == 0  # outside the image reads as zero


def test_mean_background_fills_outside_each_nucleus_with_its_interior_mean():
    labels = np.zeros((80, 80), np.int32)
    labels[30:40, 30:40] = 1
    rng = np.random.default_rng(0)
    image = np.where(labels > 0, rng.uniform(0.5, 0.9, labels.shape), 0.1).astype(np.float32)
    params = CropParams(size=32, background="mean", normalize="none")
    crop = crop_nuclei(image, labels, params).crops[0]
    inside = crop_nuclei(image, labels, CropParams(size=32, background="keep", normalize="none"))
    mask = crop_nuclei(labels.astype(np.float32), labels, CropParams(size=32, normalize="none"))
    nucleus = mask.crops[0] > 0
    np.testing.assert_array_equal(crop[nucleus], inside.crops[0][nucleus])
    np.testing.assert_allclose(crop[~nucleus], image[labels > 0].mean(), rtol=1e-5)
    with pytest.raises(InputError, match="background must be one of"):
        CropParams(background="black")


def test_large_nuclei_are_shrunk_to_fit_and_alignment_puts_major_axis_horizontal():
    labels = np.zeros((200, 200), np.int32)
    rr, cc = ellipse(100, 100, 70, 30, rotation=0.6, shape=labels.shape)
    labels[rr, cc] = 1
    image = labels.astype(np.float32)
    fitted = crop_nuclei(image, labels, CropParams(size=32, align=True))
    mask = fitted.crops[0] > 0.5
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any()
    props = measure_plane(mask.astype(float), mask.astype(np.int32))
    assert abs(abs(props["orientation"][0]) - np.pi / 2) < 0.1  # major axis along columns
    clipped = crop_nuclei(image, labels, CropParams(size=32, rescale_large=False))
    assert (clipped.crops[0] > 0.5).all()  # the nucleus fills an unscaled 32×32 window


def test_percentile_normalisation_per_image_and_per_crop(synthetic):
    image, labels = synthetic
    dim = image * 0.1 + 5.0  # an affine change of intensities
    a = crop_nuclei(image, labels, CropParams(size=32))
    b = crop_nuclei(dim, labels, CropParams(size=32))
    np.testing.assert_allclose(a.crops, b.crops, atol=1e-4)
    per_crop = crop_nuclei(image, labels, CropParams(size=32, normalize="crop"))
    assert np.allclose(per_crop.crops.max(axis=(1, 2)), 1.0)


def test_stacks_keep_their_plane(synthetic):
    image, labels = synthetic
    stack_labels = np.stack([labels, np.where(labels > 0, labels + labels.max(), 0)])
    result = crop_nuclei(np.stack([image, image]), stack_labels, CropParams(size=32))
    assert result.table["plane"].tolist() == [0] * labels.max() + [1] * labels.max()
    np.testing.assert_array_equal(result.crops[: labels.max()], result.crops[labels.max() :])


def test_bad_labels_give_clear_errors(synthetic):
    image, labels = synthetic
    with pytest.raises(InputError, match="do not match"):
        crop_nuclei(image, labels[:100])
    with pytest.raises(InputError, match="integers"):
        crop_nuclei(image, labels.astype(float))
    with pytest.raises(NoNucleiError):
        crop_nuclei(image, np.zeros_like(labels))


def test_one_pixel_nuclei_are_cropped():
    labels = np.zeros((50, 50), np.int32)
    labels[25, 25] = 1
    image = labels.astype(np.float32)
    result = crop_nuclei(image, labels, CropParams(size=16, normalize="none"))
    assert result.crops.shape == (1, 16, 16)
    assert result.crops[0, 8, 8] == 1.0 and result.crops.sum() == 1.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_plane_percentiles_equal_numpy(dtype):
    rng = np.random.default_rng(1)
    top = 255 if dtype == np.uint8 else 60_000
    plane = (rng.gamma(2.0, top / 12, (301, 157)).clip(0, top)).astype(dtype)
    for pcts in [(1.0, 99.8), (0.0, 100.0), (37.3, 50.0)]:
        np.testing.assert_allclose(plane_percentiles(plane, pcts), np.percentile(plane, pcts))
    constant = np.full((5, 5), 7, dtype=dtype)
    assert plane_percentiles(constant, (1.0, 99.8)) == (7.0, 7.0)


def test_windows_near_the_border_read_zero_outside():
    plane = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    corners = np.array([[2, 3], [-2, -1], [7, 8], [-5, 20]])
    windows = gather_windows(plane, corners, 4)
    padded = np.pad(plane, 30)
    for window, (r, c) in zip(windows, corners + 30, strict=True):
        np.testing.assert_array_equal(window, padded[r : r + 4, c : c + 4])
    tiny = gather_windows(plane[:3, :3], np.array([[-1, -1]]), 5)  # a plane smaller than a crop
    np.testing.assert_array_equal(tiny[0], np.pad(plane[:3, :3], ((1, 1), (1, 1))))


def test_crop_size_suggestion_lets_the_measured_nuclei_fill_the_crop(synthetic):
    image, labels = synthetic  # nuclei 12-22 px across
    table = crop_nuclei(image, labels, CropParams(size=64)).table
    assert suggest_crop_size(table) == 32
    note = crop_size_note(table, 64)
    assert "crop size 32 would fill it with them (now 64)" in note
    assert crop_size_note(table, 32) is None and crop_size_note(table, 48) is None
    big = table.assign(bbox_y1=table["bbox_y0"] + 150)
    assert suggest_crop_size(big) == 192 and "(now 64)" in crop_size_note(big, 64)
    assert suggest_crop_size(table.iloc[:0]) is None
