"""A report folder a person can open: the figures of a whole analysis and an ``index.html``.

:func:`write_report` runs the analysis steps on a project with embedded crops (projection,
clusters, outliers, representatives, interpolation), stores their per-crop results as project
features and draws each result with matplotlib (no GUI backend). Its clusters and outlier
flags are stored as ``report_cluster`` and ``report_outlier``, so a clustering or flags the
user made (e.g. HDBSCAN in the Latent explorer) are never replaced, unless
``ReportOptions.store_columns`` asks to store them as ``cluster`` and ``outlier``. The
folder is built beside its target and moved in at the end, so a failed run leaves no half
report; a previous report in the target folder is replaced, any other non-empty folder is
refused; a folder that cannot be written gives an :class:`ExportWriteError`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from . import analysis
from .analysis import MapSettings
from .centers import CENTERS
from .embed import resolve_model
from .errors import InputError, NucleaeError
from .explore import (
    INTERPOLATION_STEPS,
    METRICS,
    OUTLIER_PCT,
    latent_histograms,
    rank_outliers,
    sample_rows,
)
from .export import ExportExistsError, write_error
from .model import LoadedModel
from .progress import Progress
from .projection import PROJECTION_NAMES
from .represent import TOP_K, RepresentativeSet
from .staging import staged
from .store import Project

MARKER = "report.json"
PLOT_POINTS = 50_000
REPORT_PREFIX = "report_"


@dataclass(frozen=True)
class ReportOptions:
    """What the report computes; the defaults suit a few hundred to a million crops."""

    projection: str = MapSettings.method
    metric: str = MapSettings.metric
    n_clusters: int = 4  # a few clusters a reader can compare, fewer than the explorer's
    outlier_pct: float = OUTLIER_PCT
    gallery: int = 8
    top_k: int = TOP_K
    centers: tuple[str, ...] = CENTERS
    metrics: tuple[str, ...] = METRICS
    steps: int = INTERPOLATION_STEPS
    histogram_dims: int = 16
    seed: int = 0
    store_columns: bool = False  # True: store as the user's "cluster" / "outlier" columns

    def column(self, name: str) -> str:
        """The project column the report stores ``name`` ("cluster", "outlier") in."""
        return name if self.store_columns else f"{REPORT_PREFIX}{name}"


@dataclass
class Section:
    """One part of the report: a heading, a figure file (if any) and what it shows."""

    title: str
    caption: str
    figure: str | None = None
    links: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """What the steps share while the report is being built."""

    project: Project
    model: LoadedModel
    folder: Path
    options: ReportOptions
    latents: np.ndarray
    per_cluster: RepresentativeSet | None = None


Step = Callable[[_Run], Section]


def write_report(
    project: Project,
    out_dir: str | Path,
    *,
    model: str | LoadedModel | None = None,
    options: ReportOptions | None = None,
    progress: Progress | None = None,
) -> Path:
    """Analyse the project's latents (active model by default) and write the report folder;
    return the path of its ``index.html``."""
    options = options or ReportOptions()
    out_dir = Path(out_dir)
    _check_target(out_dir)
    loaded = resolve_model(project, model, None)
    latents = analysis.latents_of(project, loaded.name)
    if len(latents) < 2:
        raise InputError("a report needs at least two embedded crops")
    try:
        with staged(out_dir) as staging:
            run = _Run(project, loaded, staging, options, latents)
            sections = []
            for done, (message, step) in enumerate(STEPS):
                if progress is not None:
                    progress(done, len(STEPS), message)
                sections.append(step(run))
            _write_index(run, sections)
            if progress is not None:
                progress(len(STEPS), len(STEPS), "report written")
    except NucleaeError:
        raise
    except OSError as err:  # a file in the path, no permission, a full disk
        raise write_error(out_dir, err) from err
    return out_dir / "index.html"


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportExistsError(f"{out_dir} is a file; choose a folder for the report")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ExportExistsError(
            f"{out_dir} already contains files that are not a napari-nucleae report; "
            "choose an empty or new folder"
        )


# ---------------------------------------------------------------------------- steps
def loss_section(run: _Run) -> Section:
    """Training and validation loss per epoch, from the model's ``history.csv``."""
    title = "Training"
    path = run.project.model_dir(run.model.name) / "history.csv"
    config = run.model.config
    about = (
        f"Model '{run.model.name}': {config.variant}, latent size {config.latent_dim}, "
        f"{config.crop_size}×{config.crop_size} px crops."
    )
    if not path.is_file():
        return Section(title, f"{about} No training history (the model was loaded).")
    history = pd.read_csv(path)
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    for column, label in (("train_loss", "training"), ("val_loss", "validation")):
        ax.plot(history["epoch"], history[column], marker="o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="MSE loss", yscale="log", title="Loss per epoch")
    ax.legend()
    _save(fig, run, "loss.png")
    last = history.iloc[-1]
    return Section(
        title,
        f"{about} After {len(history)} epochs: training loss {last.train_loss:.5f}, "
        f"validation loss {last.val_loss:.5f} (validation crops come from held-out images).",
        "loss.png",
    )


def histogram_section(run: _Run) -> Section:
    """Histograms of the latent dimensions with the largest spread."""
    spread = run.latents.std(axis=0)
    dims = np.argsort(-spread, kind="stable")[: run.options.histogram_dims]
    counts, edges = latent_histograms(run.latents, bins=40, dims=dims)
    cols = min(4, len(dims))
    rows = -(-len(dims) // cols)
    fig = Figure(figsize=(2.2 * cols, 1.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, dim, count, edge in zip(axes, dims, counts, edges, strict=False):
        ax.stairs(count, edge, fill=True)
        ax.set_title(f"dimension {dim}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(dims) :]:
        ax.set_axis_off()
    _save(fig, run, "latent_histograms.png")
    return Section(
        "Latent dimensions",
        f"Distribution of each latent dimension over all {len(run.latents)} crops, for the "
        f"{len(dims)} of {run.latents.shape[1]} dimensions with the largest spread. Dimensions "
        "that are constant carry no information (a sign of an over-large latent size).",
        "latent_histograms.png",
    )


def projection_section(run: _Run) -> Section:
    """The 2-D projection coloured by reconstruction error and by k-means cluster."""
    opts, project = run.options, run.project
    cluster = opts.column("cluster")
    settings = analysis.MapSettings(
        method=opts.projection,
        metric=opts.metric,
        clustering="kmeans",
        n_clusters=opts.n_clusters,
        seed=opts.seed,
        cluster_column=cluster,
    )
    found = analysis.map_latents(project, settings, model=run.model.name, latents=run.latents)
    n_clusters = max(1, min(opts.n_clusters, len(project)))
    table = project.table()
    shown = sample_rows(len(table), PLOT_POINTS, opts.seed)
    x, y = (table[c].to_numpy()[shown] for c in found.columns)
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    by_mse, by_cluster = fig.subplots(1, 2)
    mse = table["mse"].to_numpy()[shown]
    positive = mse[mse > 0]
    norm = LogNorm(positive.min(), positive.max()) if len(positive) > 1 else None
    points = by_mse.scatter(x, y, c=np.maximum(mse, 1e-12), s=6, cmap="viridis", norm=norm)
    fig.colorbar(points, ax=by_mse, label="reconstruction MSE")
    clusters = table[cluster].cat.codes.to_numpy()[shown]
    by_cluster.scatter(x, y, c=clusters, s=6, cmap="tab10", vmin=0, vmax=9)
    for code, name in enumerate(table[cluster].cat.categories):
        members = clusters == code
        if members.any():
            by_cluster.annotate(
                str(name), (np.median(x[members]), np.median(y[members])), weight="bold"
            )
    for ax, title in ((by_mse, "coloured by MSE"), (by_cluster, "coloured by k-means cluster")):
        ax.set(xlabel=found.columns[0], ylabel=found.columns[1], title=title)
    _save(fig, run, "projection.png")
    sampled = f" ({len(shown)} of {len(table)} points drawn)" if len(shown) < len(table) else ""
    return Section(
        "Latent map",
        f"{PROJECTION_NAMES[opts.projection]} of the latents ({opts.metric}){sampled}. Columns "
        f"{', '.join(found.columns)} and '{cluster}' ({n_clusters} k-means clusters) are "
        "stored in the project, so the napari Latent explorer shows the same map.",
        "projection.png",
    )


def outlier_section(run: _Run) -> Section:
    """MSE distribution with both flagged tails, and galleries of each tail."""
    opts, project = run.options, run.project
    column = opts.column("outlier")
    flags = analysis.flag_outliers(project, opts.outlier_pct, opts.outlier_pct, column=column)
    mse = project.table()["mse"].to_numpy()
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    values = np.log10(np.maximum(mse, 1e-12))
    ax.hist(values, bins=60, color="0.6")
    for tail, color in (("low", "tab:blue"), ("high", "tab:red")):
        ax.hist(values[np.asarray(flags == tail)], bins=60, range=ax.get_xlim(), color=color)
    ax.set(xlabel="log10 reconstruction MSE", ylabel="crops", title="Reconstruction error")
    _save(fig, run, "mse.png")
    rows = []
    for tail in ("high", "low"):
        index = rank_outliers(mse, opts.gallery, tail)
        crops = project.read_crops(index)
        rows.append(
            (f"{tail} MSE", [(c, f"#{i}\n{mse[i]:.4f}") for c, i in zip(crops, index, strict=True)])
        )
        rows.append(("reconstruction", [(r, "") for r in run.model.reconstruct(crops)]))
    _image_grid(run, "outliers.png", rows)
    counts = pd.Series(np.asarray(flags)).value_counts()
    return Section(
        "Outliers",
        f"The {opts.outlier_pct:g} % highest-error crops ({counts.get('high', 0)}, red) are the "
        f"ones the model reconstructs worst: unusual nuclei, debris or segmentation mistakes; "
        f"the {opts.outlier_pct:g} % lowest ({counts.get('low', 0)}, blue) are the most typical. "
        f"Galleries show the {opts.gallery} most extreme of each tail (crop index and MSE) "
        f"above their reconstructions. The flags are stored as the '{column}' column.",
        "mse.png",
        ["outliers.png"],
    )


def representative_section(run: _Run) -> Section:
    """Theoretical and practical representatives for every centre × metric, globally."""
    opts = run.options
    found = analysis.find_representatives(
        run.project,
        centers=opts.centers,
        metrics=opts.metrics,
        k=opts.top_k,
        model=run.model,
        seed=opts.seed,
        latents=run.latents,
    )
    _representative_grid(run, "representatives.png", found.latent, "latent")
    if found.pixel is not None:
        _representative_grid(run, "representatives_pixel.png", found.pixel, "pixel")
    analysis.export(run.project, found, run.folder / "representatives")
    return Section(
        "Representative nuclei (all crops)",
        "Each row is one centre of the latent space (mean, per-dimension median, geometric "
        "median) and one metric. First column: the centre decoded by the model, the "
        "'theoretical' nucleus; then the real crops nearest to it, the 'practical' "
        "representatives, with their distance (Euclidean) or similarity (cosine), picked from "
        "the quality-checked pool (no MSE tail, border or blank crop; the centres use every "
        "crop); the CSV gives each pick's percentiles in area, intensity, shape and MSE. "
        "The second figure is the pixel-space baseline (centres of the raw crops) for "
        "comparison. A global centre of mixed classes can be meaningless: see the per-cluster "
        "section, or annotate and classify the nuclei and pick per class.",
        "representatives.png",
        ["representatives_pixel.png", "representatives/representatives.csv"],
    )


def cluster_section(run: _Run) -> Section:
    """Geometric-median representatives of each cluster."""
    found = analysis.find_representatives(
        run.project,
        centers=("geomedian",),
        metrics=("euclidean",),
        k=run.options.top_k,
        by=run.options.column("cluster"),
        model=run.model,
        stability=True,
        pixel_baseline=False,
        seed=run.options.seed,
        latents=run.latents,
    )
    run.per_cluster = found.latent
    _representative_grid(run, "representatives_per_cluster.png", found.latent, "latent")
    analysis.export(run.project, found, run.folder / "representatives_per_cluster")
    return Section(
        "Representative nuclei per cluster",
        "One row per k-means cluster: its decoded geometric median, then its nearest real "
        "crops (Euclidean). 'stability' in the CSV is how often each crop stays in the top "
        "k when the cluster's crops are resampled (bootstrap).",
        "representatives_per_cluster.png",
        ["representatives_per_cluster/representatives.csv"],
    )


def interpolation_section(run: _Run) -> Section:
    """A decoded straight path between the representatives of the two most distant clusters."""
    a, b = _interpolation_ends(run)
    strip = analysis.interpolate_crops(
        run.project, a, b, run.options.steps, run.model, latents=run.latents
    )
    start, end = run.project.read_crops([a, b])
    t = np.linspace(0, 1, len(strip))
    row = [(start, f"crop {a}")] + [(img, f"t={v:.2f}") for img, v in zip(strip, t, strict=True)]
    _image_grid(run, "interpolation.png", [("", [*row, (end, f"crop {b}")])])
    return Section(
        "Latent interpolation",
        f"Decoded images along the straight line in latent space from crop {a} to crop {b} "
        "(the representatives of the two clusters farthest apart), real crops at both ends.",
        "interpolation.png",
    )


def _interpolation_ends(run: _Run) -> tuple[int, int]:
    """The top crops of the two clusters whose centres lie farthest apart (else crop 0 and
    the crop farthest from it)."""
    found = run.per_cluster
    if found is not None and len(found.centers) >= 2:
        groups = [group for group, _ in found.centers]
        centers = np.stack(list(found.centers.values()))
        gaps = np.linalg.norm(centers[:, None] - centers[None], axis=-1)
        i, j = np.unravel_index(np.argmax(gaps), gaps.shape)
        firsts = found.table[found.table["rank"] == 1].set_index("group")["crop_index"]
        return int(firsts[groups[min(i, j)]]), int(firsts[groups[max(i, j)]])
    far = np.linalg.norm(run.latents - run.latents[0], axis=1)
    return 0, int(np.argmax(far))


STEPS: list[tuple[str, Step]] = [
    ("loss curve", loss_section),
    ("latent histograms", histogram_section),
    ("projection and clusters", projection_section),
    ("outliers", outlier_section),
    ("representatives", representative_section),
    ("representatives per cluster", cluster_section),
    ("interpolation", interpolation_section),
]


# ---------------------------------------------------------------------------- drawing
def _save(fig: Figure, run: _Run, name: str) -> None:
    fig.savefig(run.folder / name, dpi=110)


def _image_grid(
    run: _Run, name: str, rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]]
) -> None:
    """Rows of grayscale images (shown on 0–1) with a label per row and a title per image."""
    cols = max(len(images) for _, images in rows)
    fig = Figure(figsize=(1.25 * cols + 1, 1.45 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for ax_row, (label, images) in zip(axes, rows, strict=True):
        for ax in ax_row:
            ax.set_axis_off()
        for ax, (image, title) in zip(ax_row, images, strict=False):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
        if label:
            ax_row[0].text(
                -0.15,
                0.5,
                label,
                transform=ax_row[0].transAxes,
                rotation=90,
                va="center",
                ha="right",
                fontsize=8,
            )
    _save(fig, run, name)


def _representative_grid(run: _Run, name: str, found: RepresentativeSet, space: str) -> None:
    """One row per (group, centre, metric): the theoretical image, then the practical crops."""
    table = found.table
    index = np.unique(table["crop_index"].to_numpy(np.int64))
    lookup = dict(zip(index, run.project.read_crops(index), strict=True))
    rows = []
    for (group, method, metric), part in table.groupby(
        ["group", "center", "metric"], sort=False, observed=True
    ):
        images = []
        if (group, method) in found.theoretical:
            images.append((found.theoretical[(group, method)], f"{space} {method}"))
        score = "d" if metric == "euclidean" else "cos"
        images += [
            (lookup[row.crop_index], f"#{row.crop_index} {score}={row.score:.3g}")
            for row in part.itertuples()
        ]
        scope = "" if group == "all" else f"{group}: "
        rows.append((f"{scope}{method}\n{metric}", images))
    _image_grid(run, name, rows)


# ---------------------------------------------------------------------------- index
def _write_index(run: _Run, sections: Sequence[Section]) -> None:
    project, model = run.project, run.model
    table = project.table()
    summary = {
        "project": str(project.path),
        "crops": len(table),
        "images": len(project.images()),
        "crop_size": project.crop_size,
        "model": model.name,
        "variant": model.config.variant,
        "latent_dim": model.config.latent_dim,
        "median_mse": float(np.nanmedian(table["mse"])),
        "options": asdict(run.options),
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>napari-nucleae report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "img{max-width:100%;border:1px solid #ddd}td,th{padding:2px 8px;text-align:left}"
        "</style></head><body>",
        "<h1>napari-nucleae report</h1><table>",
        *(
            f"<tr><th>{html.escape(key)}</th><td>{html.escape(_show(value))}</td></tr>"
            for key, value in summary.items()
            if key != "options"
        ),
        "</table><ul>",
        *(
            f"<li><a href='#s{i}'>{html.escape(section.title)}</a></li>"
            for i, section in enumerate(sections)
        ),
        "</ul>",
    ]
    for i, section in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(section.title)}</h2>")
        parts.append(f"<p>{html.escape(section.caption)}</p>")
        for file in [section.figure, *section.links]:
            if file is None:
                continue
            if file.endswith(".png"):
                parts.append(f"<p><img src='{html.escape(file)}' alt='{html.escape(file)}'></p>")
            else:
                parts.append(f"<p><a href='{html.escape(file)}'>{html.escape(file)}</a></p>")
    parts.append("</body></html>")
    (run.folder / "index.html").write_text("\n".join(parts), encoding="utf-8")
    record = {**summary, "sections": [asdict(s) for s in sections]}
    (run.folder / MARKER).write_text(json.dumps(record, indent=2), encoding="utf-8")


def _show(value: object) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)
