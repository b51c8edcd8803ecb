"""Property-based tests of cropping: random label images, nucleus sizes and crop settings."""

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from napari_nucleae.core.crop import crop_nuclei
from napari_nucleae.core.store import CropParams

SETTINGS = settings(max_examples=30, deadline=None, database=None)


@st.composite
def label_images(draw: st.DrawFn) -> np.ndarray:
    """Rectangles and ellipses of random size and place; ids non-sequential; later shapes
    are painted only on background, so a nucleus may be cut into pieces by an earlier one."""
    shape = (draw(st.integers(12, 72)), draw(st.integers(12, 72)))
    n = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n, unique=True))
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for label in ids:
        y, x = draw(st.integers(0, shape[0] - 1)), draw(st.integers(0, shape[1] - 1))
        ry, rx = draw(st.integers(0, 12)), draw(st.integers(0, 12))
        if draw(st.booleans()):
            inside = (abs(yy - y) <= ry) & (abs(xx - x) <= rx)
        else:
            inside = ((yy - y) / (ry + 0.5)) ** 2 + ((xx - x) / (rx + 0.5)) ** 2 <= 1
        labels[inside & (labels == 0)] = label
    return labels


def expected_labels(labels: np.ndarray, skip_border: bool) -> list[int]:
    """Present labels, in increasing order, without those touching the border if skipped."""
    present = [int(v) for v in np.unique(labels) if v]
    if not skip_border:
        return present
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return [v for v in present if v not in set(edge.tolist())]


def split_nucleus() -> np.ndarray:
    """One nucleus in two far-apart pieces: its centred window holds none of its pixels."""
    labels = np.zeros((60, 60), np.int32)
    labels[5, 5] = labels[50, 50] = 1
    return labels


def window(array: np.ndarray, center: tuple[float, float], size: int) -> np.ndarray:
    """The ``size``×``size`` window centred on the pixel nearest ``centre`` (zero outside)."""
    padded = np.pad(array, size)
    r, c = (int(np.rint(v)) - size // 2 + size for v in center)
    return padded[r : r + size, c : c + size]


@SETTINGS
@given(
    labels=label_images(),
    size=st.integers(8, 40),
    skip_border=st.booleans(),
    mask=st.booleans(),
)
def test_unscaled_crops_are_the_windows_centerd_on_each_nucleus(labels, size, skip_border, mask):
    present = [v for v in np.unique(labels) if v]
    # every pixel has its own value, so a crop shows exactly where it was taken from
    image = ((np.arange(labels.size) + 1) / (labels.size + 1)).reshape(labels.shape)
    params = CropParams(
        size=size,
        background="zero" if mask else "keep",
        skip_border=skip_border,
        rescale_large=False,
        normalize="none",
    )
    result = crop_nuclei(image.astype(np.float32), labels, params)
    kept = expected_labels(labels, skip_border)
    assert result.crops.shape == (len(kept), size, size)
    assert result.table["label"].tolist() == kept
    assert len(result.measurements) == len(present)
    assert result.measurements["cropped"].sum() == len(kept)
    for crop, row in zip(result.crops, result.table.itertuples(), strict=True):
        pixels = np.argwhere(labels == row.label)
        center = pixels.mean(axis=0)
        np.testing.assert_allclose([row.centroid_y, row.centroid_x], center)
        assert row.area == len(pixels)
        r, c = np.rint(center).astype(int)
        expected = window(image.astype(np.float32), center, size)
        if mask:
            expected = np.where(window(labels, center, size) == row.label, expected, 0)
        np.testing.assert_array_equal(crop, expected)
        assert crop[size // 2, size // 2] == (
            image[r, c].astype(np.float32) if not mask or labels[r, c] == row.label else 0
        )


@SETTINGS
@given(
    labels=label_images(),
    size=st.integers(8, 40),
    skip_border=st.booleans(),
    mask=st.booleans(),
    rescale=st.booleans(),
    align=st.booleans(),
    normalize=st.sampled_from(["image", "crop", "none"]),
    offset=st.floats(-1000, 70000),
    scale=st.floats(1e-3, 1e5),
    seed=st.integers(0, 2**16),
)
@example(split_nucleus(), 8, True, False, False, False, "crop", 0.0, 1.0, 0)
def test_crops_have_the_crop_size_and_values_in_unit_range(
    labels, size, skip_border, mask, rescale, align, normalize, offset, scale, seed
):
    image = np.random.default_rng(seed).random(labels.shape)
    if normalize != "none":  # which needs values in [0, 1]
        image = offset + scale * image
    params = CropParams(
        size=size,
        background="zero" if mask else "keep",
        skip_border=skip_border,
        rescale_large=rescale,
        align=align,
        normalize=normalize,
    )
    result = crop_nuclei(image, labels, params)
    kept = expected_labels(labels, skip_border)
    assert result.crops.shape == (len(kept), size, size)
    assert result.crops.dtype == np.float32
    assert np.isfinite(result.crops).all()
    assert result.crops.min(initial=0) >= 0 and result.crops.max(initial=0) <= 1
    assert result.table["label"].tolist() == kept
    assert len(result.table) == len(result.crops)
    cropped = result.measurements[result.measurements["cropped"]].reset_index(drop=True)
    np.testing.assert_array_equal(cropped["label"], result.table["label"])
