"""Peak memory of reading every patch of a huge tiled TIFF through ``TiffSource``.

Writes a 20 000 x 20 000 RGB TIFF with 256-px zlib tiles (a cheap pattern plus noise, generated
tile by tile so writing stays small), then reads every 256 x 256 patch in grid order in a fresh
subprocess and reports that process's peak RSS (``ru_maxrss``) and time as a markdown line.

    python benchmarks/read_memory.py            # 20 000 px, the requirement: peak < 500 MB
    python benchmarks/read_memory.py --quick    # 4 096 px smoke run

The reader process imports only ``patchgd.data.sources`` (the package imports torch lazily);
``--with-torch`` also imports torch first, as a training process would: torch alone holds about
0.5 GB of RSS, so that figure measures torch plus the reader.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    # Not patchgd.memory.lifetime_peak_rss: importing that module imports torch, whose 0.5 GB
    # the torch-free reader process must not hold.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB else


def write_tiff(
    path: Path, size: int, tile: int, compression: str | None, level: int | None = None
) -> None:
    """size x size RGB: per-tile colour ramp plus 4 bits of noise, written tile by tile.

    ``compression`` is a tifffile name or ``None``; ``level`` its level (1: fastest zlib).
    """
    import tifffile

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 16, (8, tile, tile, 3), dtype=np.uint8)
    n = -(-size // tile)

    def tiles():
        for i in range(n):
            for j in range(n):
                yield noise[(i * n + j) % 8] + np.uint8((i * 13 + j * 7) % 240)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression=compression,
        compressionargs=None if level is None else {"level": level},
        bigtiff=True,
    )


def fill_all(path: str, patch: int, workers: int) -> dict:
    """Runs in the fresh process: fill Z for the whole image through the lazy patch provider."""
    import torch

    from patchgd import PatchGrid, fill_z
    from patchgd.data.lazy import LazyImage
    from patchgd.data.source_patches import SourcePatches
    from patchgd.data.sources import open_image

    with open_image(path) as source:
        size = source.size
    grid = PatchGrid(size, patch)
    encoder = torch.nn.Sequential(  # small, so the figure is about reading, not the model
        torch.nn.Conv2d(3, 16, 7, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 64),
    )
    provider = SourcePatches([LazyImage(path, 0, size, size)], grid, num_workers=workers)
    after_imports = _peak_rss_mb()
    start = time.perf_counter()
    z = fill_z(encoder, provider, grid, chunk=64)
    seconds = time.perf_counter() - start
    return {
        "patches": grid.num_patches,
        "z_shape": list(z.shape),
        "seconds": round(seconds, 2),
        "ms_per_patch": round(1000 * seconds / grid.num_patches, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_imports_mb": round(after_imports, 1),
    }


def read_all(path: str, patch: int, with_torch: bool) -> dict:
    """Runs in the fresh process: read every patch in grid order."""
    if with_torch:
        import torch  # noqa: F401
    from patchgd.data.sources import TiffSource

    after_imports = _peak_rss_mb()
    start = time.perf_counter()
    checksum = 0
    count = 0
    with TiffSource(path) as source:
        height, width = source.size
        for top in range(0, height, patch):
            for left in range(0, width, patch):
                region = source.read_region(top, left, patch, patch)
                checksum += int(region.sum(dtype=np.uint64))
                count += 1
    seconds = time.perf_counter() - start
    return {
        "patches": count,
        "seconds": round(seconds, 2),
        "ms_per_patch": round(1000 * seconds / count, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_imports_mb": round(after_imports, 1),
        "checksum": checksum,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4096 px instead of 20000 px")
    parser.add_argument("--size", type=int, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--compression", default="zlib", help="tifffile compression name")
    parser.add_argument("--limit-mb", type=float, default=500.0, help="fail above this peak")
    parser.add_argument("--with-torch", action="store_true", help="import torch in the reader")
    parser.add_argument(
        "--fill",
        type=int,
        metavar="WORKERS",
        help="fill Z through SourcePatches with this many DataLoader workers instead of reading",
    )
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    parser.add_argument("--read", metavar="PATH", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.read:
        if args.fill is not None:
            print(json.dumps(fill_all(args.read, args.patch, args.fill)))
        else:
            print(json.dumps(read_all(args.read, args.patch, args.with_torch)))
        return 0

    size = args.size or (4096 if args.quick else 20000)
    with tempfile.TemporaryDirectory(prefix="patchgd-bench-") as workdir:
        path = Path(workdir) / "big.tif"
        start = time.perf_counter()
        write_tiff(path, size, args.tile, args.compression)
        write_s, file_mb = time.perf_counter() - start, path.stat().st_size / 2**20
        command = [sys.executable, __file__, "--read", str(path), "--patch", str(args.patch)]
        child = subprocess.run(
            command
            + ["--with-torch"] * args.with_torch
            + ([] if args.fill is None else ["--fill", str(args.fill)]),
            capture_output=True,
            text=True,
            check=False,
        )
    if child.returncode != 0:
        print(child.stdout + child.stderr, file=sys.stderr)
        return child.returncode
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result.update(size=size, file_mb=round(file_mb, 1), write_seconds=round(write_s, 1))
    print(
        f"| {size}x{size} RGB, {args.tile}-px {args.compression} tiles ({file_mb:.0f} MB) "
        f"| {'Z-fill' if args.fill is not None else 'read'}: "
        f"{result['patches']} patches of {args.patch}x{args.patch} "
        f"| peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(after imports {result['rss_after_imports_mb']:.0f} MB) "
        f"| {result['seconds']:.1f} s ({result['ms_per_patch']:.2f} ms/patch) |"
    )
    if args.json:
        print(json.dumps(result))
    return 0 if result["peak_rss_mb"] < args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())
