"""The ``nucleae`` command: the napari-nucleae pipeline, headless."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .core.analysis import LOW_CONTRAST, MIN_CLASS_PROBABILITY, POOLS, QC_CHECKS, MapSettings
from .core.centers import CENTERS, DEFAULT_CENTER
from .core.classify import CLASS
from .core.crop import crop_size_note
from .core.data import CUDA_WORKERS
from .core.distributed import torchrun_ranks
from .core.errors import NucleaeError, describe_os_error
from .core.explore import INTERPOLATION_STEPS, METRICS, OUTLIER_PCT, SEARCH_K
from .core.ingest import IngestParams, IngestSummary, expand_inputs, ingest, summary_line
from .core.model import (
    ARCHS,
    AUTO,
    DEFAULT_VARIANT,
    DEVICES,
    INITS,
    SCHEDULES,
    VARIANTS,
    ModelConfig,
    checkpoint_config,
    checkpoint_file,
    read_checkpoint,
)
from .core.projection import CLUSTER_METHODS, PROJECTIONS
from .core.report import ReportOptions, write_report
from .core.represent import TOP_K
from .core.segment import METHODS, SegmentParams
from .core.store import BACKGROUNDS, NORMALIZATIONS, CropParams, Project
from .core.training import (
    COLLAPSE_ACTIONS,
    COMPILE_MODES,
    EPOCHS,
    MODEL_NAME,
    VAL_FRACTION,
    train,
)


class ProgressBar:
    """A ``progress(done, total, message)`` callback drawing a tqdm bar on stderr."""

    def __init__(self, description: str, quiet: bool = False):
        self.bar = tqdm(desc=description, unit="step", file=sys.stderr, leave=True, disable=quiet)

    def __call__(self, done: int, total: int, message: str) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(message[-60:], refresh=True)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text}")
    return value


def auto_or_count(text: str) -> int | None:
    """An argparse type: ``auto`` (None, chosen later) or a whole number from 0."""
    return None if text == "auto" else non_negative_int(text)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (no nan or inf)."""
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def percentage(text: str) -> float:
    """An argparse type: a finite number from 0 to 100."""
    value = finite_float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100, not {text}")
    return value


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        noun = "whole number" if kind is int else "number"
        raise argparse.ArgumentTypeError(f"must be a {noun}, not {text!r}") from None


# ---------------------------------------------------------------------------- ingest
def add_ingest_options(parser: argparse.ArgumentParser) -> None:
    """Segmentation and crop options shared by ``ingest`` and ``demo``."""
    seg = parser.add_argument_group("segmentation")
    seg.add_argument(
        "--method",
        choices=METHODS,
        default=SegmentParams.method,
        help="cellpose, the classical scikit-image pipeline, or auto (cellpose, "
        "falling back to classical with a notice when its weights are missing)",
    )
    seg.add_argument(
        "--model",
        default=SegmentParams.model,
        help="cellpose model name (cpsam, nuclei, cyto3, ...) or a model file path",
    )
    seg.add_argument(
        "--diameter",
        type=positive_float,
        default=None,
        help="nucleus diameter in pixels (default: automatic)",
    )
    seg.add_argument("--flow-threshold", type=finite_float, default=SegmentParams.flow_threshold)
    seg.add_argument(
        "--cellprob-threshold", type=finite_float, default=SegmentParams.cellprob_threshold
    )
    seg.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run cellpose on the GPU (default: when one is available)",
    )
    seg.add_argument(
        "--channel",
        type=non_negative_int,
        default=None,
        help="nuclear channel of RGB or multichannel images",
    )
    seg.add_argument(
        "--channel-axis",
        type=int,
        default=None,
        help="axis holding the channels (default: last axis of RGB-like images, else the "
        "first when --channel is given)",
    )
    seg.add_argument(
        "--stack",
        action="store_true",
        help="segment every plane of a 3-D image, even when its few planes differ like channels do",
    )
    crop = parser.add_argument_group("crops")
    crop.add_argument("--crop-size", type=int, default=CropParams.size, help="crop side in pixels")
    crop.add_argument(
        "--background",
        choices=BACKGROUNDS,
        default=CropParams.background,
        help="outside each nucleus: zeros, the nucleus's interior mean, or the image kept",
    )
    crop.add_argument(
        "--no-mask",
        dest="background",
        action="store_const",
        const="keep",
        help="the same as --background keep",
    )
    crop.add_argument(
        "--keep-border", action="store_true", help="also crop nuclei that touch the image border"
    )
    crop.add_argument(
        "--no-rescale",
        dest="rescale",
        action="store_false",
        help="do not shrink nuclei larger than the crop",
    )
    crop.add_argument(
        "--align", action="store_true", help="rotate each nucleus so its major axis is horizontal"
    )
    crop.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default=CropParams.normalize,
        help="percentile normalisation per image or per crop, or none",
    )


