"""A small analysed project (two synthetic images, a tiny trained model, latents) built once,
copied per test, and shown in a viewer the way "Segment & crop nuclei" shows it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_nucleae.core.embed import embed
from napari_nucleae.core.ingest import IngestParams, add_to_project, process_layer
from napari_nucleae.core.model import ModelConfig
from napari_nucleae.core.segment import SegmentParams
from napari_nucleae.core.store import CropParams, Project
from napari_nucleae.core.training import train
from napari_nucleae.sample import synthetic_nuclei
from napari_nucleae.widgets._settings import SETTINGS_ENV
from napari_nucleae.widgets.segment import features_table


@dataclass
class Shown:
    """One segmented image as the segment widget would show it."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    features: pd.DataFrame
    image_id: str


@dataclass
class Analysed:
    path: Path
    images: list[Shown]


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch) -> Path:
    """Each widget test remembers its parameters in its own settings file."""
    path = tmp_path / "settings" / "widgets.json"
    monkeypatch.setenv(SETTINGS_ENV, str(path))
    return path


@pytest.fixture(scope="session")
def analysed_template(tmp_path_factory) -> Analysed:
    params = IngestParams(
        segment=SegmentParams(method="classical", diameter=16), crop=CropParams(size=32)
    )
    path = tmp_path_factory.mktemp("analysed") / "project"
    project = Project.create(path, params.crop)
    shown = []
    for seed in (3, 4):
        image, _ = synthetic_nuclei(shape=(200, 200), n_nuclei=16, seed=seed)
        name = f"nuclei {seed}"
        result = process_layer(image, params, name=name)
        added = add_to_project(project, result)
        labels = result.segmentation.labels
        features, _ = features_table(result, added.start)
        shown.append(Shown(name, image, labels, features, result.record["image_id"]))
    config = ModelConfig(
        variant="ae",
        crop_size=32,
        n_blocks=2,
        base_filters=4,
        latent_dim=8,
        batch_size=8,
        min_steps=0,
    )
    train(project, config, 2, device="cpu", on_collapse="warn")  # tiny: spread is not the point
    embed(project, device="cpu")
    return Analysed(path, shown)


@pytest.fixture
def analysed(analysed_template, tmp_path) -> Analysed:
    """A private copy of the analysed project."""
    path = tmp_path / "project"
    shutil.copytree(analysed_template.path, path)
    return Analysed(path, analysed_template.images)


def _show_project(viewer, analysed: Analysed) -> list:
    """Add every image and its Labels layer (with features and metadata) to ``viewer``."""
    layers = []
    for item in analysed.images:
        viewer.add_image(item.image, name=item.name)
        layers.append(
            viewer.add_labels(
                item.labels,
                name=f"{item.name} nuclei",
                features=item.features.copy(),
                metadata={"nucleae": {"image_id": item.image_id, "project": str(analysed.path)}},
            )
        )
    return layers


def _visible_labels(highlight, source) -> set[int]:
    """Labels of ``source`` a highlight layer draws (non-transparent pixels)."""
    drawn = highlight.colormap.map(highlight.data)[..., 3] > 0
    return {int(v) for v in np.unique(source.data[drawn])}


@pytest.fixture
def show_project():
    """``show_project(viewer, analysed)``: the images and Labels layers, as segmented."""
    return _show_project


@pytest.fixture
def visible_labels():
    """``visible_labels(highlight, source)``: the labels a highlight layer shows."""
    return _visible_labels
