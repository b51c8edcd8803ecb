import importlib

from npe2 import PluginManifest


def test_manifest_is_registered_and_every_command_imports():
    manifest = PluginManifest.from_distribution("napari-nucleae")
    assert manifest.name == "napari-nucleae"
    for command in manifest.contributions.commands:
        module, _, attribute = command.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), command.id
    menus = manifest.contributions.menus
    assert any(
        item.command == "napari-nucleae.segment_widget" for item in menus["napari/layers/segment"]
    )


def test_sample_data_loads_real_and_synthetic_images():
    from napari_nucleae.sample import bbbc007_sample, synthetic_sample

    ((data, meta, kind),) = bbbc007_sample()
    assert kind == "image" and data.ndim == 2 and data.dtype.kind == "u"
    assert "BBBC007" in meta["name"]
    image, labels = synthetic_sample()
    assert image[2] == "image" and labels[2] == "labels"
    assert labels[0].max() == 24