def ingest_params(args: argparse.Namespace) -> IngestParams:
    """Ingest parameters from parsed arguments."""
    return IngestParams(
        segment=SegmentParams(
            method=args.method,
            model=args.model,
            diameter=args.diameter,
            flow_threshold=args.flow_threshold,
            cellprob_threshold=args.cellprob_threshold,
            gpu=args.gpu,
        ),
        crop=CropParams(
            size=args.crop_size,
            background=args.background,
            skip_border=not args.keep_border,
            rescale_large=args.rescale,
            align=args.align,
            normalize=args.normalize,
        ),
        channel=args.channel,
        channel_axis=args.channel_axis,
        stack=args.stack,
    )


def run_ingest(paths: Sequence[Path], project_dir: Path, args: argparse.Namespace) -> Project:
    """Ingest ``paths`` into the project at ``project_dir`` and print a summary."""
    return ingest_and_report(paths, project_dir, args)[0]


def ingest_and_report(
    paths: Sequence[Path], project_dir: Path, args: argparse.Namespace
) -> tuple[Project, IngestSummary]:
    """Ingest ``paths``, print one line per note, failure and image without nuclei, then the
    counts; return the project and the summary."""
    params = ingest_params(args)
    project = Project.open_or_create(project_dir, params.crop)
    bar = ProgressBar("ingest")
    try:
        summary = ingest(
            paths,
            project,
            params,
            scheduler=getattr(args, "scheduler", None),
            workers=getattr(args, "workers", None),
            progress=bar,
        )
    finally:
        bar.close()
    for note in summary.notes:
        print(f"note: {note}")
    for path, message in summary.failed:
        print(f"failed: {path}: {message}")
    for path in summary.empty:
        print(f"no nuclei: {path}")
    print(summary_line(summary))
    print(
        f"project {project.path}: {len(project)} crops of {project.crop_size}×"
        f"{project.crop_size} px from {len(project.images())} images"
    )
    suggestion = crop_size_note(project.table(with_features=False), project.crop_size)
    if suggestion:
        print(f"note: {suggestion} (--crop-size, for a new project)")
    return project, summary


def cmd_ingest(args: argparse.Namespace) -> int:
    """Exit status 1 when any image failed (the others are added all the same)."""
    paths = expand_inputs(args.images)
    if not paths:
        raise NucleaeError("no image files found in the given paths")
    _, summary = ingest_and_report(paths, args.project, args)
    if summary.failed:
        print(f"nucleae ingest: {len(summary.failed)} images failed", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- train / embed
# (option, ModelConfig field, help); each option's default is the field's default
MODEL_OPTIONS = (
    ("--arch", "arch", "norm: batch-normalised convolutions; reference: the seed's plain network"),
    ("--latent-dim", "latent_dim", "latent size, or auto: chosen from the crops' variance"),
    ("--blocks", "n_blocks", "encoder blocks, or auto: halve the crop down to 4 px (at most 5)"),
    ("--filters", "base_filters", "filters of the first block (doubling per block)"),
    ("--lr", "lr", "peak learning rate (Adam)"),
    ("--batch-size", "batch_size", "crops per optimiser step"),
    ("--init", "init", "weight initialisation: kaiming (He normal) or torch's default"),
    ("--schedule", "schedule", "learning rate: linear warm-up then cosine decay, or constant"),
    ("--warmup", "warmup", "share of the steps spent warming the learning rate up"),
    ("--min-steps", "min_steps", "small projects: repeat each epoch to reach this many steps"),
    (
        "--patience",
        "patience",
        "stop after this many epochs without a better validation loss (0: never)",
    ),
    ("--jitter", "jitter", "augmentation: random intensity scale of ± this fraction"),
    ("--kl-weight", "kl_weight", "vae: weight of the KL term"),
    ("--noise-std", "noise_std", "denoising: standard deviation of the added noise"),
)
AUTO_FIELDS = ("latent_dim", "n_blocks")
DEVICE_HELP = f"{', '.join(DEVICES)} or e.g. cuda:1 (auto: CUDA, then MPS, then CPU)"


def auto_or_int(text: str) -> int:
    """``auto`` (0, chosen later) or a positive integer."""
    if text == "auto":
        return AUTO
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text}")
    return value


