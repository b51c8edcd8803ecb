import numpy as np
import pytest
import tifffile

from napari_nucleae.core.errors import InputError
from napari_nucleae.core.ingest import (
    IngestParams,
    expand_inputs,
    ingest,
    process_layer,
)
from napari_nucleae.core.segment import SegmentParams
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
