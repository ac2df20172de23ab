"""Patch providers: in memory, a slow reference, and images read lazily from disk, all agree."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from images import damage_first_tile, write_pyramid
from patchgd import (
    ConfigError,
    HeadConfig,
    InnerLoopConfig,
    PatchGDClassifier,
    PatchGrid,
    TensorPatches,
    as_patches,
    fill_z,
)
from patchgd.data.lazy import LazyImage
from patchgd.data.source_patches import SourcePatches, image_patches, read_wait
from patchgd.errors import DataError
from reference import TinyEncoder, reference_patch


class SlicingPatches:
    """The obvious provider: one slice of the padded image per requested patch."""

    def __init__(self, images: torch.Tensor, grid: PatchGrid) -> None:
        self.images, self.grid = images, grid
        self.batch_size = images.shape[0]

    def gather(self, image_index, flat_index):
        return torch.stack(
            [
                reference_patch(self.images[b : b + 1], self.grid, *self.grid.position(f))[0]
                for b, f in zip(image_index.tolist(), flat_index.tolist(), strict=True)
            ]
        )

    def chunks(self, chunk, ids=None):
        n = self.grid.num_patches
        ids = torch.arange(self.batch_size * n) if ids is None else ids
        for part in ids.split(chunk):
            yield part, self.gather(part // n, part % n)

    def blank(self, image_index):
        p = self.grid.patch_size
        return torch.full((len(image_index), self.images.shape[1], p, p), self.grid.pad_value)


def test_tensor_patches_chunks_cover_every_patch_once_in_balanced_chunks():
    grid = PatchGrid((40, 56), 16, 12)
    images = torch.randn(3, 2, 40, 56)
    full = grid.extract(images)
    seen, sizes = [], []
    for ids, patches in TensorPatches(images, grid).chunks(7):
        sizes.append(len(ids))
        for i, patch in zip(ids.tolist(), patches, strict=True):
            b, (r, c) = i // grid.num_patches, grid.position(i % grid.num_patches)
            assert torch.equal(patch, full[b, r, c])
        seen += ids.tolist()
    assert sorted(seen) == list(range(3 * grid.num_patches))
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 7
    subset = torch.tensor([1, 2, 5, 8, 13, 21, 34])
    parts = list(TensorPatches(images, grid).chunks(3, subset))
    assert [len(ids) for ids, _ in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([ids for ids, _ in parts]), subset)
    for ids, patches in parts:
        for i, patch in zip(ids.tolist(), patches, strict=True):
            b, (r, c) = i // grid.num_patches, grid.position(i % grid.num_patches)
            assert torch.equal(patch, full[b, r, c])


def test_any_provider_fills_and_trains_like_the_in_memory_batch():
    torch.manual_seed(0)
    images, targets = torch.randn(2, 3, 70, 50, dtype=torch.float64), torch.tensor([0, 2])
    grid = PatchGrid((70, 50), 16, 16, pad_value=0.25)
    encoder = TinyEncoder().double()
    torch.testing.assert_close(
        fill_z(encoder, SlicingPatches(images, grid), grid, chunk=5),
        fill_z(encoder, images, grid, chunk=5),
    )

    def trained(source_of):
        torch.manual_seed(1)
        model = PatchGDClassifier(
            "test_efficientnet_gn",
            3,
            (70, 50),
            16,
            pad_value=0.25,
            latent_dim=8,
            head=HeadConfig(width=8, dropout=0.0),
            loop=InnerLoopConfig(patches_per_iteration=4, accumulation=2),
        ).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = model.training_step(source_of(model.grid), targets, opt).losses
        return losses, [p.detach().clone() for p in model.parameters()]

    reference_losses, reference_params = trained(lambda g: SlicingPatches(images, g))
    losses, params = trained(lambda g: images)
    assert losses == pytest.approx(reference_losses, rel=1e-12)
    for a, b in zip(params, reference_params, strict=True):
        torch.testing.assert_close(a, b)


def test_as_patches_refuses_other_inputs():
    with pytest.raises(ConfigError, match="expected a \\(B, C, H, W\\) tensor or a PatchProvider"):
        as_patches([torch.zeros(3, 8, 8)], PatchGrid(8, 4))


@pytest.fixture(scope="module")
def disk_images(tmp_path_factory):
    """A 3-level tiled TIFF (300×220) and a PNG (130×170), with their level-1 / full pixels."""
    folder = tmp_path_factory.mktemp("lazy")
    rng = np.random.default_rng(0)
    tiff = rng.integers(0, 256, (300, 220, 3), dtype=np.uint8)
    write_pyramid(folder / "slide.tif", tiff, n_levels=3, tile=64, photometric="rgb")
    png = rng.integers(0, 256, (130, 170, 3), dtype=np.uint8)
    Image.fromarray(png).save(folder / "small.png")
    level1 = tifffile.imread(folder / "slide.tif", level=1)
    return [(str(folder / "slide.tif"), 1, level1), (str(folder / "small.png"), 0, png)]


def _canvas_tensor(pixels, canvas, fill, mean, std):
    """The in-memory equivalent: image at the top-left of a fill-coloured canvas, normalised."""
    out = np.empty((*canvas, 3), dtype=np.uint8)
    out[:] = fill
    out[: pixels.shape[0], : pixels.shape[1]] = pixels
    x = torch.from_numpy(out).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_source_patches_equal_the_decoded_padded_normalised_images(disk_images, num_workers):
    canvas, fill = (160, 176), (255.0, 255.0, 255.0)  # patches of 48 overhang the canvas too
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    lazy = [
        LazyImage(path, level, pixels.shape[:2], canvas, fill)
        for path, level, pixels in disk_images
    ]
    grid = PatchGrid(
        canvas, 48, 40, pad_value=[(255 / 255 - m) / s for m, s in zip(mean, std, strict=True)]
    )
    images = torch.stack([_canvas_tensor(p, canvas, fill, mean, std) for _, _, p in disk_images])
    expected = TensorPatches(images, grid)
    source = SourcePatches(lazy, grid, mean=mean, std=std, num_workers=num_workers)
    waited, read = read_wait.seconds, read_wait.patches
    for (ids, got), (ref_ids, want) in zip(source.chunks(9), expected.chunks(9), strict=True):
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(got, want)
    subset = torch.tensor([0, 3, 4, 17, 30, 31])  # a fill that skips patches reads only these
    parts = list(source.chunks(4, subset))
    assert torch.equal(torch.cat([ids for ids, _ in parts]), subset)
    n = grid.num_patches
    for ids, got in parts:
        torch.testing.assert_close(got, expected.gather(ids // n, ids % n))
    pick_images, pick_positions = torch.tensor([1, 0, 1]), torch.tensor([0, 11, 19])
    torch.testing.assert_close(
        source.gather(pick_images, pick_positions), expected.gather(pick_images, pick_positions)
    )
    # Every patch read from disk, and the time spent waiting for them, is counted.
    assert read_wait.patches - read == len(lazy) * n + len(subset) + len(pick_images)
    assert read_wait.seconds > waited
    # A blank patch is the fill colour, normalised like any pixel: the grid's padding.
    torch.testing.assert_close(
        source.blank(torch.tensor([1, 0])), expected.blank(torch.tensor([1, 0]))
    )
    source.close()


def test_image_patches_are_those_of_each_images_own_grid_not_its_canvas():
    grid = PatchGrid((160, 176), 48, 40)
    images = [
        LazyImage("a", 0, (160, 176), (160, 176)),
        LazyImage("b", 0, (41, 120), (160, 176)),
        LazyImage("c", 0, (1, 1), (160, 176)),
    ]
    got = image_patches(images, grid)
    for b, image in enumerate(images):
        h, w = image.size
        alone = PatchGrid((max(h, 48), max(w, 48)), 48, 40)  # the image's grid on its own
        boxes = {alone.box(*alone.position(f)) for f in range(alone.num_patches)}
        covered = np.zeros((h, w), dtype=bool)
        for flat in range(grid.num_patches):
            box = grid.box(*grid.position(flat))  # the slow way: box by box
            assert bool(got[b, flat]) == (box in boxes), (b, flat)
            if got[b, flat]:
                top, left, bottom, right = box
                assert top < h and left < w  # never a patch of padding alone
                covered[top:bottom, left:right] = True
        assert covered.all()  # every pixel of the image is in one of its patches
    assert got[0].all() and got[2].sum() == 1
    # Row 1 (top 40) would overlap image b's last pixel row, which row 0 already holds.
    assert got[1].view(grid.shape).sum(dim=1).tolist() == [3, 0, 0, 0]


def test_training_on_lazy_images_equals_training_on_the_decoded_batch(disk_images):
    canvas, fill = (160, 176), (0.0, 0.0, 0.0)
    lazy = [
        LazyImage(path, level, pixels.shape[:2], canvas, fill)
        for path, level, pixels in disk_images
    ]
    images = torch.stack(
        [_canvas_tensor(p, canvas, fill, (0, 0, 0), (1, 1, 1)) for _, _, p in disk_images]
    )

    def trained(batch_of):
        torch.manual_seed(3)
        model = PatchGDClassifier(
            "test_resnet",
            4,
            canvas,
            48,
            stride=40,
            latent_dim=8,
            head=HeadConfig(width=8, dropout=0.2),  # dropout draws from the global RNG
            loop=InnerLoopConfig(patches_per_iteration=6),
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        result = model.training_step(batch_of(model.grid), torch.tensor([1, 3]), opt)
        return result.losses, model.state_dict()

    losses, state = trained(lambda grid: SourcePatches(lazy, grid, num_workers=2))
    reference_losses, reference_state = trained(lambda grid: images)
    assert losses == reference_losses  # same pixels, same layout, same arithmetic
    for key, value in reference_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key


def test_canvas_must_match_the_grid(disk_images):
    path, level, pixels = disk_images[1]
    with pytest.raises(ConfigError, match=r"small.png: canvas \(200, 200\) differs from the grid"):
        SourcePatches([LazyImage(path, level, pixels.shape[:2], (200, 200))], PatchGrid(160, 32))


def test_collate_lazy_keeps_images_as_a_list_and_stacks_labels(disk_images):
    from torch.utils.data import DataLoader

    from patchgd.data.source_patches import LazyBatch, collate_lazy

    items = [
        (LazyImage(p, level, px.shape[:2], (400, 400)), label)
        for (p, level, px), label in zip(disk_images, [2, 0], strict=True)
    ]
    batch = next(iter(DataLoader(items, batch_size=2, collate_fn=collate_lazy)))
    assert isinstance(batch, LazyBatch)  # what the Lightning task recognises lazy batches by
    images, labels = batch
    assert images == [item for item, _ in items]
    assert labels.tolist() == [2, 0] and labels.dtype == torch.long


def test_the_readme_loop_trains_on_lazy_slides_with_tissue_candidates(tmp_path):
    """read_table → lazy dataset → DataLoader → SourcePatches + tissue candidates → a step."""
    import csv as csv_module

    from torch.utils.data import DataLoader

    from images import smooth_rgb
    from patchgd.data.dataset import LargeImageDataset
    from patchgd.data.source_patches import collate_lazy
    from patchgd.data.table import read_table
    from patchgd.data.tissue import TissueMasks

    rows = []
    for i, (h, w) in enumerate([(300, 260), (200, 330), (260, 200)]):
        slide = np.full((h, w, 3), 235, np.uint8)  # glass
        slide[h // 4 : h // 2, w // 3 : w // 2] = smooth_rgb(h // 2 - h // 4, w // 2 - w // 3)
        slide[h // 4 : h // 2, w // 3 : w // 2, 1] //= 3  # stained: saturated
        write_pyramid(tmp_path / f"s{i}.tif", slide, n_levels=2, tile=64, photometric="rgb")
        rows.append({"image_id": f"s{i}", "label": i % 2})
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        writer = csv_module.DictWriter(fh, ["image_id", "label"])
        writer.writeheader()
        writer.writerows(rows)

    table = read_table(tmp_path / "train.csv", tmp_path, num_classes=2)
    data = LargeImageDataset(table, mode="lazy", level=0, fill=(255, 255, 255), canvas_multiple=32)
    assert data.canvas == (320, 352)
    model = PatchGDClassifier(
        "test_resnet",
        2,
        data.canvas,
        32,
        latent_dim=8,
        head=HeadConfig(width=8),
        loop=InnerLoopConfig(patches_per_iteration=4),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    masks = TissueMasks(cache_dir=tmp_path / "masks", max_side=128)
    loader = DataLoader(data, batch_size=3, collate_fn=collate_lazy)
    for images, targets in loader:
        candidates = masks.candidates_batch(images, model.grid)
        assert 0 < int(candidates.sum()) < candidates.numel()  # tissue only, not the glass
        patches = SourcePatches(images, model.grid, num_workers=2)
        result = model.training_step(patches, targets, optimizer, candidates=candidates)
        visited = torch.zeros_like(candidates)
        for step in result.plan:
            for b in range(3):
                visited[b, step[b][step[b] >= 0]] = True
        assert torch.equal(visited, candidates)  # every tissue patch, nothing else
        assert all(np.isfinite(result.losses))


SIZES = [(96, 160), (64, 64), (150, 100), (40, 200)]  # (height, width), patch 32
CANVAS = (160, 224)


@pytest.fixture(scope="module")
def sized_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


@pytest.mark.parametrize("pool", ["avg", "attention"])
@pytest.mark.parametrize("tissue", [False, True])
def test_a_batch_of_images_of_different_sizes_scores_each_as_alone_on_its_own_grid(
    sized_images, pool, tissue
):
    """Images of four sizes padded to one canvas: each gets, to 1e-6, the logits and the
    evidence it gets alone on its own grid (the canvas's padding is never encoded nor read)."""
    torch.manual_seed(0)
    head = HeadConfig(width=8, stride1_layers=1, stride2_layers=2, pool=pool)
    model = PatchGDClassifier("test_resnet", 3, CANVAS, 32, latent_dim=8, head=head, fill_chunk=5)
    for module in model.modules():  # running statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2)
    fill = (255.0, 255.0, 255.0)
    lazy = [LazyImage(p, 0, s, CANVAS, fill) for p, s in zip(sized_images, SIZES, strict=True)]
    grid = model.grid
    candidates = image_patches(lazy, grid)
    if tissue:  # about half of each image's patches, as a tissue mask would leave
        candidates &= torch.rand(candidates.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        candidates[:, 0] = True
    provider = SourcePatches(lazy, grid)
    assert provider.extents().tolist() == [[3, 5], [2, 2], [5, 4], [2, 7]]
    logits = model(provider, candidates=candidates)
    probs, heatmap = model.predict_with_map(provider, candidates=candidates)
    for i, (path, size) in enumerate(zip(sized_images, SIZES, strict=True)):
        own = PatchGrid(size, 32)
        alone = PatchGDClassifier("test_resnet", 3, size, 32, latent_dim=8, head=head, fill_chunk=3)
        alone.load_state_dict(model.state_dict())
        rows, cols = own.shape
        mine = candidates[i].view(grid.shape)[:rows, :cols].reshape(1, -1)
        one = SourcePatches([LazyImage(path, 0, size, size, fill)], own)
        assert one.extents() is None
        torch.testing.assert_close(
            logits[i : i + 1], alone(one, candidates=mine), atol=1e-6, rtol=0
        )
        one_probs, one_map = alone.predict_with_map(one, candidates=mine)
        torch.testing.assert_close(probs[i : i + 1], one_probs, atol=1e-6, rtol=0)
        torch.testing.assert_close(heatmap[i, :rows, :cols], one_map[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_corrupt_tile_read_in_a_worker_is_one_line_naming_the_file(tmp_path, num_workers):
    whole = write_pyramid(tmp_path / "whole.tif", np.full((128, 128, 3), 200, np.uint8), 1, 64)
    path = damage_first_tile(whole, tmp_path / "slide.tif")
    grid = PatchGrid(128, 64)
    source = SourcePatches([LazyImage(str(path), 0, (128, 128), (128, 128))], grid,
                           num_workers=num_workers)  # fmt: skip
    with pytest.raises(DataError) as caught:
        list(source.chunks(4))
    assert str(caught.value).startswith(f"cannot decode {path} (level 0")
    assert "\n" not in str(caught.value)


def test_random_patches_serve_every_position_once_per_fill_in_the_grids_shape():
    """The planner's stand-in for a lazily read batch is a full ``PatchProvider``."""
    from patchgd.patches import PatchProvider, RandomPatches

    grid = PatchGrid((40, 24), 8)  # 5 × 3 positions
    provider = RandomPatches(2, grid, 3, torch.device("cpu"))
    assert isinstance(provider, PatchProvider) and provider.batch_size == 2
    seen = []
    for ids, patches in provider.chunks(4):
        assert patches.shape == (len(ids), 3, 8, 8)
        seen += ids.tolist()
    assert sorted(seen) == list(range(2 * 15))
    picked = provider.gather(torch.tensor([0, 1, 1]), torch.tensor([3, 0, 14]))
    assert picked.shape == (3, 3, 8, 8)
    assert provider.blank(torch.tensor([0, 1])).shape == (2, 3, 8, 8)
