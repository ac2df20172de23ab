"""Gigapixel slides on two cores: PatchGD trains on whole slides and predicts them, as they come.

Writes two slide-like pyramidal tiled TIFFs, tissue on about 30 % of each: 32 768 × 32 768 px
(1.07 gigapixels, zlib tiles) and 40 000 × 40 000 px (1.6 gigapixels, JPEG tiles), each with
its pyramid down to about 1 000 px, generated tile by tile so that writing holds one tile at a
time. Then, as a user would, each in a fresh process:

- ``patchgd fit --config configs/folder/patchgd_slides.yaml`` on a CSV of the two slides (one
  class each; the classes and the 40 000 px canvas come from the data), overriding only the
  backbone, a batch of one slide, the number of steps and no validation;
- ``patchgd predict`` with heatmaps on both slides, from the run's config and checkpoint.

A thread samples the memory of the process and of its reader workers
(:func:`patchgd.memory.process_tree_pss`) every 0.2 s. A callback times each step and reads
:data:`patchgd.data.source_patches.read_wait`: the share of a step spent waiting for patches
from disk (what the reader workers did not hide behind the encoder) and patches read per second.

    python benchmarks/gigapixel.py            # ~15 minutes on two cores
    python benchmarks/gigapixel.py --quick    # 2 048 and 2 500 px slides (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
from _report import (
    ROOT,
    add_common_options,
    markdown_table,
    output_page,
    run_lines,
    write_section,
)

SECTION, FIGURE = "gigapixel", "gigapixel_heatmap"
CONFIG = ROOT / "configs" / "folder" / "patchgd_slides.yaml"
CLOCK_ENV = "PATCHGD_BENCH_CLOCK"  # where the child's StepClock writes its JSON
TILE = 256


class StepClock(L.Callback):
    """In the child process: each training step's and each prediction's seconds, the reading
    waited for and the patches read in it; written as JSON when the stage ends."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = (0.0, 0.0, 0)

    def _begin(self) -> None:
        from patchgd.data.source_patches import read_wait

        self._start = (time.perf_counter(), read_wait.seconds, read_wait.patches)

    def _end(self, stage: str) -> None:
        from patchgd.data.source_patches import read_wait

        t0, wait0, patches0 = self._start
        self.rows.append(
            {
                "stage": stage,
                "seconds": time.perf_counter() - t0,
                "read_wait": read_wait.seconds - wait0,
                "patches": read_wait.patches - patches0,
            }
        )

    def _write(self) -> None:
        from patchgd.memory import lifetime_peak_rss

        out = {"rows": self.rows, "main_peak_rss": lifetime_peak_rss()}
        Path(os.environ[CLOCK_ENV]).write_text(json.dumps(out))

    def on_train_batch_start(self, *args: object) -> None:
        self._begin()

    def on_train_batch_end(self, *args: object) -> None:
        self._end("fit")

    def on_predict_batch_start(self, *args: object) -> None:
        self._begin()

    def on_predict_batch_end(self, *args: object) -> None:
        self._end("predict")

    def on_train_end(self, *args: object) -> None:
        self._write()

    def on_predict_end(self, *args: object) -> None:
        self._write()


