import json

from napari_nucleae.core.model import ModelConfig
from napari_nucleae.widgets._settings import load_settings, settings_file
from napari_nucleae.widgets.interpolate_search import InterpolateSearchWidget
from napari_nucleae.widgets.outliers import OutliersWidget
from napari_nucleae.widgets.segment import SegmentWidget
from napari_nucleae.widgets.train import TrainWidget


def test_a_new_widget_starts_from_the_last_parameters(make_napari_viewer, isolated_settings):
    viewer = make_napari_viewer()
    first = TrainWidget(viewer)
    first.variant.value = "vae"
    first.epochs.value = 7
    first.lr.value = 0.002
    first.name.value = "run b"
    first.resume.value = True
    assert settings_file() == isolated_settings
    assert load_settings()["train"]["epochs"] == 7

    second = TrainWidget(viewer)
    assert (second.variant.value, second.epochs.value, second.name.value) == ("vae", 7, "run b")
    assert abs(second.lr.value - 0.002) < 1e-12
    assert second.resume.value is False  # resuming is chosen afresh each time
    assert second.latent_dim.value == ModelConfig.latent_dim  # never changed: the default


def test_each_widget_keeps_its_own_parameters_and_skips_picks(make_napari_viewer):
    viewer = make_napari_viewer()
    outliers = OutliersWidget(viewer)
    outliers.high.value = 5.0
    explore = InterpolateSearchWidget(viewer)
    explore.steps.value = 9
    explore.crop_a.value = 3
    stored = load_settings()
    assert stored["outliers"]["high"] == 5.0
    assert "crop_a" not in stored["explore"] and stored["explore"]["steps"] == 9
    assert OutliersWidget(viewer).high.value == 5.0
    assert InterpolateSearchWidget(viewer).crop_a.value == 0
    segment = SegmentWidget(viewer)
    segment.crop_size.value, segment.method.value = 96, "classical"
    segment.background.value = "mean"
    segment.project.value = "/data/experiment-1"
    again = SegmentWidget(viewer)
    assert (again.crop_size.value, again.method.value) == (96, "classical")
    assert again.background.value == "mean" and again.params().crop.background == "mean"
    assert str(again.project.value) in ("", ".")  # folders are never remembered


def test_unreadable_or_outdated_settings_fall_back_to_defaults(
    make_napari_viewer, isolated_settings
):
    viewer = make_napari_viewer()
    isolated_settings.parent.mkdir(parents=True)
    isolated_settings.write_text("{not json")
    assert TrainWidget(viewer).epochs.value == 30

    stale = {"train": {"variant": "gone", "epochs": -5, "batch_size": "big", "latent_dim": 64}}
    isolated_settings.write_text(json.dumps(stale))
    widget = TrainWidget(viewer)
    assert (widget.variant.value, widget.epochs.value, widget.batch_size.value) == ("ae", 30, 64)
    assert widget.latent_dim.value == 64
