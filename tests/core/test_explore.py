import numpy as np
import pandas as pd
import pytest
import zarr

from napari_nucleae.core.errors import InputError
from napari_nucleae.core.explore import (
    interpolate,
    interpolation_strip,
    latent_histograms,
    nearest,
    outlier_flags,
    rank_outliers,
)


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, ...]:
    if metric == "euclidean":
        cost = np.linalg.norm(x[None] - q[:, None], axis=2)
    else:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        cost = -(q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
    order = np.argsort(cost, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(cost, order, axis=1)
    return order, (scores if metric == "euclidean" else -scores)


def test_outlier_flags_count_each_tail():
    mse = np.random.default_rng(0).permutation(np.arange(1000.0))
    flags = outlier_flags(mse, low_pct=1.0, high_pct=2.5)
    assert list(flags.categories) == ["low", "normal", "high"]
    counts = pd.Series(flags).value_counts()
    assert (counts["low"], counts["high"], counts["normal"]) == (10, 25, 965)
    assert set(mse[flags == "low"]) == set(range(10))
    assert set(mse[flags == "high"]) == set(range(975, 1000))


def test_outlier_flags_skip_nan_and_check_percentages():
    mse = np.array([np.nan, 5.0, 1.0, 3.0, np.nan])
    flags = outlier_flags(mse, low_pct=25, high_pct=25)
    assert list(flags) == ["normal", "high", "low", "normal", "normal"]
    with pytest.raises(InputError):
        outlier_flags(mse, low_pct=60, high_pct=50)


def test_rank_outliers_orders_most_extreme_first():
    mse = np.array([0.3, 0.9, np.nan, 0.1, 0.5, 0.95])
    assert list(rank_outliers(mse, 2, "high")) == [5, 1]
    assert list(rank_outliers(mse, 3, "low")) == [3, 0, 4]
    assert len(rank_outliers(mse, 10)) == 5
    with pytest.raises(InputError):
        rank_outliers(mse, 2, "middle")


def test_interpolation_endpoints_and_linear_decode():
    rng = np.random.default_rng(1)
    z_a, z_b = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    path = interpolate(z_a, z_b, steps=6)
    assert path.shape == (6, 8)
    np.testing.assert_array_equal(path[0], z_a)
    np.testing.assert_array_equal(path[-1], z_b)
    np.testing.assert_allclose(path[1], 0.8 * z_a + 0.2 * z_b, rtol=1e-6)

    weights = rng.normal(size=(8, 16)).astype(np.float32)

    def decode(z: np.ndarray) -> np.ndarray:
        return (z @ weights).reshape(len(z), 4, 4)

    strip = interpolation_strip(z_a, z_b, decode, steps=6)
    assert strip.shape == (6, 4, 4)
    # a batched matmul may round differently from a single row (BLAS kernels differ by shape)
    np.testing.assert_allclose(strip[0], decode(z_a[None])[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(strip[-1], decode(z_b[None])[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(strip[3], decode(path[3:4])[0], rtol=1e-6, atol=1e-6)


def test_interpolation_rejects_bad_input():
    with pytest.raises(InputError):
        interpolate(np.zeros(3), np.zeros(4))
    with pytest.raises(InputError):
        interpolate(np.zeros(3), np.ones(3), steps=1)
    with pytest.raises(InputError):
        interpolation_strip(np.zeros(3), np.ones(3), lambda z: z, steps=4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_matches_brute_force(metric):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 12))
    q = rng.normal(size=(4, 12))
    idx, scores = nearest(x, q, k=7, metric=metric, rows=37)
    expected_idx, expected_scores = brute_force(x, q, 7, metric)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-9)
    one_idx, one_scores = nearest(x, q[0], k=7, metric=metric)
    assert one_idx.shape == (7,)
    np.testing.assert_array_equal(one_idx, expected_idx[0])


def test_nearest_excludes_rows_and_caps_k():
    x = np.arange(10.0)[:, None] * np.ones((1, 3))
    idx, scores = nearest(x, x[4], k=3, exclude=[4, 5])
    assert list(idx) == [3, 2, 6]  # 2 and 6 tie; the lower row wins
    assert scores[0] == pytest.approx(np.sqrt(3))
    idx, _ = nearest(x, x[0], k=50, exclude=[0])
    assert len(idx) == 9
    with pytest.raises(InputError):
        nearest(x, np.zeros(4))


def test_nearest_breaks_ties_by_row_index_across_chunks():
    x = np.repeat(np.eye(3), 20, axis=0)[::-1]  # 20 identical copies of each row
    idx, scores = nearest(x, np.array([1.0, 0.0, 0.0]), k=5, rows=7)
    assert list(idx) == [40, 41, 42, 43, 44]
    np.testing.assert_array_equal(scores, 0)


def test_nearest_reads_a_zarr_array_in_chunks():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    z = zarr.create_array(store={}, shape=x.shape, chunks=(64, 6), dtype="f4")
    z[:] = x
    for metric in ("euclidean", "cosine"):
        got = nearest(z, x[10], k=5, metric=metric, rows=50)
        want = nearest(x, x[10], k=5, metric=metric)
        np.testing.assert_array_equal(got[0], want[0])


def test_latent_histograms_match_numpy_and_stream_from_zarr():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 5)).astype(np.float32)
    x[:, 3] = 2.0  # a constant dimension
    x[0, 1], x[1, 1] = np.nan, np.inf  # not counted
    z = zarr.create_array(store={}, shape=x.shape, chunks=(128, 5), dtype="f4")
    z[:] = x
    counts, edges = latent_histograms(z, bins=20, rows=100)
    assert counts.shape == (5, 20) and edges.shape == (5, 21)
    np.testing.assert_array_equal(counts.sum(axis=1), [1000, 998, 1000, 1000, 1000])
    for dim in (0, 1, 4):
        values = x[np.isfinite(x[:, dim]), dim]
        np.testing.assert_array_equal(counts[dim], np.histogram(values, bins=edges[dim])[0])
        assert edges[dim, 0] == pytest.approx(values.min())
    assert counts[3].max() == 1000
    sub_counts, _ = latent_histograms(x, bins=20, dims=[4, 0])
    np.testing.assert_array_equal(sub_counts, counts[[4, 0]])
