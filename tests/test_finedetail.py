"""FineDetail: deterministic generation, what each class draws, and that downscaling erases it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchgd import ConfigError
from patchgd.data.finedetail import (
    CLASSES,
    FineDetail,
    FineDetailConfig,
    generate_sample,
    texture,
    texture_residue,
)

SMALL = FineDetailConfig(canvas_size=256, objects=(3, 6), textured=(1, 3))


def test_images_are_deterministic_per_split_seed_and_index():
    a, b = FineDetail("train", 2, SMALL), FineDetail("train", 2, SMALL)
    assert torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], FineDetail("val", 2, SMALL)[5][0])
    assert not torch.equal(a[5][0], FineDetail("train", 2, SMALL, seed=1)[5][0])
    assert not torch.equal(a[5][0], a[6][0])


def test_labels_cycle_through_the_classes_and_images_are_in_range():
    data = FineDetail("test", 3, SMALL, channels=3)
    assert len(data) == 12 and data.labels == [i % 4 for i in range(12)]
    image, label = data[7]
    assert label == 3 and image.shape == (3, 256, 256) and image.dtype == torch.float32
    assert torch.equal(image[0], image[2]) and image.min() >= 0.0 and image.max() <= 1.0


@pytest.mark.parametrize("kind", CLASSES)
def test_every_texture_keeps_the_objects_mean_brightness(kind):
    pattern = texture(kind, 24)
    assert abs(float(pattern.sum())) < 1e-5
    assert (pattern == 0).all() == (kind == "plain")
    assert np.abs(pattern).max() <= 1.0


@pytest.mark.parametrize("label", range(4))
def test_each_class_draws_its_texture_on_non_overlapping_objects_at_even_places(label):
    config = FineDetailConfig(canvas_size=256, objects=(4, 6), textured=(1, 3), noise=0.0)
    for seed in range(5):
        sample = generate_sample(config, seed, label)
        kinds = [o.texture for o in sample.objects]
        assert 4 <= len(kinds) <= 6
        textured = [k for k in kinds if k != "plain"]
        assert set(textured) <= {CLASSES[label]}
        assert (len(textured) == 0) if label == 0 else (1 <= len(textured) <= 3)
        covered = np.zeros((256, 256), int)
        for o in sample.objects:
            assert o.top % 2 == 0 and o.left % 2 == 0 and o.size == 24
            box = (slice(o.top, o.top + 24), slice(o.left, o.left + 24))
            covered[box] += 1
            expected = config.brightness + config.contrast / 2 * texture(o.texture, 24)
            np.testing.assert_allclose(sample.image[box], expected, atol=1e-6)
        assert covered.max() == 1  # no two objects overlap
        np.testing.assert_allclose(sample.image[covered == 0], config.background)


def test_downscaling_by_an_even_factor_leaves_no_usable_trace_of_the_texture():
    """The property that makes the task detail-bound, on whole images: a noise-free image
    downscaled (antialiased bilinear, as downscaled GD does) equals, to within 0.5 % of the
    texture's amplitude, the same image with every texture removed."""
    config = FineDetailConfig(canvas_size=256, objects=(4, 6), noise=0.0)
    for label in (1, 2, 3):
        sample = generate_sample(config, 11, label)
        plain = sample.image.copy()
        for o in sample.objects:
            plain[o.top : o.top + o.size, o.left : o.left + o.size] = config.brightness
        both = torch.from_numpy(np.stack([sample.image, plain]))[:, None]
        full_gap = float((both[0] - both[1]).abs().max())
        assert full_gap == pytest.approx(config.contrast / 2, rel=0.05)
        for size in (128, 64):
            small = F.interpolate(both, (size, size), mode="bilinear", antialias=True)
            assert float((small[0] - small[1]).abs().max()) < 0.005 * config.contrast / 2
    assert texture_residue(config, 256) > 0.95
    assert texture_residue(config, 128) < 0.005 and texture_residue(config, 64) < 0.005


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"canvas_size": 255}, "canvas_size"),
        ({"object_size": 0}, "object_size"),
        ({"objects": (3, 2)}, "objects"),
        ({"objects": (2, 4), "textured": (3, 3)}, "textured"),
        ({"canvas_size": 64, "objects": (4, 8)}, "objects"),
        ({"contrast": 0.0}, "contrast"),
        ({"brightness": 0.9, "contrast": 0.4}, "contrast"),
        ({"noise": -0.1}, "noise"),
    ],
)
def test_bad_settings_fail_in_one_line_naming_the_option(change, name):
    with pytest.raises(ConfigError, match=f"FineDetailConfig.{name}="):
        FineDetailConfig(**change)


def test_bad_dataset_arguments_name_the_argument():
    with pytest.raises(ConfigError, match="split="):
        FineDetail("training", 2, SMALL)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="per_class"):
        FineDetail("train", 0, SMALL)
    with pytest.raises(IndexError):
        FineDetail("train", 1, SMALL)[4]
