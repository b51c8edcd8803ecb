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


def test_only_this_plugin_claims_a_project_json(tmp_path):
    import npe2

    from napari_nucleae.core.store import CropParams, Project
    from napari_nucleae.reader import get_reader

    folder = tmp_path / "project"
    Project.create(folder, CropParams(size=32))
    manager = npe2.PluginManager.instance()
    manager.discover()
    claims = {
        r.plugin_name for r in manager.iter_compatible_readers([str(folder / "project.json")])
    }
    assert claims == {"napari-nucleae"}  # napari opens it without asking which reader to use
    assert get_reader(str(folder / "project.json")) is get_reader(str(folder)) is not None
    assert get_reader(str(tmp_path)) is None
