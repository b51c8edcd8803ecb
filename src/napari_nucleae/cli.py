"""The ``nucleae`` command: the napari-nucleae pipeline, headless."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from .core.errors import NucleaeError
from .core.ingest import IngestParams, expand_inputs, ingest, summary_line
from .core.segment import METHODS, SegmentParams
from .core.store import CropParams, Project


class ProgressBar:
    """A ``progress(done, total, message)`` callback drawing a tqdm bar on stderr."""

    def __init__(self, description: str):
        self.bar = tqdm(desc=description, unit="step", file=sys.stderr, leave=True)

    def __call__(self, done: int, total: int, message: str) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(message[-60:], refresh=True)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------- ingest
def add_ingest_options(parser: argparse.ArgumentParser) -> None:
    """Segmentation and crop options shared by ``ingest`` and ``demo``."""
    seg = parser.add_argument_group("segmentation")
    seg.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="cellpose, the classical scikit-image pipeline, or auto (cellpose, "
        "falling back to classical with a notice when its weights are missing)",
    )
    seg.add_argument(
        "--model",
        default="default",
        help="cellpose model name (cpsam, nuclei, cyto3, ...) or a model file path",
    )
    seg.add_argument(
        "--diameter",
        type=float,
        default=None,
        help="nucleus diameter in pixels (default: automatic)",
    )
    seg.add_argument("--flow-threshold", type=float, default=0.4)
    seg.add_argument("--cellprob-threshold", type=float, default=0.0)
    seg.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run cellpose on the GPU (default: when one is available)",
    )
    seg.add_argument(
        "--channel", type=int, default=None, help="nuclear channel of RGB or multichannel images"
    )
    seg.add_argument(
        "--channel-axis",
        type=int,
        default=None,
        help="axis holding the channels (default: last axis of RGB-like images)",
    )
    crop = parser.add_argument_group("crops")
    crop.add_argument("--crop-size", type=int, default=64, help="crop side in pixels")
    crop.add_argument(
        "--no-mask",
        dest="mask",
        action="store_false",
        help="keep the background around each nucleus",
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
        choices=("image", "crop", "none"),
        default="image",
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
            mask_background=args.mask,
            skip_border=not args.keep_border,
            rescale_large=args.rescale,
            align=args.align,
            normalize=args.normalize,
        ),
        channel=args.channel,
        channel_axis=args.channel_axis,
    )


def run_ingest(paths: Sequence[Path], project_dir: Path, args: argparse.Namespace) -> Project:
    """Ingest ``paths`` into the project at ``project_dir`` and print a summary."""
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
    return project


def cmd_ingest(args: argparse.Namespace) -> int:
    paths = expand_inputs(args.images)
    if not paths:
        raise NucleaeError("no image files found in the given paths")
    run_ingest(paths, args.project, args)
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .sample import BBBC007_CITATION, bbbc007_paths

    out: Path = args.out
    print(f"napari-nucleae demo on the built-in sample ({BBBC007_CITATION})")
    run_ingest(bbbc007_paths(), out / "project", args)
    return 0


# ---------------------------------------------------------------------------- parser
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
    p.add_argument("--workers", type=int, default=None, help="local worker threads")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in sample images")
    p.add_argument("--out", type=Path, default=Path("nucleae-demo"), help="output folder")
    add_ingest_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (NucleaeError, FileExistsError, InterruptedError) as err:
        print(f"nucleae {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nucleae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
