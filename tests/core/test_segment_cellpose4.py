"""The cellpose 4 (``cpsam``) path: runs where cellpose 4 is installed (a GPU machine), skipped
elsewhere. No weights can be downloaded, so a randomly initialised CPSAM network is saved and
loaded through the custom-model option, exactly as a user's own model file would be."""

import numpy as np
import pytest

from napari_nucleae.core import segment as seg
from napari_nucleae.core.segment import SegmentParams, segment

pytestmark = pytest.mark.skipif(
    (seg.cellpose_version() or 0) < 4, reason="needs cellpose 4 (cpsam); CI uses cellpose 3"
)


def test_cpsam_model_file_loads_and_segments(synthetic, tmp_path):
    import torch
    from cellpose.vit import CPSAM

    path = tmp_path / "cpsam_random"
    CPSAM(dtype=torch.float32).save_model(str(path))
    image, _ = synthetic
    gpu = torch.cuda.is_available()
    params = SegmentParams(method="cellpose", model=str(path), diameter=17, gpu=gpu)
    result = segment(image, params)
    assert result.method == "cellpose"
    assert result.labels.shape == image.shape and np.issubdtype(result.labels.dtype, np.integer)
    assert seg.default_model_name(4) == "cpsam"


def test_missing_cpsam_weights_name_the_model_and_folder(monkeypatch, tmp_path):
    from cellpose import models

    monkeypatch.setattr(models, "MODEL_DIR", tmp_path)
    with pytest.raises(seg.WeightsUnavailableError, match="cpsam") as info:
        seg._load_cellpose("cpsam", False)
    assert str(tmp_path) in str(info.value)