def slide_tiles(size: int, level_size: int, seed: int) -> Iterator[np.ndarray]:
    """Tiles, row by row, of a ``level_size`` px level of a ``size`` px slide: white-grey
    background with faint noise and, on about 30 % of the area, stained "tissue" (pink and
    purple, textured) in three ellipses, placed in slide coordinates so that every level
    shows the same slide."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 24, (16, TILE, TILE, 1), dtype=np.int16)
    # Ellipses (centre y, centre x, radius y, radius x) in units of the slide's side.
    blobs = [(0.30, 0.30, 0.22, 0.16), (0.65, 0.62, 0.20, 0.25), (0.25, 0.78, 0.12, 0.10)]
    scale = size / level_size
    n = -(-level_size // TILE)
    ys, xs = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    for i in range(n):
        for j in range(n):
            y = (i * TILE + ys) * scale / size
            x = (j * TILE + xs) * scale / size
            inside = np.zeros((TILE, TILE), bool)
            for cy, cx, ry, rx in blobs:
                inside |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
            tile = np.full((TILE, TILE, 3), 236, np.int16) + noise[(i * n + j) % 16] // 8
            if inside.any():
                texture = noise[(i * 7 + j * 3) % 16]
                stain = np.array([200, 110, 170], np.int16) - texture * 3
                tile = np.where(inside[..., None], stain, tile)
            yield np.clip(tile, 0, 255).astype(np.uint8)


def write_slide(path: Path, size: int, compression: str, seed: int) -> None:
    """A pyramidal tiled TIFF: level 0 and SubIFDs halving down to about 1 000 px."""
    import tifffile

    levels = [size]
    while levels[-1] // 2 >= 1000:
        levels.append(levels[-1] // 2)
    options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, side in enumerate(levels):
            tif.write(
                slide_tiles(size, side, seed),
                shape=(side, side, 3),
                dtype=np.uint8,
                subifds=len(levels) - 1 if k == 0 else None,
                subfiletype=1 if k else 0,
                **options,
            )


def run_child(argv: list[str], clock: Path, log: Path) -> dict:
    """``patchgd <argv>`` in a fresh process with the StepClock; its peak memory, sampled."""
    env = {**os.environ, CLOCK_ENV: str(clock), "PYTHONPATH": str(Path(__file__).parent)}
    launch = "import sys; from patchgd.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", launch, *argv, "--trainer.callbacks+=gigapixel.StepClock"]
    from patchgd.memory import process_tree_pss

    peak = [0]
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        start = time.perf_counter()

        def sample() -> None:
            while child.poll() is None:
                peak[0] = max(peak[0], process_tree_pss(child.pid) or 0)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        sampler.join()
    if code != 0:
        sys.exit(
            f"patchgd {argv[0]} failed ({code}); its output: {log}\n" + log.read_text()[-3000:]
        )
    result = json.loads(clock.read_text())
    result.update(peak_pss=peak[0], wall=time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of fit")
    parser.add_argument("--backbone", default="mobilenetv3_small_050")
    parser.add_argument("--limit-gb", type=float, default=3.0, help="peak memory target")
    parser.add_argument("--keep", type=Path, help="write the slides and runs here, and keep them")
    args = parser.parse_args()
    page = output_page(args)
    sizes = (2048, 2500) if args.quick else (32768, 40000)
    steps = 2 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="patchgd-giga-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        slides = []
        for k, (size, compression) in enumerate(zip(sizes, ("zlib", "jpeg"), strict=True)):
            path = work / f"slide{k}.tif"
            start = time.perf_counter()
            write_slide(path, size, compression, seed=k)
            slides.append((path, size, compression, time.perf_counter() - start))
            print(
                f"wrote {path.name}: {size} px, {path.stat().st_size / 2**20:.0f} MiB", flush=True
            )
        csv = work / "slides.csv"
        lines = ["image_id,label,split", "slide0,0,train", "slide1,1,train"]
        for split in ("val", "test"):  # the same slides, by links; validation is off
            for k in range(2):
                (work / f"{split}{k}.tif").unlink(missing_ok=True)
                (work / f"{split}{k}.tif").symlink_to(f"slide{k}.tif")
                lines.append(f"{split}{k},{k},{split}")
        csv.write_text("\n".join(lines) + "\n")
        runs = work / "runs"
        shutil.rmtree(runs, ignore_errors=True)  # run folders are numbered from 0 again
        # fmt: off
        fit = run_child(
            [
                "fit",
                "--config", str(CONFIG),
                "--data.init_args.csv", str(csv),
                "--data.init_args.tissue_cache", str(work / "masks"),
                "--model.classifier.init_args.backbone", args.backbone,
                "--data.init_args.batch_size", "1",
                "--trainer.max_steps", str(steps),
                "--trainer.limit_val_batches", "0",
                "--trainer.num_sanity_val_steps", "0",
                "--trainer.accelerator", "cpu",
                "--model.warmup_epochs", "0",
                "--trainer.default_root_dir", str(runs),
            ],
            work / "fit.json",
            work / "fit.log",
        )
        # fmt: on
        run = runs / "lightning_logs" / "version_0"
        # fmt: off
        predict = run_child(
            [
                "predict",
                "--config", str(run / "config.yaml"),
                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                "--data", "patchgd.app.datamodules.PredictImagesDataModule",
                "--data.inputs", f"[{slides[0][0]}, {slides[1][0]}]",
                "--model.predict_heatmaps", "true",
                "--trainer.default_root_dir", str(runs),
            ],
            work / "predict.json",
            work / "predict.log",
        )
        # fmt: on
        out = runs / "lightning_logs" / "version_1"
        predicted = (out / "predictions.csv").read_text().strip().splitlines()[1:]
        heatmaps = sorted((out / "heatmaps").glob("*.png"))
        if page is not None:  # the larger slide's heatmap, beside the page
            copied = page.parent / f"{FIGURE}.png.tmp"
            shutil.copyfile(heatmaps[-1], copied)
            os.replace(copied, page.parent / f"{FIGURE}.png")
        files = {p.name: p.stat().st_size for p, *_ in slides}

    rows, within = [], True
    for name, result in (("fit", fit), ("predict", predict)):
        steps_run = result["rows"]
        seconds = [r["seconds"] for r in steps_run]
        waited = sum(r["read_wait"] for r in steps_run)
        patches = sum(r["patches"] for r in steps_run)
        within &= result["peak_pss"] < args.limit_gb * 1e9
        rows.append(
            (
                f"`patchgd {name}`",
                len(steps_run),
                f"{statistics.median(seconds):.1f}",
                f"{patches / sum(seconds):.0f}",
                f"{100 * waited / sum(seconds):.0f} %",
                f"{result['peak_pss'] / 1e9:.2f}",
                f"{result['main_peak_rss'] / 1e9:.2f}",
                f"{result['wall']:.0f}",
            )
        )
    slide_lines = [
        f"- `{path.name}`: {size:,} × {size:,} px ({size * size / 1e9:.2f} gigapixels), "
        f"{compression} tiles of {TILE} px, {files[path.name] / 2**30:.2f} GiB on disk, "
        f"written in {seconds:.0f} s"
        for path, size, compression, seconds in slides
    ]
    text = "\n\n".join(
        [
            run_lines(),
            "\n".join(slide_lines),
            f"`configs/folder/patchgd_slides.yaml` with `{args.backbone}`, a batch of one slide, "
            f"{steps} optimizer steps, no validation; then `predict` with heatmaps on both "
            f"slides ({len(predicted)} predicted, {len(heatmaps)} heatmaps written). A step is one "
            "slide's Z-fill over its tissue patches and the inner iterations; a prediction is "
            "one slide's fill and head. Reading: the share of the step's time spent waiting "
            "for patches from disk (what the reader workers did not hide). Memory: the peak of "
            "the process and its reader workers together (proportional set sizes, sampled every "
            "0.2 s), and the main process's own peak resident size.",
            markdown_table(
                (
                    "command",
                    "steps",
                    "s per step (median)",
                    "patches read per s",
                    "reading",
                    "peak GB, with workers",
                    "peak GB, main process",
                    "wall s",
                ),
                rows,
            ),
            f"Target: under {args.limit_gb:g} GB at peak: "
            + ("met by both commands." if within else "**missed**, see the table."),
            f"![attention of the trained head over the {sizes[1]:,} px slide's thumbnail]"
            f"({FIGURE}.png)",
        ]
    )
    if page is None:
        print(text)
    else:
        write_section(SECTION, text, page)
    if not within:
        sys.exit(1)


if __name__ == "__main__":
    main()