def _option_type(field_name: str, default: object) -> dict:
    """argparse keywords for one ModelConfig field."""
    choices = {"arch": ARCHS, "init": INITS, "schedule": SCHEDULES}
    if field_name in choices:
        return {"choices": choices[field_name]}
    if field_name in AUTO_FIELDS:
        return {"type": auto_or_int, "metavar": "N|auto"}
    return {"type": type(default)}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Autoencoder options shared by ``train`` and ``demo``; defaults from ModelConfig.

    Every model option defaults to None (not given), so that a resumed run can tell the
    settings asked for from the stored ones."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(ModelConfig)}
    group = parser.add_argument_group("model")
    group.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="ae (autoencoder), vae, denoising, or pca (linear baseline) (default: ae)",
    )
    group.add_argument("--epochs", type=int, default=EPOCHS)
    for option, name, text in MODEL_OPTIONS:
        shown = "auto" if defaults[name] == AUTO and name in AUTO_FIELDS else defaults[name]
        group.add_argument(
            option,
            dest=name,
            default=None,
            help=f"{text} (default: {shown})",
            **_option_type(name, defaults[name]),
        )
    group.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"flips, 90° rotations and intensity jitter while training "
        f"(default: {'on' if defaults['augment'] else 'off'})",
    )
    group.add_argument("--device", default=DEVICES[0], help=DEVICE_HELP)
    group.add_argument("--name", default=MODEL_NAME, help="model name inside the project")
    group.add_argument(
        "--val-fraction",
        type=float,
        default=VAL_FRACTION,
        help="share of source images held out for validation",
    )


def given_settings(args: argparse.Namespace) -> dict:
    """The model settings given on the command line (the rest keep their defaults)."""
    names = [name for _, name, _ in MODEL_OPTIONS] + ["augment"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def model_config(args: argparse.Namespace, crop_size: int):
    """A model configuration from parsed arguments and the project's crop size."""
    return ModelConfig(
        variant=args.variant or DEFAULT_VARIANT, crop_size=crop_size, **given_settings(args)
    )


def resume_config(project: Project, args: argparse.Namespace):
    """The stored settings of the model to resume, with the ones given on the command line
    (``train`` refuses to resume when they differ)."""
    from dataclasses import replace

    path = checkpoint_file(project.model_dir(args.name) / "last.pt")
    stored = checkpoint_config(read_checkpoint(path), path)
    given = given_settings(args)
    if args.variant is not None:
        given["variant"] = args.variant
    return replace(stored, **given)


def run_train(project: Project, args: argparse.Namespace, resume: bool = False):
    """Train a model on the project with a progress bar and per-epoch losses (under torchrun
    with ``--distributed``, printed by rank 0 only)."""
    distributed = getattr(args, "distributed", False)
    main = torchrun_ranks().main if distributed else True
    config = resume_config(project, args) if resume else model_config(args, project.crop_size)
    bar = ProgressBar("train", quiet=not main)

    def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
        bar.bar.write(f"epoch {epoch}: train loss {train_loss:.5f}, validation loss {val_loss:.5f}")

    try:
        with warnings.catch_warnings():
            # the warnings reach the user once, as "warning:" lines below, not as Python warnings
            warnings.filterwarnings("ignore", category=UserWarning, module=r"napari_nucleae\.core")
            result = train(
                project,
                config,
                args.epochs,
                name=args.name,
                device=None if args.device == "auto" else args.device,
                resume=resume,
                overwrite=args.overwrite,
                on_collapse=getattr(args, "on_collapse", COLLAPSE_ACTIONS[0]),  # demo: default
                val_fraction=args.val_fraction,
                progress=bar,
                on_epoch=on_epoch,
                num_workers=getattr(args, "loader_workers", None),
                compile=getattr(args, "compile", COMPILE_MODES[0]),
                distributed=distributed,
            )
    finally:
        bar.close()
    if not main:
        return result
    for note in result.notes:
        print(f"{'warning' if note in result.warnings else 'note'}: {note}")
    print(
        f"model '{result.name}' trained on {result.device} for {len(result.history)} epochs "
        f"(validation split by {result.split}); best checkpoint: {result.best}"
    )
    return result


def run_embed(project: Project, model: str | None, args: argparse.Namespace):
    """Encode every crop of the project and print a summary."""
    from .core.embed import embed

    bar = ProgressBar("embed")
    try:
        result = embed(
            project,
            model,
            batch_size=getattr(args, "embed_batch_size", None),
            device=None if args.device == "auto" else args.device,
            progress=bar,
        )
    finally:
        bar.close()
    print(
        f"embedded {result.n_crops} crops into {result.latent_dim}-D latents ({result.path}); "
        f"reconstruction MSE median {np.median(result.mse):.5f}"
    )
    return result


def cmd_train(args: argparse.Namespace) -> int:
    run_train(Project.open(args.project), args, resume=args.resume)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    run_embed(Project.open(args.project), args.model, args)
    return 0


# ---------------------------------------------------------------------------- analysis
def cmd_project(args: argparse.Namespace) -> int:
    from .core import analysis

    project = Project.open(args.project)
    settings = analysis.MapSettings(
        method=args.method,
        metric=args.metric,
        components=tuple(args.components),
        clustering=args.cluster_method if args.clusters else None,
        n_clusters=args.clusters,
        seed=args.seed,
        parallel=args.parallel,
        max_fit=args.max_fit,
    )
    bar = ProgressBar("project")
    try:
        found = analysis.map_latents(project, settings, model=args.model, progress=bar)
    finally:
        bar.close()
    print(f"{args.method} projection of {len(project)} crops stored as {', '.join(found.columns)}")
    if found.clusters is not None:
        counts = found.clusters.value_counts().sort_index()
        print("clusters: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def cmd_outliers(args: argparse.Namespace) -> int:
    from .core import analysis

    project = Project.open(args.project)
    flags = analysis.flag_outliers(project, args.low, args.high)
    table = project.table()
    for tail, ascending in (("high", False), ("low", True)):
        rows = table[np.asarray(flags == tail)].sort_values("mse", ascending=ascending)
        print(f"{tail} MSE ({len(rows)} crops):")
        columns = [c for c in ("crop_index", "mse", "image_path", "label") if c in rows]
        print(rows[columns].head(args.show).to_string(index=False))
    return 0


def cmd_represent(args: argparse.Namespace) -> int:
    from .core import analysis

    project = Project.open(args.project)
    latents = analysis.latents_of(project, args.model)
    found = analysis.find_representatives(
        project,
        centers=args.center,
        metrics=args.metric,
        k=args.top,
        by=args.by,
        model=args.model,
        stability=args.stability,
        pixel_baseline=False,
        seed=args.seed,
        latents=latents,
        pool=args.pool,
        checks=args.qc,
    )
    print(analysis.pool_line(found))
    print(found.latent.table.to_string(index=False))
    spectrum = None
    if args.spectrum:
        spectrum = analysis.find_spectrum(
            project,
            found,
            args.spectrum,
            center=args.center[0],
            metric=args.metric[0],
            latents=latents,
        )
        print(f"spectrum of {args.spectrum} crops per group, most to least typical:")
        print(spectrum.to_string(index=False))
    if args.export:
        files = analysis.export(
            project,
            found,
            args.export,
            overwrite=args.overwrite,
            pixel_size=args.pixel_size,
            spectrum_table=spectrum,
        )
        print(f"exported {len(files)} files to {args.export}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .core import analysis

    project = Project.open(args.project)
    if args.annotations is not None:
        annotations = analysis.import_annotations(project, args.annotations)
        print(f"{int(annotations.notna().sum())} crops annotated")
    found = analysis.classify_crops(project, model=args.model, column=args.column, seed=args.seed)
    print("cross-validated accuracy per class (annotated crops):")
    for name, accuracy in found.accuracy.items():
        print(f"  {name}: {accuracy:.0%} of {found.counts[name]}")
    counts = pd.Series(found.classes).value_counts().sort_index()
    print(
        f"{args.column} stored for {len(project)} crops: "
        + ", ".join(f"{name} {n}" for name, n in counts.items())
    )
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .core import analysis

    project = Project.open(args.project)
    strip = analysis.interpolate_crops(project, args.a, args.b, args.steps, args.model)
    save_strip(strip, args.out)
    print(f"interpolation of {args.steps} steps from crop {args.a} to {args.b}: {args.out}")
    return 0


def save_strip(images: np.ndarray, out: Path) -> None:
    """Save images side by side as a PNG (refusing to overwrite an existing file)."""
    from matplotlib.image import imsave

    if out.exists():
        raise FileExistsError(f"{out} exists; choose another file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    imsave(out, np.concatenate(list(images), axis=1), cmap="gray", vmin=0, vmax=1)


def cmd_search(args: argparse.Namespace) -> int:
    from .core import analysis
    from .core.ingest import read_image

    project = Project.open(args.project)
    query = int(args.query) if args.query.isdigit() else read_image(args.query)
    found = analysis.search_similar(project, query, k=args.k, metric=args.metric, model=args.model)
    print(found.to_string(index=False))
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .sample import BBBC007_CITATION, bbbc007_paths

    out: Path = args.out
    print(f"napari-nucleae demo on the built-in sample ({BBBC007_CITATION})")
    project = run_ingest(bbbc007_paths(), out / "project", args)
    run_train(project, args)
    run_embed(project, args.name, args)
    run_report(project, out / "report", args.name, args)
    return 0


def run_report(project: Project, out: Path, model: str | None, args: argparse.Namespace) -> Path:
    """Write the report folder and print where its index is."""
    options = ReportOptions(
        projection=args.projection,
        n_clusters=args.clusters,
        seed=getattr(args, "seed", 0),
        store_columns=args.store_columns,
    )
    bar = ProgressBar("report")
    try:
        index = write_report(project, out, model=model, options=options, progress=bar)
    finally:
        bar.close()
    print(f"report: {index.resolve()}")
    return index


def cmd_report(args: argparse.Namespace) -> int:
    run_report(Project.open(args.project), args.out, args.model, args)
    return 0


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """Options of the report written by ``report`` and ``demo``."""
    group = parser.add_argument_group("report")
    group.add_argument("--projection", choices=PROJECTIONS, default=ReportOptions.projection)
    group.add_argument(
        "--clusters", type=int, default=ReportOptions.n_clusters, help="k-means clusters"
    )
    group.add_argument(
        "--store-columns",
        action="store_true",
        help="store the report's clusters and outlier flags as the project's own 'cluster' "
        "and 'outlier' columns (default: report_cluster / report_outlier, so a clustering "
        "made in the viewer is kept)",
    )


# ---------------------------------------------------------------------------- parser
def add_common_analysis(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model name (default: the active model)")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleae",
        description="Nuclei → crops → latent space → representative nuclei, headless.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="segment images and add their nucleus crops to a project")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--project", type=Path, required=True, help="project folder (created if new)")
    add_ingest_options(p)
    p.add_argument(
        "--scheduler",
        default=None,
        help="dask.distributed scheduler address (default: a local cluster)",
    )
    p.add_argument("--workers", type=positive_int, default=None, help="local worker threads")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="train an autoencoder (or PCA baseline) on a project's crops")
    p.add_argument("--project", type=Path, required=True)
    add_model_options(p)
    p.add_argument("--resume", action="store_true", help="continue the named model's training")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing model of the same name"
    )
    p.add_argument(
        "--on-collapse",
        choices=COLLAPSE_ACTIONS,
        default=COLLAPSE_ACTIONS[0],
        help="when the model gives every crop the same output: restart at a lower learning "
        "rate (default), stop with an error, or only warn",
    )
    p.add_argument(
        "--workers",
        dest="loader_workers",
        type=auto_or_count,
        default=None,
        metavar="N|auto",
        help=f"loader processes decoding the crops (default: auto: up to {CUDA_WORKERS} on "
        "CUDA, none on the CPU)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default=COMPILE_MODES[0],
        help="torch.compile the training step (auto: on CUDA; eager when compiling fails)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one of the processes of `torchrun --nproc-per-node K -m napari_nucleae.cli "
        "train ... --distributed`: DDP, each process on its share of the crops",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("embed", help="latents and reconstruction MSE for every crop")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument(
        "--model",
        default=None,
        help="model name in the project or a checkpoint path (default: active model)",
    )
    p.add_argument("--device", default=DEVICES[0], help=DEVICE_HELP)
    p.add_argument("--batch-size", dest="embed_batch_size", type=positive_int, default=None)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("project", help="2-D projection (and clusters) of the latents")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument("--method", choices=PROJECTIONS, default=MapSettings.method)
    p.add_argument("--metric", choices=METRICS, default=MapSettings.metric)
    p.add_argument(
        "--components",
        type=non_negative_int,
        nargs=2,
        default=MapSettings.components,
        metavar=("I", "J"),
        help="PCA: the pair of principal components to show",
    )
    p.add_argument(
        "--clusters", type=non_negative_int, default=0, help="also cluster into this many groups"
    )
    p.add_argument(
        "--parallel",
        action="store_true",
        help="UMAP and t-SNE on all cores: several times faster on big machines, not "
        "bit-reproducible (the default is seeded and single-threaded)",
    )
    p.add_argument(
        "--max-fit",
        type=positive_int,
        default=MapSettings.max_fit,
        help="UMAP / t-SNE: past this many crops fit a random subsample of this size and place "
        "the rest on it",
    )
    p.add_argument("--cluster-method", choices=CLUSTER_METHODS, default=MapSettings.clustering)
    add_common_analysis(p)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("outliers", help="flag and list the reconstruction-MSE tails")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument(
        "--low", type=percentage, default=OUTLIER_PCT, help="lowest-MSE percentage to flag"
    )
    p.add_argument(
        "--high", type=percentage, default=OUTLIER_PCT, help="highest-MSE percentage to flag"
    )
    p.add_argument("--show", type=non_negative_int, default=10, help="rows to print per tail")
    p.set_defaults(func=cmd_outliers)

    p = sub.add_parser("represent", help="representative nuclei: decoded centres and nearest crops")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument("--center", nargs="+", choices=CENTERS, default=[DEFAULT_CENTER])
    p.add_argument("--metric", nargs="+", choices=METRICS, default=[METRICS[0]])
    p.add_argument(
        "--by",
        default=None,
        help="a table column to group by (e.g. cluster); default: all crops together",
    )
    p.add_argument(
        "--top", type=positive_int, default=TOP_K, help="representatives per centre and metric"
    )
    p.add_argument("--stability", action="store_true", help="bootstrap stability of each choice")
    p.add_argument(
        "--pool",
        choices=POOLS,
        default=POOLS[0],
        help="pick from quality-checked crops (qc: see --qc) or from all; the centres are "
        "computed from all crops of a group either way",
    )
    p.add_argument(
        "--qc",
        nargs="+",
        choices=QC_CHECKS,
        default=list(QC_CHECKS),
        help=f"what the qc pool leaves out: the MSE tails ({OUTLIER_PCT:g} percent each), border "
        f"nuclei, blank crops (pixel range below {LOW_CONTRAST:g}), and crops whose "
        f"<by>_probability is below {MIN_CLASS_PROBABILITY:g}",
    )
    p.add_argument(
        "--spectrum",
        type=positive_int,
        default=None,
        metavar="N",
        help="also N crops per group from most to least typical (exported to spectrum/)",
    )
    p.add_argument(
        "--pixel-size",
        type=positive_float,
        default=None,
        help="µm per image pixel, for the figure's scale bar (default: the TIFF metadata)",
    )
    p.add_argument("--export", type=Path, default=None, help="folder for TIFF/PNG + CSV")
    p.add_argument("--overwrite", action="store_true", help="replace files in --export")
    add_common_analysis(p)
    p.set_defaults(func=cmd_represent)

    p = sub.add_parser(
        "classify", help="predict every crop's class from annotated ones (logistic regression)"
    )
    p.add_argument("--project", type=Path, required=True)
    p.add_argument(
        "--annotations",
        type=Path,
        default=None,
        help="CSV of crop_index,class or image_path,label,class rows, added to the project's "
        "annotations (default: use the stored ones)",
    )
    p.add_argument("--column", default=CLASS, help="column for the predicted classes")
    add_common_analysis(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("interpolate", help="decode the latent path between two crops")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument("a", type=non_negative_int, help="first crop index")
    p.add_argument("b", type=non_negative_int, help="second crop index")
    p.add_argument("--steps", type=positive_int, default=INTERPOLATION_STEPS)
    p.add_argument("--out", type=Path, default=Path("interpolation.png"))
    add_common_analysis(p)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("search", help="the crops most similar to a crop index or an image file")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument("query", help="a crop index of the project, or a crop image file")
    p.add_argument("-k", type=positive_int, default=SEARCH_K)
    p.add_argument("--metric", choices=METRICS, default=METRICS[0])
    add_common_analysis(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in sample images")
    p.add_argument("--out", type=Path, default=Path("nucleae-demo"), help="output folder")
    add_ingest_options(p)
    add_model_options(p)
    add_report_options(p)
    p.set_defaults(crop_size=32)  # BBBC007 nuclei are 15–30 px across
    p.set_defaults(overwrite=True)  # a re-run replaces the demo's own model
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="write a report folder (figures + index.html) of a project")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="report folder (a previous report "
        "there is replaced; any other non-empty folder is refused)",
    )
    add_common_analysis(p)
    add_report_options(p)
    p.set_defaults(func=cmd_report)
    return parser


def options_reference() -> str:
    """Markdown tables of every sub-command's options, defaults and choices (for the docs)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# Command options",
        "",
        "Generated from the `nucleae` parser by `scripts/cli_reference.py`: the defaults and",
        "choices below are the ones the command uses. `nucleae COMMAND --help` shows the same.",
    ]
    for name, sub in commands.choices.items():
        lines += ["", f"## `nucleae {name}`", "", sub.description or _help_of(commands, name), ""]
        lines += ["| option | default | choices | meaning |", "|---|---|---|---|"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            option = ", ".join(action.option_strings) or action.dest.upper()
            default = "" if action.default in (None, argparse.SUPPRESS) else action.default
            if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction):
                default = ""
            choices = " ".join(map(str, action.choices)) if action.choices else ""
            cells = [f"`{option}`", _cell(default), choices, _cell(action.help or "")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _help_of(commands: argparse._SubParsersAction, name: str) -> str:
    return next((a.help for a in commands._choices_actions if a.dest == name), "") or ""


def _cell(value: object) -> str:
    text = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    # every note core logs reaches the user once, as a "note:" / "warning:" line of its own
    logging.getLogger("napari_nucleae").addHandler(logging.NullHandler())
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (NucleaeError, FileExistsError, InterruptedError) as err:
        print(f"nucleae {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the environment: a full disk, no permission ...
        print(f"nucleae {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            f"nucleae {args.command}: error: out of memory; process less at a time "
            "(fewer --workers, smaller images or batches) or use a machine with more memory",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"nucleae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
